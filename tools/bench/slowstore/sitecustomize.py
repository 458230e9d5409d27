"""Slow-store scenario: add latency to every filesystem store delete.

Put this directory first on ``PYTHONPATH`` of *both* tools (glance-scrubber
and scrub-listener) and Python imports it at start-up.  It waits until
``glance_store._drivers.filesystem`` is imported (by either tool, however
late) and wraps ``Store.delete`` so that each call first sleeps

    BENCH_STORE_DELETE_DELAY + BENCH_STORE_DELETE_DELAY_PER_MIB * size_MiB

seconds (environment variables, floats, default 0), then deletes as usual.
``time.sleep`` releases the GIL, like waiting on a remote object store
(Swift, Ceph RGW, RBD) does, so the scenario shows what parallel deletes
(``scrub_pool_size``) buy when the store, not the CPU, is the bottleneck.
Both tools delete through this same method, so the handicap is equal.
"""

import functools
import importlib.abc
import os
import sys
import time

TARGET = 'glance_store._drivers.filesystem'
FIXED = float(os.environ.get('BENCH_STORE_DELETE_DELAY', '0') or 0)
PER_MIB = float(os.environ.get('BENCH_STORE_DELETE_DELAY_PER_MIB', '0') or 0)


def _size_mib(location):
    try:
        return os.path.getsize(location.store_location.path) / 1048576.0
    except (AttributeError, OSError):
        return 0.0


def _patch(module):
    original = module.Store.delete

    @functools.wraps(original)
    def delete(self, location, *args, **kwargs):
        delay = FIXED + (PER_MIB * _size_mib(location) if PER_MIB else 0)
        if delay > 0:
            time.sleep(delay)
        return original(self, location, *args, **kwargs)

    module.Store.delete = delete


class _Loader(importlib.abc.Loader):
    def __init__(self, wrapped):
        self._wrapped = wrapped

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module):
        self._wrapped.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            import importlib.util

            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if FIXED > 0 or PER_MIB > 0:
    sys.meta_path.insert(0, _Finder())
