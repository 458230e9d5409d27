"""What is waiting to be scrubbed: Glance's pending_delete images joined
with their due-queue state, for ``scrub-listener-manage list``.

The Glance API hides pending_delete images (404), so this is how an
operator finds the id of an image to restore.
"""

import dataclasses
import datetime

from scrub_listener import model
from scrub_listener import redaction

State = model.QueueState


@dataclasses.dataclass
class Row:
    """One line of ``list``: an image and where its deletion stands."""

    id: str
    name: str | None
    owner: str | None
    size: int | None
    visibility: str | None
    deleted_at: datetime.datetime
    due_at: datetime.datetime
    state: model.QueueState
    attempts: int = 0
    last_error: str | None = None
    next_attempt_at: datetime.datetime | None = None

    def as_json(self):
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, datetime.datetime):
                data[key] = value.isoformat() + 'Z'
        return data


def iter_rows(glance_db, queue, schedule, now, page_size=500, **filters):
    """Yield a Row per pending_delete image, page by page."""
    page = []
    for image in glance_db.iter_pending_images(page_size, **filters):
        page.append(image)
        if len(page) == page_size:
            yield from _rows(page, queue, schedule, now)
            page = []
    yield from _rows(page, queue, schedule, now)


def _rows(images, queue, schedule, now):
    entries = queue.entries_for({image.id for image in images})
    for image in images:
        entry = _entry_for(entries.get(image.id, ()), image.deleted_at)
        row = Row(
            id=image.id,
            name=image.name,
            owner=image.owner,
            size=image.size,
            visibility=image.visibility,
            deleted_at=image.deleted_at,
            due_at=schedule.due_at(image.deleted_at),
            state=State.WAITING,
        )
        if entry is not None:
            row.due_at = entry.due_at
            row.attempts = entry.attempts
            # Written by any version, any worker: redacted again here, as
            # it leaves for the operator's screen or script.
            row.last_error = redaction.redact(entry.last_error)
            row.next_attempt_at = entry.next_attempt_at
        row.state = _state(row, entry, now)
        if image.interrupted and row.state != State.IN_PROGRESS:
            row.state = State.INTERRUPTED
        yield row


def _entry_for(entries, deleted_at):
    for entry in entries:
        if (
            entry.deletion.location_id is None
            and entry.deletion.deleted_at == deleted_at
        ):
            return entry
    return None


def _state(row, entry, now):
    if entry is not None and entry.lease_expires and entry.lease_expires > now:
        return State.IN_PROGRESS
    if entry is not None and entry.attempts:
        return State.FAILED
    if row.due_at > now:
        return State.WAITING
    return State.DUE if entry is not None else State.NOT_QUEUED
