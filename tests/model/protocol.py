"""Exhaustive explicit-state model of the scrub/restore claim protocol.

Issue 7 asks for a mechanical proof that a restored image never loses its
data.  This module is that proof for small configurations: ``explore()``
enumerates every interleaving of every party's steps, breadth first and
each distinct state once, checks the invariant after every step, and
returns the number of distinct states and, if the invariant breaks, the
shortest trace that breaks it.  It is pure Python (no database): the
model is the specification the code in ``scrub_listener`` implements;
the property-based tests on the real databases check the code against it.

The invariant
-------------
S1. No image is ``active`` while any of its data objects is gone (or
    partly gone), or while a store delete of it is in flight (started,
    not yet returned) by any worker: alive, paused, crashed or
    interrupted.  An active image's data is present and nothing can still
    delete it.
S2. No data is deleted that a live location (an active image's row,
    ``deleted=0``) points at.  Checked as "no live row names data that is
    gone or being deleted": S1 seen from the rows, so it fires at the
    moment a delete starts or completes under a live row, and at the
    moment a restore revives rows whose data is gone or being deleted.

Both are checked after every step.

What is modelled
----------------
* Data objects ``d1, d2 ...``: present or gone.  Several location rows
  may name one data object (two images sharing data).
* Images: ``active`` | ``pending_delete`` | ``deleted``, with a deletion
  *generation* (Glance's ``deleted_at``) that every Glance DELETE bumps.
* Location rows: ``live`` | ``pending_delete`` | ``scrubbing[token]`` |
  ``scrub_interrupted`` (new protocol only: a delete may have started and
  nobody holds the row) | ``deleted``.
* Workers: idle, or holding one claim: its token, and per claimed row
  whether the claim took it *clean* (from ``pending_delete``: no delete
  of it can be running) and *shared* (a live row names the same data:
  keep the data), and how far its store delete got (not started, in
  flight, returned ok, returned failed).
* In-flight store deletes, kept apart from the workers: a delete that
  started runs to its end whatever happens to the worker (crash, Ctrl-C,
  finish, its claim taken over).  It may complete ok (data gone) or
  failed (data intact) at any later step, or never.

Each step below is one database transaction or one store call, atomic
because the code runs it under the image row locks (claim, finish and
restore lock image rows first, in id order; restore also locks the images
sharing its data).  The functions say which code path each one models.

Abstractions, and why they lose nothing
---------------------------------------
* Leases and clocks.  There is no lease clock: *any* ``scrubbing`` row
  may be judged stale by a claimer at *any* moment.  The real rule (stale
  once ``updated_at`` is ``lease_time`` old by the claimer's clock) only
  ever allows a subset of those takeovers: a claimer whose clock is
  ``lease_time`` ahead, or an owner paused longer than ``lease_time``
  (GC pause, SIGSTOP, a hung NFS or Ceph call, a DB partition) makes any
  claim stale at any point of its life.  A protocol safe here is safe
  under any clock skew and any pause: leases may only serve liveness.
  A dead predecessor's claim taken over at once (crash recovery) is the
  same step.
* Pauses.  A pause is a worker not being scheduled.  Every interleaving
  is explored, so each worker's next step is tried after any sequence of
  other steps: every pause length, at every point.
* Crash.  The worker becomes idle without finishing; its rows stay
  ``scrubbing``; its in-flight deletes become orphans that may still
  complete.  That is a superset of "they complete or not at the moment of
  the crash", and what a store does with a request already sent.
* Events, sweeps, late events.  An idle worker may claim any pending
  deletion at any time: that is the ``image.delete`` notification, the
  sweep re-enqueueing a deletion, duplicates and retries.  Claims are
  keyed by (image, generation); a late event for a deletion that a
  restore undid finds an active image or another generation and is
  skipped, which changes nothing and so is no step.
* Batches.  A claim here is one deletion; a real batch claims several in
  one transaction, which allows fewer interleavings than separate claims
  by separate workers, which the model explores.
* Finish at any time (new protocol).  ``finish`` may run at any point of
  a batch (normal end, Ctrl-C, a stop, an exception), with whatever the
  worker knows of its deletes; safety does not depend on the scrubber
  waiting for its deletes.  (The old scrubber's finish ran only after all
  deletes returned; its exception path is the ``interrupt`` step.)
* Bounds.  Each worker claims at most ``max_claims`` times, each image is
  deleted by Glance at most ``max_generations`` times (restores are
  bounded by that too), and the old protocol's stamp clock stops at
  ``max_clock``.  Within the bounds the search is exhaustive.
* Reductions (they merge states, they drop no behaviour): states that
  differ only by the names of interchangeable workers are one state
  (``canonical``); a claim's token dies with the claim (``_claim_ends``),
  so states differing only in which dead claim left a row are one state.

Store errors
------------
The issue's spec has two outcomes for a store delete: ok (gone) and
failed (intact, and nothing runs any more).  ``Config.ambiguous_errors``
adds a third, outside that spec: the worker hears an error (a timeout, a
lost connection) while the store goes on deleting.  With it the new
protocol as specified breaks (an error recorded 'failed' hands a clean
row back to pending_delete, and a restore revives it);
``NEW_UNKNOWN_ERRORS``, which records such errors 'outcome unknown'
(-> scrub_interrupted, like an interrupted delete), holds.  So 'failed'
must mean "the store said no": anything else is 'unknown'.

Protocols
---------
``NEW`` is the protocol of issue 7; ``OLD`` is what the code did before
(claims fenced by a whole-second stamp, no ``scrub_interrupted``).  The
two differ only in the methods of their classes; everything else (the
world, the store, Glance, restore's locking) is shared.
"""

