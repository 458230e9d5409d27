"""Races: scrubs, restores and queue workers at the same time (fixtures).

The tests are in ``test_concurrency_claims.py`` (the claim protocol, one
interleaving at a time), ``test_concurrency_queue.py`` (late events, the
due-queue shared by several workers) and
``test_concurrency_processes.py`` (sweep-once, restore and crash as real
processes).  What they share is here: ``Cluster`` (and its ``cluster``
fixture), ``Proc``, ``FileStores``, ``Paused``, ``Outcome``,
``run_threads``, ``read_delete_logs``.

Real threads and real processes on real databases (SQLite, MariaDB,
PostgreSQL; ids ``[sqlite]``, ``[mysql]``, ``[postgresql]``), a real file
store in a temp dir.  Interleavings are lined up, not hoped for:

* threads meet at a ``threading.Barrier``, or one side is paused *inside*
  its transaction (an SQLAlchemy ``before_cursor_execute`` hook, or the
  restore's ``verify`` callback) while the other side is started, shown
  to wait, and then let go;
* processes are held by a cross-process gate: the import hooks
  (``tools/hooks``, ``SL_TEST_GATE``) wrap glance_store's filesystem
  ``Store.delete`` (and ``GlanceDB.restore``), block the first call on a
  socket until the test has seen every process arrive, log every delete
  of the process to its own file (``SL_TEST_DELETE_LOG``) and can slow
  each delete down.

The invariant every test ends with: each image is either ``active``
(``deleted=0``, every location it came back with ``active``, data file
present and byte-identical) or ``deleted`` (every location ``deleted``,
data file gone).  Never an active image without its data, never a deleted
image whose data is still there.

Bugs found are kept as ``xfail(strict=True)`` tests whose reason starts
with ``BUG:``.
"""

import collections
import datetime
import os
import threading
import urllib.parse

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from scrub_listener import db
from scrub_listener import exceptions
from scrub_listener import glance_db
from scrub_listener import model
from scrub_listener import queue as queue_mod
from tools import glance_rows
from tools import harness
from tools import hooks
from tools import service_process
from tools import world

SCRUB_LISTENER = service_process.SERVICE
MANAGE = service_process.MANAGE

KEY = '0123456789abcdef0123456789abcdef'
WINDOW = 60  # [scrubber] deletion_window default
PROC_TIMEOUT = 120
SECOND = datetime.timedelta(seconds=1)
# How long a thread must stay blocked to count as "waiting for the lock".
BLOCKED = 0.5


def finish_claim(worker, claims, done=(), failed=(), images=()):
    """GlanceDB.finish with location ids: ``done`` gone, ``failed`` not."""
    claims = claims if isinstance(claims, list) else [claims]
    by_id = {loc.id: loc for c in claims for loc in c.locations}
    pairs = [(by_id[i], glance_db.Verdict.GONE) for i in done] + [
        (by_id[i], glance_db.Verdict.FAILED) for i in failed
    ]
    token = claims[0].token if claims else '0' * 20
    return worker.finish(token, pairs, set(images))


RESTORE_REFUSALS = (
    exceptions.ScrubInProgress,
    exceptions.DataGone,
    exceptions.NotPendingDelete,
)


def utcnow():
    return glance_db.utcnow()


def ago(seconds):
    return utcnow() - datetime.timedelta(seconds=seconds)


def _path(uri):
    return urllib.parse.urlsplit(uri).path


def _read(path):
    with open(path, 'rb') as f:
        return f.read()


class Proc(service_process.ChildProcess):
    """A product command (``--sweep-once``, ``manage``), started at once
    in its own process group; ``wait()`` returns its exit code."""

    def __init__(self, name, argv, env, workdir):
        super().__init__(
            argv, os.path.join(workdir, f'{name}.out'), env=env, name=name
        )
        self.deletes = None
        self.start()

    def wait(self, timeout=PROC_TIMEOUT):
        try:
            rc, _ = super().wait(timeout)
        except service_process.WaitTimeout:
            self.kill()
            pytest.fail(f'{self.name} did not finish:\n{self.output()}')
        return rc

    def output(self):
        return self.log()


class FileStores:
    """glance_store's file driver reduced to what in-process tests need.

    (The subprocess tests go through the real glance_store.)  Unlink;
    missing means already gone; ``deleted`` lists what was unlinked.
    """

    def __init__(self):
        self.deleted = []
        self._lock = threading.Lock()
        self.before_delete = None

    def delete(self, location):
        if self.before_delete is not None:
            self.before_delete(location)
        try:
            os.unlink(_path(location.uri))
        except FileNotFoundError:
            return model.StoreAnswer.ALREADY_GONE
        with self._lock:
            self.deleted.append(_path(location.uri))
        return model.StoreAnswer.REMOVED

    def check_present(self, location):
        if not os.path.exists(_path(location.uri)):
            raise exceptions.DataGone(
                image_id=location.image_id, reason='file is gone'
            )


