"""The RPC API (``restore``, ``status``) and the client admin tools use.

Server side: an oslo.messaging RPC endpoint on topic ``[rpc] topic``,
versioned target 1.0, only methods marked ``@expose`` are callable
(ExplicitRPCAccessPolicy).  RPC is at-most-once (the request is acked
before dispatch), so ``restore`` is safe to repeat: a second call on a
restored image fails with NotPendingDelete saying it is active.

Trust: the request context is whatever the publisher wrote, and anyone
who can publish on the vhost can write any (README, "RPC trust model").
The admin check is a guard against mistakes, so it is exact: ``roles``
must be a list of strings holding every role of ``[rpc] client_roles``,
or ``is_admin`` the boolean True; a context of any other shape is
refused.  Every caller-supplied text is made one bounded printable line
(:func:`clean`) before it reaches a log line or an error message, and
the image id is validated before it is logged.  A refused call is one
WARNING line on the server and a typed error (exit code 2 or 9) for the
caller.

Errors cross the wire as our own exception types: the client lists
``scrub_listener.exceptions`` in ``allowed_remote_exmods`` and gets e.g.
``ImageNotFound_Remote``, a subclass of ImageNotFound with its exit code.
"""

import dataclasses
import getpass
import logging
import reprlib
import socket
import threading
import uuid

import futurist
import oslo_messaging
from sqlalchemy import exc as sa_exc

from scrub_listener import exceptions
from scrub_listener import model

LOG = logging.getLogger(__name__)

API_VERSION = '1.0'
REMOTE_EXMODS = ['scrub_listener.exceptions']
ADMIN_ROLE = 'admin'
# Longest caller-supplied text shown in a log line or an error message.
MAX_SHOWN = 100
UUID_LENGTH = 36

_REPR = reprlib.Repr()  # keyword arguments need Python 3.12
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 2, 8, 8
_REPR.maxstring = _REPR.maxother = MAX_SHOWN


def clean(value, limit=MAX_SHOWN):
    """``value`` as one printable line of at most about ``limit`` chars.

    Non-printable characters (CR, LF, ESC, bidi overrides...) are
    escaped, so that a caller cannot start a forged log line; a longer
    text is cut and says how long it was.  Non-strings show as a bounded
    repr.
    """
    text = value if isinstance(value, str) else _REPR.repr(value)
    shown = _escape(text[:limit])
    if len(text) > limit or len(shown) > limit:
        return f'{shown[:limit]}... ({len(text)} characters)'
    return shown


def _escape(text):
    if text.isprintable():
        return text
    return ''.join(
        c if c.isprintable() else c.encode('unicode_escape').decode('ascii')
        for c in text
    )


class OneLineFilter(logging.Filter):
    """Escape line breaks and control characters in a whole log record.

    For the oslo.messaging loggers that quote the request envelope before
    our endpoint sees it: the method name of a NoSuchMethod, the
    ``_msg_id`` of a duplicate.  An exception whose text is not one
    printable line loses its traceback (whose last line would quote the
    text as is) and is appended, escaped, to the message.
    """

    def filter(self, record):
        message = record.getMessage()
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and not str(exc).isprintable():
            message = f'{message}: {type(exc).__name__}: {exc}'
            record.exc_info = None
        if not message.isprintable():
            record.msg, record.args = _escape(message), None
        return True


ENVELOPE_LOGGERS = (
    'oslo_messaging._drivers.amqpdriver',
    'oslo_messaging.rpc.dispatcher',
    'oslo_messaging.rpc.server',
)


def filter_envelope_logs():
    """Put a OneLineFilter on ENVELOPE_LOGGERS (once)."""
    for name in ENVELOPE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineFilter) for f in logger.filters):
            logger.addFilter(OneLineFilter())


@dataclasses.dataclass(frozen=True)
class Caller:
    """What the service takes from a request context, and nothing else.

    Built by :meth:`from_context`; its texts are :func:`clean`.  ``problem``
    says why the context is malformed (it is then refused whatever it
    claims).
    """

    who: str
    request_id: str
    roles: tuple = ()
    is_admin: bool = False
    problem: str | None = None

    @classmethod
    def from_context(cls, ctxt):
        """The Caller of a raw oslo.messaging context (a dict)."""
        if not isinstance(ctxt, dict):
            return cls('an anonymous caller', '-', problem='no context')
        who = next(
            (
                clean(ctxt[key])
                for key in ('user_identity', 'user_name', 'user')
                if ctxt.get(key)
            ),
            'an anonymous caller',
        )
        request_id = clean(ctxt.get('request_id') or '-')
        roles, is_admin = ctxt.get('roles'), ctxt.get('is_admin')
        problem = _roles_problem(roles) or _is_admin_problem(is_admin)
        if problem:
            return cls(who, request_id, problem=problem)
        return cls(who, request_id, tuple(roles or ()), is_admin is True)