import collections
import dataclasses
import functools
import itertools
from typing import NamedTuple

# Location row states (image_locations.status; LIVE is Glance's deleted=0).
LIVE = 'live'
PENDING = 'pending_delete'
SCRUBBING = 'scrubbing'
INTERRUPTED = 'scrub_interrupted'
DELETED = 'deleted'

# Image states.
ACTIVE = 'active'
PENDING_DELETE = 'pending_delete'
IMAGE_DELETED = 'deleted'

# How far a claimed row's store delete got, as its worker knows it.
NOT_STARTED = 'not started'
IN_FLIGHT = 'in flight'
RETURNED_OK = 'returned ok'
RETURNED_FAILED = 'returned failed'
# Returned an error that does not say whether the delete ran or still
# runs (a timeout, a lost connection): see Config.ambiguous_errors.
RETURNED_UNKNOWN = 'returned, outcome unknown'

WORKER_NAMES = 'ABCDEFGH'

# Step names, for Config.actions.
ACTIONS = frozenset(
    {
        'claim',  # glance_db.claim of rows nobody holds
        'takeover',  # ... of rows whose claim is judged stale
        'start',  # scrubber submits a store delete
        'ok',  # a store delete returns: data gone
        'fail',  # a store delete returns: data intact
        'renew',  # glance_db.renew
        'finish',  # glance_db.finish
        'crash',  # the worker dies (SIGKILL, OOM, host lost)
        'interrupt',  # Ctrl-C of the one-shot worker
        'restore',  # glance_db.restore
        'redelete',  # glance-api DELETE of an active (restored) image
    }
)


# -- state -------------------------------------------------------------------
# NamedTuples: immutable, hashable (C-speed), readable.


class Row(NamedTuple):
    """One image_locations row."""

    status: str
    holder: object = None  # SCRUBBING only: the claim's token (or stamp)


class Image(NamedTuple):
    status: str
    generation: int  # which deletion (Glance's deleted_at)


class Held(NamedTuple):
    """One row of a worker's claim, as the worker knows it."""

    row: int
    clean: bool  # claimed from pending_delete: no other delete can run
    shared: bool  # a live row names the same data: keep it
    delete: str = NOT_STARTED


class Worker(NamedTuple):
    claims: int = 0  # claims made so far: bounds them and numbers them
    image: int | None = None  # None: idle
    token: object = None  # what finish fences on (old: the latest stamp)
    claimed_with: object = None  # the token the claim returned
    held: tuple = ()  # of Held


class Flight(NamedTuple):
    """A store delete that started and has not returned."""

    worker: int
    claim: int  # which of the worker's claims started it
    row: int


class State(NamedTuple):
    data: tuple  # of bool: present?
    images: tuple  # of Image
    rows: tuple  # of Row
    workers: tuple  # of Worker
    flights: tuple  # of Flight, sorted
    clock: int = 0  # old protocol: the last whole-second stamp handed out


def _put(items, index, value):
    return items[:index] + (value,) + items[index + 1 :]


def _with(
    s,
    data=None,
    images=None,
    rows=None,
    workers=None,
    flights=None,
    clock=None,
):
    """``s`` with some fields replaced (NamedTuple._replace, but faster)."""
    return State(
        s.data if data is None else data,
        s.images if images is None else images,
        s.rows if rows is None else rows,
        s.workers if workers is None else workers,
        s.flights if flights is None else flights,
        s.clock if clock is None else clock,
    )


def _claim_ends(s, w):
    """Worker ``w`` leaves its claim (finish, Ctrl-C, crash) and is idle.

    The claim's name dies with it: its token still on rows (only after a
    crash) becomes the worker's *dead* token ``(w, 0)``, its deletes still
    running become orphans whose result reaches nobody.  A dead name is
    never compared equal to a live claim again, so only its existence
    matters; states that differ only in which dead claim it was merge.
    """
    worker = s.workers[w]
    mine, dead = (w, worker.claims), (w, 0)
    rows, flights = s.rows, s.flights
    if any(r.holder == mine for r in rows):
        rows = tuple(
            Row(SCRUBBING, dead) if r.holder == mine else r for r in rows
        )
    if any(f[:2] == mine for f in flights):
        flights = tuple(
            sorted(
                Flight(w, 0, f.row) if f[:2] == mine else f for f in flights
            )
        )
    workers = _put(s.workers, w, Worker(worker.claims))
    return State(s.data, s.images, rows, workers, flights, s.clock)


def _holding(worker, held):
    return Worker(*worker[:4], held)


