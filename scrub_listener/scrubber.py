"""Scrub a batch of deletions: claim in Glance, delete data, record it.

Database work is batched (one claim transaction and one finish
transaction per batch, whatever its size) and runs in the calling thread;
only store I/O fans out to the futurist pool (``scrub_pool_size``).  That
split is what makes a sweep fast: glance-scrubber spends its time in
several ORM round trips per image, one after another.
"""

import dataclasses
import logging

from futurist import waiters

from scrub_listener import exceptions
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


class Scrubber:
    """Scrubs deletions: Glance DB claim → store deletes → Glance DB finish."""

    def __init__(self, glance_db, stores, executor, lease_time=600):
        self._db = glance_db
        self._stores = stores
        self._executor = executor
        # Renew claims well before they could look stale to others.
        self._renew_every = lease_time / 3.0

    def scrub(self, deletions, heartbeat=None):
        """Scrub ``deletions``; return one Outcome per deletion, in order.

        ``heartbeat()`` is called as often as the claims are renewed
        (the drain renews its due-queue leases there).
        """
        claims = self._db.claim(deletions)
        claimed = [loc for c in claims for loc in c.locations]
        stamp = claims[0].stamp if claims else None
        try:
            verdicts, stamp = self._delete_all(claimed, stamp, heartbeat)
        except BaseException:
            # Hand our claims back rather than leave them "scrubbing"
            # until lease_time; a delete that did run is idempotent.
            self._db.finish([], [loc.id for loc in claimed], set(), stamp)
            raise
        done_ids = [i for i, (ok, _, _) in verdicts.items() if ok]
        failed_ids = [i for i, (ok, _, _) in verdicts.items() if not ok]
        images = {
            c.deletion.image_id
            for c in claims
            if c.deletion.location_id is None and not (c.skip_reason or c.busy)
        }
        # If this raises (Glance DB lost), our locations stay "scrubbing"
        # and are taken over after lease_time; the data is gone already
        # or will be deleted again (idempotent).
        closed = self._db.finish(done_ids, failed_ids, images, stamp)
        return [self._outcome(c, verdicts, closed) for c in claims]

    def _delete_all(self, locations, stamp, heartbeat):
        """Delete in parallel; return ({location id: (ok, freed bytes,
        reason)}, the claim's latest stamp).

        A batch may take longer than lease_time (slow store, one thread):
        while it runs, the claims are renewed so that no other worker
        takes them over and deletes the same data again.
        """
        futures = {
            self._executor.submit(self._delete_one, loc): loc
            for loc in locations
        }
        pending = set(futures)
        while pending:
            _, pending = waiters.wait_for_all(pending, self._renew_every)
            if pending:
                stamp = self._renew(locations, stamp, heartbeat)
        return {loc.id: fut.result() for fut, loc in futures.items()}, stamp

    def _renew(self, locations, stamp, heartbeat):
        # Every row of the claim, done ones too: finish moves the rows
        # that carry the latest stamp.  A renewal that fails (database
        # blip) must not end the wait: our caller would then hand the
        # rows back to pending_delete (and to a restore) while deletes
        # are still running.  Keep waiting; at worst the claim goes stale
        # and is taken over (deletes are idempotent, and the stamp fences
        # our finish off those rows).
        try:
            stamp = self._db.renew([loc.id for loc in locations], stamp)
            if heartbeat is not None:
                heartbeat()
        except Exception:
            LOG.exception('Could not renew the claims of a running batch')
        return stamp

    def _delete_one(self, location):
        if location.shared:
            LOG.info(
                'Image %s location %s: a live location points at the same '
                'data; marking it deleted, keeping the data',
                location.image_id,
                location.id,
            )
            return True, 0, None
        try:
            result = self._stores.delete(location)
        except (exceptions.StoreError, exceptions.LocationRefused) as exc:
            LOG.error('Image %s: %s', location.image_id, exc)
            return False, 0, str(exc)
        LOG.debug(
            'Image %s location %s: %s', location.image_id, location.id, result
        )
        freed = (location.size or 0) if result == store_mod.DELETED else 0
        return True, freed, None

    @staticmethod
    def _outcome(claim, verdicts, closed):
        outcome = Outcome(claim.deletion, SCRUBBED)
        if claim.busy:
            outcome.status = BUSY
            outcome.reason = 'another worker is scrubbing it'
            return outcome
        if claim.skip_reason:
            outcome.status = SKIPPED
            outcome.reason = claim.skip_reason
            outcome.superseded_by = claim.superseded_by
            return outcome
        reasons = [f'location {i}: {r}' for i, r in claim.errors]
        for location in claim.locations:
            ok, freed, reason = verdicts[location.id]
            if ok:
                outcome.locations += 1
                outcome.bytes_freed += freed
            else:
                reasons.append(reason)
        outcome.image_deleted = claim.deletion.image_id in closed
        if reasons:
            outcome.status = FAILED
            outcome.reason = '; '.join(reasons)
        return outcome
