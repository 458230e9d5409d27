"""Forged request contexts over the real broker, against a running service.

Anyone who can publish on the vhost writes the request context it likes
(README, "RPC trust model"); these tests publish such contexts with
oslo.messaging's own client, in this process, to a real ``scrub-listener``
service on RabbitMQ and a MariaDB Glance database, and check:

* the call is refused with the typed error (Forbidden: exit 9,
  InvalidImageId: exit 2) and the image is untouched;
* the service logged exactly one line for it: a WARNING from
  ``scrub_listener.rpc``, no ERROR, no traceback, and no line a caller's
  text started (a newline in ``user_identity`` shows as ``\\n``).

The reply is sent after the endpoint has logged, so once the client has
it the log holds every line of that request: no waiting is needed.
"""

import os
import re
import shlex
import uuid

import kombu
import pytest

from scrub_listener import exceptions
from tests.functional import service_fixtures as sf
from tests.functional.test_service_rpc import RawRpc
from tools import harness

module_vhost = sf.module_vhost
module_glance_mysql = sf.module_glance_mysql
module_service = sf.module_service
services = sf.services
vhost = sf.vhost

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

FORGED = '\n2026-12-04 20:00:00.000 1 ERROR scrub_listener.rpc [-] forged'
# one oslo.log line: date time pid LEVEL logger [context] message
LINE_RE = re.compile(
    r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \d+ (?P<level>[A-Z]+) '
    r'(?P<logger>\S+) \[[^\]]*\] (?P<message>.*)$'
)


class Service:
    """The module's service, and RPC calls to it with any context."""

    def __init__(self, world, service, caller):
        self.world = world
        self.service = service
        self._caller = caller

    def call(self, ctxt, method, **kwargs):
        """(result or raised error, the service's log lines meanwhile)."""
        offset = len(self.service.log())
        try:
            outcome = self._caller.call_as(ctxt, method, **kwargs)
        except Exception as exc:
            outcome = exc
        return outcome, self.service.log()[offset:].splitlines()

    def own_line(self, line):
        """Does ``line`` start with the service's own header (time, its
        pid, level, logger), as records and their traceback lines do?"""
        return re.match(
            rf'\d{{4}}-\d\d-\d\d \S+ {self.service.pid} [A-Z]+ \S+ ', line
        )


@pytest.fixture(scope='module')
def svc(module_service):
    world, service, *_ = module_service('trust', scrub_time=3600)
    with sf.RpcCaller(world.vhost.transport_url, world.rpc_topic) as caller:
        yield Service(world, service, caller)


def admin(**changes):
    return {'user_identity': 'pytest', 'roles': ['admin'], **changes}


def assert_one_warning(lines, *fragments):
    """``lines`` is one WARNING line of scrub_listener.rpc; return it."""
    assert len(lines) == 1, '\n'.join(lines)
    match = LINE_RE.match(lines[0])
    assert match, lines[0]
    assert (match['level'], match['logger']) == (
        'WARNING',
        'scrub_listener.rpc',
    ), lines[0]
    message = match['message']
    assert message.startswith('Refused '), message
    for fragment in fragments:
        assert fragment in message, f'{fragment!r} not in {message!r}'
    return message


def assert_refused(outcome, expected, code):
    assert isinstance(outcome, expected), repr(outcome)
    assert type(outcome).__name__ == expected.__name__ + '_Remote'
    assert outcome.exit_code == code
    return outcome


FORGED_CONTEXTS = {
    'roles-a-string': (
        admin(roles='admin'),
        "malformed request context: roles 'admin' is not a list",
    ),
    'roles-with-a-non-string': (
        admin(roles=['admin', 1]),
        "malformed request context: roles ['admin', 1] holds a non-string",
    ),
    'roles-a-nested-list': (admin(roles=[['admin']]), 'holds a non-string'),
    'is_admin-the-string-True': (
        admin(roles=['member'], is_admin='True'),
        "is_admin 'True' is not a boolean",
    ),
    'is_admin-the-number-1': (
        admin(roles=['member'], is_admin=1),
        'is_admin 1 is not a boolean',
    ),
    'roles-missing': ({'user_identity': 'pytest'}, 'not admin (roles [])'),
    'member-only': (admin(roles=['member']), "not admin (roles ['member'])"),
    'user_identity-with-a-forged-line': (
        admin(roles=['member'], user_identity='mallory' + FORGED),
        'for mallory\\n2026-12-04 20:00:00.000 1 ERROR',
    ),
    'request_id-with-a-forged-line': (
        admin(roles=['member'], request_id='req-1' + FORGED),
        '(request req-1\\n2026-12-04',
    ),
}


