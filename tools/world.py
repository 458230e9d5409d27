"""A Glance world for a scrub-listener service: databases, store, broker.

What a test or a benchmark of the always-on service stands on: a Glance
database with the real schema (:mod:`tools.harness`), a file store (a
datadir made with ``harness.make_datadir``), a RabbitMQ vhost with a
publisher (:mod:`tools.publisher`), the due-queue (SQLite under
``state_path`` by default, or a database URL), the import hooks
(:mod:`tools.hooks`) with a delete log, and the service's config sections.

``World`` (made by ``make_world(workdir, vhost, glance_url)`` on
resources the caller owns, or by ``new_world()``, a context manager that
creates them all and removes them afterwards):

* ``config(**kw)`` the ``{section: {option: value}}`` of a service on
  this world (``service_config`` keywords), with the world's own
  listener pool and RPC topic; ``write_config(name, sections)``;
* ``env(**SL_TEST_*)`` the child environment: hooks, delete log, extras;
* ``service(name, sections, env=None)`` a ``ServiceProcess`` (not
  started) that ``close()`` kills;
* ``pending(data=None, **kw)`` one pending_delete image (file + rows as
  glance-api 33 leaves them); ``path(image_id)`` its data file;
* ``scrubbed(id)``, ``not_scrubbed(ids)``, ``wait_scrubbed(ids)``,
  ``pool_depth()``; ``deletes`` the :class:`tools.hooks.DeleteLog`.

Row readers on any URL: ``image_statuses``, ``location_statuses``,
``queue_rows``; ``sqlite_queue_url(workdir)`` the default due-queue.

``GlanceDatabase(url)``: one Glance database in this process (``engine``
without a pool, reflected ``tables``, ``backend``), written as glance-api
33 writes it (``glance_delete``, ``remove_location``); the base of the
tests' own views of a world (``conftest.Env``, ``Cluster``).
"""

import contextlib
import dataclasses
import os
import shutil
import tempfile

import sqlalchemy as sa
from sqlalchemy import pool as sa_pool

from tools import glance_rows
from tools import harness
from tools import hooks
from tools import publisher as publisher_mod
from tools import service_process


def engine(url):
    """An engine without a pool (nothing left open between calls)."""
    return sa.create_engine(url, poolclass=sa_pool.NullPool)


def service_config(
    workdir,
    *,
    glance_url,
    transport_url,
    store_dir,
    queue_url=None,
    scrub_time=0,
    wakeup_time=3600,
    pool_size=2,
    lease_time=10,
    rpc_timeout=10,
    extra=None,
):
    """Sections of a scrub-listener config file for a service under test.

    ``wakeup_time`` defaults to an hour, so that only notifications (and
    the sweep at start-up) bring work: a caller that wants the periodic
    sweep sets it small.  ``queue_url`` None: SQLite under ``state_path``
    (``<workdir>/state``).  ``extra``: ``{section: {option: value}}``
    merged last.
    """
    sections = {
        'DEFAULT': {
            'transport_url': transport_url,
            'scrub_time': scrub_time,
            'wakeup_time': wakeup_time,
            'scrub_pool_size': pool_size,
            'enabled_backends': {'fs': 'file'},
            'state_path': os.path.join(workdir, 'state'),
            'debug': False,
            'use_stderr': True,
        },
        'database': {'connection': glance_url},
        'glance_store': {'default_backend': 'fs'},
        'fs': {'filesystem_store_datadir': store_dir},
        'scrub_queue': {'connection': queue_url},
        'scrubber': {'lease_time': lease_time},
        'listener': {},
        'rpc': {'timeout': rpc_timeout, 'connect_retries': 1},
        'service': {'graceful_shutdown_timeout': 30},
    }
    for section, options in (extra or {}).items():
        sections.setdefault(section, {}).update(options)
    return sections


def write_service_config(path, sections):
    """Write ``sections`` as an ini file; return its path."""
    return harness.write_config(str(path), sections)


# ------------------------------------------------------------ row readers


def image_statuses(url, image_ids=None):
    """{image id: status} (all images, or those of ``image_ids``)."""
    rows = harness.fetch_all(url, 'SELECT id, status FROM images')
    result = {r['id']: r['status'] for r in rows}
    if image_ids is not None:
        return {i: result.get(i) for i in image_ids}
    return result


