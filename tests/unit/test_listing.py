"""scrub_listener.listing: pending_delete images joined with queue state."""

import datetime
import json

from scrub_listener import glance_db
from scrub_listener import listing
from scrub_listener import model
from tests.unit.conftest import ago

HOUR = 3600


def _rows(glance, gdb, due_queue, scrub_time=HOUR, page_size=500, **kw):
    rows = listing.iter_rows(
        gdb,
        due_queue,
        model.Schedule(scrub_time),
        glance_db.utcnow(),
        page_size,
        **kw,
    )
    return {row.id: row for row in rows}


def test_states(glance, gdb, due_queue):
    waiting = glance.make_image(deleted_at=ago(60))
    not_queued = glance.make_image(deleted_at=ago(2 * HOUR))
    due = glance.make_image(deleted_at=ago(2 * HOUR))
    in_progress = glance.make_image(deleted_at=ago(3 * HOUR))
    failed = glance.make_image(deleted_at=ago(4 * HOUR))
    glance.make_image(status='active')
    glance.make_image(status='deleted')

    def queue(image_id):
        d = glance.deletion(image_id)
        due_queue.enqueue([(d, d.deleted_at + datetime.timedelta(hours=1))])

    for image_id in (due, in_progress, failed):
        queue(image_id)
    [oldest] = due_queue.claim('w', 1)  # failed: the oldest due entry
    assert oldest.deletion.image_id == failed
    due_queue.retry_later([(oldest, 'store on fire')], 'w')
    [leased] = due_queue.claim('w', 1)
    assert leased.deletion.image_id == in_progress

    rows = _rows(glance, gdb, due_queue)

    assert {i: r.state for i, r in rows.items()} == {
        waiting: listing.State.WAITING,
        not_queued: listing.State.NOT_QUEUED,
        due: listing.State.DUE,
        in_progress: listing.State.IN_PROGRESS,
        failed: listing.State.FAILED,
    }
    row = rows[failed]
    assert (row.attempts, row.last_error) == (1, 'store on fire')
    assert row.next_attempt_at > glance_db.utcnow()
    row = rows[waiting]
    assert row.due_at == row.deleted_at + datetime.timedelta(hours=1)
    assert row.attempts == 0 and row.last_error is None


def test_due_time_comes_from_the_queue_entry(glance, gdb, due_queue):
    image = glance.make_image(deleted_at=ago(60))
    d = glance.deletion(image)
    fixed = d.deleted_at + datetime.timedelta(seconds=30)
    due_queue.enqueue([(d, fixed)])  # queued under another scrub_time
    row = _rows(glance, gdb, due_queue, scrub_time=HOUR)[image]
    assert row.due_at == fixed
    assert row.state == listing.State.DUE


def test_entry_of_an_older_deletion_is_not_this_one(glance, gdb, due_queue):
    image = glance.make_image(deleted_at=ago(60))
    stale = glance_db.Deletion(image, None, ago(9 * HOUR))
    due_queue.enqueue([(stale, ago(8 * HOUR))])
    due_queue.claim('w', 1)
    row = _rows(glance, gdb, due_queue)[image]
    assert row.state == listing.State.WAITING
    assert row.due_at == row.deleted_at + datetime.timedelta(hours=1)


def test_pages_and_filters(glance, gdb, due_queue):
    mine = {glance.make_image(owner='me', name=f'n{i}') for i in range(5)}
    glance.make_image(owner='you', name='n0')
    assert set(_rows(glance, gdb, due_queue, page_size=2, owner='me')) == mine
    assert len(_rows(glance, gdb, due_queue, page_size=2, name='n0')) == 2
    assert len(_rows(glance, gdb, due_queue, page_size=1)) == 6


def test_as_json(glance, gdb, due_queue):
    image = glance.make_image(owner='me', name='x', data=b'a' * 7)
    row = _rows(glance, gdb, due_queue)[image]
    data = json.loads(json.dumps(row.as_json()))
    assert data['id'] == image
    assert data['size'] == 7
    assert data['state'] == listing.State.WAITING
    assert data['deleted_at'].endswith('Z')
    assert datetime.datetime.fromisoformat(data['due_at'][:-1]) == row.due_at
    assert data['next_attempt_at'] is None


def test_an_interrupted_scrub_shows_as_interrupted(glance, gdb, due_queue):
    """Restore refuses it for good (docs/safety.md): list says so."""
    image = glance.make_image()
    [row] = glance.locations(image)
    glance.update('image_locations', row.id, status='scrub_interrupted')
    other = glance.make_image()
    states = {i: r.state for i, r in _rows(glance, gdb, due_queue).items()}
    assert states[image] == listing.State.INTERRUPTED
    assert states[other] != listing.State.INTERRUPTED
