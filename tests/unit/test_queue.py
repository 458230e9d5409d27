"""scrub_listener.queue.DueQueue on SQLite: enqueue, leases, backoff.

The same operations from racing threads and processes on MariaDB and
PostgreSQL are in tests/functional/test_concurrency_*.py.
"""

import datetime
import uuid

import pytest

from scrub_listener import glance_db
from scrub_listener import queue
from tests.unit.conftest import ago

SECOND = datetime.timedelta(seconds=1)


def _deletion(deleted_at=None, location_id=None, image_id=None):
    return glance_db.Deletion(
        image_id or str(uuid.uuid4()), location_id, deleted_at or ago(100)
    )


def _due(deletion, seconds_ago=10):
    return (deletion, ago(seconds_ago))


def test_enqueue_is_idempotent(due_queue):
    items = [_due(_deletion()) for _ in range(5)]
    assert due_queue.enqueue(items) == 5
    assert due_queue.enqueue(items) == 0
    assert due_queue.enqueue(items[3:] + [_due(_deletion())]) == 1
    assert due_queue.enqueue([]) == 0
    assert due_queue.count() == 6


def test_enqueue_keeps_the_first_due_time_and_a_leased_row(due_queue):
    deletion = _deletion()
    due_queue.enqueue([(deletion, ago(10))])
    [entry] = due_queue.claim('w1', 10)
    due_queue.enqueue([(deletion, ago(-3600))])
    [row] = due_queue.entries_for({deletion.image_id})[deletion.image_id]
    assert row.due_at == entry.due_at
    assert row.lease_owner == 'w1'


def test_one_image_several_deletions_are_distinct(due_queue):
    image_id = str(uuid.uuid4())
    first = _deletion(ago(300), image_id=image_id)
    second = _deletion(ago(100), image_id=image_id)
    removed = _deletion(ago(300), location_id=7, image_id=image_id)
    assert due_queue.enqueue([_due(d) for d in (first, second, removed)]) == 3
    got = {e.deletion for e in due_queue.entries_for({image_id})[image_id]}
    assert got == {first, second, removed}


def test_deleted_at_round_trips_to_the_microsecond(due_queue):
    when = datetime.datetime(2026, 11, 25, 15, 12, 18, 625795)
    deletion = _deletion(when)
    due_queue.enqueue([_due(deletion)])
    [entry] = due_queue.claim('w', 1)
    assert entry.deletion == deletion
    assert entry.deletion.location_id is None


def test_claim_leases_due_entries_in_order(due_queue):
    early, late = _deletion(), _deletion()
    not_due = _deletion()
    due_queue.enqueue([(late, ago(10)), (early, ago(20)), (not_due, ago(-60))])
    now = glance_db.utcnow()
    entries = due_queue.claim('w1', 10, now=now)
    assert [e.deletion for e in entries] == [early, late]
    for entry in entries:
        assert entry.lease_owner == 'w1'
        assert entry.lease_expires == now + datetime.timedelta(seconds=600)
    # leased: nobody else gets them, not even the same owner
    assert due_queue.claim('w2', 10) == []
    assert due_queue.claim('w1', 10) == []


def test_claim_respects_limit_and_due_before(due_queue):
    deletions = [_deletion() for _ in range(5)]
    base = ago(100)
    due_queue.enqueue(
        [(d, base + i * SECOND) for i, d in enumerate(deletions)]
    )
    assert len(due_queue.claim('w1', 2)) == 2
    entries = due_queue.claim('w2', 10, due_before=base + 2.5 * SECOND)
    assert [e.deletion for e in entries] == [deletions[2]]
    assert len(due_queue.claim('w3', 10)) == 2


def test_expired_lease_is_taken_over(due_queue):
    deletion = _deletion()
    due_queue.enqueue([_due(deletion)])
    [mine] = due_queue.claim('dead', 1)
    assert due_queue.claim('w2', 1, now=mine.lease_expires) == []
    later = mine.lease_expires + SECOND
    [taken] = due_queue.claim('w2', 1, now=later)
    assert taken.id == mine.id
    assert taken.lease_owner == 'w2'
    # the old owner can no longer complete, back off or release it
    due_queue.complete([mine], 'dead')
    due_queue.retry_later([(mine, 'late')], 'dead')
    due_queue.release([mine], 'dead', ago(0))
    [row] = due_queue.entries_for({deletion.image_id})[deletion.image_id]
    assert (row.lease_owner, row.attempts) == ('w2', 0)
    due_queue.complete([taken], 'w2')
    assert due_queue.count() == 0


def test_complete_only_by_owner(due_queue):
    due_queue.enqueue([_due(_deletion()) for _ in range(3)])
    entries = due_queue.claim('w1', 3)
    due_queue.complete(entries, 'intruder')
    assert due_queue.count() == 3
    due_queue.complete(entries[:2], 'w1')
    assert due_queue.count() == 1
    due_queue.complete([], 'w1')


