"""Races of the due-queue: late events, and workers sharing one queue.

Threads (and a few real processes) on real databases (ids ``[sqlite]``,
``[mysql]``, ``[postgresql]``).  The set-up is in
``concurrency_fixtures.py``.
"""

import collections
import datetime
import os
import threading
import time
import uuid

import futurist
import pytest
import sqlalchemy as sa

from scrub_listener import exceptions
from scrub_listener import glance_db
from scrub_listener import model
from scrub_listener import notification
from scrub_listener import queue as queue_mod
from scrub_listener import scrubber as scrubber_mod
from tests.functional.concurrency_fixtures import MANAGE
from tests.functional.concurrency_fixtures import SECOND
from tests.functional.concurrency_fixtures import WINDOW
from tests.functional.concurrency_fixtures import FileStores
from tests.functional.concurrency_fixtures import Outcome
from tests.functional.concurrency_fixtures import ago
from tests.functional.concurrency_fixtures import read_delete_logs
from tests.functional.concurrency_fixtures import run_threads
from tests.functional.concurrency_fixtures import utcnow
from tests.functional.concurrency_fixtures import verify_files
from tools import glance_rows
from tools.service_process import wait_until

# ====================================================================
# Late events
# ====================================================================


def _in_process_drain(cluster, queue_url, scrub_time, stores=None):
    gdb = cluster.glance_db()
    due_queue = cluster.due_queue(queue_url)
    scrubber = scrubber_mod.Scrubber(
        gdb,
        stores or FileStores(),
        futurist.SynchronousExecutor(),
        queue=due_queue,
        owner='test-worker',
        batch_size=50,
        schedule=model.Schedule(scrub_time),
    )
    return gdb, due_queue, scrubber


def test_late_event_after_restore_then_deleted_again(cluster):
    """The image.delete event of deletion D is read, X is restored, then
    the event's entry is committed.  Claimed → skipped, data intact.  X is
    deleted again: the old entry does not scrub the new deletion early,
    the new deletion is queued with its own due time."""
    scrub_time = 3600
    originals = cluster.make_images(1)
    [image_id] = originals
    queue_url = cluster.queue_url()
    gdb, due_queue, the_drain = _in_process_drain(
        cluster, queue_url, scrub_time
    )
    restore_side = cluster.glance_db()

    class RestoreRightAfterRead:
        """The endpoint's view of the Glance DB; a restore lands between
        its read of deleted_at and its enqueue."""

        def get_deletion_times(self, image_ids):
            times = gdb.get_deletion_times(image_ids)
            restore_side.restore(image_id, verify_files, WINDOW)
            return times

    endpoint = notification.ImageDeleteEndpoint(
        RestoreRightAfterRead(), due_queue, model.Schedule(scrub_time)
    )
    endpoint.info([{'payload': {'id': image_id}, 'metadata': {}}])
    [entry] = due_queue.entries_for({image_id})[image_id]
    assert entry.due_at < utcnow()  # deleted an hour ago: due now
    assert cluster.image(image_id).status == 'active'

    [outcome] = the_drain.scrub_batch()

    assert outcome.status == model.Result.SKIPPED
    assert due_queue.count() == 0
    cluster.assert_final_state(originals, restored={image_id})

    # deleted again; the stale entry of the first deletion comes back too
    old = entry.deletion
    due_queue.enqueue([(old, old.deleted_at)])
    new_time = ago(2)
    cluster.glance_delete(image_id, new_time)
    [outcome] = the_drain.scrub_batch()
    assert outcome.status == model.Result.SKIPPED
    assert outcome.superseded_by == cluster.image(image_id).deleted_at
    assert os.path.exists(cluster.data_path(image_id))
    [row] = due_queue.entries_for({image_id})[image_id]
    assert row.deletion.deleted_at == cluster.image(image_id).deleted_at
    assert row.due_at == row.deletion.deleted_at + datetime.timedelta(
        seconds=scrub_time
    )
    assert the_drain.scrub_batch() == []
    # a late event for the new deletion adds nothing
    endpoint = notification.ImageDeleteEndpoint(
        gdb, due_queue, model.Schedule(scrub_time)
    )
    endpoint.info([{'payload': {'id': image_id}, 'metadata': {}}])
    assert due_queue.count() == 1
    # when its time comes, it is scrubbed
    [outcome] = the_drain.scrub_batch(due_before=row.due_at)
    assert outcome.status == model.Result.SCRUBBED
    assert not os.path.exists(cluster.data_path(image_id))


