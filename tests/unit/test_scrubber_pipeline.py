"""scrub_listener.scrubber.Scrubber draining the due-queue.

How a batch's outcomes settle the queue (done, backed off, released,
requeued), and how batches overlap in :meth:`Scrubber.drain` without ever
meeting on one image.  Real Glance rows (SQLite, real schema), a real
due-queue, a fake store (tests.unit.conftest.FakeStores).
"""

import datetime
import os
import threading
import uuid

import futurist
import pytest

from scrub_listener import exceptions
from scrub_listener import model
from scrub_listener import scrubber
from tests.unit.conftest import ago
from tools.service_process import wait_until

SCRUB_TIME = 3600
Result = model.Result


def _make(gdb, stores, due_queue, batch_size=10, executor=None, **kwargs):
    return scrubber.Scrubber(
        gdb,
        stores,
        executor or futurist.SynchronousExecutor(),
        queue=due_queue,
        owner='me',
        batch_size=batch_size,
        schedule=model.Schedule(SCRUB_TIME),
        **kwargs,
    )


@pytest.fixture
def the_scrubber(gdb, stores, due_queue):
    return _make(gdb, stores, due_queue)


def _rows(due_queue, deletion):
    return due_queue.entries_for({deletion.image_id}).get(
        deletion.image_id, []
    )


def _queue_all(due_queue, deletions, due_at=None):
    due_queue.enqueue([(d, due_at or ago(10)) for d in deletions])


def test_nothing_due(the_scrubber, glance, due_queue, stores):
    due_queue.enqueue([(glance.deletion(glance.make_image()), ago(-60))])
    assert the_scrubber.scrub_batch() == []
    assert stores.calls == []


def test_settle_every_outcome(the_scrubber, glance, gdb, due_queue, stores):
    done, failed, busy, skipped, old = (glance.make_image() for _ in range(5))
    deletions = {i: glance.deletion(i) for i in (done, failed, busy, skipped)}
    deletions[old] = glance.deletion(old)
    bad = 'file://' + glance.path(failed)
    stores.fail[bad] = exceptions.StoreError('store down', data_intact=True)
    gdb.claim([deletions[busy]])  # another live worker holds it
    gdb.restore(skipped, lambda locations: None, 60)
    gdb.restore(old, lambda locations: None, 60)
    new_time = ago(30)
    glance.glance_delete(old, new_time)  # restored, deleted again
    _queue_all(due_queue, deletions.values())
    before = model.utcnow()

    outcomes = the_scrubber.scrub_batch()

    by_image = {o.deletion.image_id: o.status for o in outcomes}
    assert by_image == {
        done: Result.SCRUBBED,
        failed: Result.FAILED,
        busy: Result.BUSY,
        skipped: Result.SKIPPED,
        old: Result.SKIPPED,
    }
    assert _rows(due_queue, deletions[done]) == []
    assert _rows(due_queue, deletions[skipped]) == []
    [row] = _rows(due_queue, deletions[failed])
    assert (row.attempts, row.lease_owner) == (1, None)
    assert 'store down' in row.last_error
    assert row.next_attempt_at >= before + datetime.timedelta(seconds=27)
    [row] = _rows(due_queue, deletions[busy])
    assert row.attempts == 0 and row.lease_owner is None
    assert row.next_attempt_at >= before + scrubber.BUSY_DELAY
    # the old deletion is done; the new one is queued with its own due time
    [row] = _rows(due_queue, deletions[old])
    assert row.deletion == model.Deletion(old, None, new_time)
    assert row.due_at == new_time + datetime.timedelta(seconds=SCRUB_TIME)
    assert row.lease_owner is None
    # nothing is due again right away
    assert the_scrubber.scrub_batch() == []


class _ClaimFails:
    """A GlanceDB whose claims fail: the Glance database is away."""

    def __init__(self, real):
        self.process = real.process

    def claim(self, deletions):
        raise RuntimeError('Glance DB gone')


