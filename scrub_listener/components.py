"""Build scrub-listener's collaborators from the configuration, once.

The databases are always needed and built at once.  The stores (loading
glance_store imports every store driver: about 0.3 s) and the scrub
pipeline (futurist) are built on first use: a ``--sweep-once`` that
finds nothing due, or a ``list``, never pays for them.  The service and
restore build them at start, so that a bad store configuration stops
them there.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from scrub_listener import db
from scrub_listener import exceptions
from scrub_listener import glance_db
from scrub_listener import holders
from scrub_listener import model
from scrub_listener import queue
from scrub_listener import restore
from scrub_listener import sweep


@dataclasses.dataclass
class Components:
    """Everything a command needs, built once from the configuration."""

    conf: object
    glance_db: glance_db.GlanceDB
    queue: queue.DueQueue
    schedule: model.Schedule
    sweeper: sweep.Sweeper
    process: holders.Process
    executor: object = None

    @functools.cached_property
    def stores(self):
        """The configured glance_store backends (scrub_listener.store)."""
        from scrub_listener import store

        store.register_opts(self.conf)
        return store.Stores(self.conf)

    @functools.cached_property
    def scrubber(self):
        """The scrub pipeline, with its store pool."""
        from scrub_listener import pool
        from scrub_listener import scrubber

        stores = self.stores
        self.release_dead_leases()
        self.executor = pool.StorePool(max_workers=self.conf.scrub_pool_size)
        return scrubber.Scrubber(
            self.glance_db,
            stores,
            self.executor,
            self.conf.scrubber.lease_time,
            queue=self.queue,
            owner=self.process.lease_owner,
            batch_size=self.conf.scrub_queue.batch_size,
            schedule=self.schedule,
        )

    @functools.cached_property
    def restorer(self):
        """Restores images, checking their data in the stores."""
        return restore.Restorer(
            self.glance_db,
            self.stores,
            self.queue,
            self.conf.scrubber.deletion_window,
            # a third of the RPC timeout: the store check and the reply
            # must fit in what is left
            lock_timeout=self.conf.rpc.timeout / 3,
        )

    def release_dead_leases(self):
        """A restart after SIGKILL: our dead predecessor's leases are free."""
        self.queue.release_dead_leases(self.process.lease_owner_is_dead)

    def close(self):
        """Release pools and connections; idempotent.

        The pool is not waited for: after a finished drain it is idle,
        and after a shutdown that timed out, the deletes still running are
        abandoned on purpose (their claims are taken over later).
        """
        if self.executor is not None:
            self.executor.shutdown(wait=False)
            self.executor = None
        self.glance_db.engine.dispose()
        self.queue.engine.dispose()


def build(conf, with_stores=True):
    """Validate the configuration and build the parts.

    ``with_stores``: build the stores now (else on first use).
    """
    _check_encryption_key(conf)
    process = holders.this_process(conf.host)
    gdb = glance_db.GlanceDB(
        _glance_engine(conf),
        encryption_key=conf.metadata_encryption_key,
        lease_time=conf.scrubber.lease_time,
        data_key=_data_key,
        process=process,
    )
    due_queue = queue.DueQueue(
        _queue_engine(conf),
        lease_time=conf.scrubber.lease_time,
        retry_backoff=conf.scrub_queue.retry_backoff,
        retry_backoff_max=conf.scrub_queue.retry_backoff_max,
    )
    schedule = model.Schedule(conf.scrub_time)
    sweeper = sweep.Sweeper(
        gdb, due_queue, schedule, conf.scrub_queue.batch_size
    )
    parts = Components(conf, gdb, due_queue, schedule, sweeper, process)
    if with_stores:
        parts.stores  # noqa: B018 (built now: a bad store config stops us)
    return parts


def _data_key(uri):
    """:func:`scrub_listener.store.data_key`, imported on first use."""
    from scrub_listener import store

    return store.data_key(uri)


def _check_encryption_key(conf):
    key = conf.metadata_encryption_key
    if key and len(key.encode('utf-8')) not in (16, 24, 32):
        raise exceptions.ConfigError(
            '[DEFAULT] metadata_encryption_key must be 16, 24 or 32 bytes '
            f'long (AES), it is {len(key.encode("utf-8"))}'
        )


def _glance_engine(conf):
    url = conf.database.connection
    if not url:
        raise exceptions.ConfigError(
            '[database] connection is not set: it must point at the Glance '
            'database (the value from glance-api.conf)'
        )
    engine = db.create_engine(url, '[database] connection')
    with db.translate_errors('Glance database', url):
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table('images'):
                raise exceptions.ConfigError(
                    '[database] connection has no Glance "images" table; '
                    'is it the Glance database (glance-manage db_sync)?'
                )
    return engine


def _queue_engine(conf):
    url = conf.scrub_queue.connection
    engine = db.create_engine(url, '[scrub_queue] connection')
    if engine.dialect.name == 'sqlite' and engine.url.database:
        directory = os.path.dirname(os.path.abspath(engine.url.database))
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise exceptions.ConfigError(
                f'[scrub_queue] connection: cannot create {directory}: {exc}'
            ) from exc
    with db.translate_errors('due-queue database', url):
        try:
            queue.DueQueue(engine).create_schema()
        except sa_exc.OperationalError as exc:
            if db.is_sqlite(engine):
                raise exceptions.ConfigError(
                    f'[scrub_queue] connection: {exc.orig}'
                ) from exc
            raise
    return engine
