"""The world of the claim-protocol model: its states, its configuration
and the invariant.

Owns the vocabulary (row, image and delete states, the step names), the
immutable state tuples and their small editors (``_put``, ``_with``,
``_claim_ends``), ``Config`` (the world to explore and the steps allowed
in it), ``initial_state`` and ``violation`` (S1/S2).  The invariant and
the abstractions are stated in ``tests/model/protocol.py``.
"""

import dataclasses
import functools
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
    """One image of the model: its status and which deletion it is in."""

    status: str
    generation: int  # which deletion (Glance's deleted_at)


class Held(NamedTuple):
    """One row of a worker's claim, as the worker knows it."""

    row: int
    clean: bool  # claimed from pending_delete: no other delete can run
    shared: bool  # a live row names the same data: keep it
    delete: str = NOT_STARTED


class Worker(NamedTuple):
    """One scrub worker of the model: the claim it holds, its token."""

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
    """A whole state of the model: data, rows, workers, deletes in flight."""

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


def _name(cfg, w):
    return WORKER_NAMES[w] + (' (one-shot)' if cfg.is_oneshot(w) else '')