def test_claim_error_backs_the_whole_batch_off(glance, gdb, stores, due_queue):
    deletions = [glance.deletion(glance.make_image()) for _ in range(3)]
    _queue_all(due_queue, deletions)
    down = _make(_ClaimFails(gdb), stores, due_queue)
    with pytest.raises(RuntimeError):
        down.drain()
    for deletion in deletions:
        [row] = _rows(due_queue, deletion)
        assert row.attempts == 1
        assert row.last_error == 'RuntimeError: Glance DB gone'
        assert row.lease_owner is None
    assert stores.calls == []


def test_due_before_bounds_the_batch(the_scrubber, glance, due_queue):
    first, second = (glance.deletion(glance.make_image()) for _ in range(2))
    due_queue.enqueue([(first, ago(20)), (second, ago(5))])
    outcomes = the_scrubber.scrub_batch(due_before=ago(10))
    assert [o.deletion for o in outcomes] == [first]


def test_batch_size(glance, gdb, stores, due_queue):
    _queue_all(
        due_queue, [glance.deletion(glance.make_image()) for _ in range(7)]
    )
    small = _make(gdb, stores, due_queue, batch_size=3)
    assert [len(small.scrub_batch()) for _ in range(4)] == [3, 3, 1, 0]


def test_tally():
    stats = model.Tally()
    d = model.Deletion(str(uuid.uuid4()), None, ago(60))
    for status, freed in [
        (Result.SCRUBBED, 10),
        (Result.FAILED, 0),
        (Result.BUSY, 0),
        (Result.SKIPPED, 0),
        (Result.SCRUBBED, 5),
    ]:
        stats.add(model.Outcome(d, status, locations=1, bytes_freed=freed))
    assert (stats.images, stats.failed, stats.busy, stats.skipped) == (
        2,
        1,
        1,
        1,
    )
    assert (stats.locations, stats.bytes_freed, stats.handled) == (5, 15, 5)


def test_restored_then_deleted_again(the_scrubber, glance, gdb, due_queue):
    # the old deletion's entry must not scrub the new deletion early
    image = glance.make_image(deleted_at=ago(2 * SCRUB_TIME))
    old = glance.deletion(image)
    delay = datetime.timedelta(seconds=SCRUB_TIME)
    due_queue.enqueue([(old, old.deleted_at + delay)])
    gdb.restore(image, lambda locations: None, 60)
    new_time = ago(10)
    glance.glance_delete(image, new_time)

    [outcome] = the_scrubber.scrub_batch()

    assert outcome.status is Result.SKIPPED
    assert os.path.exists(glance.path(image))
    [row] = _rows(due_queue, old)
    assert row.deletion.deleted_at == new_time
    assert row.due_at == new_time + delay
    assert the_scrubber.scrub_batch() == []
    # when its own time comes, the new deletion is scrubbed
    [outcome] = the_scrubber.scrub_batch(due_before=row.due_at)
    assert outcome.status is Result.SCRUBBED
    assert not os.path.exists(glance.path(image))


def test_busy_deletion_waits_for_the_other_workers_lease(
    the_scrubber, glance, gdb, due_queue, caplog
):
    """Finding 9: an entry another worker holds was polled and logged at
    INFO every 5 s (34,000 lines in ten minutes); now it comes back when
    that worker's lease runs out, and quietly."""
    busy = glance.deletion(glance.make_image())
    gdb.claim([busy])
    lease_end = ago(-590)
    _queue_all(due_queue, [busy])
    with caplog.at_level('INFO', logger='scrub_listener.scrubber'):
        the_scrubber.scrub_batch()
    [row] = _rows(due_queue, busy)
    assert row.next_attempt_at > lease_end
    assert row.lease_owner is None and row.attempts == 0
    assert not [r for r in caplog.records if r.levelname != 'DEBUG']


# -- the pipeline ------------------------------------------------------------


@pytest.fixture
def pool():
    executor = futurist.ThreadPoolExecutor(max_workers=1)
    yield executor
    executor.shutdown(wait=False)


class _Gate:
    """Holds the store deletes of chosen images until opened."""

    def __init__(self, stores, images):
        self.images = set(images)
        self.started = threading.Event()
        self.opened = threading.Event()
        stores.before_delete = self._before

    def _before(self, location):
        if location.image_id in self.images:
            self.started.set()
            assert self.opened.wait(60), 'the test never opened the gate'


