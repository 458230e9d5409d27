"""The running service turns Glance's image.delete notifications into scrubs.

Every test runs ``scrub-listener`` as a real process on a fresh RabbitMQ
vhost and a Glance database on MariaDB (real schema), and publishes
notifications exactly as glance-api 33.0.0 does (see NOTES.md).  Outcomes
are checked where they land: files in the store, Glance rows, the
due-queue, the service's log, its exit code.  A sitecustomize hook logs
every store delete per process (tests/functional/service_fixtures.py).

``wakeup_time`` is an hour unless a test is about the sweep: the sweep at
start-up runs before any image exists, so a scrub can only come from a
notification.
"""

import datetime
import json
import os
import re
import signal
import time
import uuid

import pytest

from tests.functional import service_fixtures as sf
from tools import glance_rows
from tools import harness

# fixtures (see service_fixtures)
services = sf.services
world = sf.world
module_vhost = sf.module_vhost
module_glance_mysql = sf.module_glance_mysql
empty_db_factory = sf.empty_db_factory


def _barrier(world, svc, timeout=20):
    """Publish one more good event, wait for its scrub and an empty queue.

    The broker delivers in order, but oslo.messaging's threading executor
    runs batches concurrently: once this one is scrubbed and the pool
    queue is empty, every earlier message was delivered; its batch may
    still be finishing, so callers wait for counts, not just read them.
    """
    image_id = world.pending()
    world.publisher.image_delete(image_id)
    world.wait_scrubbed([image_id], timeout, svc)
    sf.wait_until(
        lambda: world.pool_depth() == (0, 1),
        10,
        message=lambda: f'pool queue {world.pool_depth()}',
    )
    return image_id


def _wait_count(svc, pattern, expected, timeout=5):
    """Wait until the log has ``pattern`` exactly ``expected`` times."""
    sf.wait_until(
        lambda: svc.count(pattern) == expected,
        timeout,
        message=lambda: f'{pattern!r}: {svc.count(pattern)} != {expected}',
    )


def _queue_url(world):
    return sf.sqlite_queue_url(world.workdir)


def _when(value):
    """A due-queue timestamp read back from SQLite (text) as a datetime."""
    if isinstance(value, datetime.datetime):
        return value
    return datetime.datetime.fromisoformat(value)


# ------------------------------------------------------------ the happy path


def test_glance_delete_notification_is_scrubbed(world, services):
    svc = services(world.config(), env=world.env())
    data = os.urandom(4096)
    image_id = world.pending(
        data=data, properties={'os_distro': 'cirros'}, tags=['t1']
    )
    assert os.path.exists(world.path(image_id))

    world.publisher.image_delete(image_id, size=len(data))
    latency = world.wait_scrubbed([image_id], 10, svc)

    print(f'\nnotification -> data gone and rows deleted: {latency:.3f} s')
    assert latency < 5
    assert sf.image_statuses(world.glance_url, [image_id]) == {
        image_id: 'deleted'
    }
    assert sf.location_statuses(world.glance_url, [image_id]) == {
        image_id: ['deleted']
    }
    assert [e.path for e in world.deletes.calls()] == [world.path(image_id)]
    assert (
        svc.count(
            rf'Scrubbed image {image_id}: 1 location\(s\), 4096 bytes freed'
        )
        == 1
    )
    assert sf.queue_rows(_queue_url(world)) == []
    assert svc.alive()


def test_same_message_twice_is_scrubbed_once(world, services):
    # scrub_time: both copies arrive while the first is still waiting in
    # the due-queue, so the queue's own idempotency is what is tested.
    svc = services(world.config(scrub_time=2), env=world.env())
    image_id = world.pending()
    message = sf.glance_delete_message(image_id)
    world.publisher.publish(message)
    # The same notification again, as a redelivery to a restarted
    # consumer looks (same message_id, another _unique_id, so that
    # oslo.messaging's own per-process duplicate cache does not hide it).
    again = dict(message, _unique_id=uuid.uuid4().hex)
    world.publisher.publish(again)
    world.publisher.publish(again)

    sf.wait_until(
        lambda: len(sf.queue_rows(_queue_url(world))) == 1,
        10,
        message=lambda: svc.log_tail(),
    )
    time.sleep(0.5)  # the other copies have had time to land
    assert len(sf.queue_rows(_queue_url(world))) == 1
    world.wait_scrubbed([image_id], 15, svc)

    # A late redelivery after the scrub: nothing left to do.
    world.publisher.publish(dict(message, _unique_id=uuid.uuid4().hex))
    _barrier(world, svc)

    assert world.deletes.calls_by_path()[world.path(image_id)] == 1
    assert svc.count(rf'Scrubbed image {image_id}') == 1
    assert sf.queue_rows(_queue_url(world)) == []