# -- configuration -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """The world to explore and the steps allowed in it."""

    name: str
    # One (image, data object) per location row; rows naming the same
    # data object share it.
    locations: tuple = ((0, 0),)
    workers: int = 2
    # The last worker is a one-shot --sweep-once that can be Ctrl-C'd.
    oneshot: bool = False
    max_claims: int = 2
    # Glance DELETEs per image; > 1 lets a restored image be deleted again.
    max_generations: int = 1
    # Images that start active (deleted later by 'redelete'); the others
    # start pending_delete, generation 1.
    active_at_start: frozenset = frozenset()
    # Restrictions, to isolate one finding: the steps allowed, and which
    # workers may take a claim over / see their store deletes fail
    # (None: all).
    actions: frozenset = ACTIONS
    takeover_by: frozenset | None = None
    fail_by: frozenset | None = None
    # Old protocol: the steps whose stamp may fall in the same whole
    # second as the last stamp handed out (so equal two claims' stamps).
    same_second: frozenset = frozenset({'claim', 'renew'})
    max_clock: int = 3
    # Outside the spec: a store delete may also return an error
    # while the store goes on deleting (a timeout, a lost connection);
    # the worker records ``proto.error_verdict``.
    ambiguous_errors: bool = False
    # Merge states that differ only by the names of interchangeable
    # workers (see canonical()); False explores them all.
    symmetry: bool = True

    @functools.cached_property
    def images(self):
        return max(image for image, _ in self.locations) + 1

    @functools.cached_property
    def data(self):
        return max(data for _, data in self.locations) + 1

    @functools.cached_property
    def rows_of(self):
        """Image -> its location rows."""
        return tuple(
            tuple(r for r, (i, _) in enumerate(self.locations) if i == image)
            for image in range(self.images)
        )

    @functools.cached_property
    def data_of(self):
        """Row -> the data object it names."""
        return tuple(data for _, data in self.locations)

    @functools.cached_property
    def sharing(self):
        """Row -> the other rows naming the same data object."""
        return tuple(
            tuple(
                other
                for other, data in enumerate(self.data_of)
                if other != row and data == self.data_of[row]
            )
            for row in range(len(self.locations))
        )

    @functools.cached_property
    def allowed(self):
        """The (action, worker) pairs allowed; worker None: not a worker's."""
        only = {'takeover': self.takeover_by, 'fail': self.fail_by}
        return frozenset(
            (action, w)
            for action in self.actions
            for w in (None, *range(self.workers))
            if only.get(action) is None or w in only[action]
        )

    @functools.cached_property
    def interchangeable(self):
        """Workers allowed exactly the same steps (the one-shot is not)."""
        restricted = self.takeover_by is not None or self.fail_by is not None
        if not self.symmetry or restricted:
            return []
        return list(range(self.workers - 1 if self.oneshot else self.workers))

    def may(self, action, worker=None):
        return (action, worker) in self.allowed

    def is_oneshot(self, worker):
        return self.oneshot and worker == self.workers - 1


def initial_state(cfg):
    images, rows = [], []
    for image in range(cfg.images):
        active = image in cfg.active_at_start
        images.append(Image(ACTIVE, 0) if active else Image(PENDING_DELETE, 1))
    for image, _ in cfg.locations:
        rows.append(Row(LIVE if image in cfg.active_at_start else PENDING))
    return State(
        data=(True,) * cfg.data,
        images=tuple(images),
        rows=tuple(rows),
        workers=(Worker(),) * cfg.workers,
        flights=(),
    )


# -- the invariant -----------------------------------------------------------


def violation(cfg, s):
    """Return why ``s`` breaks S1/S2, or None."""
    for image, img in enumerate(s.images):
        if img.status == ACTIVE:
            for row in cfg.rows_of[image]:
                why = _unsafe_data(cfg, s, row)
                if why:
                    return f'S1: image{image + 1} is active while {why}'
    for row, r in enumerate(s.rows):
        if r.status == LIVE:
            why = _unsafe_data(cfg, s, row)
            if why:
                return f'S2: live location loc{row + 1} names data that {why}'
    return None


def _unsafe_data(cfg, s, row):
    data = cfg.data_of[row]
    if not s.data[data]:
        return f'd{data + 1} is gone'
    for f in s.flights:
        if cfg.data_of[f.row] == data:
            return (
                f"{_name(cfg, f.worker)}'s store delete of d{data + 1} "
                f'(via loc{f.row + 1}) is in flight'
            )
    return None


# -- the protocols -----------------------------------------------------------


