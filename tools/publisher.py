"""Glance notifications on RabbitMQ, as glance-api 33 sends them (kombu).

``glance_delete_message(image_id, name='img', deleted_at=None, **payload)``
    The decoded ``image.delete`` message glance-api 33.0.0 sends on a
    delayed delete (the shape seen on the wire, see NOTES.md).
``envelope(message)``
    oslo.messaging's 2.0 envelope around it.
``glance_exchange(name='glance', durable=False)``
    The exchange as oslo.messaging declares it.
``GlancePublisher(transport_url)``
    ``publish(message)``, ``publish_raw(body)``, ``image_delete(id)``,
    ``publish_all(messages, queue)`` (then wait until the queue holds
    them), ``declare_pool_queue(name)``, ``depth(name)``, ``purge(name)``,
    ``close()``.
``bind_queue`` / ``queue_depth`` / ``drain_queue`` / ``queue_properties``
    One-shot queue helpers on a transport URL (or vhost name).
``Vhost`` / ``new_vhost()``
    A fresh vhost (name, transport URL, publisher); ``new_vhost()`` is a
    context manager that deletes it afterwards.
"""

import contextlib
import dataclasses
import datetime
import json
import time
import uuid

import kombu

from tools import harness

EXCHANGE = 'glance'
ROUTING_KEY = 'notifications.info'


def glance_delete_message(image_id, name='img', deleted_at=None, **payload):
    """The decoded message glance-api 33.0.0 sends on a delayed delete.

    Shape copied from the message seen on RabbitMQ (see NOTES.md and
    tests/functional/test_harness.py): no locations, ``deleted_at`` to the
    second, ``status`` pending_delete.  ``payload`` overrides fields
    (``size=...``).
    """
    now = datetime.datetime.now(datetime.UTC)
    stamp = (deleted_at or now).strftime('%Y-%m-%dT%H:%M:%SZ')
    body = {
        'id': image_id,
        'name': name,
        'status': 'pending_delete',
        'created_at': stamp,
        'updated_at': stamp,
        'min_disk': 0,
        'min_ram': 0,
        'protected': False,
        'checksum': 'd41d8cd98f00b204e9800998ecf8427e',
        'owner': None,
        'disk_format': 'raw',
        'container_format': 'bare',
        'size': 1024,
        'virtual_size': 1024,
        'is_public': False,
        'visibility': 'shared',
        'properties': {},
        'tags': [],
        'deleted': True,
        'deleted_at': stamp,
    }
    body.update(payload)
    return {
        'message_id': str(uuid.uuid4()),
        'publisher_id': 'image.localhost',
        'event_type': 'image.delete',
        'priority': 'INFO',
        'payload': body,
        'timestamp': now.strftime('%Y-%m-%d %H:%M:%S.%f'),
        '_unique_id': uuid.uuid4().hex,
    }


def envelope(message):
    """oslo.messaging's 2.0 envelope around a message dict."""
    return {'oslo.version': '2.0', 'oslo.message': json.dumps(message)}


# why these flags: oslo.messaging declares the control exchange as a
# non-durable, non-auto-delete topic exchange; another declaration would
# fail with PRECONDITION_FAILED on whichever side comes second.
def glance_exchange(name=EXCHANGE, durable=False):
    return kombu.Exchange(
        name, type='topic', durable=durable, auto_delete=False
    )


def _pool_queue(name, routing_key=ROUTING_KEY):
    # As oslo.messaging's impl_rabbit declare_topic_consumer: durable and
    # auto_delete from amqp_durable_queues / amqp_auto_delete, both False
    # by default, no arguments.
    return kombu.Queue(
        name,
        glance_exchange(),
        routing_key=routing_key,
        durable=False,
        auto_delete=False,
    )


