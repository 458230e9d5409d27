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

Modules
-------
This module is the entry point: it re-exports the model's names and
holds what the test suite explores (``CONFIGS``, ``FINDINGS``).  The
world (states, ``Config``, the invariant) is in ``world.py``, the
protocols and their steps in ``transitions.py``, the search, the
symmetry reduction and the traces in ``explorer.py``.
"""

from tests.model.explorer import Result
from tests.model.explorer import canonical
from tests.model.explorer import describe
from tests.model.explorer import explore
from tests.model.explorer import replay
from tests.model.transitions import NEW
from tests.model.transitions import NEW_UNKNOWN_ERRORS
from tests.model.transitions import OLD
from tests.model.transitions import NewProtocol
from tests.model.transitions import NewProtocolUnknownErrors
from tests.model.transitions import OldProtocol
from tests.model.transitions import claim
from tests.model.transitions import complete_delete
from tests.model.transitions import crash
from tests.model.transitions import finish
from tests.model.transitions import interrupt
from tests.model.transitions import redelete
from tests.model.transitions import renew
from tests.model.transitions import restore
from tests.model.transitions import start_delete
from tests.model.transitions import successors
from tests.model.world import ACTIONS
from tests.model.world import ACTIVE
from tests.model.world import DELETED
from tests.model.world import IMAGE_DELETED
from tests.model.world import IN_FLIGHT
from tests.model.world import INTERRUPTED
from tests.model.world import LIVE
from tests.model.world import NOT_STARTED
from tests.model.world import PENDING
from tests.model.world import PENDING_DELETE
from tests.model.world import RETURNED_FAILED
from tests.model.world import RETURNED_OK
from tests.model.world import RETURNED_UNKNOWN
from tests.model.world import SCRUBBING
from tests.model.world import WORKER_NAMES
from tests.model.world import Config
from tests.model.world import Flight
from tests.model.world import Held
from tests.model.world import Image
from tests.model.world import Row
from tests.model.world import State
from tests.model.world import Worker
from tests.model.world import initial_state
from tests.model.world import violation

__all__ = [
    'ACTIONS',
    'ACTIVE',
    'CONFIGS',
    'Config',
    'DELETED',
    'FINDINGS',
    'Flight',
    'Held',
    'IMAGE_DELETED',
    'INTERRUPTED',
    'IN_FLIGHT',
    'Image',
    'LIVE',
    'NEW',
    'NEW_UNKNOWN_ERRORS',
    'NOT_STARTED',
    'NewProtocol',
    'NewProtocolUnknownErrors',
    'OLD',
    'OldProtocol',
    'PENDING',
    'PENDING_DELETE',
    'RETURNED_FAILED',
    'RETURNED_OK',
    'RETURNED_UNKNOWN',
    'Result',
    'Row',
    'SCRUBBING',
    'State',
    'WORKER_NAMES',
    'Worker',
    'canonical',
    'claim',
    'complete_delete',
    'crash',
    'describe',
    'explore',
    'finish',
    'initial_state',
    'interrupt',
    'main',
    'redelete',
    'renew',
    'replay',
    'restore',
    'start_delete',
    'successors',
    'violation',
]


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
