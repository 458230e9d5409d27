"""Import hooks for the processes of the tests and benchmarks.

This one module holds every hook that slows down, observes or breaks a
library inside a *child* process (``scrub-listener``, ``--sweep-once``,
``scrub-listener-manage``, ``glance-scrubber``).  The product code is not
changed: each hook wraps a method of its target module when that module
is first imported, however late, through one ``sys.meta_path`` finder.

Use it through :func:`tools.hooks.hook_env`, which puts this directory
first on ``PYTHONPATH`` (Python then imports ``sitecustomize`` at start-up)
and sets the variables::

    env = hook_env(SL_TEST_DELETE_LOG=path, SL_TEST_DELETE_DELAY=0.2)
    subprocess.Popen([...], env=dict(os.environ, **env))

Each hook is off unless its variable is set (non-empty); with none set
this module installs nothing and imports nothing but the standard
library.  It never imports the repository (its children may run from
another directory, against another checkout of the product).

Variables, by target:

``glance_store._drivers.filesystem`` (``Store.delete``), outermost first:

``SL_TEST_GATE``
    ``host:port`` of a :class:`tools.hooks.Gate`: the first delete (or the
    first ``GlanceDB.restore``) of the process connects, sends its pid and
    blocks until the gate releases everyone at once.
``SL_TEST_DELETE_LOG`` / ``SL_TEST_DELETE_DELAY``
    Append ``<pid> <event> <time> <path>`` per delete to the log: ``call``
    when it begins, then ``ok``, ``notfound`` or ``error``; sleep the delay
    (seconds) after the ``call`` line.  Read with
    :class:`tools.hooks.DeleteLog`.
``BENCH_STORE_DELETE_DELAY`` / ``BENCH_STORE_DELETE_DELAY_PER_MIB``
    Sleep ``DELAY + PER_MIB * size in MiB`` seconds before each delete: a
    slow (remote) store.  ``time.sleep`` releases the GIL, as waiting on
    Swift or Ceph does.
``BENCH_GONE_LOG``
    Append ``<time> <path>`` when a delete returned (the data is gone).
    Read with :func:`tools.hooks.read_gone_log`.
``SL_TEST_STORE_SECRET``
    ``Store.delete`` and ``Store.get_size`` of files named ``badstore-*``
    raise ``BadStoreUri`` quoting a Swift URL with this secret, as store
    drivers quote URLs in their errors.

``scrub_listener.sweep`` (``Sweeper.sweep``):

``SL_TEST_SWEEP_LOG`` / ``SL_TEST_SWEEP_DELAY``
    Append ``<pid> start <time>`` and ``<pid> end <time>`` around each
    sweep; sleep the delay inside it.  Read with
    :class:`tools.hooks.SweepLog`.

``scrub_listener.glance_db`` (``GlanceDB.restore``; a module or a
package):

``SL_TEST_GATE``
    As above: the first restore of the process waits at the gate.

``oslo_messaging._drivers.amqpdriver``:

``SL_TEST_OSLO_USE_CACHE``
    ``NotificationAMQPListener.use_cache = True``: an oslo.messaging of
    another shape (one that caches notification ids on receipt).
"""

import functools
import importlib.abc
import importlib.util
import os
import socket
import sys
import threading
import time

#: Every variable a hook reads, and what it does (for hook_env's check).
VARIABLES = {
    'SL_TEST_GATE': 'host:port; first delete/restore waits there',
    'SL_TEST_DELETE_LOG': 'file: "<pid> <event> <time> <path>" per delete',
    'SL_TEST_DELETE_DELAY': 'seconds slept in each delete',
    'BENCH_STORE_DELETE_DELAY': 'seconds slept before each delete',
    'BENCH_STORE_DELETE_DELAY_PER_MIB': 'seconds per MiB, each delete',
    'BENCH_GONE_LOG': 'file: "<time> <path>" per delete that returned',
    'SL_TEST_STORE_SECRET': 'badstore-* files fail quoting this secret',
    'SL_TEST_SWEEP_LOG': 'file: "<pid> start|end <time>" per sweep',
    'SL_TEST_SWEEP_DELAY': 'seconds slept in each sweep',
    'SL_TEST_OSLO_USE_CACHE': 'NotificationAMQPListener.use_cache = True',
}

FILESYSTEM = 'glance_store._drivers.filesystem'
SWEEP = 'scrub_listener.sweep'
GLANCE_DB = 'scrub_listener.glance_db'
AMQPDRIVER = 'oslo_messaging._drivers.amqpdriver'


def _number(env, name):
    return float(env.get(name) or 0)


def _append(path, text):
    """One line, one write(2) on an O_APPEND fd: lines of several
    processes and threads never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + '\n').encode())
    finally:
        os.close(fd)


def _location_path(location):
    return getattr(location.store_location, 'path', '?')


class _GateClient:
    """The process's side of the cross-process gate (first call only)."""

    def __init__(self, address):
        self.address = address
        self._lock = threading.Lock()
        self._passed = False

    def wait(self):
        # the other pool threads queue on the lock until the gate opens
        with self._lock:
            if self._passed:
                return
            host, port = self.address.rsplit(':', 1)
            with socket.create_connection((host, int(port)), 60) as s:
                s.sendall(b'%d\n' % os.getpid())
                s.settimeout(120)
                s.recv(1)
            self._passed = True


# ------------------------------------------------- Store.delete wrappers
# Each takes the method it wraps and returns the wrapper; install() applies
# them innermost first.


def _failing_on_badstore(secret):
    def wrap(original):
        @functools.wraps(original)
        def call(self, location, *args, **kwargs):
            name = os.path.basename(_location_path(location))
            if name.startswith('badstore-'):
                from glance_store import exceptions

                raise exceptions.BadStoreUri(
                    uri=f'swift+https://svc:{secret}@keystone.example.com'
                    f'/v3/c/{name}'
                )
            return original(self, location, *args, **kwargs)

        return call

    return wrap


