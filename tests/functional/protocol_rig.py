"""The hypothesis state machine that drives the real claim protocol.

Issue 7 asks for a mechanical proof that a restored image never loses its
data.  tests/model/protocol.py explores a model of the protocol
exhaustively; the machine here checks the *code* against the same
invariant:
hypothesis' stateful testing drives the real :class:`GlanceDB` (claim,
renew, finish, restore on the real Glance 33 schema, on SQLite, MariaDB
and PostgreSQL) and a real file store through random interleavings, and
checks the invariant against the database rows and the files after
every step.

The invariant (checked after every step)
----------------------------------------
1. Every ``active`` image has live locations, their files present with
   their original bytes, and no worker has a store delete in flight or
   still to start on any of those files (the in-flight deletes of a
   worker whose claim was taken over, or who crashed, included).
2. No file named by a live location (``deleted = 0``) has been removed.
3. Every location row's status is one of ``active``, ``pending_delete``,
   ``scrubbing:<20 characters>``, ``scrub_interrupted``, ``deleted``, and
   ``active`` exactly when the row is live.
4. An image is ``deleted`` only when none of its location rows is
   ``pending_delete``, ``scrubbing`` or ``scrub_interrupted``.
5. No ``pending_delete`` row has a store delete in flight or still to
   start from any claim of it (what ``pending_delete`` means in
   glance_db: revivable at any moment).  (1) catches a bad hand-back
   only once a restore has revived the row; (5) at the hand-back.

The rules also check what each call promises: a claim leaves its rows
``scrubbing:<token>`` and flags exactly the rows whose data a live
location names as shared (by ``data_key``); renew returns exactly the
rows still carrying its token; finish reports the images it closed; a
successful restore revives every location its deletion took.  That last
check found a bug, fixed since: restore took the scrubber's clock
(``updated_at``) to tell this deletion's rows from earlier removals
(``test_restore_leaves_out_no_location_of_its_deletion`` in
tests/functional/test_protocol_properties.py).

What is modelled
----------------
* The world: one or two images, ``active`` at first, their rows written
  by tools/glance_rows as glance-api 33 writes them, URLs in clear or
  encrypted with ``metadata_encryption_key`` (each encrypted anew).  The
  first may have two locations (two files).  The second has its own
  file, or names the first image's first file: by the same URL, or spelt
  ``file://<dir>/./<name>`` (one file, two spellings: only
  ``store.data_key`` tells they are the same data).
* Workers: two or three, each its own GlanceDB and engine, all in this
  process' one :class:`holders.Process` (so a worker "restarted on this
  host" has its predecessor's claims recognised as dead at once).  Each
  knows its claim: token, images, and per location: not started, in
  flight, returned ok, returned failed.
* Time: a simulated clock ticks one second per step and every call gets
  ``now=``.  A worker's clock may run ``lease_time + 1`` s ahead or
  behind; a claim may be *late* (its clock another ``lease_time + 1`` s
  ahead, so it takes over any claim); ``wait`` pauses everybody longer
  than ``lease_time``.
* Store deletes: a started delete runs to its end whatever becomes of
  its worker (finish, interrupt, crash, takeover); ``complete`` ends one,
  removing the file or failing.  Shared data is never sent to the store
  (the scrubber answers GONE at once).

Rules: Glance DELETE of an active image (or its half-finished form, cut
between its two transactions: finding 7); Glance removing one location of
an active image; claim of an ``image.delete`` event (any seen so far, so
also a late event of a deletion a restore undid); a sweep (the real
``iter_due_*`` queries, one batch); start a delete; complete one; renew;
finish (all deletes returned: GONE / FAILED, closing the images); an
interrupt (Ctrl-C: NOT_STARTED / UNKNOWN / what returned, no images, as
``Scrubber._finish_interrupted``); a crash (claims forgotten, rows left
``scrubbing``, its deletes still running); a restore with a ``verify``
that checks each file and its size; a pause of everybody.

Runs are deterministic in everything but hypothesis' choices: the
simulated clock also drives ``glance_db.utcnow`` (the sweep's lease
check, glance_rows' timestamps), so hypothesis can replay and shrink a
failure exactly; the test databases skip fsync (``_no_fsync``).

The tests that run it (random runs on every database, and fixed
sequences of its steps) are in tests/functional/test_protocol_properties.py:
:func:`make_rig` builds a backend's :class:`Rig`, :func:`machine` the
machine class bound to it.
"""