def verify_files(locations):
    """GlanceDB.restore's verify for file:// locations."""
    for location in locations:
        if not os.path.exists(_path(location.uri)):
            raise exceptions.DataGone(
                image_id=location.image_id, reason='file is gone'
            )


class Cluster(world.GlanceDatabase):
    """A Glance database (real schema), a file store and everything a test
    starts on them: engines, configs, processes, gates, queue databases."""

    def __init__(self, glance_url, tmp_path):
        super().__init__(glance_url)
        self.tmp = str(tmp_path)
        self.store_dir = os.path.join(self.tmp, 'images')
        harness.make_datadir(self.store_dir)
        self._engines = []
        self._procs = []
        self._gates = []
        self._dbs = []

    # -- collaborators in this process

    def product_engine(self, url=None):
        engine = db.create_engine(url or self.glance_url, 'test')
        self._engines.append(engine)
        return engine

    def glance_db(self, **kwargs):
        return glance_db.GlanceDB(self.product_engine(), **kwargs)

    def queue_url(self, shared=True, name='queue'):
        """A due-queue database: on the Glance DB's server, or SQLite."""
        if self.backend == 'sqlite' or not shared:
            return f'sqlite:///{os.path.join(self.tmp, name + ".sqlite")}'
        url = harness.create_empty_database(self.backend)
        self._dbs.append(url)
        return url

    def due_queue(self, url, **kwargs):
        q = queue_mod.DueQueue(self.product_engine(url), **kwargs)
        q.create_schema()
        return q

    # -- configs and processes

    def config(
        self,
        name,
        queue_url,
        scrub_time=0,
        lease_time=600,
        batch_size=25,
        pool_size=2,
    ):
        state = os.path.join(self.tmp, f'state-{name}')
        return harness.write_config(
            os.path.join(self.tmp, f'{name}.conf'),
            {
                'DEFAULT': {
                    'scrub_time': scrub_time,
                    'scrub_pool_size': pool_size,
                    'state_path': state,
                    'enabled_backends': {'fs': 'file'},
                },
                'glance_store': {'default_backend': 'fs'},
                'fs': {'filesystem_store_datadir': self.store_dir},
                'database': {'connection': self.glance_url},
                'scrub_queue': {
                    'connection': queue_url,
                    'batch_size': batch_size,
                },
                'scrubber': {'lease_time': lease_time},
            },
        )

    def spawn(self, name, argv, log=None, delay=0, gate=None):
        env = hooks.hook_env(
            SL_TEST_DELETE_LOG=log,
            SL_TEST_DELETE_DELAY=delay or None,
            SL_TEST_GATE=gate.address if gate else None,
        )
        proc = Proc(name, argv, env, self.tmp)
        self._procs.append(proc)
        return proc

    def sweeper(self, name, config, **kwargs):
        log = os.path.join(self.tmp, f'{name}.deletes')
        proc = self.spawn(
            name,
            [SCRUB_LISTENER, '--config-file', config, '--sweep-once'],
            log=log,
            **kwargs,
        )
        proc.deletes = hooks.DeleteLog(log)
        return proc

    def gate(self):
        gate = hooks.Gate()
        self._gates.append(gate)
        return gate

    # -- Glance rows

    def make_images(self, count, size=256):
        """``count`` pending_delete images, each with its own random data,
        deleted an hour ago; returns {image id: data}."""
        ids = glance_rows.bulk_pending_images(
            self.engine, self.store_dir, count, size
        )
        originals = {}
        for image_id in ids:
            data = os.urandom(size)
            with open(self.data_path(image_id), 'wb') as f:
                f.write(data)
            originals[image_id] = data
        return originals

    def data_path(self, image_id):
        return os.path.join(self.store_dir, image_id)

    def image(self, image_id):
        return self.rows([image_id])[0][image_id]

    def locations(self, image_id):
        return self.rows([image_id])[1][image_id]

    def deletion(self, image_id):
        return self.deletions([image_id])[0]

    def deletions(self, image_ids):
        """The Deletions of pending_delete images, as the queue has them."""
        image_rows, _ = self.rows(image_ids)
        return [
            glance_db.Deletion(i, None, image_rows[i].deleted_at)
            for i in image_ids
        ]

    def rows(self, image_ids):
        """({id: image row}, {id: [location rows]}) in two queries."""
        images = self.tables['images']
        locations = self.tables['image_locations']
        ids = sorted(image_ids)
        with self.engine.connect() as conn:
            image_rows = {
                r.id: r
                for r in conn.execute(
                    sa.select(images).where(images.c.id.in_(ids))
                )
            }
            by_image = collections.defaultdict(list)
            for r in conn.execute(
                sa.select(locations)
                .where(locations.c.image_id.in_(ids))
                .order_by(locations.c.id)
            ):
                by_image[r.image_id].append(r)
        return image_rows, by_image

    def scrubbing_rows(self):
        locations = self.tables['image_locations']
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(locations).where(
                    locations.c.status.like('scrubbing%')
                )
            ).all()

    def assert_final_state(self, originals, restored=None):
        """Each image active with its data, or deleted with it gone.

        ``restored``: ids whose restore succeeded; exactly those must be
        active.  Returns (active ids, deleted ids).
        """
        image_rows, by_image = self.rows(originals)
        active, deleted, problems = set(), set(), []
        for image_id, data in originals.items():
            image = image_rows[image_id]
            locations = by_image[image_id]
            path = self.data_path(image_id)
            if image.status == 'active':
                active.add(image_id)
                good = (
                    not image.deleted
                    and image.deleted_at is None
                    and locations
                    and all(
                        r.status == 'active' and not r.deleted
                        for r in locations
                    )
                    and os.path.exists(path)
                    and _read(path) == data
                )
            elif image.status == 'deleted':
                deleted.add(image_id)
                good = (
                    image.deleted
                    and all(
                        r.status == 'deleted' and r.deleted for r in locations
                    )
                    and not os.path.exists(path)
                )
            else:
                good = False
            if not good:
                problems.append(
                    f'{image_id}: image {image.status}/{image.deleted}, '
                    f'locations {[(r.status, r.deleted) for r in locations]}'
                    f', data present {os.path.exists(path)}'
                )
        assert problems == [], '\n'.join(problems[:20])
        if restored is not None:
            assert active == set(restored)
        return active, deleted

    def close(self):
        for gate in self._gates:
            gate.close()
        for proc in self._procs:
            proc.close()
        for engine in self._engines:
            engine.dispose()
        super().close()
        for url in self._dbs:
            harness.drop_database(url)


