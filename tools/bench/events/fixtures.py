"""The world an event-path scenario runs in, on the shared test scaffolding.

:class:`World` is a :func:`tools.world.new_world` (a Glance 33.0.0
database on MariaDB made by the real ``glance-manage db_sync``, a file
store, a RabbitMQ vhost with its :class:`tools.publisher.GlancePublisher`,
the due-queue on SQLite under ``state_path`` or a fresh database, and the
:class:`tools.service_process.ServiceProcess` of every service started in
it; all removed again on exit) with what the benchmarks need on top:

* thousands of images at once (:func:`tools.glance_rows.bulk_pending_images`);
* an autocommit, read-only engine on the due-queue to poll its row count
  while the service fills it (never creating the SQLite file first), and
  a reset of the queue between runs;
* the listener's pool queue under the product's default name (the vhost is
  the world's own), the service configured as in production (product
  defaults for what a run does not set) and without the delete log the
  tests switch on;
* the list of what it created (``created``), for the smoke test to check
  that it is all gone, and ``--keep-logs``.

Used by every scenario of ``python -m tools.bench events``; measures
nothing itself.
"""

import contextlib
import datetime
import os
import shutil
import time
import uuid

import sqlalchemy as sa

from tools import glance_rows
from tools import harness
from tools import publisher
from tools import world as world_mod
from tools.bench.events import common


def glance_message(image_id, size=1):
    """The ``image.delete`` message glance-api 33 sends for a bench image
    of ``size`` bytes (:func:`tools.publisher.glance_delete_message`)."""
    return publisher.glance_delete_message(
        image_id, name='bench', size=size, virtual_size=size
    )


def delete_messages(ids):
    """``image.delete`` messages of ``ids``, one by one."""
    for image_id in ids:
        yield glance_message(image_id)


