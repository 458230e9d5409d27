"""rpc: the admin check is exact and caller texts never forge log lines.

The endpoint is called as oslo.messaging's dispatcher calls it (a context
dict, keyword arguments).  The same contexts over a real RabbitMQ against
a running service: tests/functional/test_rpc_trust.py.
"""

import dataclasses
import logging
import uuid

import oslo_messaging
import pytest
from oslo_config import cfg

from scrub_listener import exceptions
from scrub_listener import rpc

FORGED = '\n2026-12-04 20:00:00.000 1 ERROR scrub_listener forged'


@dataclasses.dataclass
class Result:
    """A stand-in RestoreResult."""

    image_id: str
    locations: int = 1
    properties: int = 0
    tags: int = 0
    members: int = 0
    deleted_at: object = None


class Restorer:
    """A scripted restorer: answers or raises as the test says."""

    def __init__(self):
        self.calls = []

    def restore(self, image_id, requested_by):
        self.calls.append((image_id, requested_by))
        return Result(image_id)


@pytest.fixture
def restorer():
    return Restorer()


@pytest.fixture
def api(restorer):
    return rpc.ScrubListenerAPI(restorer, lambda: {'queued': 0})


def admin(**changes):
    return {'user_identity': 'alice', 'roles': ['admin'], **changes}


def records(caplog):
    return [r for r in caplog.records if r.name == 'scrub_listener.rpc']


def refused(call, *args):
    """The error ``call(*args)`` answers with (the dispatcher unwraps it).

    ``expected_exceptions`` wraps our errors in ExpectedException, which
    oslo.messaging logs at DEBUG only and unwraps for the reply.
    """
    with pytest.raises(oslo_messaging.ExpectedException) as info:
        call(*args)
    return info.value.exc_info[1]


def assert_one_warning(caplog):
    """Exactly one record of ours: a WARNING, one line, no traceback."""
    ours = records(caplog)
    assert [r.levelno for r in ours] == [logging.WARNING], caplog.text
    assert ours[0].exc_info is None
    line = ours[0].getMessage()
    assert '\n' not in line and '\r' not in line
    assert len(line) < 500
    return line


# ------------------------------------------------------------------ clean


@pytest.mark.parametrize(
    'value, shown',
    [
        ('alice@host', 'alice@host'),
        ('a\r\nb', 'a\\r\\nb'),
        ('\x1b[31mred', '\\x1b[31mred'),
        ('\u202eevil', '\\u202eevil'),  # bidi override
        ('a\u2028b', 'a\\u2028b'),  # Unicode line separator
        (['admin', 1], "['admin', 1]"),
    ],
)
def test_clean_escapes_what_would_break_a_line(value, shown):
    assert rpc.clean(value) == shown


def test_clean_bounds_the_length_and_says_how_long():
    assert rpc.clean('x' * 100_000) == 'x' * 100 + '... (100000 characters)'
    many_newlines = rpc.clean('\n' * 500)
    assert many_newlines.endswith('... (500 characters)')
    assert len(many_newlines) < 150
    assert len(rpc.clean({'k': ['v' * 10_000] * 1000})) < 150


# ----------------------------------------------------------------- caller


@pytest.mark.parametrize(
    'changes, problem',
    [
        ({'roles': 'admin'}, "roles 'admin' is not a list"),
        ({'roles': ['admin', 7]}, 'holds a non-string'),
        ({'roles': [['admin']]}, 'holds a non-string'),
        ({'is_admin': 'True'}, "is_admin 'True' is not a boolean"),
        ({'is_admin': 'true'}, 'is not a boolean'),
        ({'is_admin': 1}, 'is_admin 1 is not a boolean'),
    ],
)
def test_a_malformed_context_is_a_problem_whatever_it_claims(changes, problem):
    caller = rpc.Caller.from_context(admin(**changes))
    assert problem in caller.problem
    assert caller.roles == () and caller.is_admin is False


def test_caller_texts_are_clean():
    caller = rpc.Caller.from_context(
        admin(user_identity='bob' + FORGED, request_id='req\n' + 'r' * 500)
    )
    assert '\n' not in caller.who and caller.who.startswith('bob\\n2026')
    assert '\n' not in caller.request_id
    assert caller.request_id.endswith('(504 characters)')


