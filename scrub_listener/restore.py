"""Restore a pending_delete image so that it really works again.

glance-scrubber's restore only flips the image status: its locations stay
deleted (a download returns 0 bytes) and its properties and tags stay
gone.  Here the image, the locations of that deletion, and the
properties, tags and members Glance soft-deleted with it come back, after
checking the data is still in the store, all in one transaction that a
concurrent scrub of the same image cannot interleave with (see
:mod:`scrub_listener.glance_db`).
"""

import logging

from sqlalchemy import exc as sa_exc

LOG = logging.getLogger(__name__)


class Restorer:
    """Restores images: the Glance rows (under lock) and the due-queue."""

    def __init__(
        self, glance_db, stores, queue, deletion_window, lock_timeout=None
    ):
        """``lock_timeout``: seconds a restore waits for a row lock held by
        a scrub or another restore before answering ScrubInProgress (kept
        below the RPC timeout, so that the caller gets the answer)."""
        self._db = glance_db
        self._stores = stores
        self._queue = queue
        self._window = deletion_window
        self._lock_timeout = lock_timeout

    def restore(self, image_id, requested_by='local admin'):
        """Restore ``image_id``; return a RestoreResult or raise."""
        result = self._db.restore(
            image_id,
            self._verify,
            self._window,
            lock_timeout=self._lock_timeout,
        )
        LOG.info(
            'Restored image %s for %s: %d location(s), %d properties, '
            '%d tags, %d members brought back',
            image_id,
            requested_by,
            result.locations,
            result.properties,
            result.tags,
            result.members,
        )
        try:
            self._queue.forget_deletion(result.image_id, result.deleted_at)
        except sa_exc.SQLAlchemyError as exc:
            # Harmless: a leftover entry is dropped at claim time, since
            # the image is no longer pending_delete.
            LOG.warning(
                'Could not drop queue entries of %s: %s', image_id, exc
            )
        return result

    def _verify(self, locations):
        for location in locations:
            self._stores.check_present(location)
