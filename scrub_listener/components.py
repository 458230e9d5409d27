"""Build scrub-listener's collaborators from the configuration, once."""

from __future__ import annotations

import dataclasses
import os

import futurist
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from scrub_listener import db
from scrub_listener import exceptions
from scrub_listener import glance_db
from scrub_listener import holders
from scrub_listener import model
from scrub_listener import queue
from scrub_listener import restore
from scrub_listener import scrubber
from scrub_listener import store
from scrub_listener import sweep


@dataclasses.dataclass
class Components:
    """Everything a command needs, built once from the configuration."""

    conf: object
    glance_db: glance_db.GlanceDB
    queue: queue.DueQueue
    schedule: model.Schedule
    stores: store.Stores | None = None
    executor: futurist.ThreadPoolExecutor | None = None
    scrubber: scrubber.Scrubber | None = None
    sweeper: sweep.Sweeper | None = None
    restorer: restore.Restorer | None = None

    def close(self):
        """Release pools and connections; idempotent.

        The pool is not waited for: after a finished drain it is idle
        (and futurist's idle workers would hold us up to a second each),
        and after a shutdown that timed out, the deletes still running are
        abandoned on purpose (their claims are taken over later).
        """
        if self.executor is not None:
            self.executor.shutdown(wait=False)
            self.executor = None
        self.glance_db.engine.dispose()
        self.queue.engine.dispose()


def build(conf, with_stores=True):
    """Validate the configuration and build everything that is needed."""
    process = holders.this_process(conf.host)
    gdb = glance_db.GlanceDB(
        _glance_engine(conf),
        encryption_key=conf.metadata_encryption_key,
        lease_time=conf.scrubber.lease_time,
        data_key=store.data_key,
        process=process,
    )
    due_queue = queue.DueQueue(
        _queue_engine(conf),
        lease_time=conf.scrubber.lease_time,
        retry_backoff=conf.scrub_queue.retry_backoff,
        retry_backoff_max=conf.scrub_queue.retry_backoff_max,
    )
    parts = Components(conf, gdb, due_queue, model.Schedule(conf.scrub_time))
    if not with_stores:
        return parts
    _check_encryption_key(conf)
    store.register_opts(conf)
    parts.stores = store.Stores(conf)
    parts.executor = futurist.ThreadPoolExecutor(
        max_workers=conf.scrub_pool_size
    )
    # A restart after SIGKILL: our dead predecessor's leases are free now.
    due_queue.release_dead_leases(process.lease_owner_is_dead)
    parts.scrubber = scrubber.Scrubber(
        gdb,
        parts.stores,
        parts.executor,
        conf.scrubber.lease_time,
        queue=due_queue,
        owner=process.lease_owner,
        batch_size=conf.scrub_queue.batch_size,
        schedule=parts.schedule,
    )
    parts.sweeper = sweep.Sweeper(
        gdb, due_queue, parts.schedule, conf.scrub_queue.batch_size
    )
    parts.restorer = restore.Restorer(
        gdb,
        parts.stores,
        due_queue,
        conf.scrubber.deletion_window,
        # a third of the RPC timeout: the store check and the reply must
        # fit in what is left
        lock_timeout=conf.rpc.timeout / 3,
    )
    return parts


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