# ------------------------------------------------------- malformed messages


def _malformed_bodies(decoy):
    """{kind: raw body} of malformed messages.

    Those that must be dropped name ``decoy``, a pending_delete image, so
    that one wrongly let through would scrub it.  Valid events with odd
    extra fields name an unknown image instead.
    """
    good = sf.glance_delete_message(decoy)
    odd = sf.glance_delete_message(str(uuid.uuid4()))

    def with_payload(payload):
        return json.dumps(sf.envelope(dict(good, payload=payload)))

    def with_fields(**fields):
        return json.dumps(sf.envelope(dict(good, **fields)))

    def odd_fields(**fields):
        return json.dumps(sf.envelope(dict(odd, **fields)))

    kinds = {
        'oslo.message not JSON': json.dumps(
            {'oslo.version': '2.0', 'oslo.message': '{"event_type": "ima'}
        ),
        'oslo.message a list': json.dumps(
            {'oslo.version': '2.0', 'oslo.message': '[1, 2, 3]'}
        ),
        'envelope version 9.0': json.dumps(
            {'oslo.version': '9.0', 'oslo.message': json.dumps(good)}
        ),
        'body not JSON': 'this is not json {',
        'body a JSON string': json.dumps('image.delete'),
        'body a JSON list': json.dumps([good]),
        'payload missing id': with_payload({'name': 'x'}),
        'payload null': with_payload(None),
        'payload a string': with_payload('3310c7fe'),
        'payload a list': with_payload([decoy]),
        'id not a uuid': with_payload({'id': 'not-a-uuid'}),
        'id an int': with_payload({'id': 42}),
        'id a list': with_payload({'id': [decoy]}),
        'id null': with_payload({'id': None}),
        'id empty': with_payload({'id': ''}),
        'id with NUL': with_payload({'id': decoy[:-1] + '\0'}),
        'id 10 kB': with_payload({'id': 'a' * 10000}),
        'id of an unknown image': with_payload({'id': str(uuid.uuid4())}),
        'event_type image.update': with_fields(event_type='image.update'),
        'event_type image.delete.end': with_fields(
            event_type='image.delete.end'
        ),
        'non-image event': with_fields(
            event_type='compute.instance.delete.end',
            publisher_id='compute.host1',
        ),
        'event_type missing': json.dumps(
            sf.envelope({k: v for k, v in good.items() if k != 'event_type'})
        ),
        'event_type an int': with_fields(event_type=7),
        'priority missing': json.dumps(
            sf.envelope({k: v for k, v in good.items() if k != 'priority'})
        ),
        'priority unknown': with_fields(priority='LOUD'),
        'publisher_id an object': odd_fields(publisher_id={'a': 1}),
        'metadata odd': odd_fields(message_id=['x'], timestamp=5),
        'context odd': odd_fields(_context_roles='admin', _context_user=3),
    }
    return kinds


# Kinds that reach our endpoint as image.delete events with a bad payload:
# each must be logged once ("Dropping malformed ...").
_DROPPED_BY_ENDPOINT = {
    'payload missing id',
    'payload null',
    'payload a string',
    'payload a list',
    'id not a uuid',
    'id an int',
    'id a list',
    'id null',
    'id empty',
    'id with NUL',
    'id 10 kB',
}


def test_listener_survives_1000_malformed_messages(world, services):
    svc = services(world.config(), env=world.env())
    # An image that is pending_delete, so that an event that wrongly got
    # through for it would show; the malformed ones name it in odd ways.
    decoy = world.pending()
    names = sorted(_malformed_bodies(decoy))
    sent = {}
    for i in range(1000):
        kind = names[i % len(names)]
        # built anew each time: every message has its own message_id and
        # _unique_id, like distinct notifications
        world.publisher.publish_raw(_malformed_bodies(decoy)[kind])
        sent[kind] = sent.get(kind, 0) + 1

    good = _barrier(world, svc, timeout=60)

    assert svc.alive(), svc.log_tail()
    # Nothing but the good event was scrubbed; the decoy is untouched.
    assert [e.path for e in world.deletes.calls()] == [world.path(good)]
    assert os.path.exists(world.path(decoy))
    assert sf.image_statuses(world.glance_url, [decoy])[decoy] == (
        'pending_delete'
    )
    # Each malformed image.delete our endpoint saw is logged exactly once
    # with its reason: dropped, not requeued in a loop.
    dropped = sum(sent[k] for k in _DROPPED_BY_ENDPOINT)
    _wait_count(svc, 'Dropping malformed image.delete notification', dropped)
    assert svc.count(r'payload has no "id"') == sent['payload missing id']
    assert (
        svc.count(r"payload \"id\" 'not-a-uuid' is not an image id")
        == (sent['id not a uuid'])
    )
    requeue_errors = svc.count('Exception during messages handling')
    time.sleep(1)
    assert svc.count('Exception during messages handling') == requeue_errors