@pytest.mark.parametrize(
    'ctxt, reason', FORGED_CONTEXTS.values(), ids=FORGED_CONTEXTS.keys()
)
def test_a_forged_context_cannot_restore(svc, ctxt, reason):
    image_id = svc.world.pending()

    outcome, lines = svc.call(ctxt, 'restore', image_id=image_id)

    error = assert_refused(outcome, exceptions.Forbidden, 9)
    assert 'restore needs the admin role' in error.message
    assert '\n' not in error.message
    assert_one_warning(lines, f'Refused restore of {image_id} for ', reason)
    assert sf.image_statuses(svc.world.glance_url, [image_id]) == {
        image_id: 'pending_delete'
    }
    assert os.path.exists(svc.world.path(image_id))


@pytest.mark.parametrize(
    'ctxt, reason', FORGED_CONTEXTS.values(), ids=FORGED_CONTEXTS.keys()
)
def test_a_forged_context_cannot_read_the_status(svc, ctxt, reason):
    outcome, lines = svc.call(ctxt, 'status')

    assert_refused(outcome, exceptions.Forbidden, 9)
    assert_one_warning(lines, 'Refused status for ', reason)


def test_a_100_kb_image_id_is_refused_in_one_short_line(svc):
    huge = 'f' * 100 * 1024

    outcome, lines = svc.call(admin(), 'restore', image_id=huge)

    error = assert_refused(outcome, exceptions.InvalidImageId, 2)
    assert len(error.message) < 100, error.message
    assert (
        error.message
        == f'{"f" * 40}... (102400 characters) is not a valid image id'
    )
    message = assert_one_warning(lines, 'invalid image id ffff')
    assert len(lines[0]) < 300 and '(102400 characters)' in message


def test_an_id_with_a_forged_line_is_refused_before_it_is_logged(svc):
    # uuid.UUID() accepts a newline around 31 hex digits
    for image_id in ('\n' + '0' * 31, 'x' + FORGED):
        outcome, lines = svc.call(admin(), 'restore', image_id=image_id)
        assert_refused(outcome, exceptions.InvalidImageId, 2)
        assert_one_warning(lines, 'invalid image id ')


def test_an_admin_with_a_forged_identity_restores_without_forged_lines(svc):
    image_id = svc.world.pending()

    outcome, lines = svc.call(
        admin(user_identity='root' + FORGED, request_id='req-2' + FORGED),
        'restore',
        image_id=image_id,
    )

    assert outcome['image_id'] == image_id, outcome
    assert sf.image_statuses(svc.world.glance_url, [image_id]) == {
        image_id: 'active'
    }
    assert lines, 'the restore logged nothing'
    for line in lines:
        match = LINE_RE.match(line)
        assert match and match['level'] == 'INFO', line
        assert 'forged' not in line or '\\n2026-12-04' in line, line
    assert any(
        f'Restore of image {image_id} requested by root\\n2026-12-04' in line
        for line in lines
    )


def test_is_admin_true_and_the_admin_role_still_work(svc):
    status, lines = svc.call({'is_admin': True, 'roles': []}, 'status')
    assert status['scrub_time'] == 3600 and lines == []
    status, lines = svc.call(admin(), 'status')
    assert status['scrub_time'] == 3600 and lines == []


def test_envelope_fields_oslo_messaging_logs_start_no_line(svc):
    """oslo.messaging itself logs the method of a NoSuchMethod and the
    ``_msg_id`` of a duplicate, before our endpoint runs: those lines
    are escaped too (rpc.OneLineFilter)."""
    raw = RawRpc(svc.world.vhost.transport_url, svc.world.rpc_topic)
    try:
        offset = len(svc.service.log())
        nosuch = raw.request('nosuch' + FORGED)
        raw.send(nosuch)
        assert raw.reply(nosuch, 15)['failure'], 'no NoSuchMethod answer'
        twice = raw.request('status')
        twice['_msg_id'] = 'id' + FORGED
        raw.send(twice)
        raw.send(twice)  # dropped as a duplicate, logged with its _msg_id
        last = raw.request('status')
        raw.send(last)
        assert raw.reply(last, 15)['failure'] is None
        svc.service.wait_for_log('ignoring duplicate message id')
    finally:
        raw.close()
    lines = svc.service.log()[offset:].splitlines()
    assert any('RPC method nosuch\\n2026-12-04' in line for line in lines)
    assert any('duplicate message id\\n2026-12-04' in line for line in lines)
    for line in lines:
        assert svc.own_line(line), f'a line the caller started: {line!r}'


