"""The transitions of the claim-protocol model: the protocols' rules and
the steps.

Owns ``NewProtocol`` (issue 7's protocol, one rule per method or
attribute, so a mutant changes exactly one), ``OldProtocol`` (what the
code did before), ``NewProtocolUnknownErrors``, and the step functions
(one database transaction or one store call each) that ``successors``
combines into every step the scheduler may pick in a state.
"""

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
from tests.model.world import Flight
from tests.model.world import Held
from tests.model.world import Image
from tests.model.world import Row
from tests.model.world import Worker
from tests.model.world import _claim_ends
from tests.model.world import _holding
from tests.model.world import _put
from tests.model.world import _with

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
