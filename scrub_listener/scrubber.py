"""Scrub a batch of deletions: claim in Glance, delete data, record it.

Database work is batched (one claim transaction and one finish
transaction per batch, whatever its size) and runs in the calling thread;
only store I/O fans out to the futurist pool (``scrub_pool_size``).  That
split is what makes a sweep fast: glance-scrubber spends its time in
several ORM round trips per image, one after another.
"""

import dataclasses
import logging
import time

from futurist import waiters
from sqlalchemy import exc as sa_exc

from scrub_listener import exceptions
from scrub_listener import glance_db
from scrub_listener import redaction
from scrub_listener import retry
from scrub_listener import store as store_mod

LOG = logging.getLogger(__name__)

SCRUBBED = 'scrubbed'
SKIPPED = 'skipped'
FAILED = 'failed'
BUSY = 'busy'


@dataclasses.dataclass
class Outcome:
    """What happened to one Deletion."""

    deletion: object
    status: str
    reason: str | None = None
    locations: int = 0
    bytes_freed: int = 0
    image_deleted: bool = False
    superseded_by: object = None
    # BUSY: when the other worker's lease runs out (None: unknown)
    busy_until: object = None


@dataclasses.dataclass(frozen=True)
class LocationResult:
    """The store's answer for one claimed location."""

    verdict: glance_db.Verdict
    bytes_freed: int = 0
    reason: str | None = None


