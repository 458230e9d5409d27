"""Races between real processes: sweep-once, restore, crash.

Real ``scrub-listener --sweep-once`` and ``scrub-listener-manage``
processes on real databases and the real glance_store, held together at a
cross-process gate (``tools.hooks.Gate``), their store deletes logged by
the import hooks.  The set-up is in ``concurrency_fixtures.py``.
"""

import collections
import datetime
import random
import threading

import pytest

from scrub_listener import exceptions
from tests.functional.concurrency_fixtures import MANAGE
from tests.functional.concurrency_fixtures import RESTORE_REFUSALS
from tests.functional.concurrency_fixtures import SECOND
from tests.functional.concurrency_fixtures import WINDOW
from tests.functional.concurrency_fixtures import Outcome
from tests.functional.concurrency_fixtures import read_delete_logs
from tests.functional.concurrency_fixtures import utcnow
from tests.functional.concurrency_fixtures import verify_files
from tools.service_process import wait_until

# ====================================================================
# Processes: sweep-once, restore, crash (real glance_store, real CLIs)
# ====================================================================


def _deleted_paths(procs):
    """Counter path -> how often a process really deleted it, and the
    Counter of NotFound answers."""
    deleted, notfound = collections.Counter(), collections.Counter()
    for (word, path), count in read_delete_logs(procs).items():
        if word == 'deleted':
            deleted[path] += count
        elif word == 'notfound':
            notfound[path] += count
    return deleted, notfound


@pytest.mark.parametrize('queues', ['shared', 'per-host'])
def test_sweep_once_processes_scrub_each_image_exactly_once(cluster, queues):
    """Three ``--sweep-once`` processes at once on 500 images.

    ``shared``: one due-queue (MariaDB / PostgreSQL / one SQLite file) --
    the queue leases split the work.  ``per-host``: each process its own
    SQLite queue, so all three queue and try every image -- the Glance DB
    claim alone must keep the deletes apart.  Every process is held at its
    first store delete until all three are there, so they really overlap.
    """
    count = 500
    originals = cluster.make_images(count, size=64)
    gate = cluster.gate()
    shared = cluster.queue_url() if queues == 'shared' else None
    if shared:
        # created once beforehand: the start-up race on a fresh queue
        # database is test_instances_starting_together_...
        cluster.due_queue(shared)
    procs = []
    for n in range(3):
        url = shared or cluster.queue_url(shared=False, name=f'host{n}')
        config = cluster.config(f'host{n}', url, batch_size=25, pool_size=2)
        procs.append(cluster.sweeper(f'sweep{n}', config, gate=gate))
    arrived = gate.wait_for(procs)
    gate.release()
    codes = [proc.wait() for proc in procs]

    deleted, notfound = _deleted_paths(procs)
    twice = sorted(path for path, n in deleted.items() if n > 1)
    assert twice == [], f'{len(twice)} paths deleted twice'
    # not even a harmless second attempt: the claim keeps them apart
    assert sum(notfound.values()) == 0, notfound
    outputs = '\n'.join(p.output() for p in procs)
    # (a shared MariaDB queue used to fail here with "ERROR: database
    # error: Deadlock found", exit 3)
    assert codes == [0, 0, 0], outputs
    assert set(deleted) == {cluster.data_path(i) for i in originals}
    # they overlapped: at least two were deleting at the same time
    assert len(arrived) >= 2, outputs
    if not shared:
        assert len(arrived) == 3, outputs
    cluster.assert_final_state(originals, restored=set())
    assert cluster.scrubbing_rows() == []
    if shared:
        assert cluster.due_queue(shared).count() == 0


