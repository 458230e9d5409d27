"""messaging_compat: the duplicate-ack fix touches notifications only.

The listeners are oslo.messaging's real classes fed real kombu messages
(``kombu.Message`` wrapped in the rabbit driver's ``RabbitMessage``, as
the consumer callback gets them); only the AMQP channel under the
messages is a stub that records acks, and raises like RabbitMQ's client
would on a second ack.  The same paths over a real RabbitMQ:
tests/functional/test_service_rpc.py (RPC) and
tests/functional/test_service_listener.py (notifications).
"""

import json
import logging
import types
import uuid

import kombu
import pytest
from oslo_messaging._drivers import amqp as rpc_amqp
from oslo_messaging._drivers import amqpdriver
from oslo_messaging._drivers import impl_rabbit

from scrub_listener import exceptions
from scrub_listener import messaging_compat


class Channel:
    """The part of an AMQP channel a kombu Message acks through."""

    no_ack_consumers = None

    def __init__(self, fail_with=None):
        self.acked = []
        self.fail_with = fail_with

    def basic_ack(self, delivery_tag, multiple=False):
        if self.fail_with is not None:
            raise self.fail_with
        self.acked.append(delivery_tag)

    def basic_reject(self, delivery_tag, requeue=False):
        raise AssertionError('nothing here rejects')


def delivery(channel, tag, body):
    """One delivery of ``body`` (a message dict) as the consumer sees it."""
    envelope = {'oslo.version': '2.0', 'oslo.message': json.dumps(body)}
    raw = kombu.Message(
        body=json.dumps(envelope),
        delivery_tag=tag,
        content_type='application/json',
        content_encoding='utf-8',
        channel=channel,
    )
    return impl_rabbit.RabbitMessage(raw)


def request(unique_id):
    return {
        'method': 'status',
        'args': {},
        '_msg_id': uuid.uuid4().hex,
        '_reply_q': 'reply_x',
        '_context_roles': ['admin'],
        rpc_amqp.UNIQUE_ID: unique_id,
    }


def listener(cls):
    return cls(types.SimpleNamespace(prefetch_size=1), None)


@pytest.fixture
def patched():
    messaging_compat.ack_duplicate_messages()


# -------------------------------------------------------------- RPC path


def test_rpc_listener_keeps_the_stock_call(patched):
    # RpcAMQPListener.__call__ ends in super().__call__: AMQPListener's,
    # which must still be oslo.messaging's own.
    stock = vars(amqpdriver.AMQPListener)['__call__']
    assert stock.__module__ == 'oslo_messaging._drivers.amqpdriver'
    assert amqpdriver.NotificationAMQPListener not in (
        amqpdriver.RpcAMQPListener.__mro__
    )


def test_a_request_delivered_twice_is_acked_once_per_delivery(patched):
    """The old fix acked the copy a second time: MessageStateError."""
    channel = Channel()
    rpc = listener(amqpdriver.RpcAMQPListener)
    body = request(uuid.uuid4().hex)

    rpc(delivery(channel, 1, body))
    rpc(delivery(channel, 2, body))  # the copy: must not raise

    assert channel.acked == [1, 2]
    assert len(rpc.incoming) == 1  # the copy is dropped, not dispatched


# ------------------------------------------------------ notification path


def _handled(notify, channel, body, tag):
    """Deliver ``body`` and handle it as the server does (ack later)."""
    notify(delivery(channel, tag, body))
    notify.incoming.pop(0).acknowledge()
    notify._message_operations_handler.process()


def test_a_copy_of_a_handled_notification_is_acked(patched):
    channel = Channel()
    notify = listener(amqpdriver.NotificationAMQPListener)
    body = request(uuid.uuid4().hex)
    _handled(notify, channel, body, 1)

    notify(delivery(channel, 2, body))

    assert channel.acked == [1, 2]
    assert notify.incoming == []


def test_a_copy_of_a_notification_not_handled_yet_is_delivered(patched):
    # its id enters the cache only when the first copy is acknowledged
    channel = Channel()
    notify = listener(amqpdriver.NotificationAMQPListener)
    body = request(uuid.uuid4().hex)

    notify(delivery(channel, 1, body))
    notify(delivery(channel, 2, body))

    assert channel.acked == []
    assert len(notify.incoming) == 2


def test_a_failed_ack_of_a_copy_is_logged_not_raised(patched, caplog):
    channel = Channel()
    notify = listener(amqpdriver.NotificationAMQPListener)
    body = request(uuid.uuid4().hex)
    _handled(notify, channel, body, 1)
    channel.fail_with = ConnectionResetError('connection lost')

    with caplog.at_level(logging.WARNING):
        notify(delivery(channel, 2, body))

    assert notify.incoming == []
    assert 'Could not acknowledge duplicate notification' in caplog.text


def test_applying_twice_changes_nothing(patched):
    installed = amqpdriver.NotificationAMQPListener.__call__
    messaging_compat.ack_duplicate_messages()
    assert amqpdriver.NotificationAMQPListener.__call__ is installed


# ------------------------------------------------------------ shape check


def _own_call(self, message):
    return None


@pytest.mark.parametrize(
    'obj, name, value, fragment',
    [
        (amqpdriver, 'NotificationAMQPListener', None, 'no AMQPListener'),
        (
            amqpdriver,
            'RpcAMQPListener',
            type('Rpc', (amqpdriver.NotificationAMQPListener,), {}),
            'hierarchy changed',
        ),
        (
            amqpdriver.AMQPListener,
            '__call__',
            lambda self, message, batch=None: None,
            'AMQPListener.__call__(self, message) changed',
        ),
        (
            amqpdriver.NotificationAMQPListener,
            '__call__',
            _own_call,
            'defines its own __call__',
        ),
        (amqpdriver.NotificationAMQPListener, 'use_cache', True, 'use_cache'),
        (rpc_amqp, 'UNIQUE_ID', None, '_unique_id key'),
        (
            rpc_amqp._MsgIdCache,
            '__init__',
            lambda self, **kwargs: None,
            'no msg_id_cache.prev_msgids',
        ),
    ],
    ids=[
        'no-class',
        'rpc-subclasses-notify',
        'call-signature',
        'own-call',
        'use-cache',
        'unique-id',
        'cache-attrs',
    ],
)
def test_a_changed_oslo_messaging_fails_loudly(
    monkeypatch, obj, name, value, fragment
):
    monkeypatch.setattr(obj, name, value)
    with pytest.raises(messaging_compat.IncompatibleMessaging) as info:
        messaging_compat.ack_duplicate_messages()
    message = str(info.value)
    assert fragment in message
    assert '14.0.0 to 18.3.1' in message and 'requirements.txt' in message
    # reported like any configuration error: one ERROR line, exit 2
    assert isinstance(info.value, exceptions.ConfigError)
    assert info.value.exit_code == 2


def test_the_installed_oslo_messaging_passes_the_check():
    assert next(messaging_compat._shape_problems(), None) is None