def _roles_problem(roles):
    if roles is None:
        return None
    if not isinstance(roles, list):
        return f'roles {clean(_REPR.repr(roles))} is not a list'
    if not all(isinstance(role, str) for role in roles):
        return f'roles {clean(roles)} holds a non-string'
    return None


def _is_admin_problem(is_admin):
    # a real boolean only: "true", "True" and 1 are refused
    if is_admin is None or isinstance(is_admin, bool):
        return None
    return f'is_admin {clean(_REPR.repr(is_admin))} is not a boolean'


class ScrubListenerAPI:
    """RPC endpoint; the methods marked ``@expose`` are API 1.0."""

    target = oslo_messaging.Target(version=API_VERSION)

    def __init__(self, restorer, status_func, admin_roles=(ADMIN_ROLE,)):
        self._restorer = restorer
        self._status = status_func
        self.require_roles(admin_roles)

    def require_roles(self, roles):
        """Callers need every one of ``roles`` (or ``is_admin`` True)."""
        roles = frozenset(role for role in roles if role)
        if not roles:
            raise exceptions.ConfigError(
                '[rpc] client_roles is empty: the service would serve '
                'restore to anyone'
            )
        self._admin_roles = roles

    # expected_exceptions: a refused restore is an answer, not a server
    # error; oslo.messaging then logs it at DEBUG, not as an ERROR with a
    # traceback, and still sends the typed error to the caller.
    @oslo_messaging.expose
    @oslo_messaging.expected_exceptions(exceptions.ScrubListenerError)
    def restore(self, ctxt, image_id):
        caller = Caller.from_context(ctxt)
        image_id = self._valid_id(caller, image_id)
        self._authorize(caller, 'restore', image_id)
        LOG.info(
            'Restore of image %s requested by %s (request %s)',
            image_id,
            caller.who,
            caller.request_id,
        )
        try:
            result = self._restorer.restore(image_id, requested_by=caller.who)
        except exceptions.ScrubListenerError as exc:
            # Rebuilt without its chained causes: the reply carries the
            # traceback, and a cause may quote a driver's text.
            raise type(exc)(exc.message, **exc.kwargs) from None
        except sa_exc.SQLAlchemyError as exc:
            # Only our own exception types cross the wire with their
            # meaning (and exit code); a database error would arrive as an
            # anonymous RemoteError.
            raise exceptions.DatabaseUnavailable(
                f'database error during restore: '
                f'{getattr(exc, "orig", None) or exc}'
            ) from None
        reply = dataclasses.asdict(result)
        if result.deleted_at is not None:
            reply['deleted_at'] = result.deleted_at.isoformat() + 'Z'
        return reply

    @oslo_messaging.expose
    @oslo_messaging.expected_exceptions(exceptions.ScrubListenerError)
    def status(self, ctxt):
        self._authorize(Caller.from_context(ctxt), 'status')
        return self._status()

    def _authorize(self, caller, action, image_id=None):
        """Return if ``caller`` is admin, else log and raise Forbidden."""
        if caller.problem:
            reason = f'malformed request context: {caller.problem}'
        elif caller.is_admin or self._admin_roles <= set(caller.roles):
            return
        else:
            reason = f'not admin (roles {clean(list(caller.roles))})'
        what = f'{action} of {image_id}' if image_id else action
        _log_refusal(caller, what, reason)
        raise exceptions.Forbidden(
            f'{action} needs the admin role; {caller.who} does not have '
            f'it: {reason}',
            action=action,
            who=caller.who,
        )

    @staticmethod
    def _valid_id(caller, image_id):
        """The image id, or InvalidImageId with a short message."""
        valid = None
        # Anything longer than a UUID is refused without validate_image_id,
        # whose error would carry (and process) the whole text.
        if isinstance(image_id, str) and len(image_id) <= UUID_LENGTH:
            try:
                valid = model.validate_image_id(image_id)
            except exceptions.InvalidImageId:
                pass
        # uuid.UUID() also takes surrounding whitespace and braces: an id
        # that would need escaping in a log line is no Glance id either.
        if valid is not None and valid.isprintable():
            return valid
        shown = clean(image_id, limit=40)
        _log_refusal(caller, 'restore', f'invalid image id {shown}')
        raise exceptions.InvalidImageId(
            f'{shown} is not a valid image id', image_id=shown
        )


def _log_refusal(caller, what, reason):
    # One WARNING line, no traceback: a refusal is an answer, not a fault.
    LOG.warning(
        'Refused %s for %s (request %s): %s',
        what,
        caller.who,
        caller.request_id,
        reason,
    )


def get_server(conf, transport, endpoint):
    """The RPC server of ``endpoint``, which requires [rpc] client_roles."""
    endpoint.require_roles(conf.rpc.client_roles)
    filter_envelope_logs()
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
