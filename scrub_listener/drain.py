"""Drain the due-queue: claim due entries, scrub them, settle the queue.

One call of :meth:`Drain.drain_batch` is one round: lease up to
``batch_size`` due entries, hand their deletions to the Scrubber, then
remove the finished ones, back off the failed ones and give back the ones
another worker is busy with.  A poisoned entry only delays itself.
"""

import dataclasses
import datetime
import logging

from scrub_listener import glance_db
from scrub_listener import redaction
from scrub_listener import scrubber as scrubber_mod

LOG = logging.getLogger(__name__)

# A deletion another worker holds is looked at again when that worker's
# lease runs out (its claim is then stale), and never sooner than this.
BUSY_DELAY = datetime.timedelta(seconds=5)


@dataclasses.dataclass
class DrainStats:
    images: int = 0
    locations: int = 0
    failed: int = 0
    skipped: int = 0
    busy: int = 0
    bytes_freed: int = 0
    # queued deletions that failed before and wait for their backoff
    waiting_retry: int = 0

    def add(self, outcome):
        if outcome.status == scrubber_mod.SCRUBBED:
            self.images += 1
        elif outcome.status == scrubber_mod.FAILED:
            self.failed += 1
        elif outcome.status == scrubber_mod.BUSY:
            self.busy += 1
        else:
            self.skipped += 1
        self.locations += outcome.locations
        self.bytes_freed += outcome.bytes_freed

    @property
    def handled(self):
        return self.images + self.failed + self.skipped + self.busy


class Drain:
    def __init__(self, queue, scrubber, owner, batch_size, scrub_time):
        self._queue = queue
        self._scrubber = scrubber
        self.owner = owner
        self._batch_size = batch_size
        self.scrub_time = scrub_time  # seconds; mutable on SIGHUP

    def drain_batch(self, due_before=None):
        """Scrub one batch of due entries; return their Outcomes.

        An empty list means nothing was due.
        """
        entries = self._queue.claim(
            self.owner, self._batch_size, due_before=due_before
        )
        if not entries:
            return []
        try:
            outcomes = self._scrubber.scrub(
                [e.deletion for e in entries],
                heartbeat=lambda: self._queue.renew(entries, self.owner),
            )
        except Exception as exc:
            # Glance DB or store layer down: back the whole batch off
            # rather than sit on the leases until they expire.
            self._queue.retry_later(
                [
                    (e, redaction.redact(f'{type(exc).__name__}: {exc}'))
                    for e in entries
                ],
                self.owner,
            )
            raise
        except BaseException:
            # Ctrl-C: the Glance rows were settled by the scrubber; give
            # the entries back so that another host need not wait out
            # our leases.
            self._release_quietly(entries)
            raise
        self._settle(entries, outcomes)
        return outcomes

    def _release_quietly(self, entries):
        try:
            self._queue.release(entries, self.owner, glance_db.utcnow())
        except Exception:
            LOG.warning('Could not give back the due-queue leases')

    def _settle(self, entries, outcomes):
        done, failures, busy, renewed = [], [], {}, []
        now = glance_db.utcnow()
        for entry, outcome in zip(entries, outcomes, strict=True):
            self._log(outcome)
            if outcome.status == scrubber_mod.FAILED:
                failures.append((entry, outcome.reason))
            elif outcome.status == scrubber_mod.BUSY:
                busy.setdefault(_look_again_at(outcome, now), []).append(entry)
            else:
                done.append(entry)
            if outcome.superseded_by is not None:
                # Restored, then deleted again: queue the new deletion with
                # its own due time (the notification may be lost).
                new = glance_db.Deletion(
                    entry.deletion.image_id, None, outcome.superseded_by
                )
                delay = datetime.timedelta(seconds=self.scrub_time)
                renewed.append((new, outcome.superseded_by + delay))
        self._queue.enqueue(renewed)
        self._queue.retry_later(failures, self.owner)
        for at, group in sorted(busy.items()):
            self._queue.release(group, self.owner, at)
        self._queue.complete(done, self.owner)

    @staticmethod
    def _log(outcome):
        deletion = outcome.deletion
        what = deletion.image_id
        if deletion.location_id is not None:
            what = f'{what} location {deletion.location_id}'
        if outcome.status == scrubber_mod.SCRUBBED:
            LOG.info(
                'Scrubbed image %s: %d location(s), %d bytes freed',
                what,
                outcome.locations,
                outcome.bytes_freed,
            )
        elif outcome.status == scrubber_mod.FAILED:
            LOG.warning('Failed to scrub image %s: %s', what, outcome.reason)
        elif outcome.status == scrubber_mod.BUSY:
            # Normal while another worker runs it; looked at again only
            # when that worker's lease runs out, so this stays quiet.
            LOG.debug('Image %s is being scrubbed by another worker', what)
        else:
            LOG.info(
                'Not scrubbing image %s (%s): %s',
                what,
                outcome.status,
                outcome.reason,
            )


def _look_again_at(outcome, now):
    """When to look at a deletion another worker holds again."""
    at = now + BUSY_DELAY
    if outcome.busy_until is not None:
        # A second past the lease, whole seconds so that a batch's busy
        # entries share a few release statements.
        at = max(at, outcome.busy_until + datetime.timedelta(seconds=1))
    if at.microsecond:  # rounded up: never sooner than BUSY_DELAY
        at = at.replace(microsecond=0) + datetime.timedelta(seconds=1)
    return at