def test_retry_later_backs_off_and_keeps_the_reason(due_queue):
    due_queue.retry_backoff = 30
    due_queue.retry_backoff_max = 3600
    deletion = _deletion()
    due_queue.enqueue([_due(deletion)])
    now = glance_db.utcnow()
    delays = []
    for attempt in range(1, 10):
        [entry] = due_queue.claim('w', 1, now=now)
        assert entry.attempts == attempt - 1
        due_queue.retry_later([(entry, f'boom {attempt}')], 'w', now=now)
        [row] = due_queue.entries_for({deletion.image_id})[deletion.image_id]
        assert row.attempts == attempt
        assert row.last_error == f'boom {attempt}'
        assert row.lease_owner is None and row.lease_expires is None
        assert due_queue.claim('w', 1, now=now) == []
        delays.append((row.next_attempt_at - now).total_seconds())
        now = row.next_attempt_at
    expected = [min(30 * 2 ** (n - 1), 3600) for n in range(1, 10)]
    for delay, nominal in zip(delays, expected, strict=True):
        assert nominal * 0.9 - 0.001 <= delay <= nominal * 1.1 + 0.001
    assert max(delays) <= 3600 * 1.1


def test_backoff_doubles_and_caps():
    q = queue.DueQueue(None, retry_backoff=10, retry_backoff_max=100)
    for attempts, nominal in [
        (1, 10),
        (2, 20),
        (3, 40),
        (4, 80),
        (5, 100),
        (30, 100),
        (200, 100),
    ]:
        for _ in range(20):
            seconds = q.backoff(attempts).total_seconds()
            assert nominal * 0.9 <= seconds <= nominal * 1.1


def test_backoff_has_jitter():
    q = queue.DueQueue(None, retry_backoff=30, retry_backoff_max=3600)
    assert len({q.backoff(3) for _ in range(20)}) > 1


def test_retry_later_truncates_long_reasons(due_queue):
    due_queue.enqueue([_due(_deletion())])
    [entry] = due_queue.claim('w', 1)
    due_queue.retry_later([(entry, 'x' * 10000)], 'w')
    [row] = next(
        iter(due_queue.entries_for({entry.deletion.image_id}).values())
    )
    assert len(row.last_error) == 4000


def test_release_gives_back_untouched(due_queue):
    deletion = _deletion()
    due_queue.enqueue([_due(deletion)])
    [entry] = due_queue.claim('w1', 1)
    at = ago(-5)
    due_queue.release([entry], 'other', at)
    assert due_queue.claim('w2', 1, now=ago(-6)) == []  # still leased
    due_queue.release([entry], 'w1', at)
    [row] = due_queue.entries_for({deletion.image_id})[deletion.image_id]
    assert (row.attempts, row.lease_owner, row.next_attempt_at) == (
        0,
        None,
        at,
    )
    assert due_queue.claim('w2', 1) == []
    assert len(due_queue.claim('w2', 1, now=at)) == 1


def test_next_wakeup(due_queue):
    assert due_queue.next_wakeup() is None
    a, b = _deletion(), _deletion()
    due_queue.enqueue([(a, ago(-100)), (b, ago(-50))])
    assert (
        due_queue.next_wakeup()
        == due_queue.entries_for({b.image_id})[b.image_id][0].next_attempt_at
    )
    [entry] = due_queue.claim('w', 1, due_before=ago(-60))
    assert entry.deletion == b
    # a leased row wakes us when its lease runs out
    assert due_queue.next_wakeup() == min(
        entry.lease_expires,
        due_queue.entries_for({a.image_id})[a.image_id][0].next_attempt_at,
    )


def test_forget_deletion_drops_that_image_deletion_only(due_queue):
    image_id = str(uuid.uuid4())
    whole = _deletion(ago(300), image_id=image_id)
    again = _deletion(ago(100), image_id=image_id)
    removed = _deletion(ago(300), location_id=3, image_id=image_id)
    other = _deletion()
    due_queue.enqueue([_due(d) for d in (whole, again, removed, other)])
    due_queue.forget_deletion(image_id, whole.deleted_at)
    left = {
        e.deletion
        for es in due_queue.entries_for({image_id, other.image_id}).values()
        for e in es
    }
    assert left == {again, removed, other}


def test_stats(due_queue):
    due_queue.enqueue(
        [
            (_deletion(), ago(10)),
            (_deletion(), ago(5)),
            (_deletion(), ago(-60)),
        ]
    )
    [entry] = due_queue.claim('w', 1)
    due_queue.retry_later([(entry, 'x')], 'w')
    due_queue.claim('w', 1)
    stats = due_queue.stats(glance_db.utcnow())
    assert stats['queued'] == 3
    assert stats['in_progress'] == 1
    assert stats['failing'] == 1
    assert stats['due'] == 0


def test_entries_for_nothing(due_queue):
    assert due_queue.entries_for(set()) == {}


def test_unsupported_dialect():
    class Engine:
        class dialect:
            name = 'oracle'

    with pytest.raises(NotImplementedError):
        queue.DueQueue(Engine())._insert_ignoring_duplicates()