def test_priority_of_wrong_type_does_not_block_the_listener(world, services):
    svc = services(world.config(), env=world.env())
    image_id = world.pending()
    # "priority": null (same with 3 or ["info"]): oslo.messaging's
    # dispatcher calls .lower() on it
    poison = sf.glance_delete_message(str(uuid.uuid4()))
    poison['priority'] = None
    world.publisher.publish(poison)
    world.publisher.image_delete(image_id)

    try:
        world.wait_scrubbed([image_id], 5, svc)
    finally:
        failed = svc.count('Exception during messages handling')
        print(f'\nbatch dispatch failed {failed} time(s)')
    # and the poison message is not redelivered in a loop
    before = svc.count('Exception during messages handling')
    time.sleep(1)
    assert svc.count('Exception during messages handling') == before


def test_redelivered_copies_do_not_stall_the_listener(world, services):
    """Copies with a _unique_id the listener has seen are acknowledged.

    oslo.messaging 18.3.1's AMQPListener neither acks nor rejects such a
    copy; with a bounded prefetch ([listener] prefetch, 200) each one
    held a slot for good and after 200 the listener received nothing
    more (fixed by scrub_listener/messaging_compat.py).
    """
    svc = services(world.config(), env=world.env())
    image_id = world.pending()
    copy = sf.glance_delete_message(str(uuid.uuid4()))
    world.publisher.publish(copy)
    # once the first copy is acked its _unique_id is in the listener's
    # duplicate cache (the last 16 acked messages)
    _barrier(world, svc)
    for _ in range(250):
        world.publisher.publish(copy)
    world.publisher.image_delete(image_id)
    world.wait_scrubbed([image_id], 10, svc)
    sf.wait_until(lambda: world.pool_depth() == (0, 1), 10)
    assert svc.count('ignoring duplicate message') == 0


def test_event_for_an_image_that_is_not_pending_delete_deletes_nothing(
    world, services
):
    svc = services(world.config(), env=world.env())
    active = world.pending(status='active')
    eng = sf.engine(world.glance_url)
    try:
        # an image already scrubbed earlier: deleted, data gone
        scrubbed = world.pending()
        os.unlink(world.path(scrubbed))
        with eng.begin() as conn:
            conn.exec_driver_sql(
                "UPDATE images SET status = 'deleted' WHERE id = %s",
                (scrubbed,),
            )
            conn.exec_driver_sql(
                "UPDATE image_locations SET status = 'deleted' "
                'WHERE image_id = %s',
                (scrubbed,),
            )
    finally:
        eng.dispose()

    world.publisher.image_delete(active)
    world.publisher.image_delete(scrubbed)
    good = _barrier(world, svc)

    assert os.path.exists(world.path(active))
    assert sf.image_statuses(world.glance_url, [active, scrubbed]) == {
        active: 'active',
        scrubbed: 'deleted',
    }
    assert sf.location_statuses(world.glance_url, [active]) == {
        active: ['active']
    }
    assert [e.path for e in world.deletes.calls()] == [world.path(good)]
    assert sf.queue_rows(_queue_url(world)) == []


# ------------------------------------------------------------- scrub_time


def test_scrub_time_holds_the_data_until_due_then_scrubs_promptly(
    world, services
):
    scrub_time = 3
    svc = services(world.config(scrub_time=scrub_time), env=world.env())
    eng = sf.engine(world.glance_url)
    images = []
    try:
        for _ in range(5):
            image_id = world.pending()
            world.publisher.image_delete(image_id)
            row = glance_rows.image_row(eng, image_id)
            due = row.deleted_at + datetime.timedelta(seconds=scrub_time)
            images.append((image_id, _epoch(due)))
            time.sleep(0.2)
    finally:
        eng.dispose()
    # what is not due yet is still there (the precise check is below, on
    # the times the service called the store)
    now = time.time()
    for image_id, due in images:
        if due > now + 0.2:
            assert os.path.exists(world.path(image_id))

    world.wait_scrubbed([i for i, _ in images], 15, svc)

    latencies = []
    ok = {e.path: e.time for e in world.deletes.calls('ok')}
    called = {e.path: e.time for e in world.deletes.calls()}
    for image_id, due in images:
        # MariaDB keeps Glance's deleted_at to the second; the due time
        # is computed from what it keeps, as the service does.
        assert called[world.path(image_id)] >= due, 'scrubbed before due'
        latencies.append(ok[world.path(image_id)] - due)
    latencies.sort()
    print(
        '\ndue -> data gone latency (s): '
        + ', '.join(f'{x:.3f}' for x in latencies)
    )
    assert latencies[-1] < 1.0


