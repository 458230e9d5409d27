"""The ``image.delete`` notification endpoint: events → due-queue rows.

Glance 33.0.0 sends, on exchange ``glance`` with routing key
``notifications.info``, an ``image.delete`` event whose payload has the
image ``id``, ``status`` and a ``deleted_at`` rounded to the second (the
send time, not the database value) and no locations.  So the event only
says *which* image; its deletion time, which fixes the due time and
identifies the deletion, is read from the Glance database.

Delivery is at-least-once: the batch is acknowledged after this endpoint
returns, i.e. after the rows are committed.  Enqueue is idempotent, so a
redelivered or duplicated event adds nothing.  When a database is down,
the endpoint retries the same batch in place with an exponential backoff
(1 s to 60 s), holding it unacknowledged: nothing is lost and nothing
loops hot.  (oslo.messaging's own requeue is not used: it would also
requeue, forever and at once, a batch it cannot dispatch at all.)
A malformed event is logged with its reason and dropped: it can never
succeed.  Even an event lost for good (service down when the broker
dropped a transient queue) is not a lost deletion: the image stays
pending_delete in Glance and the periodic sweep finds it.
"""

import logging
import threading

import oslo_messaging
from sqlalchemy import exc as sa_exc

from scrub_listener import exceptions
from scrub_listener import model
from scrub_listener import retry

LOG = logging.getLogger(__name__)

EVENT_TYPE = 'image.delete'

# Backoff of a batch that failed for a transient reason (DB down).
RETRY_MIN = 1.0
RETRY_MAX = 60.0


class ImageDeleteEndpoint:
    """Batch notification endpoint for oslo.messaging's listener."""

    filter_rule = oslo_messaging.NotificationFilter(
        event_type=r'^image\.delete$'
    )

    def __init__(self, glance_db, queue, schedule, on_enqueued=None):
        self._db = glance_db
        self._queue = queue
        self._schedule = schedule
        self._on_enqueued = on_enqueued or (lambda: None)
        # Set by stop(): cut a backoff sleep short on shutdown.
        self.stopping = threading.Event()

    def info(self, messages):
        """Enqueue the deletions of a batch of ``image.delete`` events."""
        image_ids = set()
        for message in messages:
            image_id = self._image_id(message)
            if image_id is not None:
                image_ids.add(image_id)
        if not image_ids:
            return None
        for delay in retry.delays(RETRY_MIN, RETRY_MAX):
            try:
                queued = self._enqueue(image_ids)
                break
            except (
                sa_exc.SQLAlchemyError,
                exceptions.DatabaseUnavailable,
            ) as exc:
                if self.stopping.is_set():
                    # Shutting down during an outage: this batch is acked
                    # unrecorded; the deletions stay pending_delete in
                    # Glance and the first sweep of the next start finds
                    # them.
                    LOG.warning(
                        'Stopping; %d event(s) left to the sweep',
                        len(image_ids),
                    )
                    return None
                LOG.warning(
                    'Cannot record %d image.delete event(s), retrying in '
                    '%.0f s: %s',
                    len(image_ids),
                    delay,
                    exc,
                )
                self.stopping.wait(delay)
        if queued:
            self._on_enqueued()
        return None

    def _enqueue(self, image_ids):
        deleted_at = self._db.get_deletion_times(image_ids)
        for image_id in sorted(image_ids - deleted_at.keys()):
            # Deleted without delayed_delete (data already gone), already
            # restored, or already scrubbed: nothing for us to do.
            LOG.debug(
                'image.delete for %s: not pending_delete, ignored', image_id
            )
        return self._queue.enqueue(
            [
                self._schedule.queued(model.Deletion(image_id, None, when))
                for image_id, when in deleted_at.items()
            ]
        )

    @staticmethod
    def _image_id(message):
        """The valid image id of an event, or None (logged) if malformed."""
        payload = message.get('payload')
        metadata = message.get('metadata') or {}
        reason = None
        if not isinstance(payload, dict):
            reason = f'payload is a {type(payload).__name__}, not an object'
        elif 'id' not in payload:
            reason = 'payload has no "id"'
        else:
            image_id = payload['id']
            try:
                # JSON gives no UUID objects: anything but a canonical
                # UUID string is refused here
                return model.validate_image_id(image_id)
            except exceptions.InvalidImageId:
                reason = f'payload "id" {image_id!r:.80} is not an image id'
        LOG.warning(
            'Dropping malformed %s notification %s from %s: %s',
            message.get('event_type'),
            metadata.get('message_id') if isinstance(metadata, dict) else '?',
            message.get('publisher_id'),
            reason,
        )
        return None
