"""Races: scrubs, restores and queue workers at the same time.

Real threads and real processes on real databases (SQLite, MariaDB,
PostgreSQL; ids ``[sqlite]``, ``[mysql]``, ``[postgresql]``), a real file
store in a temp dir.  Interleavings are lined up, not hoped for:

* threads meet at a ``threading.Barrier``, or one side is paused *inside*
  its transaction (an SQLAlchemy ``before_cursor_execute`` hook, or the
  restore's ``verify`` callback) while the other side is started, shown
  to wait, and then let go;
* processes are held by a cross-process gate: a ``sitecustomize.py`` put
  on their ``PYTHONPATH`` wraps glance_store's ``FilesystemStore.delete``
  (and ``GlanceDB.restore``), blocks the first call on a socket until the
  test has seen every process arrive, logs every delete of the process to
  its own file (``start``/``deleted``/``notfound``/``error`` + path) and
  can slow each delete down.

The invariant every test ends with: each image is either ``active``
(``deleted=0``, every location it came back with ``active``, data file
present and byte-identical) or ``deleted`` (every location ``deleted``,
data file gone).  Never an active image without its data, never a deleted
image whose data is still there.

Bugs found are kept as ``xfail(strict=True)`` tests whose reason starts
with ``BUG:``.
"""

import collections
import contextlib
import dataclasses
import datetime
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import uuid

import futurist
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import pool

from scrub_listener import db
from scrub_listener import drain as drain_mod
from scrub_listener import exceptions
from scrub_listener import glance_db
from scrub_listener import notification
from scrub_listener import queue as queue_mod
from scrub_listener import scrubber as scrubber_mod
from scrub_listener import store as store_mod
from tools import glance_rows
from tools import harness

BIN_DIR = os.path.dirname(sys.executable)
SCRUB_LISTENER = os.path.join(BIN_DIR, 'scrub-listener')
MANAGE = os.path.join(BIN_DIR, 'scrub-listener-manage')

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


# ------------------------------------------------------- subprocess hook

SITECUSTOMIZE = textwrap.dedent(
    '''
    """Test hook of tests/functional/test_concurrency.py (see there).

    SL_TEST_DELETE_LOG    append "start|deleted|notfound|error <path>"
                          for every filesystem store delete
    SL_TEST_DELETE_DELAY  seconds to sleep in every delete
    SL_TEST_GATE          host:port; the first delete (and the first
                          GlanceDB.restore) of the process blocks there
                          until the test releases everyone at once
    """
    import functools
    import importlib.abc
    import importlib.util
    import os
    import socket
    import sys
    import threading
    import time

    LOG = os.environ.get('SL_TEST_DELETE_LOG')
    DELAY = float(os.environ.get('SL_TEST_DELETE_DELAY') or 0)
    GATE = os.environ.get('SL_TEST_GATE')
    _lock = threading.Lock()
    _passed = []


    def gate():
        if not GATE:
            return
        # the other pool threads queue on the lock until the gate opens
        with _lock:
            if _passed:
                return
            host, port = GATE.rsplit(':', 1)
            with socket.create_connection((host, int(port)), 60) as s:
                s.sendall(b'%d\\n' % os.getpid())
                s.settimeout(120)
                s.recv(1)
            _passed.append(True)


    def log(word, path):
        if LOG:
            with open(LOG, 'a') as f:
                f.write('%s %s\\n' % (word, path))


    def patch_filesystem(module):
        original = module.Store.delete

        @functools.wraps(original)
        def delete(self, location, *args, **kwargs):
            path = location.store_location.path
            gate()
            log('start', path)
            if DELAY:
                time.sleep(DELAY)
            try:
                result = original(self, location, *args, **kwargs)
            except Exception as exc:
                missing = type(exc).__name__ == 'NotFound'
                log('notfound' if missing else 'error', path)
                raise
            log('deleted', path)
            return result

        module.Store.delete = delete


    def patch_glance_db(module):
        original = module.GlanceDB.restore

        @functools.wraps(original)
        def restore(self, *args, **kwargs):
            gate()
            return original(self, *args, **kwargs)

        module.GlanceDB.restore = restore


    PATCHES = {
        'glance_store._drivers.filesystem': patch_filesystem,
        'scrub_listener.glance_db': patch_glance_db,
    }


    class _Loader(importlib.abc.Loader):
        def __init__(self, wrapped, patch):
            self._wrapped = wrapped
            self._patch = patch

        def create_module(self, spec):
            return self._wrapped.create_module(spec)

        def exec_module(self, module):
            self._wrapped.exec_module(module)
            self._patch(module)


    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in PATCHES:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, PATCHES[name])
            return spec


    sys.meta_path.insert(0, _Finder())
    '''
)


class Gate:
    """Cross-process barrier: processes block in the hook's ``gate()``.

    ``wait_for(n)`` returns once ``n`` processes arrived; ``release()``
    lets them all go at once.
    """

    def __init__(self):
        self._sock = socket.socket()
        self._sock.bind(('127.0.0.1', 0))
        self._sock.listen(128)
        self._sock.settimeout(0.2)
        self.address = f'127.0.0.1:{self._sock.getsockname()[1]}'
        self._conns = []

    def wait_for(self, procs, timeout=90):
        """Wait until each of ``procs`` is at the gate or has exited;
        return those at the gate (the others' exit is for the test to
        judge)."""
        deadline = time.monotonic() + timeout
        by_pid = {proc.popen.pid: proc for proc in procs}
        arrived = {}
        while True:
            missing = [
                p
                for pid, p in by_pid.items()
                if pid not in arrived and p.poll() is None
            ]
            if not missing:
                return list(arrived.values())
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f'{[p.name for p in missing]} did not reach the '
                        f'gate in {timeout} s'
                    )
                continue
            conn.settimeout(30)
            pid = int(conn.recv(64).split()[0])
            self._conns.append(conn)
            arrived[pid] = by_pid[pid]

    def release(self):
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.sendall(b'x')
            conn.close()
        self._conns = []

    def close(self):
        self.release()
        self._sock.close()