class Scrubber:
    """Scrubs deletions: Glance DB claim → store deletes → Glance DB finish.

    The protocol (and why a claim cut short never makes data revivable)
    is in :mod:`scrub_listener.glance_db`.
    """

    def __init__(
        self,
        glance_db,
        stores,
        executor,
        lease_time=600,
        sleep=time.sleep,
        clock=time.monotonic,
    ):
        self._db = glance_db
        self._stores = stores
        self._executor = executor
        self._lease_time = lease_time
        # Renew claims well before they could look stale to others.
        self._renew_every = lease_time / 3.0
        self._sleep = sleep  # for the finish retries; both injectable
        self._clock = clock

    def scrub(self, deletions, heartbeat=None):
        """Scrub ``deletions``; return one Outcome per deletion, in order.

        ``heartbeat()`` is called as often as the claims are renewed
        (the drain renews its due-queue leases there).  An interruption
        (KeyboardInterrupt, SystemExit) records what is known — deletes
        not started go back, deletes still running become
        ``scrub_interrupted`` — and is re-raised.
        """
        claims = self._db.claim(deletions)
        token = claims[0].token if claims else None
        claimed = [loc for c in claims for loc in c.locations]
        images = {
            c.deletion.image_id
            for c in claims
            if c.deletion.location_id is None and not (c.skip_reason or c.busy)
        }
        try:
            results = self._delete_all(claimed, token, heartbeat)
            closed = self._finish(token, _pairs(claimed, results), images)
        finally:
            self._db.process.drop(token)
        return [self._outcome(c, results, closed) for c in claims]

    def _delete_all(self, locations, token, heartbeat):
        """Delete in parallel; return {location id: LocationResult}.

        A batch may take longer than lease_time (slow store, one thread):
        while it runs, the claims are renewed so that no other worker
        takes them over and deletes the same data again.
        """
        futures = {}
        try:
            for loc in locations:
                futures[self._executor.submit(self._delete_one, loc)] = loc
            pending = set(futures)
            while pending:
                _, pending = waiters.wait_for_all(pending, self._renew_every)
                if pending:
                    self._renew(token, locations, heartbeat)
        except BaseException:
            # Ctrl-C, a stop, a broken pool: what started may still be
            # deleting; what never started goes back (if it was clean).
            results = self._cut_short(futures)
            for loc in locations:
                results.setdefault(
                    loc.id, LocationResult(glance_db.Verdict.NOT_STARTED)
                )
            self._finish_interrupted(token, locations, results)
            raise
        return {loc.id: fut.result() for fut, loc in futures.items()}

    @staticmethod
    def _cut_short(futures):
        results = {}
        for future, location in futures.items():
            if future.cancel():
                verdict = glance_db.Verdict.NOT_STARTED
            elif future.done() and not future.exception():
                results[location.id] = future.result()
                continue
            else:
                verdict = glance_db.Verdict.UNKNOWN
            results[location.id] = LocationResult(verdict)
        return results

    def _finish_interrupted(self, token, locations, results):
        try:
            self._db.finish(token, _pairs(locations, results), set())
        except Exception:
            # Rows stay claimed; they are taken over after lease_time (a
            # takeover never makes them revivable).
            LOG.exception('Could not record an interrupted batch')

    def _renew(self, token, locations, heartbeat):
        # A renewal that fails (database blip) must not end the wait: the
        # deletes are still running.  At worst the claim goes stale and is
        # taken over, which is safe (see glance_db).
        try:
            mine = self._db.renew(token, [loc.id for loc in locations])
            if heartbeat is not None:
                heartbeat()
        except Exception:
            LOG.exception('Could not renew the claims of a running batch')
            return
        lost = len(locations) - len(mine)
        if lost:
            LOG.warning(
                '%d location(s) of a running batch were taken over by '
                'another worker (this one was paused longer than '
                'lease_time?); they are left to it',
                lost,
            )

    def _finish(self, token, pairs, images):
        """Record the verdicts; keep trying while the database is away.

        The store has answered and the claim is still ours: giving up
        would strand the rows as ``scrubbing`` for lease_time and the
        deletions would be redone.  Retried with backoff for up to
        lease_time (after that another worker may have taken them over,
        and our finish would move nothing anyway).
        """
        return retry.call(
            lambda: self._db.finish(token, pairs, images),
            retry_on=(sa_exc.OperationalError, sa_exc.InterfaceError),
            within=self._lease_time,
            what='record a finished batch in the Glance database',
            sleep=self._sleep,
            clock=self._clock,
        )

    def _delete_one(self, location):
        if location.shared:
            LOG.info(
                'Image %s location %s: a live location points at the same '
                'data; marking it deleted, keeping the data',
                location.image_id,
                location.id,
            )
            return LocationResult(glance_db.Verdict.GONE)
        try:
            result = self._stores.delete(location)
        except exceptions.LocationRefused as exc:
            # refused before the store was called: nothing was touched
            LOG.error('Image %s: %s', location.image_id, exc)
            return LocationResult(glance_db.Verdict.FAILED, reason=str(exc))
        except exceptions.StoreError as exc:
            LOG.error('Image %s: %s', location.image_id, exc)
            return LocationResult(_failure_verdict(exc), reason=str(exc))
        except Exception as exc:
            # Never the batch: one location fails, with what went wrong.
            reason = redaction.redact(
                f'location {location.id}: unexpected error: '
                f'{type(exc).__name__}: {exc}'
            )
            LOG.exception('Image %s: %s', location.image_id, reason)
            return LocationResult(glance_db.Verdict.UNKNOWN, reason=reason)
        LOG.debug(
            'Image %s location %s: %s', location.image_id, location.id, result
        )
        freed = (location.size or 0) if result == store_mod.DELETED else 0
        return LocationResult(glance_db.Verdict.GONE, bytes_freed=freed)

    @staticmethod
    def _outcome(claim, results, closed):
        outcome = Outcome(claim.deletion, SCRUBBED)
        if claim.busy:
            outcome.status = BUSY
            outcome.reason = 'another worker is scrubbing it'
            outcome.busy_until = claim.busy_until
            return outcome
        if claim.skip_reason:
            outcome.status = SKIPPED
            outcome.reason = claim.skip_reason
            outcome.superseded_by = claim.superseded_by
            return outcome
        reasons = [f'location {i}: {r}' for i, r in claim.errors]
        for location in claim.locations:
            result = results[location.id]
            if result.verdict is glance_db.Verdict.GONE:
                outcome.locations += 1
                outcome.bytes_freed += result.bytes_freed
            else:
                reasons.append(result.reason or result.verdict.value)
        outcome.image_deleted = claim.deletion.image_id in closed
        if reasons:
            outcome.status = FAILED
            outcome.reason = '; '.join(reasons)
        return outcome


def _failure_verdict(exc):
    """FAILED only when the store says the data was left intact.

    A timeout, a lost connection or a multi-step delete that stopped
    half-way (RBD unprotects and removes the snapshot before it fails on a
    busy image) is an error while the data may be partly gone, or still
    going: UNKNOWN, which is never revived.  The store adapter knows which
    errors are clean refusals (``StoreError(..., data_intact=True)``).
    """
    if getattr(exc, 'data_intact', False):
        return glance_db.Verdict.FAILED
    return glance_db.Verdict.UNKNOWN


def _pairs(locations, results):
    """(Location, Verdict) pairs for GlanceDB.finish."""
    return [(loc, results[loc.id].verdict) for loc in locations]