def test_drain_scrubs_every_batch_and_tallies(glance, gdb, stores, due_queue):
    images = [glance.make_image(data=b'x' * 10) for _ in range(9)]
    _queue_all(due_queue, [glance.deletion(i) for i in images])
    reported = []
    scrub = _make(gdb, stores, due_queue, batch_size=2)

    tally = scrub.drain(report=reported.append)

    assert (tally.images, tally.bytes_freed, tally.failed) == (9, 90, 0)
    assert [len(batch) for batch in reported] == [2, 2, 2, 2, 1]
    assert due_queue.count() == 0
    assert all(glance.image(i).status == 'deleted' for i in images)
    assert not any(os.path.exists(glance.path(i)) for i in images)


def test_next_batch_is_taken_while_deletes_run(
    glance, gdb, stores, due_queue, pool
):
    """Batch 2 is leased and claimed while batch 1's deletes still run:
    the store pool is never idle while work is due."""
    images = [glance.make_image() for _ in range(4)]
    _queue_all(due_queue, [glance.deletion(i) for i in images])
    gate = _Gate(stores, images)
    scrub = _make(gdb, stores, due_queue, batch_size=2, executor=pool)
    runner = threading.Thread(target=scrub.drain)

    def _statuses():
        return {r.status for i in images for r in glance.locations(i)}

    runner.start()
    try:
        assert gate.started.wait(30)
        # both batches are taken: every entry leased, every row claimed
        wait_until(lambda: _leased(due_queue, images) == 4, 30)
        wait_until(
            lambda: all(s.startswith('scrubbing:') for s in _statuses()), 30
        )
        assert len(_statuses()) == 2  # two claims, two tokens
    finally:
        gate.opened.set()
        runner.join(60)
    assert due_queue.count() == 0
    assert all(glance.image(i).status == 'deleted' for i in images)


def test_an_image_in_flight_is_not_taken_twice(
    glance, gdb, stores, due_queue, pool
):
    """The image's deletion and a location removed from it earlier sit in
    consecutive batches; the second waits for the first instead of
    finding the rows claimed by its own pipeline (busy)."""
    image = glance.make_image()
    removed_url = glance.write_file('removed')
    removed = glance.add_location(image, removed_url)
    glance.remove_location(removed, ago(120))
    whole = glance.deletion(image)
    due_queue.enqueue(
        [(whole, ago(20)), (glance.location_deletion(removed), ago(10))]
    )
    outcomes = []
    scrub = _make(gdb, stores, due_queue, batch_size=1, executor=pool)

    scrub.drain(report=outcomes.extend)

    assert [o.status for o in outcomes] == [Result.SCRUBBED, Result.SKIPPED]
    assert due_queue.count() == 0
    assert stores.calls.count(removed_url) == 1


def test_interrupt_settles_what_is_known_of_every_batch(
    glance, gdb, stores, due_queue, pool
):
    """Ctrl-C while batch 2 deletes: its running delete is left
    scrub_interrupted (never revivable), its queued one goes back to
    pending_delete, its queue entries are released at once."""
    first = [glance.make_image() for _ in range(2)]
    running, queued = glance.make_image(), glance.make_image()
    _queue_all(due_queue, [glance.deletion(i) for i in first], ago(30))
    _queue_all(due_queue, [glance.deletion(i) for i in (running, queued)])
    gate = _Gate(stores, [running])
    scrub = _make(gdb, stores, due_queue, batch_size=2, executor=pool)

    def report(outcomes):
        assert gate.started.wait(30)
        raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            scrub.drain(report=report)
    finally:
        gate.opened.set()

    assert all(glance.image(i).status == 'deleted' for i in first)
    [row] = glance.locations(running)
    assert row.status == model.INTERRUPTED
    [row] = glance.locations(queued)
    assert row.status == model.PENDING_DELETE
    assert os.path.exists(glance.path(queued))
    for image in (running, queued):
        [entry] = _rows(due_queue, glance.deletion(image))
        assert entry.lease_owner is None and entry.attempts == 0


def _leased(due_queue, images):
    entries = due_queue.entries_for(set(images))
    return sum(1 for group in entries.values() for e in group if e.lease_owner)