class NewProtocol:
    """The claim protocol of issue 7: what scrub_listener implements.

    Each rule is one method or attribute, so that a mutant (see the tests)
    changes exactly one.  Tokens are unique per claim (a random nonce in
    the row's status, ``scrubbing:<token>``), modelled as (worker, claim
    number).
    """

    name = 'new'
    # The claim records per row whether it took it clean (shown in traces).
    tracks_clean = True
    # Rows that keep their image pending_delete when a finish closes it.
    unfinished = frozenset({PENDING, SCRUBBING, INTERRUPTED})
    # Rows a restore revives; any other row of the image makes it refuse.
    revivable = frozenset({PENDING})
    # Another image's rows on the same data that make a restore refuse:
    # someone is, or may still be, deleting that data.
    blocks_sharing_restore = frozenset({SCRUBBING, INTERRUPTED})
    # What the worker records for an error of unknown outcome (only with
    # Config.ambiguous_errors): the spec has one 'failed' for any error.
    error_verdict = RETURNED_FAILED

    def tokens(self, cfg, s, w, step):
        """(token, clock) choices for a claim: one fresh nonce."""
        return (((w, s.workers[w].claims + 1), s.clock),)

    def take(self, status):
        """glance_db.claim: is a row in ``status`` taken clean (True),
        unclean (False), or not at all (None: deleted, nothing to do)?

        Clean means no delete of it can be running: it comes from
        pending_delete.  A scrubbing row (judged stale: its holder may be
        paused mid-delete) or a scrub_interrupted one may still be under a
        delete: never clean.
        """
        return {PENDING: True, SCRUBBING: False, INTERRUPTED: False}.get(
            status
        )

    def shared(self, cfg, s, row):
        """glance_db.claim: does a live row name this row's data?"""
        return any(s.rows[o].status == LIVE for o in cfg.sharing[row])

    def holds(self, row, token):
        """The fence of renew and finish: is ``row`` still ours?"""
        return row == Row(SCRUBBING, token)

    def renew(self, cfg, s, w):
        """glance_db.renew: re-stamp the rows still ours, and learn which.

        Rows taken over are dropped from the claim: the worker will never
        finish them (its deletes already in flight on them still run).
        The lease stamp itself is not modelled (see "Leases").
        """
        worker = s.workers[w]
        kept = tuple(
            h for h in worker.held if self.holds(s.rows[h.row], worker.token)
        )
        if kept != worker.held:
            yield _with(s, workers=_put(s.workers, w, _holding(worker, kept)))

    def may_finish(self, worker):
        return True  # at any point: see "Finish at any time"

    def finish_row(self, held):
        """glance_db.finish: the new status of one row still ours."""
        if held.shared or held.delete == RETURNED_OK:
            return DELETED
        if held.delete in (IN_FLIGHT, RETURNED_UNKNOWN):
            # Started, end unknown (Ctrl-C, stop): it may still delete.
            return INTERRUPTED
        # Failed or never started: the data is intact as far as *this*
        # claim knows.  Revivable only if no earlier delete can be
        # running, i.e. the row was claimed from pending_delete.
        return PENDING if held.clean else INTERRUPTED

    def interrupt(self, cfg, s, w):
        """oneshot Ctrl-C: cancel deletes not started, finish at once.

        In-flight deletes are reported 'started, not returned'
        (-> scrub_interrupted) and keep running.
        """
        return _finish(self, cfg, s, w)

    def restore_refusal(self, cfg, s, image):
        """glance_db.restore's checks, under the image locks; or None."""
        own = cfg.rows_of[image]
        if any(s.rows[r].status not in self.revivable for r in own):
            return 'a row is scrubbing, interrupted or deleted'
        for row in own:
            for other in cfg.sharing[row]:
                if s.rows[other].status in self.blocks_sharing_restore:
                    return "another image's scrub holds the same data"
        if not all(s.data[cfg.data_of[r]] for r in own):
            return 'data gone'  # the store check (verify)
        return None


class OldProtocol(NewProtocol):
    """What the code did before issue 7 (must fail the invariant).

    Claims are fenced by a whole-second stamp (a small integer from a
    shared logical clock that a step may or may not advance, so two
    stamps can be equal); there is no scrub_interrupted state.
    """

    name = 'old'
    tracks_clean = False
    unfinished = frozenset({PENDING, SCRUBBING})
    blocks_sharing_restore = frozenset({SCRUBBING})

    def tokens(self, cfg, s, w, step):
        """Stamp choices: this second again, or the next one."""
        if step in cfg.same_second:
            yield s.clock, s.clock
        if s.clock < cfg.max_clock:
            yield s.clock + 1, s.clock + 1

    def take(self, status):
        """Old claim: pending_delete rows, and stale scrubbing ones."""
        return True if status in (PENDING, SCRUBBING) else None

    def renew(self, cfg, s, w):
        """Old glance_db.renew: rows carrying our stamp get the new one,
        and the new stamp is returned even when no row had ours (after a
        takeover): possibly the very stamp the taker holds (issue 7.2).
        """
        worker = s.workers[w]
        for stamp, clock in self.tokens(cfg, s, w, 'renew'):
            if stamp == worker.token:
                continue  # same second: returns the stamp unchanged
            rows = list(s.rows)
            for h in worker.held:
                if self.holds(rows[h.row], worker.token):
                    rows[h.row] = Row(SCRUBBING, stamp)
            renewed = Worker(*worker[:2], stamp, *worker[3:])
            workers = _put(s.workers, w, renewed)
            yield _with(s, rows=tuple(rows), clock=clock, workers=workers)

    def may_finish(self, worker):
        # The old scrubber waited for every delete before finishing.
        return all(
            h.shared or h.delete in (RETURNED_OK, RETURNED_FAILED)
            for h in worker.held
        )

    def finish_row(self, held):
        """Old finish: ok -> deleted, failed -> pending_delete, always."""
        if held.shared or held.delete == RETURNED_OK:
            return DELETED
        return PENDING

    def interrupt(self, cfg, s, w):
        """Old scrubber's exception path on Ctrl-C (issue 7.3).

        Every row of the batch goes back to pending_delete while the
        in-flight deletes keep running, fenced by the stamp the claim
        returned (after a renewal the rows stay stuck instead).
        """
        worker = s.workers[w]
        rows = list(s.rows)
        for h in worker.held:
            if self.holds(rows[h.row], worker.claimed_with):
                rows[h.row] = Row(PENDING)
        return _claim_ends(_with(s, rows=tuple(rows)), w)