class GlancePublisher:
    """Publish to RabbitMQ exactly as glance-api's messagingv2 driver.

    One kombu connection to the vhost of ``transport_url``; it also
    declares, measures and purges queues on it.
    """

    def __init__(self, transport_url, exchange=EXCHANGE, durable=False):
        # durable: as glance-api declares it with amqp_durable_queues
        self.connection = kombu.Connection(harness.amqp_url(transport_url))
        self.exchange = glance_exchange(exchange, durable)
        self.channel = self.connection.channel()
        self.producer = kombu.Producer(self.channel, exchange=self.exchange)
        self.exchange(self.channel).declare()

    def publish(self, message, routing_key=ROUTING_KEY):
        """Publish a message dict inside the oslo envelope."""
        self.publish_raw(json.dumps(envelope(message)), routing_key)
        return message

    def publish_raw(self, body, routing_key=ROUTING_KEY, content_type=None):
        """Publish any body (str/bytes), JSON content type by default."""
        self.producer.publish(
            body,
            routing_key=routing_key,
            content_type=content_type or 'application/json',
            content_encoding='utf-8',
        )

    def image_delete(self, image_id, **kwargs):
        """Publish a Glance-shaped image.delete for ``image_id``."""
        return self.publish(glance_delete_message(image_id, **kwargs))

    def declare_pool_queue(self, name, routing_key=ROUTING_KEY):
        """The listener's pool queue, as oslo.messaging declares it."""
        _pool_queue(name, routing_key)(self.channel).declare()

    def depth(self, name):
        """Messages ready in queue ``name`` (not those unacked)."""
        _, messages, _ = self.channel.queue_declare(name, passive=True)
        return messages

    def purge(self, name):
        self.channel.queue_purge(name)

    def publish_all(self, messages, name, timeout=300):
        """Publish (an iterable), then wait until queue ``name`` holds
        them all; return (count, seconds)."""
        started = time.monotonic()
        before = self.depth(name)
        count = 0
        for message in messages:
            self.publish(message)
            count += 1
        want = before + count
        deadline = time.monotonic() + timeout
        while self.depth(name) < want:
            if time.monotonic() > deadline:
                raise harness.HarnessError(
                    f'queue {name} holds {self.depth(name)} messages, '
                    f'want {want}'
                )
            time.sleep(0.1)
        return count, time.monotonic() - started

    def close(self):
        with contextlib.suppress(Exception):
            self.connection.release()


def bind_queue(transport_url, name, routing_key=ROUTING_KEY):
    """Declare a non-durable queue bound to glance/``routing_key``."""
    with kombu.Connection(harness.amqp_url(transport_url)) as conn:
        _pool_queue(name, routing_key)(conn.default_channel).declare()


def queue_depth(transport_url, name):
    """(messages ready, consumers) of a queue, or None if it is missing."""
    with kombu.Connection(harness.amqp_url(transport_url)) as conn:
        channel = conn.channel()
        try:
            _, messages, consumers = channel.queue_declare(name, passive=True)
        except Exception:
            return None
        return messages, consumers


def drain_queue(transport_url, name, timeout=2.0):
    """Read (and ack) every message of a queue.

    Returns the decoded messages; a body that is not an oslo envelope is
    returned as ``{'raw': body}``.
    """
    out = []
    with kombu.Connection(harness.amqp_url(transport_url)) as conn:
        queue = kombu.Queue(name, glance_exchange(), no_declare=True)
        bound = queue(conn.default_channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = bound.get(no_ack=True)
            if message is None:
                time.sleep(0.05)
                continue
            deadline = time.monotonic() + timeout
            try:
                body = json.loads(message.body)
                out.append(json.loads(body['oslo.message']))
            except (ValueError, TypeError, KeyError):
                out.append({'raw': message.body})
    return out


def queue_properties(vhost_name, queue_name):
    """{'durable': bool, 'type': str} of a queue, from rabbitmqctl."""
    out = harness._rabbitmqctl(
        'list_queues',
        '--vhost',
        vhost_name,
        '--no-table-headers',
        '--quiet',
        'name',
        'durable',
        'type',
    )
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == queue_name:
            return {'durable': parts[1] == 'true', 'type': parts[2]}
    return None


@dataclasses.dataclass
class Vhost:
    """A RabbitMQ vhost, its transport URL and a publisher on it."""

    name: str
    transport_url: str
    publisher: GlancePublisher


@contextlib.contextmanager
def new_vhost():
    """A fresh vhost (``harness.create_vhost``) as a :class:`Vhost`;
    its publisher closed and the vhost deleted afterwards."""
    name, url = harness.create_vhost()
    publisher = GlancePublisher(url)
    try:
        yield Vhost(name, url, publisher)
    finally:
        publisher.close()
        with contextlib.suppress(harness.HarnessError):
            harness.delete_vhost(name)
