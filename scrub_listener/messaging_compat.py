"""Fixes for oslo.messaging that a robust listener needs.

First, duplicates and the bounded prefetch (notifications only):

``AMQPListener.__call__`` drops a message whose ``_unique_id`` is in its
recent-message cache (a publisher's retry, a redelivery after a
connection loss) without acknowledging or rejecting it.  The broker then
counts it as in flight forever, so with ``rabbit_qos_prefetch_count`` set
(we set it: ``[listener] prefetch``, so that a large backlog does not
land in memory) every such copy takes one prefetch slot for good, and
after ``prefetch`` of them the listener receives nothing more.

:func:`ack_duplicate_messages` gives ``NotificationAMQPListener``, and
only it, a ``__call__`` that acknowledges such a copy.  That is safe
there because a notification's id enters the cache only when the first
copy is acknowledged, i.e. handled (``use_cache`` is False and
``NotificationAMQPIncomingMessage.acknowledge`` adds it), and every
handling is idempotent here anyway.

``RpcAMQPListener`` must keep the stock method: it acknowledges every
request *before* calling ``AMQPListener.__call__``, so acknowledging a
duplicate there again raised kombu's MessageStateError in the consumer
callback, whose ``reject()`` raised again, and the RPC consumer was torn
down and rebuilt (an ERROR storm, a second without RPC).  The RPC
listener does not stall on duplicates in the first place.

The fix was checked against oslo.messaging 14.0.0, 16.0.0, 17.0.0, 18.0.0
and 18.3.1 (the classes and methods it relies on are the same in all of
them; requirements.txt pins that range).  It checks at start that the
installed version still has that shape and raises
:class:`IncompatibleMessaging` otherwise: silently running without it
would bring the stall back.

Second, :class:`TolerantBatchDispatcher`, below.
"""

import inspect
import logging
import types

from oslo_messaging._drivers import amqp as rpc_amqp
from oslo_messaging._drivers import amqpdriver
from oslo_messaging.notify import dispatcher as notify_dispatcher

from scrub_listener import exceptions

LOG = logging.getLogger(__name__)

CHECKED_VERSIONS = '14.0.0 to 18.3.1'
_MARK = '_scrub_listener_acks_duplicates'


class IncompatibleMessaging(exceptions.ConfigError):
    """The installed oslo.messaging is not the one our fix was checked on."""

    template = (
        'the installed oslo.messaging is not one scrub-listener was checked '
        'against ({checked}): {reason}. Install a version in that range '
        '(see requirements.txt).'
    )


def ack_duplicate_messages():
    """Make notification listeners acknowledge copies already handled.

    Idempotent.  Raises IncompatibleMessaging if oslo.messaging no longer
    has the shape the fix relies on (checked on every call, so that a
    start always fails loudly rather than running without the fix).
    """
    _check_shape()
    listener_cls = amqpdriver.NotificationAMQPListener
    if not _is_ours(vars(listener_cls).get('__call__')):
        listener_cls.__call__ = _make_acking_call(
            amqpdriver.AMQPListener.__call__
        )


def _make_acking_call(base_call):
    def __call__(self, message):
        unique_id = message.get(rpc_amqp.UNIQUE_ID)
        if unique_id is None or unique_id not in (
            self.msg_id_cache.prev_msgids
        ):
            return base_call(self, message)
        LOG.debug('Acknowledging duplicate notification %s', unique_id)
        try:
            message.acknowledge()
        except Exception as exc:
            # The connection is gone: the broker redelivers the copy
            # after the reconnection and it is dropped again then.
            LOG.warning(
                'Could not acknowledge duplicate notification %s: %s',
                unique_id,
                exc,
            )
        return None

    setattr(__call__, _MARK, True)
    return __call__


def _is_ours(func):
    return getattr(func, _MARK, False)


def _check_shape():
    """Raise IncompatibleMessaging unless every assumption still holds."""
    problem = next(_shape_problems(), None)
    if problem is not None:
        raise IncompatibleMessaging(checked=CHECKED_VERSIONS, reason=problem)


def _shape_problems():
    """Yield what differs from the oslo.messaging the fix was written for."""
    base = getattr(amqpdriver, 'AMQPListener', None)
    notify = getattr(amqpdriver, 'NotificationAMQPListener', None)
    rpc = getattr(amqpdriver, 'RpcAMQPListener', None)
    if not all(isinstance(c, type) for c in (base, notify, rpc)):
        yield (
            'amqpdriver has no AMQPListener, NotificationAMQPListener or '
            'RpcAMQPListener class'
        )
        return
    if not issubclass(notify, base) or issubclass(rpc, notify):
        yield 'the AMQP listener class hierarchy changed'
    if _params(vars(base).get('__call__')) != ['self', 'message']:
        yield 'AMQPListener.__call__(self, message) changed'
    own_call = vars(notify).get('__call__')
    if own_call is not None and not _is_ours(own_call):
        yield 'NotificationAMQPListener defines its own __call__'
    if getattr(notify, 'use_cache', None) is not False:
        yield 'NotificationAMQPListener caches ids on receipt (use_cache)'
    if not isinstance(getattr(rpc_amqp, 'UNIQUE_ID', None), str):
        yield 'the _unique_id key (amqp.UNIQUE_ID) is gone'
    yield from _cache_problems(notify)


def _params(func):
    try:
        return list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None


def _cache_problems(notify):
    # A throw-away listener (its constructor starts nothing) shows what
    # the class alone cannot: the instance attributes __call__ reads.
    try:
        listener = notify(types.SimpleNamespace(prefetch_size=1), None)
        prev = listener.msg_id_cache.prev_msgids
        prev.append('probe')
        found = 'probe' in prev
    except Exception as exc:
        yield (
            'a NotificationAMQPListener has no msg_id_cache.prev_msgids '
            f'({type(exc).__name__}: {exc})'
        )
        return
    if not found:
        yield 'msg_id_cache.prev_msgids no longer holds the seen ids'


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