class NewProtocolUnknownErrors(NewProtocol):
    """The new protocol, where an error that does not prove the delete
    did not happen (timeout, lost connection, unexpected exception) is
    recorded 'outcome unknown' (-> scrub_interrupted), not 'failed'."""

    name = 'new, ambiguous errors -> unknown'
    error_verdict = RETURNED_UNKNOWN


NEW = NewProtocol()
OLD = OldProtocol()
NEW_UNKNOWN_ERRORS = NewProtocolUnknownErrors()


# -- steps -------------------------------------------------------------------
# Each yields (step, next state); a step is a small tuple
# (action, worker or None, argument), rendered only for traces.


def claim(proto, cfg, s, w):
    """glance_db.claim of one deletion (image, generation), one transaction.

    Locks the image row, re-checks it is pending_delete for this very
    generation (else skipped: restored, re-deleted, or a late event), and
    takes each row (``proto.take``): pending ones, and ``scrubbing`` ones
    judged stale (a takeover), or else the whole deletion is 'busy' and
    nothing is claimed.  Each claimed row is flagged shared when a live
    row names its data (restore locks the sharing images too, so this
    check and a revival serialise).
    """
    worker = s.workers[w]
    if worker.claims >= cfg.max_claims or not cfg.may('claim', w):
        return
    for image, img in enumerate(s.images):
        for generation in range(1, cfg.max_generations + 1):
            if img.status != PENDING_DELETE or img.generation != generation:
                continue  # skipped: nothing changes
            for token, clock in proto.tokens(cfg, s, w, 'claim'):
                nxt = _claim_rows(proto, cfg, s, w, image, token, clock)
                if nxt is not None:
                    yield ('claim', w, (image, generation)), nxt


def _claim_rows(proto, cfg, s, w, image, token, clock):
    rows, held = list(s.rows), []
    for r in cfg.rows_of[image]:
        status = s.rows[r].status
        if status == SCRUBBING and not cfg.may('takeover', w):
            return None  # judged live: busy, nothing claimed
        clean = proto.take(status)
        if clean is None:
            continue  # deleted: done already
        held.append(Held(r, clean, proto.shared(cfg, s, r)))
        rows[r] = Row(SCRUBBING, token)
    if not held:
        return None
    worker = Worker(s.workers[w].claims + 1, image, token, token, tuple(held))
    return _with(
        s, rows=tuple(rows), clock=clock, workers=_put(s.workers, w, worker)
    )


def start_delete(proto, cfg, s, w):
    """scrubber._delete_all submits one row's store delete to the pool.

    From here on the store may remove the data at any moment.  The worker
    does not know whether its claim was taken over meanwhile.
    """
    worker = s.workers[w]
    if not cfg.may('start', w):
        return
    for k, h in enumerate(worker.held):
        if h.delete == NOT_STARTED and not h.shared:
            held = _put(worker.held, k, Held(*h[:3], IN_FLIGHT))
            flights = tuple(
                sorted(s.flights + (Flight(w, worker.claims, h.row),))
            )
            yield (
                ('start', w, h.row),
                _with(
                    s,
                    flights=flights,
                    workers=_put(s.workers, w, _holding(worker, held)),
                ),
            )


def complete_delete(proto, cfg, s):
    """A store delete returns: ok (data gone) or failed (data intact).

    Any in-flight delete may complete at any step, including one of a
    crashed, interrupted, finished or taken-over worker: its outcome then
    reaches nobody.
    """
    for k, f in enumerate(s.flights):
        flights = s.flights[:k] + s.flights[k + 1 :]
        data = cfg.data_of[f.row]
        if cfg.may('ok', f.worker):
            yield (
                ('ok', f.worker, f.row),
                _report(
                    _with(s, flights=flights, data=_put(s.data, data, False)),
                    f,
                    RETURNED_OK,
                ),
            )
        if cfg.may('fail', f.worker):
            yield (
                ('fail', f.worker, f.row),
                _report(_with(s, flights=flights), f, RETURNED_FAILED),
            )
        if cfg.ambiguous_errors and f.claim:
            # The worker hears an error, the store goes on: an orphan.
            orphan = tuple(sorted(flights + (Flight(f.worker, 0, f.row),)))
            yield (
                ('error', f.worker, f.row),
                _report(_with(s, flights=orphan), f, proto.error_verdict),
            )