def test_late_event_from_another_process_after_restore(cluster):
    """Same, across processes: the restore is a ``scrub-listener-manage
    restore --direct`` and the scrub a ``scrub-listener --sweep-once``."""
    originals = cluster.make_images(3)
    image_id, other, third = sorted(originals)
    queue_url = cluster.queue_url()
    config = cluster.config('late', queue_url, scrub_time=600)
    due_queue = cluster.due_queue(queue_url)
    deletion = cluster.deletion(image_id)

    restore = cluster.spawn(
        'restore',
        [MANAGE, '--config-file', config, 'restore', '--direct', image_id],
    )
    assert restore.wait() == 0, restore.output()
    # the event of the first deletion is committed after the restore
    due_queue.enqueue([(deletion, ago(1))])
    sweep = cluster.sweeper('sweep', config)
    assert sweep.wait() == 0, sweep.output()

    assert 'skipped 1' in sweep.output()
    assert read_delete_logs([sweep]) == collections.Counter(
        {('start', cluster.data_path(p)): 1 for p in (other, third)}
        | {('deleted', cluster.data_path(p)): 1 for p in (other, third)}
    )
    cluster.assert_final_state(originals, restored={image_id})


def test_old_location_entry_does_not_scrub_a_later_removal_early(cluster):
    # Regression: the entry of the first removal was claimed without
    # comparing deletion times and scrubbed the second removal early.
    scrub_time = 3600
    live = glance_rows.make_image(
        cluster.engine, cluster.store_dir, status='active'
    )
    extra_path = os.path.join(cluster.store_dir, 'second-copy')
    with open(extra_path, 'wb') as f:
        f.write(b'second copy')
    locations = cluster.tables['image_locations']
    with cluster.engine.begin() as conn:
        extra = conn.execute(
            locations.insert(),
            {
                'image_id': live,
                'value': 'file://' + extra_path,
                'meta_data': '{"store": "fs"}',
                'status': 'active',
                'created_at': ago(7200),
                'updated_at': ago(7200),
                'deleted': False,
            },
        ).inserted_primary_key[0]
    queue_url = cluster.queue_url()
    gdb, due_queue, the_drain = _in_process_drain(
        cluster, queue_url, scrub_time
    )
    # removed 2 h ago; its event queued it, due 1 h ago
    first_removal = ago(7200)
    cluster.remove_location(extra, first_removal)
    [old_row] = [r for r in cluster.locations(live) if r.id == extra]
    old = glance_db.Deletion(live, extra, old_row.deleted_at)
    due_queue.enqueue([(old, old.deleted_at + SECOND * scrub_time)])
    # the image is deleted 10 s after, and restored: the location was
    # deleted within deletion_window before the image, so it comes back
    cluster.glance_delete(live, first_removal + 10 * SECOND)
    gdb.restore(live, verify_files, WINDOW)
    assert {r.id: r.status for r in cluster.locations(live)}[extra] == (
        'active'
    )
    # removed again, now: must stay until now + scrub_time
    cluster.remove_location(extra, ago(0))

    the_drain.scrub_batch()

    assert os.path.exists(extra_path), 'scrubbed an hour early'


# ====================================================================
# The due-queue shared by several workers (threads, all backends)
# ====================================================================


@pytest.fixture
def shared_queue(cluster):
    return cluster.queue_url(shared=True)


def _deletions(count):
    when = ago(100)
    return sorted(
        (
            (glance_db.Deletion(str(uuid.uuid4()), None, when), when)
            for _ in range(count)
        ),
        key=lambda item: item[0].image_id,
    )