def location_statuses(url, image_ids=None):
    """{image id: [location statuses]}."""
    rows = harness.fetch_all(
        url, 'SELECT image_id, status FROM image_locations ORDER BY id'
    )
    result = {}
    for r in rows:
        if image_ids is None or r['image_id'] in image_ids:
            result.setdefault(r['image_id'], []).append(r['status'])
    return result


def queue_rows(url):
    """Rows of the due-queue table (list of dicts); [] if no table yet."""
    if 'scrub_queue' not in harness.table_names(url):
        return []
    return harness.fetch_all(url, 'SELECT * FROM scrub_queue ORDER BY id')


def sqlite_queue_url(workdir):
    """The due-queue URL a service with default settings uses."""
    return f'sqlite:///{os.path.join(workdir, "state", "scrub-queue.sqlite")}'


def make_pending(url, store_dir, data=None, **kwargs):
    """One pending_delete image (file + rows, like glance-api 33)."""
    eng = engine(url)
    try:
        return glance_rows.make_image(
            eng, store_dir, data=data or os.urandom(1024), **kwargs
        )
    finally:
        eng.dispose()


def scrubbed(url, store_dir, image_id):
    """True when the image's file is gone and its rows say 'deleted'."""
    if os.path.exists(os.path.join(store_dir, image_id)):
        return False
    statuses = image_statuses(url, [image_id])
    locations = location_statuses(url, [image_id]).get(image_id, [])
    return statuses[image_id] == 'deleted' and all(
        s == 'deleted' for s in locations
    )


class GlanceDatabase:
    """One Glance database (real schema), read and written in-process.

    ``engine`` has no pool (nothing stays open between calls); ``tables``
    are the image tables, reflected; ``backend`` is ``sqlite``, ``mysql``
    or ``postgresql``.  ``close()`` disposes of the engine.
    """

    def __init__(self, glance_url):
        self.glance_url = glance_url
        self.backend = harness.backend_of(glance_url)
        self.engine = engine(glance_url)
        meta = sa.MetaData()
        meta.reflect(self.engine, only=harness.GLANCE_IMAGE_TABLES)
        self.tables = meta.tables

    def glance_delete(self, image_id, when):
        """What glance-api 33 does on DELETE with delayed_delete."""
        glance_rows.glance_delete(self.engine, image_id, when)

    def remove_location(self, location_id, when):
        """What glance-api does to a location removed from a live image."""
        glance_rows.remove_location(self.engine, location_id, when)

    def close(self):
        self.engine.dispose()


# ------------------------------------------------------------------ world


