"""The running service through signals, restarts, outages and failures.

Set-up as in test_service_listener.py: ``scrub-listener`` as a real
process on a fresh RabbitMQ vhost, Glance on MariaDB (real schema),
notifications as glance-api 33.0.0 publishes them; outcomes checked in
the store, the Glance rows, the due-queue and the service's log;
``wakeup_time`` an hour unless a test is about the sweep.

This module: SIGTERM (in-flight scrubs finished, or cut short at
graceful_shutdown_timeout), SIGHUP (a new scrub_time, an invalid one);
events sent while the service is down, a broker down at start; the
Glance or queue database unreachable for a while (no event lost, also
at shutdown); a scrub that keeps failing backs off and stays visible.
"""

import datetime
import os
import re
import signal

import pytest

from tests.functional import service_fixtures as sf
from tests.functional.listener_helpers import barrier as _barrier
from tests.functional.listener_helpers import queue_url as _queue_url
from tools import glance_rows
from tools import harness

# fixtures (see service_fixtures)
services = sf.services
world = sf.world
module_vhost = sf.module_vhost
module_glance_mysql = sf.module_glance_mysql
empty_db_factory = sf.empty_db_factory


def _when(value):
    """A due-queue timestamp read back from SQLite (text) as a datetime."""
    if isinstance(value, datetime.datetime):
        return value
    return datetime.datetime.fromisoformat(value)


# ----------------------------------------------------------------- signals


def test_sigterm_finishes_in_flight_scrubs_and_exits_0(world, services):
    sections = world.config(pool_size=1)
    sections['service']['graceful_shutdown_timeout'] = 20
    svc = services(sections, env=world.env(SL_TEST_DELETE_DELAY=0.3))
    images = [world.pending() for _ in range(8)]
    for image_id in images:
        world.publisher.image_delete(image_id)
    sf.wait_until(lambda: world.deletes.calls(), 10)

    rc, took = svc.terminate(timeout=30)

    print(f'\nSIGTERM -> exit {rc} in {took:.2f} s')
    assert rc == 0, svc.log_tail()
    assert took < 20
    assert 'Stopped' in svc.log()
    # every delete that started was finished and recorded
    calls = world.deletes.calls_by_path()
    assert calls == world.deletes.calls_by_path('ok')
    statuses = sf.image_statuses(world.glance_url, images)
    locations = sf.location_statuses(world.glance_url, images)
    queued = {r['image_id']: r for r in sf.queue_rows(_queue_url(world))}
    for image_id in images:
        if world.path(image_id) in calls:
            assert statuses[image_id] == 'deleted'
            assert locations[image_id] == ['deleted']
            assert image_id not in queued
        else:
            assert statuses[image_id] == 'pending_delete'
            assert os.path.exists(world.path(image_id))
    assert not any(
        s.startswith('scrubbing') for v in locations.values() for s in v
    ), locations

    # a new start finishes the rest without waiting for any lease
    svc2 = services(world.config(), env=world.env(SL_TEST_DELETE_DELAY=0))
    elapsed = world.wait_scrubbed(images, 15, svc2)
    assert elapsed < 5
    assert world.deletes.paths_deleted_more_than_once() == {}


def test_sigterm_exits_within_graceful_shutdown_timeout(world, services):
    """A batch longer than the timeout does not hold the exit up.

    (The leases it leaves are taken over later: see test_service_multi.)
    """
    sections = world.config(pool_size=1)
    sections['service']['graceful_shutdown_timeout'] = 1
    svc = services(sections, env=world.env(SL_TEST_DELETE_DELAY=0.5))
    images = [world.pending() for _ in range(40)]  # a 20 s batch
    for image_id in images:
        world.publisher.image_delete(image_id)
    sf.wait_until(lambda: world.deletes.calls(), 10)

    rc, took = svc.terminate(timeout=30)
    print(f'\nSIGTERM with a 20 s batch -> exit {rc} in {took:.2f} s')
    assert rc == 0
    # far below the batch: the exit did not wait for it (a wide margin,
    # so that a loaded CI machine does not make this flaky)
    assert took < 10
    assert 'In-flight scrubs did not finish within 1 s' in svc.log()


def test_sighup_applies_a_new_scrub_time(world, services):
    config = world.config(scrub_time=3600)
    svc = services(config, env=world.env())
    waiting = world.pending()
    world.publisher.image_delete(waiting)
    sf.wait_until(lambda: sf.queue_rows(_queue_url(world)), 10)

    config['DEFAULT']['scrub_time'] = 0
    sf.write_service_config(svc.config_file, config)
    svc.send(signal.SIGHUP)
    svc.wait_for_log(r'Configuration reloaded: scrub_time 0 s', 10)

    image_id = world.pending()
    world.publisher.image_delete(image_id)
    world.wait_scrubbed([image_id], 10, svc)
    assert svc.alive()
    # the due time of what was queued before stays as it was fixed
    assert os.path.exists(world.path(waiting))
    [row] = sf.queue_rows(_queue_url(world))
    assert row['image_id'] == waiting