def _logging_gone(log):
    def wrap(original):
        @functools.wraps(original)
        def delete(self, location, *args, **kwargs):
            result = original(self, location, *args, **kwargs)
            _append(log, f'{time.time():.6f} {_location_path(location)}')
            return result

        return delete

    return wrap


def _size_mib(location):
    try:
        return os.path.getsize(location.store_location.path) / 1048576.0
    except (AttributeError, OSError):
        return 0.0


def _slowed(fixed, per_mib):
    def wrap(original):
        @functools.wraps(original)
        def delete(self, location, *args, **kwargs):
            delay = fixed + (per_mib * _size_mib(location) if per_mib else 0)
            if delay > 0:
                time.sleep(delay)
            return original(self, location, *args, **kwargs)

        return delete

    return wrap


def _logging_deletes(log, delay):
    def wrap(original):
        @functools.wraps(original)
        def delete(self, location, *args, **kwargs):
            path = _location_path(location)
            pid = os.getpid()
            if log:
                _append(log, f'{pid} call {time.time():.6f} {path}')
            event = 'ok'
            try:
                if delay:
                    time.sleep(delay)
                return original(self, location, *args, **kwargs)
            except Exception as exc:
                missing = 'NotFound' in type(exc).__name__
                event = 'notfound' if missing else 'error'
                raise
            finally:
                if log:
                    _append(log, f'{pid} {event} {time.time():.6f} {path}')

        return delete

    return wrap


def _gated(gate):
    def wrap(original):
        @functools.wraps(original)
        def call(self, *args, **kwargs):
            gate.wait()
            return original(self, *args, **kwargs)

        return call

    return wrap


def _sweep_logged(log, delay):
    def wrap(original):
        @functools.wraps(original)
        def sweep(self, *args, **kwargs):
            pid = os.getpid()
            if log:
                _append(log, f'{pid} start {time.time():.6f}')
            try:
                if delay:
                    time.sleep(delay)
                return original(self, *args, **kwargs)
            finally:
                if log:
                    _append(log, f'{pid} end {time.time():.6f}')

        return sweep

    return wrap


# ------------------------------------------------------- what to patch


def patches(env):
    """{module name: [patch(module)]} for the hooks ``env`` switches on."""
    found = {}

    def wrap_method(module_name, cls, method, wrapper):
        def patch(module):
            klass = getattr(module, cls)
            setattr(klass, method, wrapper(getattr(klass, method)))

        found.setdefault(module_name, []).append(patch)

    gate = (
        _GateClient(env['SL_TEST_GATE']) if env.get('SL_TEST_GATE') else None
    )
    secret = env.get('SL_TEST_STORE_SECRET')
    if secret:
        for method in ('delete', 'get_size'):
            wrap_method(
                FILESYSTEM, 'Store', method, _failing_on_badstore(secret)
            )
    if env.get('BENCH_GONE_LOG'):
        wrap_method(
            FILESYSTEM, 'Store', 'delete', _logging_gone(env['BENCH_GONE_LOG'])
        )
    fixed = _number(env, 'BENCH_STORE_DELETE_DELAY')
    per_mib = _number(env, 'BENCH_STORE_DELETE_DELAY_PER_MIB')
    if fixed > 0 or per_mib > 0:
        wrap_method(FILESYSTEM, 'Store', 'delete', _slowed(fixed, per_mib))
    log = env.get('SL_TEST_DELETE_LOG')
    delay = _number(env, 'SL_TEST_DELETE_DELAY')
    if log or delay:
        wrap_method(
            FILESYSTEM, 'Store', 'delete', _logging_deletes(log, delay)
        )
    if gate is not None:
        wrap_method(FILESYSTEM, 'Store', 'delete', _gated(gate))
        wrap_method(GLANCE_DB, 'GlanceDB', 'restore', _gated(gate))
    log = env.get('SL_TEST_SWEEP_LOG')
    delay = _number(env, 'SL_TEST_SWEEP_DELAY')
    if log or delay:
        wrap_method(SWEEP, 'Sweeper', 'sweep', _sweep_logged(log, delay))
    if env.get('SL_TEST_OSLO_USE_CACHE'):

        def use_cache(module):
            module.NotificationAMQPListener.use_cache = True

        found.setdefault(AMQPDRIVER, []).append(use_cache)
    return found


# ------------------------------------------------ the import machinery


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then the patches, on the new module."""

    def __init__(self, wrapped, patch_list):
        self._wrapped = wrapped
        self._patches = patch_list

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module):
        self._wrapped.exec_module(module)
        for patch in self._patches:
            patch(module)

    def __getattr__(self, name):
        # get_resource_reader, is_package, ...: the real loader's
        return getattr(self._wrapped, name)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    """Finds a target module with the other finders, wraps its loader."""

    def __init__(self, targets):
        self._targets = targets

    def find_spec(self, name, path, target=None):
        if name not in self._targets:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, self._targets[name])
        return spec


def install(env):
    """Install the hooks ``env`` switches on; return the target names.

    A target imported already is patched at once; the others when first
    imported.
    """
    targets = patches(env)
    names = sorted(targets)
    for name in [n for n in targets if n in sys.modules]:
        for patch in targets.pop(name):
            patch(sys.modules[name])
    if targets:
        sys.meta_path.insert(0, _PatchingFinder(targets))
    return names


# Imported as the site hook of a child process (not as tools.hooks.*,
# which only reads VARIABLES): install what its environment asks for.
if __name__ == 'sitecustomize':
    install(os.environ)