@pytest.mark.parametrize('round_', [1, 2])
def test_restores_racing_sweep_once_processes(cluster, round_):
    """Two ``--sweep-once`` processes (own queues, slowed deletes) while
    four ``scrub-listener-manage restore --direct`` processes and three
    restore threads go for random images, all released at once; then a
    final sweep.  Exactly the images whose restore succeeded are active,
    with their data byte-identical; every other one is deleted, data
    gone; no data was deleted twice."""
    originals = cluster.make_images(120)
    ids = sorted(originals)
    rng = random.Random(f'{cluster.backend}-{round_}')
    gate = cluster.gate()
    sweepers = [
        cluster.sweeper(
            f'sweep{n}',
            cluster.config(
                f'sweep{n}',
                cluster.queue_url(shared=False, name=f'q{n}'),
                batch_size=10,
                pool_size=2,
            ),
            delay=0.01,
            gate=gate,
        )
        for n in range(2)
    ]
    restore_config = cluster.config(
        'restore', cluster.queue_url(shared=False, name='q-restore')
    )
    cli_targets = rng.sample(ids, 4)
    restorers = [
        cluster.spawn(
            f'restore{n}',
            [
                MANAGE,
                '--config-file',
                restore_config,
                'restore',
                '--direct',
                image_id,
            ],
            gate=gate,
        )
        for n, image_id in enumerate(cli_targets)
    ]
    released = threading.Event()

    def restorer(targets):
        worker = cluster.glance_db()
        assert released.wait(90)
        results = {}
        for image_id in targets:
            try:
                worker.restore(image_id, verify_files, WINDOW)
            except exceptions.NotPendingDelete as exc:
                # 'deleted': the scrub won; 'active': restored already
                results[image_id] = f'NotPendingDelete({exc.status})'
            except RESTORE_REFUSALS as exc:
                results[image_id] = type(exc).__name__
            else:
                results[image_id] = 'restored'
        return results

    targets = [rng.sample(ids, 12) for _ in range(3)]
    threads = [Outcome(lambda t=t: restorer(t)) for t in targets]
    arrived = gate.wait_for(sweepers + restorers)
    gate.release()
    released.set()
    sweep_codes = [p.wait() for p in sweepers]
    for proc in restorers:
        proc.wait()
    for thread in threads:
        thread.join()
        assert thread.error is None, thread.error

    assert sweep_codes == [0, 0], '\n'.join(p.output() for p in sweepers)
    assert len(arrived) == len(sweepers) + len(restorers)
    # 0 restored, 5 not pending_delete, 6 data gone, 7 scrub in progress
    for proc in restorers:
        assert proc.returncode in (0, 5, 6, 7), proc.output()
        assert 'Traceback' not in proc.output(), proc.output()
    outcomes = collections.Counter()
    restored = set()
    for image_id, proc in zip(cli_targets, restorers, strict=True):
        outcomes[f'cli exit {proc.returncode}'] += 1
        if proc.returncode == 0:
            restored.add(image_id)
    for thread in threads:
        for image_id, result in thread.result.items():
            outcomes[result] += 1
            if result == 'restored':
                restored.add(image_id)
    final = cluster.sweeper(
        'final',
        cluster.config(
            'final', cluster.queue_url(shared=False, name='q-final')
        ),
    )
    assert final.wait() == 0, final.output()

    deleted, _ = _deleted_paths([*sweepers, final])
    assert [p for p, n in deleted.items() if n > 1] == []
    active, gone = cluster.assert_final_state(originals, restored=restored)
    for image_id in active:
        assert cluster.data_path(image_id) not in deleted
    print(f'restore outcomes: {dict(outcomes)}; {len(active)} active')
    assert restored, f'no restore won the race: {dict(outcomes)}'
    lost = sum(
        outcomes[name]
        for name in (
            'ScrubInProgress',
            'DataGone',
            'NotPendingDelete(deleted)',
            'cli exit 6',
            'cli exit 7',
        )
    )
    assert lost, f'no restore lost the race: {dict(outcomes)}'