def test_who_falls_back_to_user_name_then_user():
    assert rpc.Caller.from_context({'user_name': 'u'}).who == 'u'
    assert rpc.Caller.from_context({'user': 'v'}).who == 'v'
    assert rpc.Caller.from_context({}).who == 'an anonymous caller'


# ----------------------------------------------------------------- restore


def test_an_admin_restores_and_the_restorer_gets_the_clean_name(
    api, restorer, caplog
):
    image_id = str(uuid.uuid4())
    with caplog.at_level(logging.INFO):
        reply = api.restore(admin(user_identity='root@h' + FORGED), image_id)
    assert reply['image_id'] == image_id
    [(restored, who)] = restorer.calls
    assert restored == image_id and '\n' not in who
    assert all('\n' not in r.getMessage() for r in records(caplog))


@pytest.mark.parametrize(
    'ctxt',
    [
        {'user_identity': 'x', 'roles': 'admin'},
        {'user_identity': 'x', 'roles': ['admin', 1]},
        {'user_identity': 'x', 'roles': ['member'], 'is_admin': 'True'},
        {'user_identity': 'x', 'roles': ['member'], 'is_admin': 1},
        {'user_identity': 'x', 'roles': 'admin', 'is_admin': True},
        {'user_identity': 'x'},  # no roles
        {'user_identity': 'x', 'roles': ['member']},
        {'user_identity': 'x' + FORGED, 'roles': ['member']},
        'not a dict',
    ],
    ids=[
        'roles-str',
        'roles-non-string',
        'is_admin-str',
        'is_admin-int',
        'malformed-roles-with-is_admin',
        'no-roles',
        'member',
        'forged-newline',
        'no-dict',
    ],
)
def test_a_refused_restore_is_one_warning_and_changes_nothing(
    api, restorer, caplog, ctxt
):
    image_id = str(uuid.uuid4())
    with caplog.at_level(logging.DEBUG):
        error = refused(api.restore, ctxt, image_id)
    assert isinstance(error, exceptions.Forbidden)
    assert restorer.calls == []
    line = assert_one_warning(caplog)
    assert line.startswith(f'Refused restore of {image_id} for ')


def test_forbidden_names_the_reason(api):
    error = refused(api.restore, admin(roles=['member']), str(uuid.uuid4()))
    assert isinstance(error, exceptions.Forbidden) and error.exit_code == 9
    assert str(error) == (
        'restore needs the admin role; alice does not have it: '
        "not admin (roles ['member'])"
    )


def test_is_admin_true_is_enough(api, restorer):
    image_id = str(uuid.uuid4())
    api.restore({'is_admin': True, 'roles': []}, image_id)
    assert restorer.calls[0][0] == image_id


def test_a_100_kb_image_id_is_refused_with_a_short_message(
    api, restorer, caplog
):
    huge = 'a' * 100_000
    with caplog.at_level(logging.DEBUG):
        error = refused(api.restore, admin(), huge)
    assert isinstance(error, exceptions.InvalidImageId)
    assert error.exit_code == 2
    assert restorer.calls == []
    assert len(str(error)) < 100
    assert '(100000 characters)' in str(error)
    assert len(error.kwargs['image_id']) < 100
    line = assert_one_warning(caplog)
    assert 'invalid image id aaaa' in line and len(line) < 200


def test_a_long_id_is_refused_without_parsing_it(api, monkeypatch):
    # building InvalidImageId around 100 KB costs seconds of CPU (its text
    # is redacted): only a UUID-sized text goes to validate_image_id
    seen = []
    monkeypatch.setattr(
        rpc.model, 'validate_image_id', lambda i: seen.append(i) or i
    )
    refused(api.restore, admin(), 'a' * 37)
    refused(api.restore, admin(), 12345)
    assert seen == []


@pytest.mark.parametrize(
    'image_id',
    [
        '\n' + '0' * 31,  # uuid.UUID() strips the newline
        '0' * 31 + '\r',
        'not-an-id' + FORGED,
        None,
        ['a', 'list'],
    ],
)
def test_an_id_that_needs_escaping_is_refused_before_it_is_logged(
    api, restorer, caplog, image_id
):
    with caplog.at_level(logging.DEBUG):
        error = refused(api.restore, admin(), image_id)
    assert isinstance(error, exceptions.InvalidImageId)
    assert restorer.calls == []
    assert '\n' not in str(error) and '\r' not in str(error)
    assert_one_warning(caplog)