import collections
import contextlib
import dataclasses
import datetime
import functools
import os
import re
import shutil
import time
import urllib.parse

import hypothesis
import hypothesis.configuration
import sqlalchemy as sa
from hypothesis import stateful
from hypothesis import strategies as st
from sqlalchemy import event

from scrub_listener import db
from scrub_listener import exceptions
from scrub_listener import glance_db
from scrub_listener import holders
from scrub_listener import store as store_mod
from tests.functional.concurrency_fixtures import RESTORE_REFUSALS
from tools import glance_rows
from tools import harness

LEASE = 10  # lease_time, in seconds of the simulated clock
WINDOW = 60  # [scrubber] deletion_window default
SIZE = 64  # bytes per data file
KEY = '0123456789abcdef0123456789abcdef'  # metadata_encryption_key
SECOND = datetime.timedelta(seconds=1)
START = datetime.datetime(2026, 1, 1)  # naive UTC, like Glance's times
STALE = datetime.timedelta(seconds=LEASE + 1)  # beyond any lease
# A worker's clock against the true one, in seconds: right, ahead or
# behind by more than a lease.
SKEWS = (0, LEASE + 1, -(LEASE + 1))
EXAMPLES = int(os.environ.get('SCRUB_LISTENER_HYPOTHESIS_EXAMPLES', 150))
SETTINGS = hypothesis.settings(
    max_examples=EXAMPLES,
    stateful_step_count=25,
    deadline=None,
    database=None,  # nothing saved between runs (see also make_rig)
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
# The explain phase replays a falsifying run hundreds of times more.
FIND_AND_SHRINK = (
    hypothesis.Phase.generate,
    hypothesis.Phase.shrink,
)

# Two spellings of one file only count as one with store.data_key (the
# fix of issue 7, finding 5); without it the claim compares strings.
DATA_KEY = getattr(store_mod, 'data_key', None)
SHARING = ('own', 'same-url') + (('other-spelling',) if DATA_KEY else ())
PROCESS = holders.this_process('protocol-properties')

ROW_STATUSES = {'active', 'pending_delete', 'scrub_interrupted', 'deleted'}
CLAIMED = re.compile(r'scrubbing:.{20}')
UNFINISHED = re.compile(r'pending_delete|scrub_interrupted|scrubbing:.*')

NOT_STARTED = 'not started'
IN_FLIGHT = 'in flight'
RETURNED_OK = 'returned ok'
RETURNED_FAILED = 'returned failed'
RETURNED = {RETURNED_OK, RETURNED_FAILED}
# What the scrubber tells finish about each (Scrubber._cut_short): what
# never started may go back, what started and did not return may still
# delete.
VERDICTS = {
    RETURNED_OK: glance_db.Verdict.GONE,
    RETURNED_FAILED: glance_db.Verdict.FAILED,
    NOT_STARTED: glance_db.Verdict.NOT_STARTED,
    IN_FLIGHT: glance_db.Verdict.UNKNOWN,
}

WORKER = st.integers(0, 2)
INDEX = st.integers(0, 7)


def _pick(items, index):
    """``items[index]``, wrapped: shrinks towards the first item."""
    return items[index % len(items)]


def _path(uri):
    # What the file store unlinks (our URLs have no netloc).
    return urllib.parse.urlsplit(uri).path


def _data_of(uri):
    return os.path.realpath(_path(uri))


def _key(uri):
    return DATA_KEY(uri) if DATA_KEY else uri


def _verify(locations):
    """GlanceDB.restore's verify: each file there, with the image's size."""
    for location in locations:
        path = _path(location.uri)
        if not os.path.isfile(path) or os.path.getsize(path) != location.size:
            raise exceptions.DataGone(
                image_id=location.image_id, reason='file missing or cut'
            )


def _no_fsync(dbapi_conn, record):
    """Commits without waiting for the disk: a test database need not
    survive a power cut, and fsync was most of the time of a step.  (No
    effect on locking or isolation, which is what the protocol rests on.)
    """
    module = type(dbapi_conn).__module__
    if module.startswith('sqlite3'):
        dbapi_conn.execute('PRAGMA synchronous = OFF')
    elif module.startswith('psycopg'):
        with dbapi_conn.cursor() as cursor:
            cursor.execute('SET synchronous_commit = off')
        dbapi_conn.commit()  # a rollback would undo the SET


class Rig:
    """One backend's engines and directories, shared by all examples.

    ``clock`` is the true time of the simulated world: the GlanceDB
    clock (the sweep's lease check) and glance_db.utcnow (glance_rows'
    timestamps) read it, so that
    nothing depends on how fast the machine runs and hypothesis can
    replay a run exactly.
    """

    def __init__(self, url, tmp_path):
        self.url = url
        self.tmp = tmp_path
        self.clock = START
        # Glance's writes and the invariant's reads.
        self.engine = sa.create_engine(url)
        # One product engine per worker and one for the restorer, as
        # separate hosts would have.
        self.engines = [db.create_engine(url, 'test') for _ in range(4)]
        for engine in [self.engine, *self.engines]:
            event.listen(engine, 'connect', _no_fsync)
        self.runs = 0
        self.steps = 0
        self.seen = collections.Counter()  # what happened, for the report

    def glance_db(self, index, key):
        return glance_db.GlanceDB(
            self.engines[index],
            encryption_key=key,
            lease_time=LEASE,
            data_key=DATA_KEY,
            process=PROCESS,
            now=lambda: self.clock,
        )

    def report(self, started):
        seen = ', '.join(f'{k} {v}' for k, v in sorted(self.seen.items()))
        return (
            f'{harness.backend_of(self.url)}: {self.runs} runs, '
            f'{self.steps} steps in {time.monotonic() - started:.1f} s '
            f'({seen})'
        )

    def close(self):
        for engine in [self.engine, *self.engines]:
            engine.dispose()


@dataclasses.dataclass
class Held:
    """A worker's claim, as the worker knows it."""

    serial: int  # which claim: a late delete must not report to a newer
    token: str
    images: set  # images finish may close (deletions of whole images)
    locations: dict  # location id -> glance_db.Location
    progress: dict  # location id -> NOT_STARTED ... RETURNED_FAILED


@dataclasses.dataclass
class Worker:
    """One simulated scrub worker: its GlanceDB and the claims it holds."""

    name: str
    gdb: glance_db.GlanceDB
    skew: datetime.timedelta  # its clock against the true one
    held: Held | None = None


@dataclasses.dataclass(frozen=True)
class Flight:
    """A store delete that started and has not returned."""

    worker: str
    serial: int
    location_id: int
    data: str  # the file's real path


class ProtocolMachine(stateful.RuleBasedStateMachine):
    """See the module docstring; ``rig`` is set by :func:`machine`."""

    rig = None

    def __init__(self):
        super().__init__()
        self.rig.runs += 1
        self.workers = []
        self.flights = []
        self.events = []  # Deletions announced so far, stale ones too
        self.original = {}  # real path -> bytes
        self.taken = {}  # image id -> ids of rows its last deletion took
        self.image_ids = []  # in creation order: picks must not
        # depend on random uuids, or hypothesis cannot replay a run
        self.images, self.rows = {}, []
        self.serial = 0
        self.dir = None

    # -- the world -------------------------------------------------------

    @stateful.initialize(
        two_images=st.booleans(),
        sharing=st.sampled_from(SHARING),
        two_locations=st.booleans(),
        skews=st.lists(st.sampled_from(SKEWS), min_size=2, max_size=3),
        encrypted=st.booleans(),
    )
    def world(
        self, two_images, sharing, two_locations, skews, encrypted=False
    ):
        # encrypted: metadata_encryption_key, every URL encrypted anew
        self.key = KEY if encrypted else None
        self.rig.seen['encrypted world'] += encrypted
        harness.truncate_glance_tables(self.rig.url)
        self.dir = str(self.rig.tmp / f'run-{self.rig.runs}')
        os.makedirs(self.dir)
        self.rig.clock = START
        first = [self._file('a0')] + (
            [self._file('b0')] if two_locations else []
        )
        self._image(first)
        if two_images:
            self._image([self._second_url(first[0], sharing)])
        self.workers = [
            Worker(f'w{i}', self.rig.glance_db(i, self.key), SECOND * skew)
            for i, skew in enumerate(skews)
        ]
        self.restorer = self.rig.glance_db(3, self.key)
        self._refresh()

    def _file(self, name):
        path = os.path.join(self.dir, name)
        data = (name * SIZE).encode()[:SIZE]
        with open(path, 'wb') as f:
            f.write(data)
        self.original[os.path.realpath(path)] = data
        return 'file://' + path

    def _second_url(self, first_url, sharing):
        if sharing == 'own':
            return self._file('a1')
        if sharing == 'same-url':
            return first_url
        head, name = first_url.rsplit('/', 1)
        return f'{head}/./{name}'

    def _image(self, urls):
        image_id = glance_rows.make_image(
            self.rig.engine,
            data=b'x' * SIZE,
            status='active',
            locations=[(url, {'store': 'fs'}) for url in urls],
            encrypt_key=self.key,
        )
        self.image_ids.append(image_id)

    def teardown(self):
        for worker in self.workers:
            if worker.held is not None:
                PROCESS.drop(worker.held.token)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- Glance ------------------------------------------------------------

    @stateful.precondition(lambda self: self._images_in('active'))
    @stateful.rule(k=INDEX, half=st.sampled_from([False, False, True]))
    def glance_delete(self, k, half):
        """A DELETE; ``half``: glance-api died between its two
        transactions (image pending_delete with deleted = 0 and no
        deleted_at: its deletion time is updated_at)."""
        image_id = _pick(self._images_in('active'), k)
        now = self._tick()
        self.taken[image_id] = {r.id for r in self._live_rows(image_id)}
        delete = (
            glance_rows.half_finished_delete
            if half
            else glance_rows.glance_delete
        )
        delete(self.rig.engine, image_id, now)
        self.rig.seen['half-finished delete'] += half
        self.events.append(glance_db.Deletion(image_id, None, now))

    @stateful.precondition(lambda self: self._removable())
    @stateful.rule(k=INDEX)
    def remove_location(self, k):
        # Glance keeps at least one location on an active image.
        row = _pick(self._removable(), k)
        now = self._tick()
        glance_rows.remove_location(self.rig.engine, row.id, now)
        self.events.append(glance_db.Deletion(row.image_id, row.id, now))

    # -- scrubbers ---------------------------------------------------------

    @stateful.precondition(lambda self: self._idle() and self.events)
    @stateful.rule(w=WORKER, k=INDEX, late=st.booleans())
    def claim(self, w, k, late):
        """An image.delete event (or a duplicate, or a late one)."""
        self._claim(_pick(self._idle(), w), [_pick(self.events, k)], late)

    @stateful.precondition(lambda self: self._idle() and self._due())
    @stateful.rule(w=WORKER, late=st.booleans())
    def sweep(self, w, late):
        """What the sweep finds due, claimed as one batch."""
        worker = _pick(self._idle(), w)
        now = self.rig.clock
        due = [
            deletion
            for pages in (
                worker.gdb.iter_due_images(now, 100),
                worker.gdb.iter_due_removed_locations(now, 100),
            )
            for page in pages
            for deletion in page
        ]
        if due:
            self._claim(worker, due, late)
        else:
            self._tick()

    def _claim(self, worker, deletions, late):
        now = (
            self._tick()
            + worker.skew
            + (STALE if late else datetime.timedelta(0))
        )
        claims = worker.gdb.claim(deletions, now=now)
        locations = {loc.id: loc for c in claims for loc in c.locations}
        self.serial += 1
        worker.held = Held(
            self.serial,
            claims[0].token,
            {
                c.deletion.image_id
                for c in claims
                if c.deletion.location_id is None
                and not (c.skip_reason or c.busy)
            },
            locations,
            dict.fromkeys(locations, NOT_STARTED),
        )
        self._check_claimed(worker.held)
        for location in locations.values():
            self.rig.seen[
                'claimed shared' if location.shared else 'claimed'
            ] += 1
            self.rig.seen['claimed unclean'] += location.taken_over

    def _check_claimed(self, held):
        self._refresh()
        status = {r.id: r.status for r in self.rows}
        live = {_key(self._uri(r)) for r in self.rows if not r.deleted}
        for location in held.locations.values():
            assert status[location.id] == glance_db.claimed_status(
                held.token
            ), f'claimed location {location.id} is {status[location.id]}'
            assert location.shared == (_key(location.uri) in live), (
                f'location {location.id} shared={location.shared}, '
                f'live data keys {live}'
            )

    @stateful.precondition(lambda self: self._startable())
    @stateful.rule(w=WORKER, k=INDEX)
    def start_delete(self, w, k):
        worker = _pick(self._startable(), w)
        held = worker.held
        location_id = _pick(
            sorted(i for i, p in held.progress.items() if p == NOT_STARTED), k
        )
        location = held.locations[location_id]
        self._tick()
        if location.shared:
            # Scrubber._delete_one: kept, GONE without a store call.
            held.progress[location_id] = RETURNED_OK
            return
        held.progress[location_id] = IN_FLIGHT
        self.flights.append(
            Flight(
                worker.name,
                held.serial,
                location_id,
                _data_of(location.uri),
            )
        )

    @stateful.precondition(lambda self: self.flights)
    @stateful.rule(k=INDEX, ok=st.booleans())
    def complete_delete(self, k, ok):
        """A store delete returns, whatever became of its worker."""
        flight = self.flights.pop(k % len(self.flights))
        self._tick()
        if ok:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(flight.data)
        held = self._worker(flight.worker).held
        if held is not None and held.serial == flight.serial:
            held.progress[flight.location_id] = (
                RETURNED_OK if ok else RETURNED_FAILED
            )

    @stateful.precondition(lambda self: self._holding())
    @stateful.rule(w=WORKER)
    def renew(self, w):
        worker = _pick(self._holding(), w)
        held = worker.held
        now = self._tick() + worker.skew
        mine = worker.gdb.renew(held.token, list(held.locations), now=now)
        self._refresh()
        carrying = {
            r.id
            for r in self.rows
            if r.status == glance_db.claimed_status(held.token)
        }
        assert mine == carrying, f'renew said {mine}, token on {carrying}'

    @stateful.precondition(lambda self: self._returned())
    @stateful.rule(w=WORKER)
    def finish(self, w):
        """The end of a batch: every delete has returned."""
        worker = _pick(self._returned(), w)
        self._finish(worker, worker.held.images)

    @stateful.precondition(lambda self: self._holding())
    @stateful.rule(w=WORKER)
    def interrupt(self, w):
        """Ctrl-C or a stop at any point (Scrubber._finish_interrupted)."""
        self._finish(_pick(self._holding(), w), set())

    def _finish(self, worker, images):
        held = worker.held
        now = self._tick() + worker.skew
        pairs = [
            (location, VERDICTS[held.progress[i]])
            for i, location in held.locations.items()
        ]
        closed = worker.gdb.finish(held.token, pairs, set(images), now=now)
        PROCESS.drop(held.token)  # as Scrubber.scrub does, finally
        worker.held = None
        self._refresh()
        assert closed <= images, f'closed {closed} of {images}'
        assert all(self.images[i].status == 'deleted' for i in closed)

    @stateful.precondition(lambda self: self._holding())
    @stateful.rule(w=WORKER, restarted=st.booleans())
    def crash(self, w, restarted):
        """The worker dies: rows stay claimed, its deletes keep running.

        ``restarted``: a new service on this host sees the token's
        process gone and takes the claims over at once; else they wait
        for the lease (a pause looks the same to the others).
        """
        worker = _pick(self._holding(), w)
        self._tick()
        if restarted:
            PROCESS.drop(worker.held.token)
        worker.held = None

    # (An argument also keeps this rule out of the first place in
    # hypothesis' rule order, which it draws far more often than the rest.)
    @stateful.precondition(lambda self: self._holding())
    @stateful.rule(seconds=st.sampled_from([LEASE // 2, LEASE + 1]))
    def wait(self, seconds):
        """Everybody pauses: shorter, or longer than lease_time."""
        self._tick()
        self.rig.clock += datetime.timedelta(seconds=seconds)

    # -- restore -----------------------------------------------------------

    @stateful.precondition(lambda self: self._images_in('pending_delete'))
    @stateful.rule(k=INDEX)
    def restore(self, k):
        image_id = _pick(self._images_in('pending_delete'), k)
        now = self._tick()
        try:
            self.restorer.restore(image_id, _verify, WINDOW, now=now)
        except RESTORE_REFUSALS as exc:
            self.rig.seen[f'restore {type(exc).__name__}'] += 1
            return
        self.rig.seen['restore ok'] += 1
        self._refresh()
        revived = {r.id for r in self._live_rows(image_id)}
        left_out = [r for r in self.rows if r.id in self.taken[image_id]]
        left_out = [r for r in left_out if r.id not in revived]
        assert not left_out, (
            f'restore revived locations {revived}, its deletion took '
            f'{self.taken[image_id]}'
        )

    # -- the invariant -----------------------------------------------------

    @stateful.invariant()
    def no_live_data_lost(self):
        self._refresh()
        threats = self._threats()
        problems = (
            self._live_data_problems(threats)
            + self._status_problems()
            + self._image_problems()
            + self._pending_problems(threats)
        )
        assert not problems, '\n'.join(problems)

    def _live_data_problems(self, threats):
        """(1) and (2): live rows' files intact and out of any delete."""
        threatened = {data: how for _, data, how in threats}
        problems = [
            f'(1) active image {i} has no live location'
            for i in self._images_in('active')
            if not self._live_rows(i)
        ]
        for row in self.rows:
            if row.deleted:
                continue
            image = self.images[row.image_id]
            data = _data_of(self._uri(row))
            where = f'{image.status} image {row.image_id} location {row.id}'
            if not self._intact(data):
                problems.append(f'(1)/(2) {where}: its data is gone')
            if data in threatened:
                problems.append(
                    f'(1) {where}: a delete of its data is {threatened[data]}'
                )
        return problems

    def _threats(self):
        """(location id, data, how) of each store delete in flight or that
        a worker may still start (shared data is never sent to the store).
        """
        threats = [
            (f.location_id, f.data, f'in flight ({f.worker})')
            for f in self.flights
        ]
        for worker in self._holding():
            held = worker.held
            for i, progress in held.progress.items():
                location = held.locations[i]
                if progress == NOT_STARTED and not location.shared:
                    how = f'still to start ({worker.name})'
                    threats.append((i, _data_of(location.uri), how))
        return threats

    def _pending_problems(self, threats):
        """(5): pending_delete means no delete of the row can be running
        or still start: a restore may revive it at any moment."""
        pending = {r.id for r in self.rows if r.status == 'pending_delete'}
        return [
            f'(5) location {i} is pending_delete, a delete of it is {how}'
            for i, _, how in threats
            if i in pending
        ]

    def _intact(self, data):
        try:
            with open(data, 'rb') as f:
                return f.read() == self.original[data]
        except FileNotFoundError:
            return False

    def _status_problems(self):
        """(3): only the protocol's states; active exactly when live."""
        problems = []
        for row in self.rows:
            known = row.status in ROW_STATUSES or CLAIMED.fullmatch(
                row.status or ''
            )
            if not known:
                problems.append(f'(3) location {row.id}: {row.status!r}')
            elif (row.status == 'active') == bool(row.deleted):
                problems.append(
                    f'(3) location {row.id}: {row.status} with '
                    f'deleted={row.deleted}'
                )
        return problems

    def _image_problems(self):
        """(4): deleted only when none of its rows is still to scrub."""
        return [
            f'(4) image {row.image_id} is deleted, location {row.id} is '
            f'{row.status}'
            for row in self.rows
            if self.images[row.image_id].status == 'deleted'
            and UNFINISHED.fullmatch(row.status or '')
        ]

    # -- helpers -----------------------------------------------------------

    def _tick(self):
        """One step: the true clock moves a second; returns it."""
        self.rig.steps += 1
        self.rig.clock += SECOND
        return self.rig.clock

    def _refresh(self):
        images, locations = glance_db.IMAGES, glance_db.LOCATIONS
        with self.rig.engine.connect() as conn:
            self.images = {r.id: r for r in conn.execute(sa.select(images))}
            self.rows = conn.execute(
                sa.select(locations).order_by(locations.c.id)
            ).all()

    def _uri(self, row):
        if self.key:
            return glance_db.decrypt_location(self.key, row.value)
        return row.value

    def _images_in(self, status):
        return [i for i in self.image_ids if self.images[i].status == status]

    def _live_rows(self, image_id):
        return [
            r for r in self.rows if r.image_id == image_id and not r.deleted
        ]

    def _removable(self):
        return [
            r
            for image_id in self._images_in('active')
            if len(self._live_rows(image_id)) > 1
            for r in self._live_rows(image_id)
        ]

    def _due(self):
        """Anything a sweep may find (a no-op sweep is a wasted step)."""
        return self._images_in('pending_delete') or any(
            r.deleted and UNFINISHED.fullmatch(r.status or '')
            for r in self.rows
        )

    def _worker(self, name):
        return next(w for w in self.workers if w.name == name)

    def _idle(self):
        return [w for w in self.workers if w.held is None]

    def _holding(self):
        return [w for w in self.workers if w.held is not None]

    def _startable(self):
        return [
            w
            for w in self._holding()
            if NOT_STARTED in w.held.progress.values()
        ]

    def _returned(self):
        return [
            w
            for w in self._holding()
            if set(w.held.progress.values()) <= RETURNED
        ]


def machine(rig):
    return type('ProtocolMachine', (ProtocolMachine,), {'rig': rig})


def make_rig(url, tmp_path, monkeypatch):
    rig = Rig(url, tmp_path)
    monkeypatch.setattr(glance_db, 'utcnow', lambda: rig.clock)
    # glance_rows reflects the schema on every call: 60% of the run time.
    # The schema does not change under us.
    monkeypatch.setattr(
        glance_rows, '_tables', functools.cache(glance_rows._tables)
    )
    # Hypothesis caches constants under ./.hypothesis even with
    # database=None: keep it out of the tree.
    monkeypatch.setattr(
        hypothesis.configuration,
        '__hypothesis_home_directory',
        tmp_path / 'hypothesis',
    )
    return rig