@dataclasses.dataclass
class World:
    """What a single-service test or benchmark needs, wired together.

    ``config(**kw)``: sections for a service on this world
    (``service_config`` keywords) with this world's own listener pool and
    RPC topic, so that services of earlier tests on the same vhost never
    see its messages (``pool`` / ``rpc_topic`` None: the product's
    defaults); ``env(**vars)``: environment with the hooks, the delete
    log and any hook variables; ``deletes``: that log.
    """

    workdir: str
    glance_url: str
    store_dir: str
    vhost: publisher_mod.Vhost
    hook_env: dict
    deletes: hooks.DeleteLog
    pool: str | None
    rpc_topic: str | None
    queue_url: str | None = None
    processes: list = dataclasses.field(default_factory=list)

    @property
    def publisher(self):
        return self.vhost.publisher

    @property
    def transport_url(self):
        return self.vhost.transport_url

    def work_path(self, *parts):
        """A path under the world's work directory."""
        return os.path.join(self.workdir, *parts)

    def config(self, workdir=None, **kwargs):
        kwargs.setdefault('queue_url', self.queue_url)
        sections = service_config(
            workdir or self.workdir,
            glance_url=kwargs.pop('glance_url', self.glance_url),
            transport_url=kwargs.pop('transport_url', self.transport_url),
            store_dir=self.store_dir,
            **kwargs,
        )
        if self.pool:
            sections['listener']['pool'] = self.pool
        if self.rpc_topic:
            sections['rpc']['topic'] = self.rpc_topic
        return sections

    def write_config(self, name, sections):
        """``<workdir>/<name>.conf`` holding ``sections``; its path."""
        return write_service_config(self.work_path(f'{name}.conf'), sections)

    def env(self, **extra):
        return dict(self.hook_env, **{k: str(v) for k, v in extra.items()})

    def service(self, name, sections, env=None):
        """A ``ServiceProcess`` on ``sections`` (not started yet); its log
        is ``<workdir>/<name>.log``; ``close()`` kills it."""
        svc = service_process.ServiceProcess(
            self.write_config(name, sections),
            self.work_path(f'{name}.log'),
            env=env,
            name=name,
            cwd=self.workdir,
        )
        self.processes.append(svc)
        return svc

    def pending(self, data=None, **kwargs):
        return make_pending(self.glance_url, self.store_dir, data, **kwargs)

    def path(self, image_id):
        """The data file of ``image_id`` in the store."""
        return os.path.join(self.store_dir, image_id)

    def scrubbed(self, image_id):
        return scrubbed(self.glance_url, self.store_dir, image_id)

    def not_scrubbed(self, image_ids):
        """Those of ``image_ids`` not scrubbed yet (two queries in all)."""
        statuses = image_statuses(self.glance_url)
        locations = location_statuses(self.glance_url)
        return [
            i
            for i in image_ids
            if statuses.get(i) != 'deleted'
            or any(s != 'deleted' for s in locations.get(i, []))
            or os.path.exists(self.path(i))
        ]

    def wait_scrubbed(self, image_ids, timeout=30, service=None):
        """Wait until every image is scrubbed; return the seconds taken."""
        image_ids = list(image_ids)

        def left():
            return self.not_scrubbed(image_ids)

        def why():
            text = f'{len(left())} of {len(image_ids)} not scrubbed'
            if service is not None:
                text += f'; log:\n{service.log_tail()}'
            return text

        _, elapsed = service_process.wait_until(
            lambda: not left(), timeout, message=why
        )
        return elapsed

    def pool_depth(self):
        """(ready, consumers) of this world's listener pool queue."""
        return publisher_mod.queue_depth(self.transport_url, self.pool)

    def close(self):
        """Kill the processes made by ``service()``."""
        for svc in self.processes:
            svc.close()
        self.processes = []


def make_world(workdir, vhost, glance_url, queue_url=None, unique=True):
    """A :class:`World` on a vhost and a Glance database the caller owns.

    Makes the store datadir and the delete log under ``workdir``.
    ``unique``: a listener pool and an RPC topic of its own (else the
    product's defaults).
    """
    workdir = str(workdir)
    store_dir = os.path.join(workdir, 'images')
    harness.make_datadir(store_dir)
    deletes = hooks.DeleteLog(os.path.join(workdir, 'deletes.log'))
    return World(
        workdir,
        glance_url,
        store_dir,
        vhost,
        hooks.hook_env(SL_TEST_DELETE_LOG=deletes.path),
        deletes,
        pool=harness.unique_name('sl_test_pool_') if unique else None,
        rpc_topic=harness.unique_name('sl_test_rpc_') if unique else None,
        queue_url=queue_url,
    )


@contextlib.contextmanager
def new_world(
    workdir=None, glance_backend='mysql', queue_backend=None, unique=True
):
    """Create a whole :class:`World`, remove everything afterwards.

    A fresh Glance database on ``glance_backend``, a due-queue database on
    ``queue_backend`` (None: SQLite under ``state_path``), a fresh vhost,
    a work directory (``workdir``, else a temp dir, removed after).  The
    service processes made by ``world.service()`` are killed first.
    """
    made_dir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix=harness.NAME_PREFIX + 'w_')
    urls = []
    try:
        with contextlib.ExitStack() as stack:
            urls.append(harness.create_glance_database(glance_backend))
            if queue_backend:
                urls.append(harness.create_empty_database(queue_backend))
            vhost = stack.enter_context(publisher_mod.new_vhost())
            world = make_world(
                workdir,
                vhost,
                urls[0],
                queue_url=urls[1] if queue_backend else None,
                unique=unique,
            )
            try:
                yield world
            finally:
                world.close()
    finally:
        for url in urls:
            harness.drop_database(url)
        if made_dir:
            shutil.rmtree(workdir, ignore_errors=True)