def test_an_invalid_id_is_refused_before_the_admin_check(api, caplog):
    # the id is not logged until it is valid, whoever asks
    with caplog.at_level(logging.DEBUG):
        error = refused(api.restore, {'roles': ['member']}, 'x' + FORGED)
    assert isinstance(error, exceptions.InvalidImageId)
    line = assert_one_warning(caplog)
    assert 'invalid image id x\\n2026' in line


# ------------------------------------------------------------------ status


def test_status_is_checked_too(api, caplog):
    assert api.status(admin()) == {'queued': 0}
    with caplog.at_level(logging.DEBUG):
        error = refused(api.status, admin(roles='admin'))
    assert isinstance(error, exceptions.Forbidden)
    line = assert_one_warning(caplog)
    assert line.startswith('Refused status for alice')


# ------------------------------------------------------- configured roles


def test_the_configured_roles_are_required(restorer):
    api = rpc.ScrubListenerAPI(restorer, dict, admin_roles=['scrub-admin'])
    refused(api.restore, admin(), str(uuid.uuid4()))
    api.restore(admin(roles=['member', 'scrub-admin']), str(uuid.uuid4()))
    assert len(restorer.calls) == 1


def test_every_configured_role_is_required(api, restorer):
    api.require_roles(['admin', 'scrub'])
    refused(api.status, admin())
    assert api.status(admin(roles=['scrub', 'admin'])) == {'queued': 0}


@pytest.mark.parametrize('roles', [[], ['']])
def test_no_configured_role_is_a_configuration_error(api, roles):
    with pytest.raises(exceptions.ConfigError, match='client_roles is empty'):
        api.require_roles(roles)


# ---------------------------------------- oslo.messaging's own log lines


def _record(msg, args=(), exc=None):
    exc_info = (type(exc), exc, None) if exc else None
    return logging.LogRecord(
        'oslo_messaging.rpc.server',
        logging.ERROR,
        __file__,
        1,
        msg,
        args,
        exc_info,
    )


def test_the_filter_escapes_a_message_quoting_the_envelope():
    record = _record('ignoring duplicate message %s', ('id' + FORGED,))
    assert rpc.OneLineFilter().filter(record) is True
    assert record.getMessage() == (
        'ignoring duplicate message id\\n2026-12-04 20:00:00.000 1 ERROR '
        'scrub_listener forged'
    )


def test_the_filter_folds_an_exception_quoting_the_envelope():
    exc = ValueError('Endpoint does not support RPC method x' + FORGED)
    record = _record('Exception during message handling', exc=exc)
    rpc.OneLineFilter().filter(record)
    assert record.exc_info is None
    assert record.getMessage() == (
        'Exception during message handling: ValueError: Endpoint does not '
        'support RPC method x\\n2026-12-04 20:00:00.000 1 ERROR '
        'scrub_listener forged'
    )


def test_the_filter_leaves_ordinary_records_alone():
    exc = TypeError("restore() got an unexpected keyword argument 'b'")
    record = _record('%s %d%%', ('a', 5), exc=exc)
    rpc.OneLineFilter().filter(record)
    assert (record.msg, record.args) == ('%s %d%%', ('a', 5))
    assert record.exc_info[1] is exc


def test_get_server_filters_the_envelope_loggers_once(api):
    conf = type(
        'Conf',
        (),
        {
            'rpc': type(
                'Rpc', (), {'client_roles': ['admin'], 'topic': 't'}
            )(),
            'host': 'h',
        },
    )()
    transport = oslo_messaging.get_rpc_transport(
        cfg.ConfigOpts(), url='fake://'
    )
    try:
        rpc.get_server(conf, transport, api)
        rpc.get_server(conf, transport, api)
    finally:
        transport.cleanup()
    for name in rpc.ENVELOPE_LOGGERS:
        filters = logging.getLogger(name).filters
        assert sum(isinstance(f, rpc.OneLineFilter) for f in filters) == 1