def _report(s, flight, outcome):
    """Tell the worker, if it is still in the claim that started it."""
    worker = s.workers[flight.worker]
    if worker.image is None or worker.claims != flight.claim:
        return s
    for k, h in enumerate(worker.held):
        if h.row == flight.row and h.delete == IN_FLIGHT:
            worker = _holding(
                worker, _put(worker.held, k, Held(*h[:3], outcome))
            )
            return _with(s, workers=_put(s.workers, flight.worker, worker))
    return s  # the row was dropped from the claim (taken over)


def renew(proto, cfg, s, w):
    """scrubber._renew -> glance_db.renew, while the batch runs."""
    if cfg.may('renew', w):
        for nxt in proto.renew(cfg, s, w):
            yield ('renew', w, None), nxt


def finish(proto, cfg, s, w):
    """scrubber -> glance_db.finish: record the verdicts, one transaction.

    Only rows still carrying this claim's token move; the image becomes
    deleted when none of its rows is left unfinished.
    """
    if cfg.may('finish', w) and proto.may_finish(s.workers[w]):
        yield ('finish', w, None), _finish(proto, cfg, s, w)


def _finish(proto, cfg, s, w):
    worker = s.workers[w]
    rows = list(s.rows)
    for h in worker.held:
        if proto.holds(rows[h.row], worker.token):
            rows[h.row] = Row(proto.finish_row(h))
    images = s.images
    image = worker.image
    if images[image].status == PENDING_DELETE and not any(
        rows[r].status in proto.unfinished for r in cfg.rows_of[image]
    ):
        gone = Image(IMAGE_DELETED, images[image].generation)
        images = _put(images, image, gone)
    return _claim_ends(_with(s, rows=tuple(rows), images=images), w)


def interrupt(proto, cfg, s, w):
    """oneshot: Ctrl-C (KeyboardInterrupt) during --sweep-once."""
    if cfg.is_oneshot(w) and cfg.may('interrupt', w):
        yield ('interrupt', w, None), proto.interrupt(cfg, s, w)


def crash(proto, cfg, s, w):
    """The worker dies mid-batch: no finish; its deletes keep running."""
    if cfg.may('crash', w):
        yield ('crash', w, None), _claim_ends(s, w)


def restore(proto, cfg, s):
    """glance_db.restore, one transaction under the image locks.

    Refused (nothing changes) unless the protocol's checks pass; then the
    image is active and its rows live again.
    """
    if not cfg.may('restore'):
        return
    for image, img in enumerate(s.images):
        if img.status != PENDING_DELETE:
            continue
        if proto.restore_refusal(cfg, s, image) is not None:
            continue
        rows = s.rows
        for r in cfg.rows_of[image]:
            rows = _put(rows, r, Row(LIVE))
        images = _put(s.images, image, Image(ACTIVE, img.generation))
        yield ('restore', None, image), _with(s, images=images, rows=rows)


def redelete(proto, cfg, s):
    """glance-api DELETE (delayed_delete) of an active image.

    A new deletion: the next generation (a new ``deleted_at``), its live
    rows pending_delete.  Bounded by ``max_generations``.
    """
    if not cfg.may('redelete'):
        return
    for image, img in enumerate(s.images):
        if img.status != ACTIVE or img.generation >= cfg.max_generations:
            continue
        rows = s.rows
        for r in cfg.rows_of[image]:
            rows = _put(rows, r, Row(PENDING))
        images = _put(
            s.images, image, Image(PENDING_DELETE, img.generation + 1)
        )
        yield ('redelete', None, image), _with(s, images=images, rows=rows)


def successors(proto, cfg, s):
    """Every (step, next state) the scheduler may pick in ``s``."""
    for w, worker in enumerate(s.workers):
        if worker.image is None:
            yield from claim(proto, cfg, s, w)
            continue
        yield from start_delete(proto, cfg, s, w)
        yield from renew(proto, cfg, s, w)
        yield from finish(proto, cfg, s, w)
        yield from interrupt(proto, cfg, s, w)
        yield from crash(proto, cfg, s, w)
    yield from complete_delete(proto, cfg, s)
    yield from restore(proto, cfg, s)
    yield from redelete(proto, cfg, s)


# -- exploration -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Result:
    protocol: str
    config: str
    states: int  # distinct states visited
    violation: str | None = None
    trace: tuple = ()  # of step descriptions, shortest first

    def report(self):
        head = f'{self.protocol} protocol, {self.config}: '
        head += f'{self.states} distinct states'
        if self.violation is None:
            return head + ', invariant holds'
        lines = [head + f', VIOLATION after {len(self.trace)} steps:']
        lines += [f'  {n:2}. {step}' for n, step in enumerate(self.trace, 1)]
        lines.append(f'  => {self.violation}')
        return '\n'.join(lines)