#: The words of the delete log, as the tests of this module count them.
_WORDS = {'call': 'start', 'ok': 'deleted'}


def read_delete_logs(procs):
    """Counter of (word, path) over the delete logs of ``procs``; word:
    ``start``, then ``deleted``, ``notfound`` or ``error``."""
    counts = collections.Counter()
    for proc in procs:
        for (event_name, path), n in proc.deletes.counts().items():
            counts[_WORDS.get(event_name, event_name), path] += n
    return counts


def run_threads(*targets, timeout=60):
    """Run callables in threads started together; re-raise the first
    error.  Returns their results."""
    barrier = threading.Barrier(len(targets))
    results = [None] * len(targets)
    errors = []

    def run(index, target):
        try:
            barrier.wait(timeout)
            results[index] = target()
        except BaseException as exc:  # reported below, in the test thread
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(i, t), daemon=True)
        for i, t in enumerate(targets)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), 'a thread is stuck'
    if errors:
        raise errors[0]
    return results


class Paused:
    """Pause a thread *inside* its transaction, at its first statement on
    ``engine`` that starts with ``prefix`` (case-insensitive).

    ``reached`` is set when it is there; it goes on after ``go.set()``.
    """

    def __init__(self, engine, prefix):
        self.reached = threading.Event()
        self.go = threading.Event()
        self._prefix = prefix.upper()
        event.listen(engine, 'before_cursor_execute', self._hook)

    def _hook(self, conn, cursor, statement, params, context, many):
        if self.reached.is_set():
            return
        if statement.lstrip().upper().startswith(self._prefix):
            self.reached.set()
            assert self.go.wait(60), 'never let go'


class Outcome:
    """Run a callable in a thread; keep its result or exception."""

    def __init__(self, func):
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=(func,))
        self.thread.daemon = True
        self.thread.start()

    def _run(self, func):
        try:
            self.result = func()
        except BaseException as exc:
            self.error = exc

    def blocked(self):
        """True when still running after BLOCKED seconds."""
        self.thread.join(BLOCKED)
        return self.thread.is_alive()

    def join(self):
        self.thread.join(60)
        assert not self.thread.is_alive(), 'thread is stuck'
        return self
