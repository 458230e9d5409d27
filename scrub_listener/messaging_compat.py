"""Fixes for oslo.messaging (18.3.1) that a robust listener needs.

First, duplicates and the bounded prefetch:

``AMQPListener.__call__`` drops a message whose ``_unique_id`` is in its
recent-message cache (a publisher's retry, a redelivery after a
connection loss) without acknowledging or rejecting it.  The broker then
counts it as in flight forever, so with ``rabbit_qos_prefetch_count`` set
(we set it: ``[listener] prefetch``, so that a large backlog does not
land in memory) every such copy takes one prefetch slot for good, and
after ``prefetch`` of them the listener receives nothing more.

We acknowledge such duplicates instead: the first copy was handled (its
id only enters the cache when it is received), and every handling is
idempotent here anyway.  The patch is applied once, only to the class
and method it was written for, and is a no-op if oslo.messaging changes
shape.

Second, :class:`TolerantBatchDispatcher`, below.
"""

import logging

from oslo_messaging._drivers import amqp as rpc_amqp
from oslo_messaging._drivers import amqpdriver
from oslo_messaging.notify import dispatcher as notify_dispatcher

LOG = logging.getLogger(__name__)

_MARK = '_scrub_listener_acks_duplicates'


def ack_duplicate_messages():
    listener_cls = getattr(amqpdriver, 'AMQPListener', None)
    original = vars(listener_cls).get('__call__') if listener_cls else None
    if original is None or getattr(original, _MARK, False):
        return
    if not hasattr(rpc_amqp, 'UNIQUE_ID'):
        LOG.warning(
            'oslo.messaging changed; duplicate messages are not '
            "acknowledged by scrub-listener's fix"
        )
        return

    def __call__(self, message):
        unique_id = message.get(rpc_amqp.UNIQUE_ID)
        cache = getattr(self, 'msg_id_cache', None)
        if (
            unique_id is not None
            and cache is not None
            and (unique_id in cache.prev_msgids)
        ):
            LOG.debug('Acknowledging duplicate message %s', unique_id)
            message.acknowledge()
            return None
        return original(self, message)

    setattr(__call__, _MARK, True)
    listener_cls.__call__ = __call__


class TolerantBatchDispatcher(notify_dispatcher.BatchNotificationDispatcher):
    """Drop, alone, a notification oslo.messaging cannot even dispatch.

    The stock batch dispatcher calls ``message.get('priority', '').lower()``
    on every message of a batch before any endpoint runs: one message
    whose body is not an object, or whose priority is not a string, makes
    the whole batch fail, and the good events in it are acked unhandled.
    Such a message is logged and acked here; the rest of the batch goes
    on.
    """

    def dispatch(self, incoming):
        good = []
        for message in incoming:
            body = message.message
            priority = body.get('priority') if isinstance(body, dict) else None
            if isinstance(priority, str):
                good.append(message)
            else:
                LOG.warning(
                    'Dropping malformed notification %s: priority %r is '
                    'not a string',
                    body.get('message_id') if isinstance(body, dict) else '?',
                    priority,
                )
        return super().dispatch(good) if good else set()