def test_the_whole_log_has_no_error_and_no_line_a_caller_started(svc):
    # after the tests above (module order): every line is a log record
    # of its own, none is an ERROR
    for line in svc.service.log().splitlines():
        assert svc.own_line(line), f'a line the caller started: {line!r}'
        match = LINE_RE.match(line)
        if match and match['logger'].startswith('scrub_listener'):
            assert match['level'] in ('INFO', 'WARNING'), line


def test_the_configured_roles_are_what_the_service_requires(
    tmp_path, module_vhost, module_glance_mysql, services
):
    """``[rpc] client_roles``: the admin tools present it, the service
    requires every role in it."""
    world = sf.make_world(tmp_path, module_vhost, module_glance_mysql)
    sections = world.config(
        scrub_time=3600, extra={'rpc': {'client_roles': 'scrub-admin'}}
    )
    service = services(sections, env=world.env())
    image_id = world.pending()
    denied = world.config(scrub_time=3600)  # client_roles = admin
    denied_file = sf.write_service_config(tmp_path / 'admin.conf', denied)

    rc, out, err, _ = sf.run_cli(['restore', image_id], denied_file)
    assert rc == 9, err
    assert err.startswith('ERROR: restore needs the admin role'), err
    service.wait_for_log(
        rf'Refused restore of {image_id} for .*: '
        r"not admin \(roles \['admin'\]\)"
    )

    rc, out, err, _ = sf.run_cli(['restore', image_id], service.config_file)
    assert rc == 0, err
    assert sf.image_statuses(world.glance_url, [image_id]) == {
        image_id: 'active'
    }


# --------------------------------------- the README's broker permissions


def readme_permissions():
    """[(configure, write, read)] of the README's set_permissions lines:
    first the RPC vhost's, then the notification vhost's."""
    path = os.path.join(os.path.dirname(__file__), '../../README.md')
    with open(path) as f:
        text = f.read()
    section = text.split('## RPC trust model', 1)[1].split('\n## ', 1)[0]
    commands = section.replace('\\\n', ' ').splitlines()
    return [
        tuple(shlex.split(line)[-3:])
        for line in commands
        if line.startswith('rabbitmqctl set_permissions')
    ]


@pytest.fixture
def broker_user():
    """Factory ``(vhost, (configure, write, read))`` -> rabbit URL of a
    fresh user holding those rights there; the user is deleted after."""
    name = harness.unique_name('sl_test_user_')
    password = uuid.uuid4().hex
    harness._rabbitmqctl('add_user', name, password)

    def grant(vhost, permissions):
        harness._rabbitmqctl(
            'set_permissions', '-p', vhost, name, *permissions
        )
        return f'rabbit://{name}:{password}@127.0.0.1:5672/{vhost}'

    yield grant
    harness._rabbitmqctl('delete_user', name)


@pytest.fixture
def rpc_vhost():
    name, _ = harness.create_vhost()
    yield name
    harness.delete_vhost(name)


def test_the_readme_permissions_run_the_service_and_its_admin_tools(
    tmp_path, vhost, rpc_vhost, module_glance_mysql, broker_user, services
):
    """RPC on a vhost of its own, notifications on Glance's, one user with
    exactly the README's rights on each: the service starts, scrubs what
    glance-api announces, and the admin tools restore through it."""
    rpc_rights, notify_rights = readme_permissions()
    rpc_url = broker_user(rpc_vhost, rpc_rights)
    notify_url = broker_user(vhost.name, notify_rights)
    world = sf.make_world(tmp_path, vhost, module_glance_mysql)
    sections = world.config(transport_url=rpc_url)
    # the default names the README's regexes are written for
    sections['listener']['pool'] = 'scrub-listener'
    sections['rpc']['topic'] = 'scrub-listener-api'
    sections['oslo_messaging_notifications'] = {'transport_url': notify_url}
    service = services(sections, env=world.env())

    scrubbed = world.pending()
    vhost.publisher.image_delete(scrubbed)  # as glance-api, on its vhost
    world.wait_scrubbed([scrubbed], 30, service)
    restored = world.pending()
    rc, out, err, _ = sf.run_cli(['restore', restored], service.config_file)
    assert rc == 0, err
    assert sf.image_statuses(world.glance_url, [restored]) == {
        restored: 'active'
    }
    # and those rights are all it has: no other queue on the RPC vhost
    with kombu.Connection(harness.amqp_url(rpc_url)) as conn:
        with pytest.raises(conn.channel_errors, match='ACCESS_REFUSED'):
            kombu.Queue('other', durable=False)(conn.channel()).declare()
