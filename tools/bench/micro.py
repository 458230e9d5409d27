"""Micro-benchmark of the store-delete path, in-process.

``python -m tools.bench micro`` times, per location, each layer a
``--sweep-once`` goes through to delete one file from a file store, on
freshly written files (synced first):

* ``os.unlink`` alone: the bare work;
* ``Stores.resolve``: scrub-listener's safety check (scheme/backend, path
  inside the store: two ``os.path.realpath`` calls);
* ``glance_store.delete``: glance_store's multi-store delete (location
  parsing, driver lookup, capability check, unlink);
* ``Stores.delete``: both, as the scrubber calls it;
* the same through a futurist ``ThreadPoolExecutor`` of ``--pool``
  threads, as ``scrub_pool_size`` does, and plain unlinks through it;
* ``ThreadPoolExecutor.shutdown(wait=True)`` of that pool.

It uses the global oslo.config ``CONF`` (glance_store needs it), so it
runs in its own process, never inside the tests.
"""

import os
import shutil
import tempfile
import time

from tools.bench import workload


def _write(directory, count, payload):
    paths = []
    for i in range(count):
        path = os.path.join(directory, f'f{i:07d}')
        with open(path, 'wb') as f:
            f.write(payload)
        paths.append(path)
    os.sync()
    return paths


def run(count=3000, size=65536, pool=8):
    """Return [(what, microseconds per location or seconds)]."""
    import futurist
    import glance_store
    from futurist import waiters
    from oslo_config import cfg

    from scrub_listener import glance_db
    from scrub_listener import opts
    from scrub_listener import store
    from tools import harness

    workdir = tempfile.mkdtemp(prefix=harness.NAME_PREFIX + 'micro_')
    try:
        images = os.path.join(workdir, 'images')
        os.makedirs(images)
        config = os.path.join(workdir, 'micro.conf')
        harness.write_config(
            config,
            {
                'DEFAULT': {'enabled_backends': {workload.STORE: 'file'}},
                'glance_store': {'default_backend': workload.STORE},
                workload.STORE: {'filesystem_store_datadir': images},
                'os_glance_staging_store': {
                    'filesystem_store_datadir': os.path.join(workdir, 's')
                },
                'os_glance_tasks_store': {
                    'filesystem_store_datadir': os.path.join(workdir, 't')
                },
            },
        )
        conf = cfg.CONF
        opts.register_opts(conf)
        conf(['--config-file', config], project='scrub-listener-bench')
        store.register_opts(conf)
        stores = store.Stores(conf)
        payload = os.urandom(size)

        def locations():
            return [
                glance_db.Location(
                    i, 'bench', 'file://' + path, workload.STORE, size
                )
                for i, path in enumerate(_write(images, count, payload))
            ]

        def per_location(func, items):
            started = time.perf_counter()
            func(items)
            return (time.perf_counter() - started) / len(items) * 1e6

        results = []
        locs = locations()
        results.append(
            (
                'os.unlink',
                per_location(
                    lambda ls: [os.unlink(loc.uri[7:]) for loc in ls], locs
                ),
            )
        )
        locs = locations()
        results.append(
            (
                'Stores.resolve (safety check only)',
                per_location(lambda ls: [stores.resolve(x) for x in ls], locs),
            )
        )
        for loc in locs:
            os.unlink(loc.uri[7:])
        locs = locations()
        results.append(
            (
                'glance_store.delete',
                per_location(
                    lambda ls: [
                        glance_store.delete(x.uri, workload.STORE) for x in ls
                    ],
                    locs,
                ),
            )
        )
        locs = locations()
        results.append(
            (
                'Stores.delete (resolve + glance_store.delete)',
                per_location(lambda ls: [stores.delete(x) for x in ls], locs),
            )
        )
        executor = futurist.ThreadPoolExecutor(max_workers=pool)

        def in_pool(func):
            def call(items):
                waiters.wait_for_all([executor.submit(func, x) for x in items])

            return call

        locs = locations()
        results.append(
            (
                f'Stores.delete in a pool of {pool}',
                per_location(in_pool(stores.delete), locs),
            )
        )
        locs = locations()
        results.append(
            (
                f'os.unlink in a pool of {pool}',
                per_location(in_pool(lambda x: os.unlink(x.uri[7:])), locs),
            )
        )
        started = time.perf_counter()
        executor.shutdown(wait=True)
        results.append(
            ('pool shutdown(wait=True), s', time.perf_counter() - started)
        )
        return results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def lines(results, count, size, pool):
    out = [
        f'Store-delete path, {count} files of {size} bytes, '
        f'futurist pool of {pool} threads, {os.cpu_count()} CPUs:'
    ]
    for what, value in results:
        if what.endswith(', s'):
            out.append(f'  {value:9.3f} s    {what[:-3]}')
        else:
            out.append(f'  {value:9.1f} us   per location: {what}')
    return out