def _wait_for_deletes(proc, count, timeout=60):
    def done():
        return sum(
            n
            for (w, _), n in read_delete_logs([proc]).items()
            if w == 'deleted'
        )

    def reached():
        if proc.poll() is not None and done() < count:
            pytest.fail(
                f'{proc.name} ended before {count} deletes:\n{proc.output()}'
            )
        return done() >= count

    wait_until(
        reached, timeout, message=lambda: f'{proc.name}: {done()} deletes'
    )
    return done()


def _wait_past(moment, timeout=60):
    """Until the (naive UTC) clock is past ``moment``."""
    wait_until(lambda: utcnow() > moment, timeout, interval=0.1)


def test_sweep_once_killed_mid_drain_is_taken_over(cluster):
    """SIGKILL a ``--sweep-once`` in the middle of a batch (deletes
    slowed down), wait out ``lease_time`` (10 s, the minimum), run another:
    everything scrubbed, no location left ``scrubbing``, queue empty, no
    data deleted twice (a delete the killed process had done but not
    logged is at most a NotFound)."""
    originals = cluster.make_images(60)
    queue_url = cluster.queue_url()
    config = cluster.config(
        'crash', queue_url, lease_time=10, batch_size=20, pool_size=2
    )
    first = cluster.sweeper('first', config, delay=0.2)
    _wait_for_deletes(first, 6)
    first.kill()

    scrubbing = cluster.scrubbing_rows()
    assert scrubbing, 'killed outside a batch: nothing to take over'
    due_queue = cluster.due_queue(queue_url)
    leases = [
        e.lease_expires
        for entries in due_queue.entries_for(set(originals)).values()
        for e in entries
        if e.lease_expires is not None
    ]
    assert leases
    expiry = max(
        max(leases),
        max(r.updated_at for r in scrubbing) + datetime.timedelta(seconds=10),
    )
    # the condition is the clock itself: every lease has run out
    _wait_past(expiry + SECOND)

    second = cluster.sweeper('second', config)
    assert second.wait() == 0, second.output()

    deleted, notfound = _deleted_paths([first, second])
    assert [p for p, n in deleted.items() if n > 1] == []
    assert set(deleted) | set(notfound) == {
        cluster.data_path(i) for i in originals
    }
    # The killed batch is redone as a whole (its finish never ran): what
    # the first process had deleted comes back as NotFound, plus at most
    # the deletes in flight when it died (pool size 2).
    by_first, _ = _deleted_paths([first])
    assert len(set(notfound) - set(by_first)) <= 2, notfound
    assert cluster.scrubbing_rows() == []
    assert due_queue.count() == 0
    cluster.assert_final_state(originals, restored=set())


def test_slow_batch_of_a_live_worker_is_not_taken_over(cluster):
    if cluster.backend != 'postgresql':
        pytest.skip('one backend is enough for a 20 s test')
    # one batch of 20 deletes of 1 s on one thread: 20 s, lease 10 s
    originals = cluster.make_images(20)
    slow = cluster.sweeper(
        'slow',
        cluster.config(
            'slow',
            cluster.queue_url(shared=False, name='q-slow'),
            lease_time=10,
            batch_size=20,
            pool_size=1,
        ),
        delay=1.0,
    )
    _wait_for_deletes(slow, 1)
    claimed = cluster.scrubbing_rows()
    assert len(claimed) >= 18
    expiry = max(r.updated_at for r in claimed) + 10 * SECOND
    # the condition is the clock itself: the lease has run out
    _wait_past(expiry + SECOND / 2)
    assert slow.poll() is None, 'the batch was meant to outlast the lease'
    other = cluster.sweeper(
        'other',
        cluster.config(
            'other',
            cluster.queue_url(shared=False, name='q-other'),
            lease_time=10,
        ),
    )
    assert other.wait() == 0, other.output()
    assert slow.wait() == 0, slow.output()

    deleted, notfound = _deleted_paths([slow, other])
    assert [p for p, n in deleted.items() if n > 1] == []
    cluster.assert_final_state(originals, restored=set())
    assert sum(notfound.values()) == 0, (
        f'{sum(notfound.values())} deletes repeated by the other process'
    )
