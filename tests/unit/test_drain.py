"""scrub_listener.drain.Drain: how a batch's outcomes settle the queue."""

import datetime
import os
import uuid

import futurist
import pytest

from scrub_listener import drain
from scrub_listener import glance_db
from scrub_listener import scrubber
from tests.unit.conftest import ago

SCRUB_TIME = 3600


class ScriptedScrubber:
    """Returns the Outcome status given per image id (default scrubbed)."""

    def __init__(self):
        self.script = {}
        self.seen = []
        self.error = None

    def scrub(self, deletions, heartbeat=None):
        self.seen.append(list(deletions))
        if self.error is not None:
            raise self.error
        outcomes = []
        for deletion in deletions:
            status, extra = self.script.get(
                deletion.image_id, (scrubber.SCRUBBED, {})
            )
            outcomes.append(scrubber.Outcome(deletion, status, **extra))
        return outcomes


def _deletion(deleted_at=None):
    return glance_db.Deletion(str(uuid.uuid4()), None, deleted_at or ago(60))


@pytest.fixture
def scripted():
    return ScriptedScrubber()


@pytest.fixture
def the_drain(due_queue, scripted):
    return drain.Drain(due_queue, scripted, 'me', 10, SCRUB_TIME)


def _rows(due_queue, deletion):
    return due_queue.entries_for({deletion.image_id}).get(
        deletion.image_id, []
    )


def test_nothing_due(the_drain, due_queue, scripted):
    due_queue.enqueue([(_deletion(), ago(-60))])
    assert the_drain.drain_batch() == []
    assert scripted.seen == []


def test_settle_every_outcome(the_drain, due_queue, scripted):
    done, failed, busy, skipped = (_deletion() for _ in range(4))
    old = _deletion(ago(7200))
    new_time = ago(30)
    scripted.script = {
        failed.image_id: (scrubber.FAILED, {'reason': 'store down'}),
        busy.image_id: (scrubber.BUSY, {'reason': 'elsewhere'}),
        skipped.image_id: (scrubber.SKIPPED, {'reason': 'restored'}),
        old.image_id: (
            scrubber.SKIPPED,
            {'reason': 'deleted again', 'superseded_by': new_time},
        ),
    }
    due_queue.enqueue(
        [(d, ago(10)) for d in (done, failed, busy, skipped, old)]
    )
    before = glance_db.utcnow()

    outcomes = the_drain.drain_batch()

    assert len(outcomes) == 5
    assert _rows(due_queue, done) == []
    assert _rows(due_queue, skipped) == []
    [row] = _rows(due_queue, failed)
    assert (row.attempts, row.last_error, row.lease_owner) == (
        1,
        'store down',
        None,
    )
    assert row.next_attempt_at >= before + datetime.timedelta(seconds=27)
    [row] = _rows(due_queue, busy)
    assert row.attempts == 0 and row.lease_owner is None
    assert row.next_attempt_at >= before + drain.BUSY_DELAY
    # the old deletion is done; the new one is queued with its own due time
    [row] = _rows(due_queue, old)
    assert row.deletion == glance_db.Deletion(old.image_id, None, new_time)
    assert row.due_at == new_time + datetime.timedelta(seconds=SCRUB_TIME)
    assert row.lease_owner is None
    # nothing is due again right away
    assert the_drain.drain_batch() == []


def test_scrubber_error_backs_the_whole_batch_off(
    the_drain, due_queue, scripted
):
    deletions = [_deletion() for _ in range(3)]
    due_queue.enqueue([(d, ago(10)) for d in deletions])
    scripted.error = RuntimeError('Glance DB gone')
    with pytest.raises(RuntimeError):
        the_drain.drain_batch()
    for deletion in deletions:
        [row] = _rows(due_queue, deletion)
        assert row.attempts == 1
        assert row.last_error == 'RuntimeError: Glance DB gone'
        assert row.lease_owner is None


def test_due_before_bounds_the_batch(the_drain, due_queue, scripted):
    first, second = _deletion(), _deletion()
    due_queue.enqueue([(first, ago(20)), (second, ago(5))])
    outcomes = the_drain.drain_batch(due_before=ago(10))
    assert [o.deletion for o in outcomes] == [first]


def test_batch_size(due_queue, scripted):
    due_queue.enqueue([(_deletion(), ago(10)) for _ in range(7)])
    small = drain.Drain(due_queue, scripted, 'me', 3, 0)
    assert [len(small.drain_batch()) for _ in range(4)] == [3, 3, 1, 0]


def test_stats():
    stats = drain.DrainStats()
    d = _deletion()
    for status, freed in [
        (scrubber.SCRUBBED, 10),
        (scrubber.FAILED, 0),
        (scrubber.BUSY, 0),
        (scrubber.SKIPPED, 0),
        (scrubber.SCRUBBED, 5),
    ]:
        stats.add(scrubber.Outcome(d, status, locations=1, bytes_freed=freed))
    assert (stats.images, stats.failed, stats.busy, stats.skipped) == (
        2,
        1,
        1,
        1,
    )
    assert (stats.locations, stats.bytes_freed, stats.handled) == (5, 15, 5)


def test_real_scrubber_restored_then_deleted_again(
    glance, gdb, due_queue, stores
):
    # the old deletion's entry must not scrub the new deletion early
    pool = futurist.SynchronousExecutor()
    real = scrubber.Scrubber(gdb, stores, pool)
    the_drain = drain.Drain(due_queue, real, 'me', 10, SCRUB_TIME)
    image = glance.make_image(deleted_at=ago(2 * SCRUB_TIME))
    old = glance.deletion(image)
    due_queue.enqueue([(old, old.deleted_at + the_drain_delay())])
    gdb.restore(image, lambda locations: None, 60)
    new_time = ago(10)
    glance.glance_delete(image, new_time)

    [outcome] = the_drain.drain_batch()

    assert outcome.status == scrubber.SKIPPED
    assert os.path.exists(glance.path(image))
    assert stores.calls == []
    [row] = _rows(due_queue, old)
    assert row.deletion.deleted_at == new_time
    assert row.due_at == new_time + the_drain_delay()
    assert the_drain.drain_batch() == []
    # when its own time comes, the new deletion is scrubbed
    [outcome] = the_drain.drain_batch(due_before=row.due_at)
    assert outcome.status == scrubber.SCRUBBED
    assert not os.path.exists(glance.path(image))


def the_drain_delay():
    return datetime.timedelta(seconds=SCRUB_TIME)


def test_busy_deletion_waits_for_the_other_workers_lease(
    the_drain, due_queue, scripted, caplog
):
    """Finding 9: an entry another worker holds was polled and logged at
    INFO every 5 s (34,000 lines in ten minutes); now it comes back when
    that worker's lease runs out, and quietly."""
    busy = _deletion()
    lease_end = ago(-590)
    scripted.script = {
        busy.image_id: (
            scrubber.BUSY,
            {'reason': 'elsewhere', 'busy_until': lease_end},
        )
    }
    due_queue.enqueue([(busy, ago(10))])
    with caplog.at_level('INFO', logger='scrub_listener.drain'):
        the_drain.drain_batch()
    [row] = _rows(due_queue, busy)
    assert row.next_attempt_at > lease_end
    assert row.lease_owner is None and row.attempts == 0
    assert not [r for r in caplog.records if r.levelname != 'DEBUG']
