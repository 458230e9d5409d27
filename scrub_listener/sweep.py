"""Reconcile Glance's pending_delete rows with the due-queue.

The sweep is what makes lost notifications harmless: it pages through the
Glance database for everything due (deleted images, and locations removed
from live images) and enqueues it.  Enqueue is idempotent, so running it
while notifications flow, or on several hosts, only costs a few queries.
"""

import logging

from scrub_listener import model

LOG = logging.getLogger(__name__)


class Sweeper:
    """Finds due deletions in the Glance database and queues them."""

    def __init__(self, glance_db, queue, schedule, page_size, now=None):
        self._db = glance_db
        self._queue = queue
        self._schedule = schedule
        self._page_size = page_size
        self._now = now or model.utcnow

    def iter_due(self, now=None):
        """Yield pages of ``(Deletion, due_at)`` due at ``now``."""
        for pages in self._due_pages(now, self._page_size):
            for page in pages:
                yield [self._schedule.queued(d) for d in page]

    def anything_due(self, now=None):
        """True if at least one deletion is due at ``now`` (one row read)."""
        return any(
            next(pages, None) for pages in self._due_pages(now, page_size=1)
        )

    def _due_pages(self, now, page_size):
        deleted_before = self._schedule.deleted_before(now or self._now())
        return (
            self._db.iter_due_images(deleted_before, page_size),
            self._db.iter_due_removed_locations(deleted_before, page_size),
        )

    def sweep(self, now=None):
        """Enqueue everything due; return (found, newly queued)."""
        found = queued = 0
        for page in self.iter_due(now):
            found += len(page)
            queued += self._queue.enqueue(page)
        LOG.info(
            'Sweep found %d due deletions, %d new in the queue', found, queued
        )
        return found, queued