def test_sighup_with_an_invalid_value_keeps_the_service_running(
    world, services
):
    config = world.config(scrub_time=3600)
    svc = services(config, env=world.env())
    config['DEFAULT']['scrub_time'] = -5  # below min=0
    sf.write_service_config(svc.config_file, config)
    svc.send(signal.SIGHUP)
    sf.wait_until(
        lambda: 'Reload refused' in svc.log() or not svc.alive(),
        15,
        message=svc.log_tail,
    )
    if not svc.alive():
        stopped = 'Stopped' in svc.log()
        pytest.fail(
            f'exited {svc.proc.returncode} on SIGHUP (graceful stop logged: '
            f'{stopped}):\n{svc.log_tail(3)}'
        )
    # still the old value: an event now is queued an hour away
    image_id = world.pending()
    world.publisher.image_delete(image_id)
    sf.wait_until(lambda: sf.queue_rows(_queue_url(world)), 10)
    assert os.path.exists(world.path(image_id))
    rc, _ = svc.terminate()
    assert rc == 0


# ------------------------------------------------- restarts and the broker


def test_events_sent_while_the_service_is_down_are_consumed_at_restart(
    world, services
):
    """The pool queue outlives the service (not the broker): a restart
    consumes what was published meanwhile.

    ``scrub_time`` is an hour, so no sweep (at start or later) can find
    these deletions due: the queue rows can only come from the events.
    The test waits for those rows and for the pool queue to drain, however
    long the restart takes on a busy machine.
    """
    scrub_time = 3600
    sections = world.config(scrub_time=scrub_time)
    first = services(sections, name='first', env=world.env())
    rc, _ = first.terminate()
    assert rc == 0
    images = [world.pending() for _ in range(5)]
    for image_id in images:
        world.publisher.image_delete(image_id)
    assert world.pool_depth() == (5, 0)

    second = services(sections, name='second', env=world.env())

    def queued():
        rows = sf.queue_rows(_queue_url(world))
        return {r['image_id']: r for r in rows} if len(rows) == 5 else None

    rows, _ = sf.wait_until(queued, 30, message=second.log_tail)
    assert sorted(rows) == sorted(images)
    for row in rows.values():
        held = _when(row['due_at']) - _when(row['deleted_at'])
        assert held.total_seconds() == scrub_time
    sf.wait_until(lambda: world.pool_depth()[0] == 0, 30)
    # consumed, not scrubbed: the data stays until it is due
    assert all(os.path.exists(world.path(i)) for i in images)
    assert not re.search(r'Sweep found [1-9]', second.log())


def test_broker_down_at_start_the_sweep_still_scrubs_and_sigterm_works(
    world, services
):
    closed = harness.free_port()
    sections = world.config(
        wakeup_time=1,
        transport_url=f'rabbit://guest:guest@127.0.0.1:{closed}/',
    )
    svc = services(sections, env=world.env(), start=False)
    svc.start(wait=False)
    svc.wait_for_log('Sweep found 0 due deletions', 20)
    image_id = world.pending()
    world.wait_scrubbed([image_id], 10, svc)
    assert not sf.STARTED_RE.search(svc.log())

    rc, took = svc.terminate(timeout=20)
    print(f'\nbroker never reached: SIGTERM -> exit {rc} in {took:.2f} s')
    assert rc == 0
    assert took < 5


# ---------------------------------------------- databases down for a while


@pytest.mark.parametrize('down', ['glance', 'queue'])
def test_events_are_not_lost_while_a_database_is_unreachable(
    world, services, empty_db_factory, down
):
    """The database behind a TCP proxy is cut while events arrive.

    Nothing may be acked and lost: once the database is back, every image
    is scrubbed, without the help of the periodic sweep.  While it is
    down, the broker still holds the backlog beyond ``[listener]
    prefetch`` (it is not pulled into memory).
    """
    proxy = sf.TcpProxy('127.0.0.1', 3306)
    try:
        if down == 'glance':
            sections = world.config(glance_url=proxy.url_for(world.glance_url))
        else:
            queue_url = empty_db_factory('mysql')
            sections = world.config(queue_url=proxy.url_for(queue_url))
        prefetch = 20
        sections['listener'].update(prefetch=prefetch, batch_size=10)
        svc = services(sections, env=world.env())

        eng = sf.engine(world.glance_url)
        try:
            images = glance_rows.bulk_pending_images(
                eng, world.store_dir, 50, 64, deleted_at=glance_rows.utcnow()
            )
        finally:
            eng.dispose()

        proxy.cut()
        for image_id in images:
            world.publisher.image_delete(image_id)
        svc.wait_for_log('Cannot record .* image.delete event', 15)
        # held unacknowledged: what the listener did not prefetch stays
        # in the broker
        sf.wait_until(
            lambda: (world.pool_depth() or (0,))[0] >= len(images) - prefetch,
            15,
            message=lambda: f'pool queue {world.pool_depth()}',
        )

        ready = world.pool_depth()
        assert ready is not None and ready[0] >= len(images) - prefetch, ready
        assert all(os.path.exists(world.path(i)) for i in images)
        assert svc.alive()

        proxy.restore()
        elapsed = world.wait_scrubbed(images, 90, svc)
        print(f'\n{down} DB back -> all 50 scrubbed in {elapsed:.1f} s')
        assert svc.count('Sweep found') == 1  # the one at start only
        assert world.deletes.paths_deleted_more_than_once() == {}
        assert svc.alive()
    finally:
        proxy.close()


