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

This module: the notifications in.  A deletion event is scrubbed (once,
however often it is delivered); malformed, poisoned, redelivered and
irrelevant messages neither scrub anything nor stall the listener;
other consumers of Glance's notifications keep their copy; the
messaging options (exchange, topics, durable and quorum queues, an RPC
topic clashing with the pool).

The service listener's tests: test_service_listener.py (notifications
in: the happy path, duplicates, malformed messages, other consumers,
messaging options), test_service_listener_scrubbing.py (when and what it
scrubs: scrub_time, the periodic sweep, image shapes) and
test_service_listener_resilience.py (signals, restarts, outages of the
broker and the databases, failing scrubs).
"""

import json
import os
import uuid

from tests.functional import service_fixtures as sf
from tests.functional.listener_helpers import barrier as _barrier
from tests.functional.listener_helpers import queue_url as _queue_url
from tools import harness

# fixtures (see service_fixtures)
services = sf.services
world = sf.world
module_vhost = sf.module_vhost
module_glance_mysql = sf.module_glance_mysql


def _wait_count(svc, pattern, expected, timeout=5):
    """Wait until the log has ``pattern`` exactly ``expected`` times."""
    sf.wait_until(
        lambda: svc.count(pattern) == expected,
        timeout,
        message=lambda: f'{pattern!r}: {svc.count(pattern)} != {expected}',
    )


# ---------------------------------------------------------- the happy path


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
    # every copy delivered (none left in the pool queue)
    sf.wait_until(
        lambda: world.pool_depth() == (0, 1),
        10,
        message=lambda: f'pool queue {world.pool_depth()}',
    )
    assert len(sf.queue_rows(_queue_url(world))) == 1
    world.wait_scrubbed([image_id], 15, svc)

    # A late redelivery after the scrub: nothing left to do.
    world.publisher.publish(dict(message, _unique_id=uuid.uuid4().hex))
    _barrier(world, svc)

    assert world.deletes.calls_by_path()[world.path(image_id)] == 1
    assert svc.count(rf'Scrubbed image {image_id}') == 1
    assert sf.queue_rows(_queue_url(world)) == []


# ------------------------------------------------------ malformed messages


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
    _barrier(world, svc)  # a later event went through meanwhile
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
    _barrier(world, svc)  # a later event went through meanwhile
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
        # a later event on our exchange went through meanwhile
        later = world.pending()
        publisher.publish(
            sf.glance_delete_message(later), routing_key='alpha.info'
        )
        world.wait_scrubbed([later], 10, svc)
        assert not world.scrubbed(images[2])
    finally:
        publisher.close()


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


def test_rpc_topic_equal_to_the_pool_is_refused(world, services):
    sections = world.config()
    sections['rpc']['topic'] = world.pool
    svc = services(sections, env=world.env(), start=False)
    svc.start(wait=False)
    rc, _ = svc.wait(20)
    assert rc == 2
    assert 'ERROR: [rpc] topic and [listener] pool are both' in svc.log()