def test_racing_queue_claims_lease_each_entry_once(cluster, shared_queue):
    items = _deletions(600)
    cluster.due_queue(shared_queue).enqueue(items)
    queues = [cluster.due_queue(shared_queue) for _ in range(5)]

    def worker(n):
        got = []
        while True:
            entries = queues[n].claim(f'w{n}', 37)
            if not entries:
                return got
            got.extend(e.deletion for e in entries)

    results = run_threads(*[lambda n=n: worker(n) for n in range(5)])

    leased = collections.Counter(d for got in results for d in got)
    assert set(leased) == {d for d, _ in items}
    assert set(leased.values()) == {1}


def test_instances_starting_together_create_the_queue_schema(cluster, request):
    """Several instances start at once on a fresh shared queue database
    (a deployment on three hosts): each creates the queue table if it is
    missing; none may fail."""
    for _ in range(5):
        url = cluster.queue_url(shared=True)
        engines = [cluster.product_engine(url) for _ in range(4)]
        for engine in engines:  # connected, like a started service
            engine.connect().close()
        run_threads(
            *[
                lambda e=e: queue_mod.DueQueue(e).create_schema()
                for e in engines
            ]
        )
        assert queue_mod.DueQueue(engines[0]).count() == 0


def test_racing_enqueues_of_the_same_deletions(cluster, shared_queue):
    """Four producers (sweeps on four hosts) enqueue the same deletions
    in the same order: one row each, nothing raised."""
    items = _deletions(500)
    queues = [cluster.due_queue(shared_queue) for _ in range(4)]
    run_threads(*[lambda q=q: q.enqueue(items) for q in queues])
    assert queues[0].count() == 500


def test_enqueue_reports_only_new_rows(cluster, shared_queue):
    # Regression: on MariaDB a duplicate counted as new (ON DUPLICATE
    # KEY UPDATE with the FOUND_ROWS client flag).
    items = _deletions(50)
    due_queue = cluster.due_queue(shared_queue)
    assert due_queue.enqueue(items[:30]) == 30
    assert due_queue.enqueue(items[:30]) == 0
    assert due_queue.enqueue(items) == 20
    queues = [cluster.due_queue(shared_queue) for _ in range(4)]
    more = _deletions(200)
    counts = run_threads(*[lambda q=q: q.enqueue(more) for q in queues])
    assert sum(counts) == 200


def _lock_waiters(cluster, url):
    database = sa.engine.make_url(url).database
    if cluster.backend == 'postgresql':
        sql = (
            'SELECT count(*) FROM pg_stat_activity WHERE datname = :db '
            "AND wait_event_type = 'Lock'"
        )
    else:
        sql = (
            'SELECT count(*) FROM information_schema.innodb_trx t JOIN '
            'information_schema.processlist p ON p.id = '
            "t.trx_mysql_thread_id WHERE t.trx_state = 'LOCK WAIT' AND "
            'p.db = :db'
        )
    with cluster.engine.connect() as conn:
        return conn.execute(sa.text(sql), {'db': database}).scalar()


def test_enqueues_in_different_orders_do_not_deadlock(cluster, shared_queue):
    # Regression: enqueue neither sorted its rows nor retried a deadlock;
    # one of two such enqueues raised OperationalError.
    if cluster.backend == 'sqlite':
        pytest.skip('SQLite serialises writers: no row-lock deadlock')
    [(a, due_a), (b, due_b), (c, due_c)] = _deletions(3)
    holder = cluster.due_queue(shared_queue)
    one = cluster.due_queue(shared_queue)
    two = cluster.due_queue(shared_queue)
    # a third transaction holds C, so both enqueues line up on it with
    # their first row inserted: one holds B, the other A
    conn = holder.engine.connect()
    tx = conn.begin()
    conn.execute(
        holder._insert_ignoring_duplicates(),
        [
            {
                'image_id': c.image_id,
                'location_id': 0,
                'deleted_at': c.deleted_at,
                'due_at': due_c,
                'next_attempt_at': due_c,
                'attempts': 0,
                'created_at': utcnow(),
            }
        ],
    )
    first = Outcome(lambda: one.enqueue([(b, due_b), (c, due_c), (a, due_a)]))
    second = Outcome(lambda: two.enqueue([(a, due_a), (c, due_c), (b, due_b)]))
    wait_until(
        lambda: _lock_waiters(cluster, shared_queue) >= 2,
        30,
        message='enqueues never lined up',
    )
    tx.commit()
    conn.close()
    first.join()
    second.join()

    assert (first.error, second.error) == (None, None)
    assert one.count() == 3