class Proc:
    """A product command running in its own process group."""

    def __init__(self, name, argv, env, workdir):
        self.name = name
        self.argv = [str(a) for a in argv]
        self._out = open(os.path.join(workdir, f'{name}.out'), 'w+')
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    @property
    def returncode(self):
        return self.popen.returncode

    def poll(self):
        return self.popen.poll()

    def wait(self, timeout=PROC_TIMEOUT):
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f'{self.name} did not finish:\n{self.output()}')

    def kill(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def output(self):
        self._out.flush()
        self._out.seek(0)
        return self._out.read()

    def close(self):
        if self.popen.poll() is None:
            self.kill()
        self._out.close()


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
            return store_mod.ALREADY_GONE
        with self._lock:
            self.deleted.append(_path(location.uri))
        return store_mod.DELETED

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


class Cluster:
    """A Glance database (real schema), a file store and everything a test
    starts on them: engines, configs, processes, gates, queue databases."""

    def __init__(self, glance_url, tmp_path):
        self.glance_url = glance_url
        self.backend = harness.backend_of(glance_url)
        self.engine = sa.create_engine(glance_url, poolclass=pool.NullPool)
        self.tmp = str(tmp_path)
        self.store_dir = os.path.join(self.tmp, 'images')
        harness.make_datadir(self.store_dir)
        self.hook_dir = os.path.join(self.tmp, 'hook')
        os.makedirs(self.hook_dir)
        with open(os.path.join(self.hook_dir, 'sitecustomize.py'), 'w') as f:
            f.write(SITECUSTOMIZE)
        meta = sa.MetaData()
        meta.reflect(self.engine, only=harness.GLANCE_IMAGE_TABLES)
        self.tables = meta.tables
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
        env = dict(os.environ)
        env['PYTHONPATH'] = os.pathsep.join(
            [self.hook_dir, *filter(None, [env.get('PYTHONPATH')])]
        )
        env['PYTHONWARNINGS'] = 'ignore'
        env['SL_TEST_DELETE_LOG'] = log or ''
        env['SL_TEST_DELETE_DELAY'] = str(delay)
        env['SL_TEST_GATE'] = gate.address if gate else ''
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
        proc.log = log
        return proc

    def gate(self):
        gate = Gate()
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

    def glance_delete(self, image_id, when):
        """What glance-api 33 does on DELETE with delayed_delete."""
        glance_rows.glance_delete(self.engine, image_id, when)

    def remove_location(self, location_id, when):
        """What glance-api does to a location removed from a live image."""
        glance_rows.remove_location(self.engine, location_id, when)

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
        self.engine.dispose()
        for url in self._dbs:
            harness.drop_database(url)


@pytest.fixture
def cluster(glance_db_url, tmp_path):
    c = Cluster(glance_db_url, tmp_path)
    yield c
    c.close()


def read_delete_logs(procs):
    """Counter of (word, path) over the delete logs of ``procs``."""
    counts = collections.Counter()
    for proc in procs:
        if not os.path.exists(proc.log):
            continue
        with open(proc.log) as f:
            for line in f:
                word, path = line.rstrip('\n').split(' ', 1)
                counts[word, path] += 1
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


# ====================================================================
# The claim protocol, one interleaving at a time (threads, all backends)
# ====================================================================


def test_restore_waits_for_a_claim_in_flight_then_refuses(cluster):
    """claim → restore: the restore queues on the image row while the
    claim's transaction is open, then sees ``scrubbing`` and refuses."""
    originals = cluster.make_images(1)
    [image_id] = originals
    deletion = cluster.deletion(image_id)
    scrub_side = cluster.glance_db()
    restore_side = cluster.glance_db()
    paused = Paused(scrub_side.engine, 'UPDATE image_locations')

    claim = Outcome(lambda: scrub_side.claim([deletion]))
    assert paused.reached.wait(30)
    restore = Outcome(
        lambda: restore_side.restore(image_id, verify_files, WINDOW)
    )
    assert restore.blocked(), 'restore did not wait for the open claim'
    paused.go.set()
    claim.join()
    restore.join()

    assert claim.error is None
    [claimed] = claim.result
    assert len(claimed.locations) == 1
    assert isinstance(restore.error, exceptions.ScrubInProgress), restore.error
    # the scrubber goes on: delete, finish
    os.unlink(_path(claimed.locations[0].uri))
    finish_claim(
        scrub_side, claimed, [claimed.locations[0].id], [], {image_id}
    )
    cluster.assert_final_state(originals, restored=set())


def test_claim_waits_for_a_restore_in_flight_then_skips(cluster):
    """restore → claim: the claim queues on the image row while the
    restore (checking the data) holds it, then finds the image active."""
    originals = cluster.make_images(1)
    [image_id] = originals
    deletion = cluster.deletion(image_id)
    scrub_side = cluster.glance_db()
    restore_side = cluster.glance_db()
    in_verify = threading.Event()
    go = threading.Event()

    def slow_verify(locations):
        verify_files(locations)
        in_verify.set()
        assert go.wait(60)

    restore = Outcome(
        lambda: restore_side.restore(image_id, slow_verify, WINDOW)
    )
    assert in_verify.wait(30)
    claim = Outcome(lambda: scrub_side.claim([deletion]))
    assert claim.blocked(), 'claim did not wait for the open restore'
    go.set()
    restore.join()
    claim.join()

    assert restore.error is None, restore.error
    [claimed] = claim.result
    assert claimed.locations == []
    assert 'active' in claimed.skip_reason
    cluster.assert_final_state(originals, restored={image_id})


def test_restore_waits_for_a_failed_scrub_to_hand_back_then_succeeds(
    cluster,
):
    """finish(failed) → restore: the data is still there, the failed
    location goes back to pending_delete under the lock, the restore that
    waited for it then succeeds."""
    originals = cluster.make_images(1)
    [image_id] = originals
    scrub_side = cluster.glance_db()
    restore_side = cluster.glance_db()
    [claimed] = scrub_side.claim([cluster.deletion(image_id)])
    with pytest.raises(exceptions.ScrubInProgress):
        restore_side.restore(image_id, verify_files, WINDOW)
    paused = Paused(scrub_side.engine, 'UPDATE image_locations')

    finish = Outcome(
        lambda: finish_claim(
            scrub_side, claimed, [], [claimed.locations[0].id], {image_id}
        )
    )
    assert paused.reached.wait(30)
    restore = Outcome(
        lambda: restore_side.restore(image_id, verify_files, WINDOW)
    )
    assert restore.blocked(), 'restore did not wait for the open finish'
    paused.go.set()
    finish.join()
    restore.join()

    assert finish.error is None and restore.error is None, restore.error
    cluster.assert_final_state(originals, restored={image_id})


def test_racing_claims_take_each_location_once(cluster):
    """Six workers claim the same 40 deletions at the same instant: each
    location goes to exactly one of them, the others see it busy; no
    deadlock escapes."""
    originals = cluster.make_images(40)
    deletions = cluster.deletions(list(originals))
    workers = [cluster.glance_db() for _ in range(6)]

    def claim(worker):
        mine = list(deletions)
        random.shuffle(mine)  # lock order must not depend on call order
        return worker.claim(mine)

    results = run_threads(*[lambda w=w: claim(w) for w in workers])

    owners = collections.Counter()
    for claims in results:
        for c in claims:
            assert c.skip_reason is None
            assert c.busy or c.locations
            for location in c.locations:
                owners[location.id] += 1
    assert len(owners) == 40
    assert set(owners.values()) == {1}


def test_concurrent_restores_of_different_images(cluster):
    """Four operators restore 25 different images each at the same time:
    every restore succeeds, none is refused or fails.

    Regression: on MariaDB restores scanned every image_locations row
    FOR UPDATE (looking for other images sharing the data) while holding
    their own rows; two restores deadlocked and 12-20 % of them failed
    with "Deadlock found" even after the retries."""
    originals = cluster.make_images(100)
    ids = sorted(originals)
    workers = [cluster.glance_db() for _ in range(4)]
    errors = []

    def restore_all(worker, chunk):
        for image_id in chunk:
            try:
                worker.restore(image_id, verify_files, WINDOW)
            except Exception as exc:
                errors.append(f'{image_id}: {exc!r:.200}')

    run_threads(
        *[
            lambda w=w, k=k: restore_all(w, ids[k::4])
            for k, w in enumerate(workers)
        ]
    )

    assert errors == [], f'{len(errors)} failed, e.g. {errors[0]}'
    cluster.assert_final_state(originals, restored=set(ids))


def test_thread_storm_of_scrubs_and_restores(cluster):
    """Three scrubbers and three restorers hammer 60 images at once
    (random batches, random order), then one last scrub cleans up."""
    originals = cluster.make_images(60)
    ids = sorted(originals)
    deletions = dict(zip(ids, cluster.deletions(ids), strict=True))
    restored = set()
    restored_lock = threading.Lock()
    refusals = collections.Counter()

    def scrubber(seed):
        rng = random.Random(seed)
        worker = cluster.glance_db()
        for _ in range(8):
            batch = [deletions[i] for i in rng.sample(ids, 10)]
            claims = worker.claim(batch)
            done = []
            for c in claims:
                for location in c.locations:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(_path(location.uri))
                    done.append(location.id)
            images = {
                c.deletion.image_id
                for c in claims
                if not (c.skip_reason or c.busy)
            }
            finish_claim(worker, claims, done, [], images)

    def restorer(seed):
        rng = random.Random(seed)
        worker = cluster.glance_db()
        for image_id in rng.sample(ids, 15):
            try:
                worker.restore(image_id, verify_files, WINDOW)
            except RESTORE_REFUSALS as exc:
                refusals[type(exc).__name__] += 1
            else:
                with restored_lock:
                    restored.add(image_id)

    run_threads(
        *[lambda s=s: scrubber(s) for s in range(3)],
        *[lambda s=s: restorer(100 + s) for s in range(3)],
    )
    # last pass: whatever is still pending_delete goes
    final = scrubber_mod.Scrubber(
        cluster.glance_db(), FileStores(), futurist.SynchronousExecutor()
    )
    image_rows, _ = cluster.rows(ids)
    leftover = [
        deletions[i] for i in ids if image_rows[i].status == 'pending_delete'
    ]
    for outcome in final.scrub(leftover):
        assert outcome.status == scrubber_mod.SCRUBBED, outcome
    cluster.assert_final_state(originals, restored=restored)
    assert restored, 'no restore won: the race was not exercised'


@dataclasses.dataclass
class Takeover:
    """One image claimed by worker ``a``, then taken over by ``b`` (its
    claim judged stale ``lease_time`` + 1 s later: a paused ``a``, or
    clocks apart); ``restorer`` is a third party."""

    originals: dict
    image_id: str
    deletion: glance_db.Deletion
    a: glance_db.GlanceDB
    b: glance_db.GlanceDB
    restorer: glance_db.GlanceDB
    a_claim: glance_db.Claim
    b_claim: glance_db.Claim
    ids: list
    later: datetime.datetime


def _take_over(cluster):
    originals = cluster.make_images(1)
    [image_id] = originals
    deletion = cluster.deletion(image_id)
    a = cluster.glance_db(lease_time=10)
    b = cluster.glance_db(lease_time=10)
    later = utcnow() + 11 * SECOND
    [a_claim] = a.claim([deletion])
    [b_claim] = b.claim([deletion], now=later)
    ids = [loc.id for loc in a_claim.locations]
    assert [loc.id for loc in b_claim.locations] == ids
    return Takeover(
        originals,
        image_id,
        deletion,
        a,
        b,
        cluster.glance_db(),
        a_claim,
        b_claim,
        ids,
        later,
    )


def test_old_owner_cannot_hand_back_a_claim_that_was_taken_over(cluster):
    t = _take_over(cluster)
    # the old owner's delete failed (store timeout): it hands back
    finish_claim(t.a, t.a_claim, [], t.ids, {t.image_id})
    try:
        t.restorer.restore(t.image_id, verify_files, WINDOW)
    except RESTORE_REFUSALS:
        restored = set()
    else:
        restored = {t.image_id}
    # the new owner's delete goes through
    for location in t.b_claim.locations:
        FileStores().delete(location)
    finish_claim(t.b, t.b_claim, t.ids, [], {t.image_id})

    cluster.assert_final_state(t.originals, restored=restored)


def test_takeover_then_failed_delete_is_never_revivable(cluster):
    """Issue 7, finding 1: A claims and stalls past lease_time; B takes
    over; B's delete fails and B finishes; a restore comes; A's delete
    then completes.  The restore must have been refused: the row went to
    scrub_interrupted, not back to pending_delete."""
    t = _take_over(cluster)
    assert all(loc.taken_over for loc in t.b_claim.locations)
    finish_claim(t.b, t.b_claim, [], t.ids, {t.image_id})  # B's failed
    _, rows = cluster.rows([t.image_id])
    assert {r.status for r in rows[t.image_id]} == {'scrub_interrupted'}

    with pytest.raises(exceptions.DataGone) as info:
        t.restorer.restore(t.image_id, verify_files, WINDOW)
    assert 'interrupted' in str(info.value)
    # A wakes up: its delete completes, its finish moves nothing
    for location in t.a_claim.locations:
        FileStores().delete(location)
    finish_claim(t.a, t.a_claim, t.ids, [], {t.image_id})
    # the next scrub claims the interrupted row at once and completes
    [again] = t.b.claim([t.deletion])
    assert [loc.id for loc in again.locations] == t.ids
    finish_claim(t.b, again, t.ids, [], {t.image_id})
    cluster.assert_final_state(t.originals, restored=set())


def test_renewal_after_a_takeover_returns_nothing_and_fences_finish(cluster):
    """Issue 7, finding 2: after a takeover, A's renewal must not yield a
    claim on B's rows, whatever the clocks say: renew answers which rows
    are still A's (none), and A's finish of a failed delete then moves
    nothing -- B's rows are never handed back while B deletes."""
    t = _take_over(cluster)
    # same instant as B's claim: the old whole-second stamps collided here
    assert t.a.renew(t.a_claim.token, t.ids, now=t.later) == set()
    finish_claim(t.a, t.a_claim, [], t.ids, {t.image_id})  # A's failed
    _, rows = cluster.rows([t.image_id])
    assert {r.status for r in rows[t.image_id]} == {
        f'scrubbing:{t.b_claim.token}'
    }
    with pytest.raises(exceptions.ScrubInProgress):
        t.restorer.restore(t.image_id, verify_files, WINDOW)
    for location in t.b_claim.locations:
        FileStores().delete(location)
    finish_claim(t.b, t.b_claim, t.ids, [], {t.image_id})
    cluster.assert_final_state(t.originals, restored=set())


def test_restore_does_not_drop_the_entry_of_a_newer_deletion(cluster):
    from scrub_listener import restore as restore_mod

    originals = cluster.make_images(1)
    [image_id] = originals
    due_queue = cluster.due_queue(cluster.queue_url())
    gdb = cluster.glance_db()
    old = cluster.deletion(image_id)
    due_queue.enqueue([(old, old.deleted_at)])
    new_time = []

    class DeletedAgainBeforeForget:
        """The image is deleted again (and its event queued) right
        between the restore's commit and its queue clean-up."""

        def forget_deletion(self, forget_id, deleted_at):
            when = utcnow()
            cluster.glance_delete(image_id, when)
            new = cluster.deletion(image_id)
            new_time.append(new.deleted_at)
            due_queue.enqueue([(new, new.deleted_at + 60 * SECOND)])
            due_queue.forget_deletion(forget_id, deleted_at)

    restorer = restore_mod.Restorer(
        gdb, FileStores(), DeletedAgainBeforeForget(), WINDOW
    )
    restorer.restore(image_id)

    entries = due_queue.entries_for({image_id}).get(image_id, [])
    assert [e.deletion.deleted_at for e in entries] == new_time


def test_restore_of_image_sharing_data_with_a_claimed_image(cluster):
    # Regression: restore(B) succeeded although A's scrub had claimed
    # the same data; A's delete then left B active without data.
    url_path = os.path.join(cluster.store_dir, 'shared-data')
    data = os.urandom(512)
    with open(url_path, 'wb') as f:
        f.write(data)
    locations = [('file://' + url_path, {'store': 'fs'})]
    a = glance_rows.make_image(cluster.engine, locations=locations, data=data)
    b = glance_rows.make_image(cluster.engine, locations=locations, data=data)
    scrub_side = cluster.glance_db()
    restore_side = cluster.glance_db()

    [claimed] = scrub_side.claim([cluster.deletion(a)])
    assert not claimed.locations[0].shared
    try:
        restore_side.restore(b, verify_files, WINDOW)
    except RESTORE_REFUSALS:
        restored = False
    else:
        restored = True
    stores = FileStores()
    stores.delete(claimed.locations[0])
    finish_claim(scrub_side, claimed, [claimed.locations[0].id], [], {a})

    if restored:
        assert cluster.image(b).status == 'active'
        assert os.path.exists(url_path), 'active image B lost its data'
        assert _read(url_path) == data


@pytest.mark.parametrize('key', [None, KEY], ids=['plain', 'encrypted'])
def test_restore_racing_an_open_claim_of_an_image_sharing_its_data(
    cluster, key, request
):
    """Images A and B point at the same data.  A's claim is paused inside
    its transaction (rows locked, not yet ``scrubbing``) while B is
    restored: the restore must wait and refuse, or the claim must then
    see B live and keep the data -- never an active B without data."""
    shared_path = os.path.join(cluster.store_dir, 'shared-data')
    data = os.urandom(512)
    with open(shared_path, 'wb') as f:
        f.write(data)
    locations = [('file://' + shared_path, {'store': 'fs'})]
    a = glance_rows.make_image(
        cluster.engine, locations=locations, data=data, encrypt_key=key
    )
    b = glance_rows.make_image(
        cluster.engine, locations=locations, data=data, encrypt_key=key
    )
    scrub_side = cluster.glance_db(encryption_key=key)
    restore_side = cluster.glance_db(encryption_key=key)
    paused = Paused(scrub_side.engine, 'UPDATE image_locations')

    claim = Outcome(lambda: scrub_side.claim([cluster.deletion(a)]))
    assert paused.reached.wait(30)
    restore = Outcome(lambda: restore_side.restore(b, verify_files, WINDOW))
    restore.blocked()
    paused.go.set()
    claim.join()
    restore.join()

    assert claim.error is None, claim.error
    [claimed] = claim.result
    stores = FileStores()
    for location in claimed.locations:
        if not location.shared:
            stores.delete(location)
    finish_claim(
        scrub_side, claimed, [loc.id for loc in claimed.locations], [], {a}
    )
    if restore.error is None:
        assert cluster.image(b).status == 'active'
        assert os.path.exists(shared_path), 'active image B lost its data'
        assert _read(shared_path) == data
    else:
        assert isinstance(restore.error, RESTORE_REFUSALS), restore.error


def test_live_url_index_sees_rows_committed_out_of_order(cluster):
    # Regression: with metadata_encryption_key the live-URL index missed
    # a live row committed after one with a higher id and later
    # updated_at, and its data was deleted as not shared.
    if cluster.backend == 'sqlite':
        pytest.skip('SQLite writers are serialised: no out-of-order commit')
    live = glance_rows.make_image(
        cluster.engine, cluster.store_dir, status='active', encrypt_key=KEY
    )
    other_live = glance_rows.make_image(
        cluster.engine, cluster.store_dir, status='active', encrypt_key=KEY
    )
    shared_path = os.path.join(cluster.store_dir, 'shared')
    with open(shared_path, 'wb') as f:
        f.write(b'live data')
    shared_url = 'file://' + shared_path
    from glance.common import crypt

    locations = cluster.tables['image_locations']
    t0 = ago(5)

    def location_row(image_id, url, when):
        return {
            'image_id': image_id,
            'value': crypt.urlsafe_encrypt(KEY, url),
            'meta_data': '{"store": "fs"}',
            'status': 'active',
            'created_at': when,
            'updated_at': when,
            'deleted': False,
        }

    scrub_side = cluster.glance_db(encryption_key=KEY)
    slow = cluster.engine.connect()
    slow_tx = slow.begin()
    # glance-api request 1 adds a location to a live image: its
    # transaction takes the lower id and its timestamp first ...
    slow.execute(locations.insert(), location_row(live, shared_url, t0))
    # ... request 2 adds another one and commits first
    with cluster.engine.begin() as conn:
        conn.execute(
            locations.insert(),
            location_row(other_live, 'file:///elsewhere', t0 + SECOND),
        )
    # a claim in between fills the index
    warmup = glance_rows.make_image(
        cluster.engine, cluster.store_dir, encrypt_key=KEY
    )
    [warm] = scrub_side.claim([cluster.deletion(warmup)])
    assert len(warm.locations) == 1
    slow_tx.commit()
    slow.close()
    # now an image with the same data is deleted and claimed
    dead = glance_rows.make_image(
        cluster.engine,
        locations=[(shared_url, {'store': 'fs'})],
        encrypt_key=KEY,
    )

    [claim] = scrub_side.claim([cluster.deletion(dead)])

    assert [loc.shared for loc in claim.locations] == [True]


# ====================================================================
# Late events
# ====================================================================


def _in_process_drain(cluster, queue_url, scrub_time, stores=None):
    gdb = cluster.glance_db()
    due_queue = cluster.due_queue(queue_url)
    scrubber = scrubber_mod.Scrubber(
        gdb, stores or FileStores(), futurist.SynchronousExecutor()
    )
    return (
        gdb,
        due_queue,
        drain_mod.Drain(due_queue, scrubber, 'test-worker', 50, scrub_time),
    )


def test_late_event_after_restore_then_deleted_again(cluster):
    """The image.delete event of deletion D is read, X is restored, then
    the event's entry is committed.  Claimed → skipped, data intact.  X is
    deleted again: the old entry does not scrub the new deletion early,
    the new deletion is queued with its own due time."""
    scrub_time = 3600
    originals = cluster.make_images(1)
    [image_id] = originals
    queue_url = cluster.queue_url()
    gdb, due_queue, the_drain = _in_process_drain(
        cluster, queue_url, scrub_time
    )
    restore_side = cluster.glance_db()

    class RestoreRightAfterRead:
        """The endpoint's view of the Glance DB; a restore lands between
        its read of deleted_at and its enqueue."""

        def get_deletion_times(self, image_ids):
            times = gdb.get_deletion_times(image_ids)
            restore_side.restore(image_id, verify_files, WINDOW)
            return times

    endpoint = notification.ImageDeleteEndpoint(
        RestoreRightAfterRead(), due_queue, scrub_time
    )
    endpoint.info([{'payload': {'id': image_id}, 'metadata': {}}])
    [entry] = due_queue.entries_for({image_id})[image_id]
    assert entry.due_at < utcnow()  # deleted an hour ago: due now
    assert cluster.image(image_id).status == 'active'

    [outcome] = the_drain.drain_batch()

    assert outcome.status == scrubber_mod.SKIPPED
    assert due_queue.count() == 0
    cluster.assert_final_state(originals, restored={image_id})

    # deleted again; the stale entry of the first deletion comes back too
    old = entry.deletion
    due_queue.enqueue([(old, old.deleted_at)])
    new_time = ago(2)
    cluster.glance_delete(image_id, new_time)
    [outcome] = the_drain.drain_batch()
    assert outcome.status == scrubber_mod.SKIPPED
    assert outcome.superseded_by == cluster.image(image_id).deleted_at
    assert os.path.exists(cluster.data_path(image_id))
    [row] = due_queue.entries_for({image_id})[image_id]
    assert row.deletion.deleted_at == cluster.image(image_id).deleted_at
    assert row.due_at == row.deletion.deleted_at + datetime.timedelta(
        seconds=scrub_time
    )
    assert the_drain.drain_batch() == []
    # a late event for the new deletion adds nothing
    endpoint = notification.ImageDeleteEndpoint(gdb, due_queue, scrub_time)
    endpoint.info([{'payload': {'id': image_id}, 'metadata': {}}])
    assert due_queue.count() == 1
    # when its time comes, it is scrubbed
    [outcome] = the_drain.drain_batch(due_before=row.due_at)
    assert outcome.status == scrubber_mod.SCRUBBED
    assert not os.path.exists(cluster.data_path(image_id))


def test_late_event_from_another_process_after_restore(cluster):
    """Same, across processes: the restore is a ``scrub-listener-manage
    restore --direct`` and the scrub a ``scrub-listener --sweep-once``."""
    originals = cluster.make_images(3)
    image_id, other, third = sorted(originals)
    queue_url = cluster.queue_url()
    config = cluster.config('late', queue_url, scrub_time=600)
    due_queue = cluster.due_queue(queue_url)
    deletion = cluster.deletion(image_id)

    restore = cluster.spawn(
        'restore',
        [MANAGE, '--config-file', config, 'restore', '--direct', image_id],
    )
    assert restore.wait() == 0, restore.output()
    # the event of the first deletion is committed after the restore
    due_queue.enqueue([(deletion, ago(1))])
    sweep = cluster.sweeper('sweep', config)
    assert sweep.wait() == 0, sweep.output()

    assert 'skipped 1' in sweep.output()
    assert read_delete_logs([sweep]) == collections.Counter(
        {('start', cluster.data_path(p)): 1 for p in (other, third)}
        | {('deleted', cluster.data_path(p)): 1 for p in (other, third)}
    )
    cluster.assert_final_state(originals, restored={image_id})


def test_old_location_entry_does_not_scrub_a_later_removal_early(cluster):
    # Regression: the entry of the first removal was claimed without
    # comparing deletion times and scrubbed the second removal early.
    scrub_time = 3600
    live = glance_rows.make_image(
        cluster.engine, cluster.store_dir, status='active'
    )
    extra_path = os.path.join(cluster.store_dir, 'second-copy')
    with open(extra_path, 'wb') as f:
        f.write(b'second copy')
    locations = cluster.tables['image_locations']
    with cluster.engine.begin() as conn:
        extra = conn.execute(
            locations.insert(),
            {
                'image_id': live,
                'value': 'file://' + extra_path,
                'meta_data': '{"store": "fs"}',
                'status': 'active',
                'created_at': ago(7200),
                'updated_at': ago(7200),
                'deleted': False,
            },
        ).inserted_primary_key[0]
    queue_url = cluster.queue_url()
    gdb, due_queue, the_drain = _in_process_drain(
        cluster, queue_url, scrub_time
    )
    # removed 2 h ago; its event queued it, due 1 h ago
    first_removal = ago(7200)
    cluster.remove_location(extra, first_removal)
    [old_row] = [r for r in cluster.locations(live) if r.id == extra]
    old = glance_db.Deletion(live, extra, old_row.deleted_at)
    due_queue.enqueue([(old, old.deleted_at + SECOND * scrub_time)])
    # the image is deleted 10 s after, and restored: the location was
    # deleted within deletion_window before the image, so it comes back
    cluster.glance_delete(live, first_removal + 10 * SECOND)
    gdb.restore(live, verify_files, WINDOW)
    assert {r.id: r.status for r in cluster.locations(live)}[extra] == (
        'active'
    )
    # removed again, now: must stay until now + scrub_time
    cluster.remove_location(extra, ago(0))

    the_drain.drain_batch()

    assert os.path.exists(extra_path), 'scrubbed an hour early'


# ====================================================================
# Processes: sweep-once, restore, crash (real glance_store, real CLIs)
# ====================================================================


def _deleted_paths(procs):
    """Counter path -> how often a process really deleted it, and the
    Counter of NotFound answers."""
    deleted, notfound = collections.Counter(), collections.Counter()
    for (word, path), count in read_delete_logs(procs).items():
        if word == 'deleted':
            deleted[path] += count
        elif word == 'notfound':
            notfound[path] += count
    return deleted, notfound


@pytest.mark.parametrize('queues', ['shared', 'per-host'])
def test_sweep_once_processes_scrub_each_image_exactly_once(cluster, queues):
    """Three ``--sweep-once`` processes at once on 500 images.

    ``shared``: one due-queue (MariaDB / PostgreSQL / one SQLite file) --
    the queue leases split the work.  ``per-host``: each process its own
    SQLite queue, so all three queue and try every image -- the Glance DB
    claim alone must keep the deletes apart.  Every process is held at its
    first store delete until all three are there, so they really overlap.
    """
    count = 500
    originals = cluster.make_images(count, size=64)
    gate = cluster.gate()
    shared = cluster.queue_url() if queues == 'shared' else None
    if shared:
        # created once beforehand: the start-up race on a fresh queue
        # database is test_instances_starting_together_...
        cluster.due_queue(shared)
    procs = []
    for n in range(3):
        url = shared or cluster.queue_url(shared=False, name=f'host{n}')
        config = cluster.config(f'host{n}', url, batch_size=25, pool_size=2)
        procs.append(cluster.sweeper(f'sweep{n}', config, gate=gate))
    arrived = gate.wait_for(procs)
    gate.release()
    codes = [proc.wait() for proc in procs]

    deleted, notfound = _deleted_paths(procs)
    twice = sorted(path for path, n in deleted.items() if n > 1)
    assert twice == [], f'{len(twice)} paths deleted twice'
    # not even a harmless second attempt: the claim keeps them apart
    assert sum(notfound.values()) == 0, notfound
    outputs = '\n'.join(p.output() for p in procs)
    # (a shared MariaDB queue used to fail here with "ERROR: database
    # error: Deadlock found", exit 3)
    assert codes == [0, 0, 0], outputs
    assert set(deleted) == {cluster.data_path(i) for i in originals}
    # they overlapped: at least two were deleting at the same time
    assert len(arrived) >= 2, outputs
    if not shared:
        assert len(arrived) == 3, outputs
    cluster.assert_final_state(originals, restored=set())
    assert cluster.scrubbing_rows() == []
    if shared:
        assert cluster.due_queue(shared).count() == 0


@pytest.mark.parametrize('round_', [1, 2])
def test_restores_racing_sweep_once_processes(cluster, round_):
    """Two ``--sweep-once`` processes (own queues, slowed deletes) while
    four ``scrub-listener-manage restore --direct`` processes and three
    restore threads go for random images, all released at once; then a
    final sweep.  Exactly the images whose restore succeeded are active,
    with their data byte-identical; every other one is deleted, data
    gone; no data was deleted twice."""
    originals = cluster.make_images(120)
    ids = sorted(originals)
    rng = random.Random(f'{cluster.backend}-{round_}')
    gate = cluster.gate()
    sweepers = [
        cluster.sweeper(
            f'sweep{n}',
            cluster.config(
                f'sweep{n}',
                cluster.queue_url(shared=False, name=f'q{n}'),
                batch_size=10,
                pool_size=2,
            ),
            delay=0.01,
            gate=gate,
        )
        for n in range(2)
    ]
    restore_config = cluster.config(
        'restore', cluster.queue_url(shared=False, name='q-restore')
    )
    cli_targets = rng.sample(ids, 4)
    restorers = [
        cluster.spawn(
            f'restore{n}',
            [
                MANAGE,
                '--config-file',
                restore_config,
                'restore',
                '--direct',
                image_id,
            ],
            gate=gate,
        )
        for n, image_id in enumerate(cli_targets)
    ]
    released = threading.Event()

    def restorer(targets):
        worker = cluster.glance_db()
        assert released.wait(90)
        results = {}
        for image_id in targets:
            try:
                worker.restore(image_id, verify_files, WINDOW)
            except exceptions.NotPendingDelete as exc:
                # 'deleted': the scrub won; 'active': restored already
                results[image_id] = f'NotPendingDelete({exc.status})'
            except RESTORE_REFUSALS as exc:
                results[image_id] = type(exc).__name__
            else:
                results[image_id] = 'restored'
        return results

    targets = [rng.sample(ids, 12) for _ in range(3)]
    threads = [Outcome(lambda t=t: restorer(t)) for t in targets]
    arrived = gate.wait_for(sweepers + restorers)
    gate.release()
    released.set()
    sweep_codes = [p.wait() for p in sweepers]
    for proc in restorers:
        proc.wait()
    for thread in threads:
        thread.join()
        assert thread.error is None, thread.error

    assert sweep_codes == [0, 0], '\n'.join(p.output() for p in sweepers)
    assert len(arrived) == len(sweepers) + len(restorers)
    # 0 restored, 5 not pending_delete, 6 data gone, 7 scrub in progress
    for proc in restorers:
        assert proc.returncode in (0, 5, 6, 7), proc.output()
        assert 'Traceback' not in proc.output(), proc.output()
    outcomes = collections.Counter()
    restored = set()
    for image_id, proc in zip(cli_targets, restorers, strict=True):
        outcomes[f'cli exit {proc.returncode}'] += 1
        if proc.returncode == 0:
            restored.add(image_id)
    for thread in threads:
        for image_id, result in thread.result.items():
            outcomes[result] += 1
            if result == 'restored':
                restored.add(image_id)
    final = cluster.sweeper(
        'final',
        cluster.config(
            'final', cluster.queue_url(shared=False, name='q-final')
        ),
    )
    assert final.wait() == 0, final.output()

    deleted, _ = _deleted_paths([*sweepers, final])
    assert [p for p, n in deleted.items() if n > 1] == []
    active, gone = cluster.assert_final_state(originals, restored=restored)
    for image_id in active:
        assert cluster.data_path(image_id) not in deleted
    print(f'restore outcomes: {dict(outcomes)}; {len(active)} active')
    assert restored, f'no restore won the race: {dict(outcomes)}'
    lost = sum(
        outcomes[name]
        for name in (
            'ScrubInProgress',
            'DataGone',
            'NotPendingDelete(deleted)',
            'cli exit 6',
            'cli exit 7',
        )
    )
    assert lost, f'no restore lost the race: {dict(outcomes)}'


def _wait_for_deletes(proc, count, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        done = sum(
            n
            for (w, _), n in read_delete_logs([proc]).items()
            if w == 'deleted'
        )
        if done >= count:
            return done
        if proc.poll() is not None:
            pytest.fail(
                f'{proc.name} ended before {count} deletes:\n{proc.output()}'
            )
        assert time.monotonic() < deadline, f'{proc.name}: {done} deletes'
        time.sleep(0.05)


def test_sweep_once_killed_mid_drain_is_taken_over(cluster):
    """SIGKILL a ``--sweep-once`` in the middle of a batch (deletes
    slowed down), wait out ``lease_time`` (10 s, the minimum), run another:
    everything scrubbed, no location left ``scrubbing``, queue empty, no
    data deleted twice (a delete the killed process had done but not
    logged is at most a NotFound)."""
    originals = cluster.make_images(60)
    queue_url = cluster.queue_url()
    config = cluster.config(
        'crash', queue_url, lease_time=10, batch_size=20, pool_size=2
    )
    first = cluster.sweeper('first', config, delay=0.2)
    _wait_for_deletes(first, 6)
    first.kill()

    scrubbing = cluster.scrubbing_rows()
    assert scrubbing, 'killed outside a batch: nothing to take over'
    due_queue = cluster.due_queue(queue_url)
    leases = [
        e.lease_expires
        for entries in due_queue.entries_for(set(originals)).values()
        for e in entries
        if e.lease_expires is not None
    ]
    assert leases
    expiry = max(
        max(leases),
        max(r.updated_at for r in scrubbing) + datetime.timedelta(seconds=10),
    )
    # why a sleep: lease expiry is a wall-clock time, nothing to wait on
    time.sleep(max(0.0, (expiry - utcnow()).total_seconds()) + 1.0)

    second = cluster.sweeper('second', config)
    assert second.wait() == 0, second.output()

    deleted, notfound = _deleted_paths([first, second])
    assert [p for p, n in deleted.items() if n > 1] == []
    assert set(deleted) | set(notfound) == {
        cluster.data_path(i) for i in originals
    }
    # The killed batch is redone as a whole (its finish never ran): what
    # the first process had deleted comes back as NotFound, plus at most
    # the deletes in flight when it died (pool size 2).
    by_first, _ = _deleted_paths([first])
    assert len(set(notfound) - set(by_first)) <= 2, notfound
    assert cluster.scrubbing_rows() == []
    assert due_queue.count() == 0
    cluster.assert_final_state(originals, restored=set())


def test_slow_batch_of_a_live_worker_is_not_taken_over(cluster):
    if cluster.backend != 'postgresql':
        pytest.skip('one backend is enough for a 20 s test')
    # one batch of 20 deletes of 1 s on one thread: 20 s, lease 10 s
    originals = cluster.make_images(20)
    slow = cluster.sweeper(
        'slow',
        cluster.config(
            'slow',
            cluster.queue_url(shared=False, name='q-slow'),
            lease_time=10,
            batch_size=20,
            pool_size=1,
        ),
        delay=1.0,
    )
    _wait_for_deletes(slow, 1)
    claimed = cluster.scrubbing_rows()
    assert len(claimed) >= 18
    expiry = max(r.updated_at for r in claimed) + 10 * SECOND
    # why a sleep: lease expiry is a wall-clock time, nothing to wait on
    time.sleep(max(0.0, (expiry - utcnow()).total_seconds()) + 0.5)
    assert slow.poll() is None, 'the batch was meant to outlast the lease'
    other = cluster.sweeper(
        'other',
        cluster.config(
            'other',
            cluster.queue_url(shared=False, name='q-other'),
            lease_time=10,
        ),
    )
    assert other.wait() == 0, other.output()
    assert slow.wait() == 0, slow.output()

    deleted, notfound = _deleted_paths([slow, other])
    assert [p for p, n in deleted.items() if n > 1] == []
    cluster.assert_final_state(originals, restored=set())
    assert sum(notfound.values()) == 0, (
        f'{sum(notfound.values())} deletes repeated by the other process'
    )


# ====================================================================
# The due-queue shared by several workers (threads, all backends)
# ====================================================================


@pytest.fixture
def shared_queue(cluster):
    return cluster.queue_url(shared=True)


def _deletions(count):
    when = ago(100)
    return sorted(
        (
            (glance_db.Deletion(str(uuid.uuid4()), None, when), when)
            for _ in range(count)
        ),
        key=lambda item: item[0].image_id,
    )


def test_racing_queue_claims_lease_each_entry_once(cluster, shared_queue):
    items = _deletions(600)
    cluster.due_queue(shared_queue).enqueue(items)
    queues = [cluster.due_queue(shared_queue) for _ in range(5)]

    def worker(n):
        got = []
        while True:
            entries = queues[n].claim(f'w{n}', 37)
            if not entries:
                return got
            got.extend(e.deletion for e in entries)

    results = run_threads(*[lambda n=n: worker(n) for n in range(5)])

    leased = collections.Counter(d for got in results for d in got)
    assert set(leased) == {d for d, _ in items}
    assert set(leased.values()) == {1}


def test_instances_starting_together_create_the_queue_schema(cluster, request):
    """Several instances start at once on a fresh shared queue database
    (a deployment on three hosts): each creates the queue table if it is
    missing; none may fail."""
    for _ in range(5):
        url = cluster.queue_url(shared=True)
        engines = [cluster.product_engine(url) for _ in range(4)]
        for engine in engines:  # connected, like a started service
            engine.connect().close()
        run_threads(
            *[
                lambda e=e: queue_mod.DueQueue(e).create_schema()
                for e in engines
            ]
        )
        assert queue_mod.DueQueue(engines[0]).count() == 0


def test_racing_enqueues_of_the_same_deletions(cluster, shared_queue):
    """Four producers (sweeps on four hosts) enqueue the same deletions
    in the same order: one row each, nothing raised."""
    items = _deletions(500)
    queues = [cluster.due_queue(shared_queue) for _ in range(4)]
    run_threads(*[lambda q=q: q.enqueue(items) for q in queues])
    assert queues[0].count() == 500


def test_enqueue_reports_only_new_rows(cluster, shared_queue):
    # Regression: on MariaDB a duplicate counted as new (ON DUPLICATE
    # KEY UPDATE with the FOUND_ROWS client flag).
    items = _deletions(50)
    due_queue = cluster.due_queue(shared_queue)
    assert due_queue.enqueue(items[:30]) == 30
    assert due_queue.enqueue(items[:30]) == 0
    assert due_queue.enqueue(items) == 20
    queues = [cluster.due_queue(shared_queue) for _ in range(4)]
    more = _deletions(200)
    counts = run_threads(*[lambda q=q: q.enqueue(more) for q in queues])
    assert sum(counts) == 200


def _lock_waiters(cluster, url):
    database = sa.engine.make_url(url).database
    if cluster.backend == 'postgresql':
        sql = (
            'SELECT count(*) FROM pg_stat_activity WHERE datname = :db '
            "AND wait_event_type = 'Lock'"
        )
    else:
        sql = (
            'SELECT count(*) FROM information_schema.innodb_trx t JOIN '
            'information_schema.processlist p ON p.id = '
            "t.trx_mysql_thread_id WHERE t.trx_state = 'LOCK WAIT' AND "
            'p.db = :db'
        )
    with cluster.engine.connect() as conn:
        return conn.execute(sa.text(sql), {'db': database}).scalar()


def test_enqueues_in_different_orders_do_not_deadlock(cluster, shared_queue):
    # Regression: enqueue neither sorted its rows nor retried a deadlock;
    # one of two such enqueues raised OperationalError.
    if cluster.backend == 'sqlite':
        pytest.skip('SQLite serialises writers: no row-lock deadlock')
    [(a, due_a), (b, due_b), (c, due_c)] = _deletions(3)
    holder = cluster.due_queue(shared_queue)
    one = cluster.due_queue(shared_queue)
    two = cluster.due_queue(shared_queue)
    # a third transaction holds C, so both enqueues line up on it with
    # their first row inserted: one holds B, the other A
    conn = holder.engine.connect()
    tx = conn.begin()
    conn.execute(
        holder._insert_ignoring_duplicates(),
        [
            {
                'image_id': c.image_id,
                'location_id': 0,
                'deleted_at': c.deleted_at,
                'due_at': due_c,
                'next_attempt_at': due_c,
                'attempts': 0,
                'created_at': utcnow(),
            }
        ],
    )
    first = Outcome(lambda: one.enqueue([(b, due_b), (c, due_c), (a, due_a)]))
    second = Outcome(lambda: two.enqueue([(a, due_a), (c, due_c), (b, due_b)]))
    deadline = time.monotonic() + 30
    while _lock_waiters(cluster, shared_queue) < 2:
        assert time.monotonic() < deadline, 'enqueues never lined up'
        time.sleep(0.05)
    tx.commit()
    conn.close()
    first.join()
    second.join()

    assert (first.error, second.error) == (None, None)
    assert one.count() == 3


def test_shared_queue_under_producers_and_consumers(cluster, shared_queue):
    """Two sweeps (sorted pages) and four drains (claim, complete) on one
    queue at once: nothing raises, no entry is leased twice, every
    deletion is handled, the queue ends empty.

    Regression: on MariaDB (REPEATABLE READ) enqueue, claim and complete
    deadlocked and OperationalError escaped every run."""
    items = _deletions(3000)
    queues = [cluster.due_queue(shared_queue) for _ in range(6)]
    errors = []
    producers_done = threading.Event()
    produced = [0]
    lock = threading.Lock()

    def producer(q):
        for start in range(0, len(items), 100):
            try:
                q.enqueue(items[start : start + 100])
            except Exception as exc:
                errors.append(f'enqueue: {exc!r:.200}')
        with lock:
            produced[0] += 1
            if produced[0] == 2:
                producers_done.set()

    def consumer(q, owner):
        leases = collections.Counter()
        idle = 0
        while True:
            try:
                entries = q.claim(owner, 37)
            except Exception as exc:
                errors.append(f'claim: {exc!r:.200}')
                continue
            if not entries:
                # done when the producers are and nothing is left (or
                # only rows whose lease a failed complete left behind)
                if producers_done.is_set():
                    idle += 1
                    if idle > 100 or q.count() == 0:
                        return leases
                time.sleep(0.01)
                continue
            idle = 0
            for entry in entries:
                leases[entry.id, entry.deletion] += 1
            try:
                q.complete(entries, owner)
            except Exception as exc:
                errors.append(f'complete: {exc!r:.200}')

    results = run_threads(
        lambda: producer(queues[0]),
        lambda: producer(queues[1]),
        *[lambda n=n: consumer(queues[2 + n], f'w{n}') for n in range(4)],
        timeout=120,
    )

    assert errors == []
    leases = sum((r for r in results if r), collections.Counter())
    assert {d for _, d in leases} == {d for d, _ in items}
    if cluster.backend != 'sqlite':  # SQLite reuses rowids
        assert set(leases.values()) == {1}
    assert queues[0].count() == 0


def test_restore_waiting_on_a_lock_answers_within_its_bound(cluster):
    """Issue 7, finding 8: a restore that waited on a row lock longer
    than the RPC timeout was reported as "service unreachable" and then
    succeeded.  With a lock bound it answers ScrubInProgress in time and
    changes nothing; once the lock is gone it succeeds."""
    if cluster.backend == 'sqlite':
        pytest.skip('SQLite waits at BEGIN, bounded by its busy timeout')
    originals = cluster.make_images(1)
    [image_id] = originals
    gdb = cluster.glance_db()
    images = cluster.tables['images']
    holder = cluster.engine.connect()
    tx = holder.begin()
    holder.execute(
        sa.select(images.c.id).where(images.c.id == image_id).with_for_update()
    ).all()
    try:
        started = time.monotonic()
        with pytest.raises(exceptions.ScrubInProgress):
            gdb.restore(image_id, verify_files, WINDOW, lock_timeout=1)
        took = time.monotonic() - started
    finally:
        tx.rollback()
        holder.close()
    print(f'\nrestore behind a held lock answered after {took:.2f} s')
    assert cluster.image(image_id).status == 'pending_delete'
    gdb.restore(image_id, verify_files, WINDOW, lock_timeout=1)
    cluster.assert_final_state(originals, restored={image_id})