def explore(protocol, config, max_states=5_000_000):
    """Breadth-first search of every reachable state; stop at the first
    violation, so the trace returned is a shortest one.

    States are kept up to renaming of interchangeable workers (see
    ``canonical``).
    """
    start = canonical(config, initial_state(config))
    parent = {start: None}
    queue = collections.deque([start])
    bad, last = violation(config, start), start
    while queue and bad is None:
        state = queue.popleft()
        for _, nxt in successors(protocol, config, state):
            if nxt.workers is not state.workers:  # else still in order
                nxt = canonical(config, nxt)
            if nxt in parent:
                continue
            parent[nxt] = state
            bad = violation(config, nxt)
            if bad is not None:
                last = nxt
                break
            queue.append(nxt)
        if len(parent) > max_states:
            raise RuntimeError(f'{config.name}: over {max_states} states')
    trace = ()
    if bad is not None:
        # Told again on the real state: the representative's names differ.
        trace, real = _trace(protocol, config, parent, last)
        bad = violation(config, real)
    return Result(protocol.name, config.name, len(parent), bad, trace)


def _trace(proto, cfg, parent, last):
    """The steps from the start to ``last``, with the workers' real names:
    replay the path of representatives, picking at each step a successor
    that is the next one up to names."""
    path = [last]
    while parent[path[-1]] is not None:
        path.append(parent[path[-1]])
    path.reverse()
    state, steps = initial_state(cfg), []
    for goal in path[1:]:
        step, nxt = next(
            (step, nxt)
            for step, nxt in successors(proto, cfg, state)
            if _alike(cfg, nxt, goal)
        )
        steps.append(describe(proto, cfg, step, state, nxt))
        state = nxt
    return tuple(steps), state


def replay(protocol, config, steps):
    """Run a scripted interleaving: for each prefix in ``steps``, the first
    step whose description starts with it.  Returns (state, descriptions).
    """
    state, done = initial_state(config), []
    for prefix in steps:
        for step, nxt in successors(protocol, config, state):
            text = describe(protocol, config, step, state, nxt)
            if text.startswith(prefix):
                state = nxt
                done.append(text)
                break
        else:
            raise LookupError(f'no step {prefix!r} after {done}')
    return state, done


# -- symmetry ----------------------------------------------------------------
# Workers allowed the same steps are interchangeable: a state, and the same
# state with two such workers' names swapped (in the workers, in the tokens
# on the rows, in the in-flight deletes), have the same futures up to that
# renaming, and the invariant does not look at names.  So the search keeps
# one representative per class: these workers sorted by what they hold.
# This merges states that are the same up to names; it drops no behaviour.


def canonical(cfg, s):
    """The representative of ``s``: interchangeable workers in order."""
    group = cfg.interchangeable
    if len(group) < 2:
        return s
    keys = _worker_keys(s, group)
    if keys == sorted(keys):
        return s  # already in order (the common case: no work)
    return _rename(s, [w for _, w in sorted(zip(keys, group, strict=True))])


def _rename(s, order):
    """``s`` with worker ``order[i]`` renamed ``i`` (in its slot, its
    tokens on the rows, its in-flight deletes)."""
    rename = {old: new for new, old in enumerate(order)}

    def token(t):
        return (rename.get(t[0], t[0]), t[1]) if type(t) is tuple else t

    workers = list(s.workers)
    for new, old in enumerate(order):
        claims, image, tok, claimed_with, held = s.workers[old]
        workers[new] = Worker(
            claims, image, token(tok), token(claimed_with), held
        )
    rows = tuple(
        Row(SCRUBBING, token(r.holder)) if r.status == SCRUBBING else r
        for r in s.rows
    )
    flights = tuple(
        sorted(Flight(rename.get(f[0], f[0]), f[1], f[2]) for f in s.flights)
    )
    return State(s.data, s.images, rows, tuple(workers), flights, s.clock)


def _alike(cfg, a, b):
    """Are ``a`` and ``b`` the same state up to worker names?"""
    return any(
        _rename(a, order) == b
        for order in itertools.permutations(cfg.interchangeable)
    )


def _worker_keys(s, group):
    """Per worker of ``group``, a sort key without its name.

    Cheap, so not quite canonical: workers alike in these but differing in
    the dead tokens or orphan deletes they left keep two representatives.
    That costs states, never soundness: any renaming is a symmetry.
    """
    return [
        (worker.claims, -1 if worker.image is None else worker.image)
        + worker.held
        for worker in map(s.workers.__getitem__, group)
    ]


# -- rendering ---------------------------------------------------------------


def _name(cfg, w):
    return WORKER_NAMES[w] + (' (one-shot)' if cfg.is_oneshot(w) else '')


def _token(token):
    if isinstance(token, tuple) and token[1] == 0:
        return f'{WORKER_NAMES[token[0]]}, dead'
    if isinstance(token, tuple):
        return f'{WORKER_NAMES[token[0]]}{token[1]}'
    return f'stamp {token}'


def _row(row):
    if row.status == SCRUBBING:
        return f'scrubbing[{_token(row.holder)}]'
    return row.status


