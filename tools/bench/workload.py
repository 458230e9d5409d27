"""One benchmark workload: a Glance DB, a file store, images to scrub.

A :class:`Workload` is made fresh for every run, so that each tool scrubs
its own identical copy: a Glance 33.0.0 schema (real ``glance-manage
db_sync``, through :mod:`tools.harness`), ``count`` ``pending_delete``
images of ``size`` bytes with their files (rows exactly as glance-api
writes them under ``delayed_delete``, :func:`tools.glance_rows.
bulk_pending_images`), plus ``keep`` *active* images whose rows and files
must survive.  :meth:`Workload.verify` then checks the outcome, so a fast
but wrong run cannot pass: every pending image ``deleted``, every one of
its locations ``deleted``, every data file gone, the active images and
their files untouched.

Everything it creates is removed by :meth:`Workload.cleanup`: the temp
dir (store, state, configs, logs) and every database (unique names, on
servers shared with other sessions).
"""

import collections
import hashlib
import os
import shutil
import tempfile

import sqlalchemy as sa
from sqlalchemy import pool

from tools import glance_rows
from tools import harness

#: Backend name of the file store in the multi-store configs.
STORE = 'fs'


def _digest(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


class Workload:
    """Databases, store and images for one run of one tool."""

    def __init__(
        self,
        backend='mysql',
        count=1000,
        size=65536,
        keep=5,
        queue_backend='sqlite',
        visibility='shared',
        live=0,
        live_size=1024,
        sync=True,
    ):
        self.backend = backend
        self.live = live
        self.sync = sync
        self.live_size = live_size
        self.count = count
        self.size = size
        self.keep = keep
        self.queue_backend = queue_backend
        self.visibility = visibility
        self.workdir = None
        self.glance_url = None
        self.queue_url = None
        self.pending_ids = []
        self.kept = {}  # image id -> (path, sha256)
        self.live_ids = set()  # bulk active images: data file must stay

    # -- paths -------------------------------------------------------------

    def path(self, *parts):
        return os.path.join(self.workdir, *parts)

    @property
    def store_dir(self):
        return self.path('images')

    @property
    def state_dir(self):
        return self.path('state')

    # -- building ----------------------------------------------------------

    def setup(self):
        """Create databases, store and images.  Not part of any timing."""
        self.workdir = tempfile.mkdtemp(prefix=harness.NAME_PREFIX + 'bench_')
        try:
            for sub in ('images', 'state', 'staging', 'tasks', 'logs'):
                os.makedirs(self.path(sub))
            self.glance_url = harness.create_glance_database(self.backend)
            if self.queue_backend != 'sqlite':
                self.queue_url = harness.create_empty_database(
                    self.queue_backend
                )
            self._populate()
            # why: the files were just written; without this the kernel
            # writes them back *during* the timed run (and unlink of a
            # dirty page costs more), charging the setup to the tool.
            # Images waiting for a scrub were written long ago.
            if self.sync:
                os.sync()
        except BaseException:
            self.cleanup()
            raise
        return self

    def _populate(self):
        engine = sa.create_engine(self.glance_url, poolclass=pool.NullPool)
        try:
            if self.live:
                self._populate_live(engine)
            if self.count:
                self.pending_ids = glance_rows.bulk_pending_images(
                    engine, self.store_dir, self.count, self.size
                )
                if self.visibility != 'shared':
                    with engine.begin() as conn:
                        conn.execute(
                            sa.text('UPDATE images SET visibility = :v'),
                            {'v': self.visibility},
                        )
            for i in range(self.keep):
                # Distinct content per kept image: a tool that deleted the
                # wrong file and rewrote another could not hide it.
                data = os.urandom(min(self.size, 4096)) + bytes([i])
                image_id = glance_rows.make_image(
                    engine,
                    self.store_dir,
                    data=data,
                    status='active',
                    visibility=self.visibility,
                    name=f'bench-kept-{i}',
                    backend=STORE,
                )
                path = os.path.join(self.store_dir, image_id)
                self.kept[image_id] = (path, _digest(path))
        finally:
            engine.dispose()

    def _populate_live(self, engine):
        # Many active images, written in bulk as pending_delete rows and
        # then made live: a real Glance DB has far more live locations
        # than deleted ones, and the shared-data check ("does a live
        # location point at the same data?") has to look at them.
        # Before the pending images, so "every row so far" is these.
        self.live_ids = set(
            glance_rows.bulk_pending_images(
                engine, self.store_dir, self.live, self.live_size
            )
        )
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE images SET status = 'active', deleted = :f, "
                    'deleted_at = NULL'
                ),
                {'f': False},
            )
            conn.execute(
                sa.text(
                    "UPDATE image_locations SET status = 'active', "
                    'deleted = :f, deleted_at = NULL'
                ),
                {'f': False},
            )

    # -- configuration -----------------------------------------------------

    def _common_sections(self, pool_size):
        return {
            'DEFAULT': {
                'scrub_time': 0,
                'scrub_pool_size': pool_size,
                'enabled_backends': {STORE: 'file'},
                'daemon': False,
            },
            'database': {'connection': self.glance_url},
            'glance_store': {'default_backend': STORE},
            STORE: {'filesystem_store_datadir': self.store_dir},
            'os_glance_staging_store': {
                'filesystem_store_datadir': self.path('staging')
            },
            'os_glance_tasks_store': {
                'filesystem_store_datadir': self.path('tasks')
            },
        }

    def write_config(self, tool, pool_size):
        """Write the config file of ``tool``; return its path."""
        sections = self._common_sections(pool_size)
        if tool == 'scrub-listener':
            sections['DEFAULT']['state_path'] = self.state_dir
            if self.queue_url:
                sections['scrub_queue'] = {'connection': self.queue_url}
        path = self.path(f'{tool}.conf')
        harness.write_config(path, sections)
        return path

    # -- checking ----------------------------------------------------------

    def verify(self):
        """Return a list of problems with the outcome (empty: all good)."""
        problems = []
        engine = sa.create_engine(self.glance_url, poolclass=pool.NullPool)
        try:
            with engine.connect() as conn:
                images = collections.Counter(
                    {
                        (row.status, bool(row.deleted)): row.n
                        for row in conn.execute(
                            sa.text(
                                'SELECT status, deleted, COUNT(*) AS n '
                                'FROM images GROUP BY status, deleted'
                            )
                        )
                    }
                )
                locations = collections.Counter(
                    {
                        (row.image_status, row.status, bool(row.deleted)): (
                            row.n
                        )
                        for row in conn.execute(
                            sa.text(
                                'SELECT i.status AS image_status, l.status, '
                                'l.deleted, COUNT(*) AS n '
                                'FROM image_locations l JOIN images i '
                                'ON i.id = l.image_id '
                                'GROUP BY i.status, l.status, l.deleted'
                            )
                        )
                    }
                )
                kept_rows = {
                    row.id: row.status
                    for row in conn.execute(
                        sa.text(
                            'SELECT id, status FROM images WHERE status != '
                            "'deleted'"
                        )
                    )
                }
        finally:
            engine.dispose()
        want_images = collections.Counter()
        want_locations = collections.Counter()
        if self.count:
            want_images[('deleted', True)] = self.count
            want_locations[('deleted', 'deleted', True)] = self.count
        if self.keep or self.live:
            want_images[('active', False)] = self.keep + self.live
            want_locations[('active', 'active', False)] = self.keep + self.live
        if images != want_images:
            problems.append(
                f'image rows (status, deleted): {dict(images)}, '
                f'want {dict(want_images)}'
            )
        if locations != want_locations:
            problems.append(
                'location rows (image status, status, deleted): '
                f'{dict(locations)}, want {dict(want_locations)}'
            )
        for image_id in self.kept:
            if kept_rows.get(image_id) != 'active':
                problems.append(
                    f'kept image {image_id} is {kept_rows.get(image_id)}'
                )
        left = set(os.listdir(self.store_dir))
        extra = left - set(self.kept) - self.live_ids
        lost = self.live_ids - left
        if lost:
            problems.append(
                f'{len(lost)} data file(s) of live images deleted, '
                f'e.g. {sorted(lost)[0]}'
            )
        if extra:
            problems.append(
                f'{len(extra)} data file(s) of scrubbed images left, '
                f'e.g. {sorted(extra)[0]}'
            )
        for image_id, (path, digest) in self.kept.items():
            if not os.path.exists(path):
                problems.append(f'kept image {image_id}: data file deleted')
            elif _digest(path) != digest:
                problems.append(f'kept image {image_id}: data file changed')
        return problems

    # -- teardown ----------------------------------------------------------

    def cleanup(self):
        """Drop every database and remove the temp dir.  Idempotent."""
        for attr in ('glance_url', 'queue_url'):
            url = getattr(self, attr)
            if url:
                harness.drop_database(url)
                setattr(self, attr, None)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self):
        return self.setup()

    def __exit__(self, *exc):
        self.cleanup()
