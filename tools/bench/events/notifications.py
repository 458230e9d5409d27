"""Glance's ``image.delete`` notifications, published as glance-api 33.0.0
publishes them, and the kombu view of the world's vhost (declare the
listener's pool queue, publish, queue depth, purge).

Used by every event-path scenario (``python -m tools.bench events``); it
measures nothing itself.
"""

import contextlib
import datetime
import json
import time
import uuid

import kombu

from tools import harness
from tools.bench.events import common


def glance_message(image_id, deleted_at=None, size=1):
    """The decoded ``image.delete`` message glance-api 33.0.0 sends.

    Shape from the message seen on RabbitMQ (NOTES.md): no locations,
    ``deleted_at`` to the second (send time), status pending_delete.
    """
    now = datetime.datetime.now(datetime.UTC)
    stamp = (deleted_at or now).strftime('%Y-%m-%dT%H:%M:%SZ')
    return {
        'message_id': str(uuid.uuid4()),
        'publisher_id': 'image.localhost',
        'event_type': 'image.delete',
        'priority': 'INFO',
        'payload': {
            'id': image_id,
            'name': 'bench',
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
            'size': size,
            'virtual_size': size,
            'is_public': False,
            'visibility': 'shared',
            'properties': {},
            'tags': [],
            'deleted': True,
            'deleted_at': stamp,
        },
        'timestamp': now.strftime('%Y-%m-%d %H:%M:%S.%f'),
        '_unique_id': uuid.uuid4().hex,
    }


def envelope(message):
    return {'oslo.version': '2.0', 'oslo.message': json.dumps(message)}


def glance_exchange():
    # As oslo.messaging declares the control exchange: topic,
    # non-durable, not auto-deleted (anything else: PRECONDITION_FAILED).
    return kombu.Exchange(
        common.EXCHANGE, type='topic', durable=False, auto_delete=False
    )


class Broker:
    """kombu connection to the world's vhost: publish, declare, depth."""

    def __init__(self, transport_url):
        self.url = harness.amqp_url(transport_url)
        self.connection = kombu.Connection(self.url)
        self.channel = self.connection.channel()
        self.producer = kombu.Producer(
            self.channel, exchange=glance_exchange()
        )
        glance_exchange()(self.channel).declare()

    def declare_pool_queue(self, name=common.POOL_QUEUE):
        """The listener's pool queue, as oslo.messaging declares it.

        (impl_rabbit declare_topic_consumer: durable and auto_delete from
        amqp_durable_queues / amqp_auto_delete, both False by default,
        no arguments.)
        """
        kombu.Queue(
            name,
            glance_exchange(),
            routing_key=common.ROUTING_KEY,
            durable=False,
            auto_delete=False,
        )(self.channel).declare()

    def publish(self, message):
        # As oslo.messaging's notify_send: the envelope dict, JSON.
        self.producer.publish(
            envelope(message),
            routing_key=common.ROUTING_KEY,
            serializer='json',
        )

    def publish_all(self, messages, name=common.POOL_QUEUE, timeout=300):
        """Publish (an iterable), then wait until the queue holds them
        all; return (count, seconds)."""
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

    def depth(self, name=common.POOL_QUEUE):
        """Messages ready in queue ``name`` (not those unacked)."""
        _, messages, _ = self.channel.queue_declare(name, passive=True)
        return messages

    def purge(self, name=common.POOL_QUEUE):
        self.channel.queue_purge(name)

    def close(self):
        with contextlib.suppress(Exception):
            self.connection.release()


def delete_messages(ids):
    for image_id in ids:
        yield glance_message(image_id)
