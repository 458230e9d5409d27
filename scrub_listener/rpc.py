"""The RPC API (``restore``, ``status``) and the client admin tools use.

Server side: an oslo.messaging RPC endpoint on topic ``[rpc] topic``,
versioned target 1.0, only methods marked ``@expose`` are callable
(ExplicitRPCAccessPolicy).  RPC is at-most-once (the request is acked
before dispatch), so ``restore`` is safe to repeat: a second call on a
restored image fails with NotPendingDelete saying it is active.

Errors cross the wire as our own exception types: the client lists
``scrub_listener.exceptions`` in ``allowed_remote_exmods`` and gets e.g.
``ImageNotFound_Remote``, a subclass of ImageNotFound with its exit code.
"""

import dataclasses
import getpass
import logging
import socket
import threading
import uuid

import futurist
import oslo_messaging
from sqlalchemy import exc as sa_exc

from scrub_listener import exceptions

LOG = logging.getLogger(__name__)

API_VERSION = '1.0'
REMOTE_EXMODS = ['scrub_listener.exceptions']
ADMIN_ROLE = 'admin'


def _caller(ctxt):
    return (
        ctxt.get('user_identity')
        or ctxt.get('user_name')
        or ctxt.get('user')
        or 'an anonymous caller'
    )


class ScrubListenerAPI:
    """RPC endpoint; every public method here is part of API 1.0."""

    target = oslo_messaging.Target(version=API_VERSION)

    def __init__(self, restorer, status_func):
        self._restorer = restorer
        self._status = status_func

    # expected_exceptions: a refused restore is an answer, not a server
    # error; oslo.messaging then logs it at DEBUG, not as an ERROR with a
    # traceback, and still sends the typed error to the caller.
    @oslo_messaging.expose
    @oslo_messaging.expected_exceptions(exceptions.ScrubListenerError)
    def restore(self, ctxt, image_id):
        who = _caller(ctxt)
        roles = ctxt.get('roles') or []
        if ADMIN_ROLE not in roles and not ctxt.get('is_admin'):
            LOG.warning(
                'Refused restore of %s for %s: not admin (roles %s)',
                image_id,
                who,
                roles,
            )
            raise exceptions.Forbidden(action='restore', who=who)
        LOG.info(
            'Restore of image %s requested by %s (request %s)',
            image_id,
            who,
            ctxt.get('request_id'),
        )
        try:
            result = self._restorer.restore(image_id, requested_by=who)
        except sa_exc.SQLAlchemyError as exc:
            # Only our own exception types cross the wire with their
            # meaning (and exit code); a database error would arrive as an
            # anonymous RemoteError.
            raise exceptions.DatabaseUnavailable(
                f'database error during restore: '
                f'{getattr(exc, "orig", None) or exc}'
            ) from exc
        reply = dataclasses.asdict(result)
        if result.deleted_at is not None:
            reply['deleted_at'] = result.deleted_at.isoformat() + 'Z'
        return reply

    @oslo_messaging.expose
    def status(self, ctxt):
        return self._status()


def get_server(conf, transport, endpoint):
    target = oslo_messaging.Target(
        topic=conf.rpc.topic, server=conf.host, version=API_VERSION
    )
    return oslo_messaging.get_rpc_server(
        transport,
        target,
        [endpoint],
        access_policy=oslo_messaging.ExplicitRPCAccessPolicy,
    )


class Client:
    """What scrub-listener-manage uses to talk to the service."""

    def __init__(self, conf):
        self._conf = conf
        self._abandoned = False
        self._transport = oslo_messaging.get_rpc_transport(
            conf, allowed_remote_exmods=REMOTE_EXMODS
        )
        self._client = oslo_messaging.get_rpc_client(
            self._transport,
            oslo_messaging.Target(topic=conf.rpc.topic, version=API_VERSION),
            timeout=conf.rpc.timeout,
            retry=conf.rpc.connect_retries,
        )

    def _context(self):
        return {
            'user_identity': f'{getpass.getuser()}@{socket.gethostname()}',
            'roles': list(self._conf.rpc.client_roles),
            'request_id': f'req-{uuid.uuid4()}',
        }

    def call(self, method, **kwargs):
        try:
            return self._bounded_call(method, **kwargs)
        except oslo_messaging.MessagingTimeout as exc:
            raise exceptions.ServiceUnavailable(
                f'no scrub-listener service answered on RPC topic '
                f'{self._conf.rpc.topic!r} within {self._conf.rpc.timeout} '
                's (is it running? --direct works without it)'
            ) from exc
        except oslo_messaging.MessageDeliveryFailure as exc:
            raise exceptions.ServiceUnavailable(
                f'cannot reach the message broker: {exc}'
            ) from exc
        except oslo_messaging.RemoteError as exc:
            # A server error of a type we did not allow to cross.
            raise exceptions.ScrubListenerError(
                f'the service failed: {exc.exc_type}: {exc.value}'
            ) from exc

    def _bounded_call(self, method, **kwargs):
        # oslo.messaging bounds the reply wait (timeout) and the send
        # (retry), but not the first declaration of the reply queue, which
        # retries forever while the broker is down.  An admin tool must
        # answer: run the call in a daemon thread and give up after the
        # whole budget.
        done = futurist.Future()

        def call():
            try:
                done.set_result(
                    self._client.call(self._context(), method, **kwargs)
                )
            except BaseException as exc:  # handed to the caller below
                done.set_exception(exc)

        threading.Thread(
            target=call, name=f'rpc-{method}', daemon=True
        ).start()
        # the reply wait, plus the send's own reconnect attempts
        budget = self._conf.rpc.timeout + 5 * (
            self._conf.rpc.connect_retries + 1
        )
        try:
            return done.result(timeout=budget)
        except futurist.TimeoutError:
            self._abandoned = True
            raise exceptions.ServiceUnavailable(
                f'no answer from the message broker or the service within '
                f'{budget} s; is the broker up? --direct works without it'
            ) from None

    def restore(self, image_id):
        return self.call('restore', image_id=image_id)

    def status(self):
        return self.call('status')

    def close(self):
        # After an abandoned call the driver is still reconnecting and
        # cleanup() would wait for it forever; the process is ending.
        if not self._abandoned:
            self._transport.cleanup()