def test_sigterm_during_a_database_outage_loses_no_deletion(world, services):
    """Events that cannot be recorded at shutdown are left to the sweep:
    the next start finds the images still pending_delete in Glance."""
    proxy = sf.TcpProxy('127.0.0.1', 3306)
    try:
        sections = world.config(glance_url=proxy.url_for(world.glance_url))
        svc = services(sections, name='first', env=world.env())
        images = [world.pending() for _ in range(5)]
        proxy.cut()
        for image_id in images:
            world.publisher.image_delete(image_id)
        svc.wait_for_log('Cannot record .* image.delete event', 15)

        rc, took = svc.terminate(timeout=30)
        print(
            f'\nSIGTERM during a Glance DB outage: exit {rc} in {took:.2f} s'
        )
        assert rc == 0
        assert took < 10
        assert 'left to the sweep' in svc.log()
        assert all(os.path.exists(world.path(i)) for i in images)

        proxy.restore()
        again = services(sections, name='again', env=world.env())
        world.wait_scrubbed(images, 15, again)
        assert again.count('Sweep found 5 due deletions, 5 new') == 1
    finally:
        proxy.close()


# ---------------------------------------------------------------- failures


def test_a_failing_scrub_backs_off_stays_visible_and_blocks_nothing(
    world, services
):
    sections = world.config()
    sections['scrub_queue'].update(retry_backoff=1, retry_backoff_max=60)
    svc = services(sections, env=world.env())
    poisoned = world.pending()
    # a directory where the image file should be: the store cannot
    # delete it (as root, permissions would not stop it)
    os.unlink(world.path(poisoned))
    os.makedirs(os.path.join(world.path(poisoned), 'sub'))
    world.publisher.image_delete(poisoned)
    good = _barrier(world, svc)

    sf.wait_until(
        lambda: [
            r
            for r in sf.queue_rows(_queue_url(world))
            if r['image_id'] == poisoned and r['attempts'] >= 2
        ],
        15,
        message=svc.log_tail,
    )
    # a third attempt comes after the 1 s and 2 s backoffs; a hot loop
    # would be far past it when seen
    sf.wait_until(
        lambda: [
            r
            for r in sf.queue_rows(_queue_url(world))
            if r['image_id'] == poisoned and r['attempts'] >= 3
        ],
        30,
        message=svc.log_tail,
    )
    [row] = sf.queue_rows(_queue_url(world))
    # 1 s, 2 s, 4 s ... (±10 %): a handful of attempts, not a hot loop
    assert 2 <= row['attempts'] <= 4, row
    assert 'store delete failed' in row['last_error']
    next_attempt = datetime.datetime.fromisoformat(str(row['next_attempt_at']))
    assert next_attempt > glance_rows.utcnow() - datetime.timedelta(seconds=1)
    assert sf.image_statuses(world.glance_url, [poisoned, good]) == {
        poisoned: 'pending_delete',
        good: 'deleted',
    }
    assert sf.location_statuses(world.glance_url, [poisoned]) == {
        poisoned: ['pending_delete']
    }
    assert svc.count(rf'Failed to scrub image {poisoned}') == row['attempts']

    # visible to an operator: status over RPC and the listing
    with sf.RpcCaller(world.vhost.transport_url, world.rpc_topic) as rpc:
        status = rpc.call('status')
    assert status['queued'] == 1 and status['failing'] == 1
    rc, out, err, _ = sf.run_cli(['list'], svc.config_file)
    assert rc == 0, err
    assert poisoned in out and f'failed ({row["attempts"]} attempts)' in out

    # repaired: the next attempt scrubs it
    os.rmdir(os.path.join(world.path(poisoned), 'sub'))
    os.rmdir(world.path(poisoned))
    world.wait_scrubbed([poisoned], 15, svc)
