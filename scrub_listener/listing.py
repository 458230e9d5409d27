"""What is waiting to be scrubbed: Glance's pending_delete images joined
with their due-queue state, for ``scrub-listener-manage list``.

The Glance API hides pending_delete images (404), so this is how an
operator finds the id of an image to restore.
"""

import dataclasses
import datetime

from scrub_listener import redaction

WAITING = 'waiting'
DUE = 'due'
IN_PROGRESS = 'in progress'
FAILED = 'failed'
NOT_QUEUED = 'not queued'
# a scrub of it was cut short: restore refuses it (docs/safety.md)
INTERRUPTED = 'interrupted'


@dataclasses.dataclass
class Row:
    id: str
    name: str | None
    owner: str | None
    size: int | None
    visibility: str | None
    deleted_at: datetime.datetime
    due_at: datetime.datetime
    state: str
    attempts: int = 0
    last_error: str | None = None
    next_attempt_at: datetime.datetime | None = None

    def as_json(self):
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, datetime.datetime):
                data[key] = value.isoformat() + 'Z'
        return data


def iter_rows(glance_db, queue, scrub_time, now, page_size=500, **filters):
    """Yield a Row per pending_delete image, page by page."""
    scrub_delta = datetime.timedelta(seconds=scrub_time)
    page = []
    for image in glance_db.iter_pending_images(page_size, **filters):
        page.append(image)
        if len(page) == page_size:
            yield from _rows(page, queue, scrub_delta, now)
            page = []
    yield from _rows(page, queue, scrub_delta, now)


def _rows(images, queue, scrub_delta, now):
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
            due_at=image.deleted_at + scrub_delta,
            state=WAITING,
        )
        if entry is not None:
            row.due_at = entry.due_at
            row.attempts = entry.attempts
            # Written by any version, any worker: redacted again here, as
            # it leaves for the operator's screen or script.
            row.last_error = redaction.redact(entry.last_error)
            row.next_attempt_at = entry.next_attempt_at
        row.state = _state(row, entry, now)
        if image.interrupted and row.state != IN_PROGRESS:
            row.state = INTERRUPTED
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
        return IN_PROGRESS
    if entry is not None and entry.attempts:
        return FAILED
    if row.due_at > now:
        return WAITING
    return DUE if entry is not None else NOT_QUEUED