def describe(proto, cfg, step, before, after):
    """One line: what the step is, then what it changed."""
    action, w, arg = step
    who = _name(cfg, w) if w is not None else ''
    if action == 'claim':
        text = f'{who}: claim (image{arg[0] + 1}, gen {arg[1]})'
    elif action in ('start', 'ok', 'fail', 'error'):
        where = f'loc{arg + 1} (d{cfg.data_of[arg] + 1})'
        text = {
            'start': f'{who}: start store delete of {where}',
            'ok': f"{who}'s store delete of {where} returns OK",
            'fail': f"{who}'s store delete of {where} FAILS",
            'error': f"{who}'s store delete of {where} times out "
            '(an error, but the store goes on deleting)',
        }[action]
    elif action == 'restore':
        text = f'restore image{arg + 1}'
    elif action == 'redelete':
        text = f'glance-api DELETE image{arg + 1}'
    else:
        text = f'{who}: ' + {'interrupt': 'Ctrl-C'}.get(action, action)
    changes = _changes(proto, cfg, step, before, after)
    return f'{text}: {"; ".join(changes)}' if changes else text


def _changes(proto, cfg, step, before, after):
    action, w, _ = step
    claimed = {}
    if action == 'claim':
        claimed = {h.row: h for h in after.workers[w].held}
    out = []
    for i, (a, b) in enumerate(zip(before.images, after.images, strict=True)):
        if a != b:
            out.append(
                f'image{i + 1} {a.status} -> {b.status} (gen {b.generation})'
            )
    for r, (a, b) in enumerate(zip(before.rows, after.rows, strict=True)):
        if r in claimed:
            out.append(
                f'loc{r + 1} {_row(a)} -> {_row(b)}'
                + _how(proto, a, claimed[r])
            )
        elif a != b:
            out.append(f'loc{r + 1} {_row(a)} -> {_row(b)}')
    for d, (a, b) in enumerate(zip(before.data, after.data, strict=True)):
        if a and not b:
            out.append(f'd{d + 1} GONE')
    if w is None:
        return out
    was, now = before.workers[w], after.workers[w]
    if action == 'renew' and was.token != now.token:
        out.append(f'{WORKER_NAMES[w]} now fences with {_token(now.token)}')
    if action == 'renew' and len(now.held) < len(was.held):
        dropped = {h.row for h in was.held} - {h.row for h in now.held}
        out.append(
            f'{WORKER_NAMES[w]} learns it lost '
            + ', '.join(f'loc{r + 1}' for r in sorted(dropped))
        )
    if action in ('finish', 'interrupt', 'crash'):
        running = [f for f in after.flights if f.worker == w]
        if running:
            out.append(
                'still running: '
                + ', '.join(f'delete of loc{f.row + 1}' for f in running)
            )
    return out


def _how(proto, row, held):
    """How a claim took a row: (clean|unclean, taken over, shared)."""
    how = []
    if proto.tracks_clean:
        how.append('clean' if held.clean else 'unclean')
    if row.status == SCRUBBING:
        how.append('judged stale, taken over')
    if held.shared:
        how.append('shared: keep the data')
    return f' ({", ".join(how)})' if how else ''


# -- what the test suite explores --------------------------------------------

# The new protocol must hold in each (exhaustively, within the bounds).
CONFIGS = (
    Config(
        '2 workers, 1 image with 2 locations (d1, d2)',
        locations=((0, 0), (0, 1)),
    ),
    Config(
        '3 workers, 1 image, deleted again after a restore',
        workers=3,
        max_generations=2,
    ),
    Config(
        '2 workers, 2 images sharing d1 (image1 active, then deleted), '
        'each deleted again after a restore',
        locations=((0, 0), (1, 0)),
        active_at_start=frozenset({0}),
        max_generations=2,
    ),
    Config(
        '2 workers + a one-shot worker (Ctrl-C), 1 image',
        workers=3,
        oneshot=True,
    ),
)

_BASIC = frozenset({'claim', 'takeover', 'start', 'ok', 'fail', 'finish'})

# Issue 7's findings against the old protocol, each restricted to the
# steps it needs, so that the shortest violation is that finding.
FINDINGS = {
    '7.1': Config(
        "7.1: a takeover does not stop the old owner's delete",
        actions=_BASIC | {'restore'},
        same_second=frozenset(),  # every stamp new: no stamp collision
        symmetry=False,  # A and B in the order the issue tells it
    ),
    '7.2': Config(
        "7.2: renew() returns the taker's stamp",
        actions=_BASIC | {'renew', 'restore'},
        # Only a renewal may fall in the second of the takeover; B takes
        # over, only A's delete fails: 7.1 is ruled out.
        same_second=frozenset({'renew'}),
        takeover_by=frozenset({1}),
        fail_by=frozenset({0}),
    ),
    '7.3': Config(
        '7.3: Ctrl-C hands rows back while deletes keep running',
        workers=1,
        oneshot=True,
        actions=frozenset(
            {'claim', 'start', 'ok', 'fail', 'interrupt', 'restore'}
        ),
    ),
}


def main():
    """Print what the explorer finds (``python -m tests.model.protocol``)."""
    for config in CONFIGS:
        print(explore(NEW, config).report())
    for config in FINDINGS.values():
        print(explore(OLD, config).report())
        print(explore(NEW, config).report())


if __name__ == '__main__':
    main()