class World:
    """A :func:`tools.world.new_world` plus the benchmarks' own needs."""

    #: The listener's pool queue: the product's default (own vhost).
    pool = common.POOL_QUEUE

    def __init__(self, queue_backend='sqlite', keep_logs=None):
        self.queue_backend = queue_backend
        self.keep_logs = keep_logs
        self.base = None
        self.created = {}
        # what the shared world holds (set by setup())
        self.workdir = self.glance_url = self.queue_url = None
        self.transport_url = self.store_dir = self.publisher = None
        self._stack = None
        self._glance_engine = None
        self._queue_engine = None

    def setup(self):
        self._stack = contextlib.ExitStack()
        try:
            self.base = self._stack.enter_context(
                world_mod.new_world(
                    queue_backend=None
                    if self.queue_backend == 'sqlite'
                    else self.queue_backend,
                    unique=False,
                )
            )
            base = self.base
            self.workdir, self.store_dir = base.workdir, base.store_dir
            self.glance_url, self.queue_url = base.glance_url, base.queue_url
            self.transport_url = base.transport_url
            self.publisher = base.publisher
            os.makedirs(self.path('state'))
            # What to look for after the run: all of it must be gone.
            self.created = {
                'vhost': self.base.vhost.name,
                'databases': [
                    sa.engine.make_url(url).database
                    for url in (self.glance_url, self.queue_url)
                    if url
                ],
                'workdir': self.workdir,
            }
        except BaseException:
            self.cleanup()
            raise
        return self

    def __enter__(self):
        return self.setup()

    def __exit__(self, *exc):
        self.cleanup()

    def cleanup(self):
        if self.base is not None:
            for svc in self.base.processes:
                svc.close()  # killed before anything else goes
                if self.keep_logs and os.path.exists(svc.log_path):
                    os.makedirs(self.keep_logs, exist_ok=True)
                    shutil.copy(svc.log_path, self.keep_logs)
            self.base.close()
        for engine in (self._glance_engine, self._queue_engine):
            if engine is not None:
                engine.dispose()
        self._glance_engine = self._queue_engine = None
        if self._stack is not None:
            self._stack.close()  # databases, vhost, work directory
            self._stack = None
        self.base = None

    def path(self, *parts):
        return self.base.work_path(*parts)

    # -- the pool queue ----------------------------------------------------

    def publish_deletes(self, ids):
        """Publish the ``image.delete`` of ``ids``, wait until the pool
        queue holds them; return the seconds taken."""
        _, seconds = self.publisher.publish_all(
            delete_messages(ids), self.pool
        )
        return seconds

    def purge_pool(self):
        """Messages left in the pool queue (then purged)."""
        depth = self.publisher.depth(self.pool)
        if depth:
            self.publisher.purge(self.pool)
        return depth

    # -- databases ---------------------------------------------------------

    @property
    def glance(self):
        if self._glance_engine is None:
            self._glance_engine = world_mod.engine(self.glance_url)
        return self._glance_engine

    @property
    def sqlite_queue_path(self):
        return self.path('state', 'scrub-queue.sqlite')

    @property
    def queue_read_url(self):
        """The due-queue, for readers (the service has made it)."""
        return self.queue_url or world_mod.sqlite_queue_url(self.workdir)

    @property
    def queue(self):
        """Autocommit engine on the due-queue: each poll sees commits."""
        if self._queue_engine is None:
            if self.queue_url:
                url = self.queue_url
            else:
                # read-only: never creates the file before the service.
                url = (
                    f'sqlite:///file:{self.sqlite_queue_path}?mode=ro&uri=true'
                )
            self._queue_engine = sa.create_engine(
                url, isolation_level='AUTOCOMMIT'
            )
        return self._queue_engine

    def queue_count(self):
        try:
            with self.queue.connect() as conn:
                return conn.execute(
                    sa.text('SELECT COUNT(*) FROM scrub_queue')
                ).scalar()
        except sa.exc.DBAPIError:
            return 0  # the service has not created it yet

    def queue_rows(self):
        """The due-queue rows, only the columns an ingest checks, as
        tuples (not :func:`tools.world.queue_rows`: every column as a dict,
        for the 500,000 rows of ``--prefill 500000``, is hundreds of MB
        in this process)."""
        with self.queue.connect() as conn:
            return conn.execute(
                sa.text(
                    'SELECT image_id, location_id, deleted_at, due_at, '
                    'attempts FROM scrub_queue'
                )
            ).all()

    def reset_queue(self):
        """Empty due-queue for the next run (the service recreates it)."""
        if self._queue_engine is not None:
            self._queue_engine.dispose()
            self._queue_engine = None
        if self.queue_url:
            harness.fetch_all(
                self.queue_url, 'DROP TABLE IF EXISTS scrub_queue'
            )
        else:
            for suffix in ('', '-journal', '-wal', '-shm'):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.sqlite_queue_path + suffix)

    @contextlib.contextmanager
    def product_queue(self):
        """The due-queue through the product's own ``DueQueue`` (its
        schema made if missing), for the duration of the block."""
        from scrub_listener import db
        from scrub_listener import queue

        engine = db.create_engine(self.queue_read_url, 'bench')
        try:
            due_queue = queue.DueQueue(engine)
            due_queue.create_schema()
            yield due_queue
        finally:
            engine.dispose()

    def pending_images(self, count, size, active=False):
        """``count`` pending_delete images (rows as glance-api writes them,
        data files); with ``active`` made live again (to delete later)."""
        ids = glance_rows.bulk_pending_images(
            self.glance, self.store_dir, count, size
        )
        if active:
            with self.glance.begin() as conn:
                conn.execute(
                    sa.text(
                        "UPDATE images SET status = 'active', deleted = 0, "
                        'deleted_at = NULL'
                    )
                )
                conn.execute(
                    sa.text(
                        "UPDATE image_locations SET status = 'active', "
                        'deleted = 0, deleted_at = NULL'
                    )
                )
        return ids

    def glance_rows(self, ids=None):
        """{id: (status, deleted, deleted_at, location status)}."""
        with self.glance.connect() as conn:
            rows = conn.execute(
                sa.text(
                    'SELECT i.id, i.status, i.deleted, i.deleted_at, '
                    'l.status AS loc_status FROM images i JOIN '
                    'image_locations l ON l.image_id = i.id'
                )
            ).all()
        out = {
            r.id: (r.status, bool(r.deleted), r.deleted_at, r.loc_status)
            for r in rows
        }
        if ids is not None:
            out = {i: out.get(i) for i in ids}
        return out

    # -- service -----------------------------------------------------------

    def config(
        self,
        scrub_time=common.NEVER,
        wakeup_time=3600,
        pool_size=8,
        batch_size=None,
        prefetch=None,
        extra=None,
    ):
        """Config sections of a service on this world: product defaults
        for everything not given here (``None`` leaves an option out)."""
        sections = {
            'scrubber': {'lease_time': None},
            'listener': {'batch_size': batch_size, 'prefetch': prefetch},
            'rpc': {'connect_retries': None},
        }
        for section, options in (extra or {}).items():
            sections.setdefault(section, {}).update(options)
        return self.base.config(
            scrub_time=scrub_time,
            wakeup_time=wakeup_time,
            pool_size=pool_size,
            rpc_timeout=30,
            extra=sections,
        )

    def service(self, name, sections, env=None):
        """A :class:`tools.service_process.ServiceProcess` (not started)
        on ``sections``, config ``<name>.conf``, log ``<name>.log``."""
        return self.base.service(name, sections, env=env)


#: How far in the future :func:`not_due` entries are due.
NOT_DUE_IN = datetime.timedelta(days=60)


def not_due(count):
    """``count`` entries for ``DueQueue.enqueue``: images unknown to
    Glance, due in 60 days (never scrubbed during a run)."""
    from scrub_listener import glance_db

    later = glance_db.utcnow() + NOT_DUE_IN
    return [
        (glance_db.Deletion(str(uuid.uuid4()), None, later), later)
        for _ in range(count)
    ]


def wait_count(world, svc, n, timeout, on_sample=None):
    """Poll the due-queue until it holds ``n`` rows, the service exits
    or ``timeout`` passes; return the last count."""
    deadline = time.monotonic() + timeout
    while True:
        count = world.queue_count()
        if on_sample:
            on_sample()
        if count >= n:
            return count
        if not svc.alive() or time.monotonic() > deadline:
            return count
        time.sleep(0.2)