def test_shared_queue_under_producers_and_consumers(cluster, shared_queue):
    """Two sweeps (sorted pages) and four drains (claim, complete) on one
    queue at once: nothing raises, no entry is leased twice, every
    deletion is handled, the queue ends empty.

    Regression: on MariaDB (REPEATABLE READ) enqueue, claim and complete
    deadlocked and OperationalError escaped every run."""
    items = _deletions(3000)
    queues = [cluster.due_queue(shared_queue) for _ in range(6)]
    errors = []
    producers_done = threading.Event()
    produced = [0]
    lock = threading.Lock()

    def producer(q):
        for start in range(0, len(items), 100):
            try:
                q.enqueue(items[start : start + 100])
            except Exception as exc:
                errors.append(f'enqueue: {exc!r:.200}')
        with lock:
            produced[0] += 1
            if produced[0] == 2:
                producers_done.set()

    def consumer(q, owner):
        leases = collections.Counter()
        idle = 0
        while True:
            try:
                entries = q.claim(owner, 37)
            except Exception as exc:
                errors.append(f'claim: {exc!r:.200}')
                continue
            if not entries:
                # done when the producers are and nothing is left (or
                # only rows whose lease a failed complete left behind)
                if producers_done.is_set():
                    idle += 1
                    if idle > 100 or q.count() == 0:
                        return leases
                time.sleep(0.01)
                continue
            idle = 0
            for entry in entries:
                leases[entry.id, entry.deletion] += 1
            try:
                q.complete(entries, owner)
            except Exception as exc:
                errors.append(f'complete: {exc!r:.200}')

    results = run_threads(
        lambda: producer(queues[0]),
        lambda: producer(queues[1]),
        *[lambda n=n: consumer(queues[2 + n], f'w{n}') for n in range(4)],
        timeout=120,
    )

    assert errors == []
    leases = sum((r for r in results if r), collections.Counter())
    assert {d for _, d in leases} == {d for d, _ in items}
    if cluster.backend != 'sqlite':  # SQLite reuses rowids
        assert set(leases.values()) == {1}
    assert queues[0].count() == 0


def test_restore_waiting_on_a_lock_answers_within_its_bound(cluster):
    """Issue 7, finding 8: a restore that waited on a row lock longer
    than the RPC timeout was reported as "service unreachable" and then
    succeeded.  With a lock bound it answers ScrubInProgress in time and
    changes nothing; once the lock is gone it succeeds."""
    if cluster.backend == 'sqlite':
        pytest.skip('SQLite waits at BEGIN, bounded by its busy timeout')
    originals = cluster.make_images(1)
    [image_id] = originals
    gdb = cluster.glance_db()
    images = cluster.tables['images']
    holder = cluster.engine.connect()
    tx = holder.begin()
    holder.execute(
        sa.select(images.c.id).where(images.c.id == image_id).with_for_update()
    ).all()
    try:
        started = time.monotonic()
        with pytest.raises(exceptions.ScrubInProgress):
            gdb.restore(image_id, verify_files, WINDOW, lock_timeout=1)
        took = time.monotonic() - started
    finally:
        tx.rollback()
        holder.close()
    print(f'\nrestore behind a held lock answered after {took:.2f} s')
    assert cluster.image(image_id).status == 'pending_delete'
    gdb.restore(image_id, verify_files, WINDOW, lock_timeout=1)
    cluster.assert_final_state(originals, restored={image_id})