def _epoch(naive_utc):
    return naive_utc.replace(tzinfo=datetime.UTC).timestamp()


# ------------------------------------------------ databases down for a while


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
        time.sleep(1.5)

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


# --------------------------------------------------------- other consumers


def test_other_consumers_keep_their_copy(world, services):
    other = harness.unique_name('sl_test_other_')
    sf.bind_queue(world.vhost.transport_url, other)
    svc = services(world.config(), env=world.env())

    images = [world.pending() for _ in range(10)]
    sent = [world.publisher.image_delete(i)['message_id'] for i in images]
    world.publisher.publish_raw('not json')
    world.wait_scrubbed(images, 20, svc)

    # the listener's queue is named after its pool and is empty
    sf.wait_until(
        lambda: world.pool_depth() == (0, 1),
        10,
        message=lambda: world.pool_depth(),
    )
    # the other consumer still got every notification
    got = sf.drain_queue(world.vhost.transport_url, other)
    assert [m.get('message_id') for m in got] == [*sent, None]
    assert got[-1] == {'raw': 'not json'}


# ------------------------------------------------------------ periodic sweep


def test_sweep_scrubs_a_deletion_no_notification_announced(world, services):
    wakeup = 2
    svc = services(world.config(wakeup_time=wakeup), env=world.env())
    svc.wait_for_log('Sweep found 0 due deletions', 10)
    started = time.monotonic()
    image_id = world.pending()

    world.wait_scrubbed([image_id], wakeup + 5, svc)
    elapsed = time.monotonic() - started
    print(f'\npending_delete without event -> scrubbed in {elapsed:.2f} s')
    assert elapsed <= wakeup + 2
    assert svc.count(r'Sweep found 1 due deletions, 1 new') == 1


def test_sweeps_never_overlap(world, services):
    """Each sweep takes longer than wakeup_time: runs must queue, not stack.

    (glance-scrubber's daemon starts a run every wakeup_time whatever the
    previous one is doing.)
    """
    sweeps = sf.SweepLog(os.path.join(world.workdir, 'sweeps.log'))
    env = world.env(SL_TEST_SWEEP_LOG=sweeps.path, SL_TEST_SWEEP_DELAY=1.2)
    svc = services(world.config(wakeup_time=1), env=env)
    image_id = world.pending()
    sf.wait_until(lambda: len(sweeps.runs()) >= 3, 20)
    world.wait_scrubbed([image_id], 10, svc)
    svc.kill()

    runs = sweeps.runs()
    if runs[-1][2] is None:
        runs.pop()  # killed while running
    assert all(end is not None for _, _, end in runs), runs
    for (_, _, end), (_, start, _) in zip(runs, runs[1:], strict=False):
        assert start >= end, (
            f'a sweep started before the previous ended: {runs}'
        )


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
    time.sleep(1.5)
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


# ------------------------------------------------------- messaging options


def test_custom_exchange_and_topics(world, services):
    sections = world.config()
    exchange = harness.unique_name('sl_test_ex_')
    sections['listener'].update(exchange=exchange, topics=['alpha', 'beta'])
    svc = services(sections, env=world.env())
    publisher = sf.GlancePublisher(world.vhost.transport_url, exchange)
    try:
        images = [world.pending() for _ in range(3)]
        publisher.publish(
            sf.glance_delete_message(images[0]), routing_key='alpha.info'
        )
        publisher.publish(
            sf.glance_delete_message(images[1]), routing_key='beta.info'
        )
        # Glance's default exchange/topic: not ours any more
        world.publisher.image_delete(images[2])
        world.wait_scrubbed(images[:2], 10, svc)
        time.sleep(1)
        assert not world.scrubbed(images[2])
    finally:
        publisher.close()


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


def test_amqp_durable_queues_makes_the_pool_queue_durable(world, services):
    """The documented set-up: amqp_durable_queues in glance-api.conf (so
    glance-api declares its exchange durable) and in ours.  (With only
    ours set, oslo.messaging 18.3.1 meets the transient exchange, gets
    PRECONDITION_FAILED and silently falls back to a transient queue: the
    README says so.)"""
    exchange = 'glance-durable'
    publisher = sf.GlancePublisher(
        world.vhost.transport_url, exchange=exchange, durable=True
    )
    try:
        sections = world.config()
        sections['listener']['exchange'] = exchange
        sections['oslo_messaging_rabbit'] = {'amqp_durable_queues': True}
        svc = services(sections, env=world.env())
        image_id = world.pending()
        publisher.image_delete(image_id)
        world.wait_scrubbed([image_id], 10, svc)
    finally:
        publisher.close()
    props = sf.queue_properties(world.vhost.name, world.pool)
    print(f'\npool queue with amqp_durable_queues = True: {props}')
    assert props['durable'], props


def test_rabbit_quorum_queue_either_works_or_fails_loudly(world, services):
    sections = world.config()
    sections['oslo_messaging_rabbit'] = {'rabbit_quorum_queue': True}
    svc = services(sections, env=world.env(), start=False)
    svc.start(wait=False)

    def outcome():
        if svc.proc.poll() is not None:
            return f'exited {svc.proc.returncode}'
        if sf.STARTED_RE.search(svc.log()):
            return 'started'
        return None

    result, _ = sf.wait_until(outcome, 10, message=svc.log_tail)
    if result == 'started':
        image_id = world.pending()
        world.publisher.image_delete(image_id)
        world.wait_scrubbed([image_id], 10, svc)
    else:
        assert result != 'exited 0'


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


# ----------------------------------------------------------------- failures


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
    time.sleep(3)
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


# -------------------------------------------------------- image shapes


def test_multi_location_and_community_images_are_scrubbed(world, services):
    svc = services(world.config(), env=world.env())
    paths = [os.path.join(world.store_dir, f'two-{i}') for i in range(2)]
    for path in paths:
        with open(path, 'wb') as f:
            f.write(b'x' * 1024)
    two = world.pending(
        locations=[('file://' + p, {'store': 'fs'}) for p in paths]
    )
    # glance-scrubber never scrubs community images (NOTES.md)
    community = world.pending(visibility='community')
    world.publisher.image_delete(two)
    world.publisher.image_delete(community, visibility='community')
    world.wait_scrubbed([community], 10, svc)
    sf.wait_until(
        lambda: sf.image_statuses(world.glance_url, [two])[two] == 'deleted',
        10,
        message=svc.log_tail,
    )
    assert not any(os.path.exists(p) for p in paths)
    assert sf.location_statuses(world.glance_url, [two]) == {
        two: ['deleted', 'deleted']
    }
    assert svc.count(rf'Scrubbed image {two}: 2 location\(s\)') == 1


def test_sweep_scrubs_a_location_removed_from_a_live_image(world, services):
    """PATCH remove /locations/N (delayed_delete) leaves the image active
    and the removed location pending_delete, with no image.delete event:
    glance-scrubber never scrubs it; the periodic sweep must."""
    svc = services(world.config(wakeup_time=1), env=world.env())
    kept, removed = (
        os.path.join(world.store_dir, name) for name in ('kept', 'removed')
    )
    for path in (kept, removed):
        with open(path, 'wb') as f:
            f.write(b'y' * 1024)
    image_id = world.pending(
        status='active',
        locations=[('file://' + p, {'store': 'fs'}) for p in (kept, removed)],
    )
    eng = sf.engine(world.glance_url)
    try:
        table = glance_rows._tables(eng)['image_locations']
        now = glance_rows.utcnow()
        with eng.begin() as conn:
            conn.execute(
                table.update()
                .where(
                    table.c.image_id == image_id,
                    table.c.value == 'file://' + removed,
                )
                .values(
                    status='pending_delete',
                    deleted=True,
                    deleted_at=now,
                    updated_at=now,
                )
            )
    finally:
        eng.dispose()

    sf.wait_until(
        lambda: not os.path.exists(removed), 10, message=svc.log_tail
    )
    time.sleep(0.5)
    assert os.path.exists(kept)
    assert sf.image_statuses(world.glance_url, [image_id]) == {
        image_id: 'active'
    }
    assert sf.location_statuses(world.glance_url, [image_id]) == {
        image_id: ['active', 'deleted']
    }


def test_rpc_topic_equal_to_the_pool_is_refused(world, services):
    sections = world.config()
    sections['rpc']['topic'] = world.pool
    svc = services(sections, env=world.env(), start=False)
    svc.start(wait=False)
    rc, _ = svc.wait(20)
    assert rc == 2
    assert 'ERROR: [rpc] topic and [listener] pool are both' in svc.log()
