"""Restore over RPC against the running service, and its typed errors.

One service process serves the whole module (``scrub_time`` an hour, so
nothing is scrubbed under the tests' feet); each test makes its own images
in the shared Glance database (MariaDB) and runs the real
``scrub-listener-manage`` / ``scrub-listener --restore`` against it.

Exit codes (scrub_listener/exceptions.py): 2 usage, 4 not found, 5 not
pending_delete, 6 data gone, 7 scrub in progress, 8 service unreachable,
9 not admin.
"""

import dataclasses
import json
import os
import subprocess
import time
import uuid

import kombu
import oslo_messaging
import pytest

from scrub_listener import exceptions
from tests.functional import service_fixtures as sf
from tools import glance_rows
from tools import harness
from tools.hooks import hook_env

module_vhost = sf.module_vhost
module_glance_mysql = sf.module_glance_mysql
module_service = sf.module_service
services = sf.services

# oslo.messaging in this process imports eventlet-era modules that warn
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


@dataclasses.dataclass
class RpcSetup:
    """A running service and an RPC caller on its own vhost."""

    world: sf.World
    service: sf.ScrubService
    config_file: str
    sections: dict
    workdir: str

    def config_variant(self, name, **changes):
        """A config file like the service's, with ``{section: {k: v}}``."""
        sections = {k: dict(v) for k, v in self.sections.items()}
        for section, options in changes.items():
            sections.setdefault(section, {}).update(options)
        return sf.write_service_config(
            os.path.join(self.workdir, f'{name}.conf'), sections
        )

    def manage(self, *args, config_file=None, **kwargs):
        return sf.run_cli(args, config_file or self.config_file, **kwargs)


@pytest.fixture(scope='module')
def rpc(module_service):
    yield RpcSetup(*module_service('rpc', scrub_time=3600, rpc_timeout=15))


def _pending_with_children(rpc, data):
    return rpc.world.pending(
        data=data,
        properties={'os_distro': 'cirros', 'hw_disk_bus': 'scsi'},
        tags=['t1', 't2'],
        members=['tenant-a'],
    )


def _rows(rpc, image_id):
    eng = sf.engine(rpc.world.glance_url)
    try:
        return (
            glance_rows.image_row(eng, image_id),
            glance_rows.location_rows(eng, image_id),
            {
                table: glance_rows.child_rows(eng, table, image_id)
                for table in (
                    'image_properties',
                    'image_tags',
                    'image_members',
                )
            },
        )
    finally:
        eng.dispose()


def _set_locations(rpc, image_id, **values):
    eng = sf.engine(rpc.world.glance_url)
    try:
        table = glance_rows._tables(eng)['image_locations']
        with eng.begin() as conn:
            conn.execute(
                table.update()
                .where(table.c.image_id == image_id)
                .values(**values)
            )
    finally:
        eng.dispose()


def _assert_error(result, code, *fragments, only_line=True):
    """Exit ``code`` and an ``ERROR: ...`` line holding ``fragments``.

    ``only_line``: stderr is that one line (the remote traceback
    oslo.messaging appends to a rebuilt exception is not shown); else it
    is the last line, after the driver's own log lines.
    """
    rc, out, err, _ = result
    assert rc == code, (rc, out, err)
    assert 'Traceback' not in err, err
    line = err.splitlines()[-1] if err else ''
    assert line.startswith('ERROR: '), err
    if only_line:
        assert err == line + '\n', err
    for fragment in fragments:
        assert fragment in line, err
    assert out == ''


# ------------------------------------------------------------------ success


def test_restore_over_rpc_brings_everything_back(rpc):
    data = os.urandom(8192)
    image_id = _pending_with_children(rpc, data)
    # the service knows of the deletion (a due-queue row, an hour away)
    rpc.world.publisher.image_delete(image_id)
    queue = sf.sqlite_queue_url(rpc.workdir)
    sf.wait_until(
        lambda: [r for r in sf.queue_rows(queue) if r['image_id'] == image_id],
        10,
        message=rpc.service.log_tail,
    )

    rc, out, err, took = rpc.manage('restore', image_id)

    assert rc == 0, err
    assert out == (
        f'Image {image_id} restored to active: 1 location(s), 2 properties, '
        '2 tags, 1 members brought back.\n'
    )
    print(f'\nscrub-listener-manage restore (process incl.): {took:.2f} s')
    with open(rpc.world.path(image_id), 'rb') as f:
        assert f.read() == data
    image, locations, children = _rows(rpc, image_id)
    assert (image.status, image.deleted, image.deleted_at) == (
        'active',
        False,
        None,
    )
    assert [(loc.status, loc.deleted) for loc in locations] == [
        ('active', False)
    ]
    assert {p.name: p.value for p in children['image_properties']} == {
        'os_distro': 'cirros',
        'hw_disk_bus': 'scsi',
    }
    assert sorted(t.value for t in children['image_tags']) == ['t1', 't2']
    assert [m.member for m in children['image_members']] == ['tenant-a']
    for rows in children.values():
        assert all(not r.deleted and r.deleted_at is None for r in rows)
    # the queue row is gone and the service logged who asked
    assert not [r for r in sf.queue_rows(queue) if r['image_id'] == image_id]
    log = rpc.service.log()
    assert f'Restore of image {image_id} requested by ' in log
    assert f'Restored image {image_id} for ' in log

    # RPC is at-most-once, restore must be safe to repeat: the second one
    # says clearly that the image is active.
    _assert_error(
        rpc.manage('restore', image_id),
        5,
        f'Image {image_id} is active, not pending_delete',
    )


def test_scrub_listener_restore_flag_does_the_same(rpc):
    data = os.urandom(1000)
    image_id = rpc.world.pending(data=data)
    rc, out, err, _ = sf.run_cli(
        ['--restore', image_id], rpc.config_file, binary=sf.SERVICE
    )
    assert rc == 0, err
    assert out.startswith(f'Image {image_id} restored to active: 1 location')
    assert sf.image_statuses(rpc.world.glance_url, [image_id]) == {
        image_id: 'active'
    }
    _assert_error(
        sf.run_cli(
            ['--restore', str(uuid.uuid4())],
            rpc.config_file,
            binary=sf.SERVICE,
        ),
        4,
        'No image found with ID',
    )


# ------------------------------------------------------------------- errors


def _missing_file(rpc, image_id):
    os.unlink(rpc.world.path(image_id))


def _truncated_file(rpc, image_id):
    with open(rpc.world.path(image_id), 'r+b') as f:
        f.truncate(10)


def _location_scrubbed(rpc, image_id):
    os.unlink(rpc.world.path(image_id))
    _set_locations(rpc, image_id, status='deleted')


def _scrub_running(rpc, image_id):
    # what a worker's claim leaves while it deletes the data
    _set_locations(
        rpc, image_id, status='scrubbing', updated_at=glance_rows.utcnow()
    )


@pytest.mark.parametrize(
    'damage, code, fragment',
    [
        (_missing_file, 6, 'is no longer in its store'),
        (_truncated_file, 6, 'holds 10 bytes, the image has 1024'),
        (_location_scrubbed, 6, 'locations were already scrubbed'),
        (_scrub_running, 7, 'is being scrubbed right now'),
    ],
    ids=['file-missing', 'file-truncated', 'location-scrubbed', 'scrubbing'],
)
def test_restore_refused_when_the_data_is_not_whole(
    rpc, damage, code, fragment
):
    image_id = rpc.world.pending(data=os.urandom(1024))
    damage(rpc, image_id)
    _assert_error(rpc.manage('restore', image_id), code, image_id, fragment)
    # nothing changed
    assert sf.image_statuses(rpc.world.glance_url, [image_id]) == {
        image_id: 'pending_delete'
    }


def test_restore_of_unknown_active_and_invalid_ids(rpc):
    unknown = str(uuid.uuid4())
    _assert_error(
        rpc.manage('restore', unknown), 4, f'No image found with ID {unknown}'
    )
    active = rpc.world.pending(status='active')
    _assert_error(
        rpc.manage('restore', active),
        5,
        f'Image {active} is active, not pending_delete',
    )
    _assert_error(
        rpc.manage('restore', 'not-an-id'), 2, "'not-an-id' is not a valid"
    )


def test_restore_refused_without_the_admin_role(rpc):
    image_id = rpc.world.pending()
    member = rpc.config_variant('member', rpc={'client_roles': ['member']})
    _assert_error(
        rpc.manage('restore', image_id, config_file=member),
        9,
        'restore needs the admin role',
    )
    assert sf.image_statuses(rpc.world.glance_url, [image_id]) == {
        image_id: 'pending_delete'
    }
    rpc.service.wait_for_log(
        rf'Refused restore of {image_id} for .*: '
        r"not admin \(roles \['member'\]\)"
    )


# --------------------------------------------------------- nobody answering


def test_service_not_running_fails_fast_with_8(rpc):
    image_id = rpc.world.pending()
    nobody = rpc.config_variant(
        'nobody',
        rpc={'topic': harness.unique_name('sl_test_nobody_'), 'timeout': 2},
    )
    rc, out, err, took = rpc.manage('restore', image_id, config_file=nobody)
    print(f'\nno service: exit {rc} after {took:.2f} s')
    _assert_error(
        (rc, out, err, took), 8, 'no scrub-listener service answered'
    )
    assert took < 2 + 5


def test_broker_unreachable_fails_in_bounded_time_with_8(rpc):
    """oslo.messaging's first call declares the reply queue and retries
    that forever whatever ``retry`` says; the client must still answer."""
    image_id = rpc.world.pending()
    closed = harness.free_port()
    broken = rpc.config_variant(
        'nobroker',
        DEFAULT={'transport_url': f'rabbit://guest:guest@127.0.0.1:{closed}/'},
        rpc={'timeout': 2, 'connect_retries': 0},
    )
    bound = 15
    try:
        # subprocess.run kills the command when the bound is exceeded
        result = rpc.manage(
            'restore', image_id, config_file=broken, timeout=bound
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f'still running after {bound} s', pytrace=False)
    print(f'\nbroker unreachable: exit {result[0]} after {result[3]:.2f} s')
    _assert_error(result, 8, 'is the broker up?', only_line=False)


def test_direct_restore_needs_no_service_nor_broker(rpc):
    data = os.urandom(2048)
    image_id = _pending_with_children(rpc, data)
    closed = harness.free_port()
    offline = rpc.config_variant(
        'offline',
        DEFAULT={'transport_url': f'rabbit://guest:guest@127.0.0.1:{closed}/'},
    )
    rc, out, err, took = rpc.manage(
        'restore', '--direct', image_id, config_file=offline
    )
    assert rc == 0, err
    assert out == (
        f'Image {image_id} restored to active: 1 location(s), 2 properties, '
        '2 tags, 1 members brought back.\n'
    )
    assert took < 10
    with open(rpc.world.path(image_id), 'rb') as f:
        assert f.read() == data
    assert sf.location_statuses(rpc.world.glance_url, [image_id]) == {
        image_id: ['active']
    }
    # and the running service agrees it is active now
    _assert_error(rpc.manage('restore', image_id), 5, 'is active')


# ------------------------------------------------ typed errors, in-process


@pytest.fixture
def rpc_client(rpc):
    """Factory of in-process RPC callers to the module's service."""
    callers = []

    def make(allowed=('scrub_listener.exceptions',), roles=('admin',)):
        caller = sf.RpcCaller(
            rpc.world.vhost.transport_url,
            rpc.world.rpc_topic,
            allowed=allowed,
            roles=roles,
        )
        callers.append(caller)
        return caller.call

    yield make
    for caller in callers:
        caller.close()


def test_errors_cross_the_wire_as_remote_subclasses(rpc, rpc_client):
    call = rpc_client()
    active = rpc.world.pending(status='active')
    gone = rpc.world.pending()
    os.unlink(rpc.world.path(gone))
    cases = [
        (str(uuid.uuid4()), exceptions.ImageNotFound, 4),
        (active, exceptions.NotPendingDelete, 5),
        (gone, exceptions.DataGone, 6),
    ]
    for image_id, expected, code in cases:
        with pytest.raises(expected) as info:
            call('restore', image_id=image_id)
        exc = info.value
        assert type(exc).__name__ == expected.__name__ + '_Remote'
        assert type(exc).__module__ == 'scrub_listener.exceptions_Remote'
        assert exc.exit_code == code
        assert image_id in exc.message
        assert exc.kwargs['image_id'] == image_id

    with pytest.raises(exceptions.Forbidden) as info:
        rpc_client(roles=['member'])('restore', image_id=active)
    assert type(info.value).__name__ == 'Forbidden_Remote'
    assert info.value.exit_code == 9

    # a module not allowed to cross: a plain RemoteError naming the type
    with pytest.raises(oslo_messaging.RemoteError) as info:
        rpc_client(allowed=())('restore', image_id=str(uuid.uuid4()))
    assert info.value.exc_type == 'ImageNotFound'

    # only exposed methods are callable (ExplicitRPCAccessPolicy)
    with pytest.raises(oslo_messaging.RemoteError) as info:
        call('_caller')
    assert info.value.exc_type == 'NoSuchMethod'

    status = call('status')
    assert status['scrub_time'] == 3600
    assert {'queued', 'due', 'in_progress', 'failing'} <= set(status)


def test_rpc_round_trip_time(rpc, rpc_client):
    """Not an assertion on speed: prints the restore round trip p50."""
    call = rpc_client()
    image_ids = [rpc.world.pending() for _ in range(20)]
    times = []
    for image_id in image_ids:
        started = time.monotonic()
        result = call('restore', image_id=image_id)
        times.append(time.monotonic() - started)
        assert result['image_id'] == image_id
    times.sort()
    print(
        f'\nRPC restore round trip: p50 {times[len(times) // 2] * 1000:.1f} '
        f'ms, max {times[-1] * 1000:.1f} ms'
    )
    assert set(
        sf.image_statuses(rpc.world.glance_url, image_ids).values()
    ) == {'active'}


def _restore_with_glance_db_down(tmp_path, vhost, glance_url, services):
    """(result of a restore while the Glance DB is cut, image id, proxy)."""
    proxy = sf.TcpProxy('127.0.0.1', 3306)
    world = sf.make_world(tmp_path, vhost, glance_url)
    sections = world.config(
        glance_url=proxy.url_for(glance_url), scrub_time=3600
    )
    svc = services(sections, env=world.env())
    image_id = world.pending()
    proxy.cut()
    result = sf.run_cli(['restore', image_id], svc.config_file)
    print(f'\nrestore, Glance DB down: exit {result[0]} in {result[3]:.2f} s')
    return result, image_id, proxy, svc


def test_restore_while_the_glance_database_is_down(
    tmp_path, module_vhost, module_glance_mysql, services
):
    """The service answers with an error, and restores once it is back."""
    result, image_id, proxy, svc = _restore_with_glance_db_down(
        tmp_path, module_vhost, module_glance_mysql, services
    )
    try:
        rc, out, err, _ = result
        assert rc != 0 and err.startswith('ERROR: ') and out == ''
        assert sf.image_statuses(module_glance_mysql, [image_id]) == {
            image_id: 'pending_delete'
        }
        proxy.restore()
        rc, out, err, _ = sf.run_cli(['restore', image_id], svc.config_file)
        assert rc == 0, err
        assert svc.alive()
    finally:
        proxy.close()


def test_restore_with_the_glance_database_down_exits_3(
    tmp_path, module_vhost, module_glance_mysql, services
):
    result, _, proxy, _ = _restore_with_glance_db_down(
        tmp_path, module_vhost, module_glance_mysql, services
    )
    proxy.close()
    _assert_error(result, 3, 'database')


# ------------------------------------------ a request delivered twice


class RawRpc:
    """RPC requests published with kombu, byte for byte as oslo.messaging
    18.3.1's rabbit driver sends them (envelope 2.0, ``_unique_id``,
    ``_context_*`` keys) to the control exchange ``openstack``, with our
    own reply queue: so that a test can publish one request twice.
    """

    def __init__(self, transport_url, topic):
        self.topic = topic
        self.reply_q = harness.unique_name('sl_test_reply_')
        self.connection = kombu.Connection(harness.amqp_url(transport_url))
        channel = self.connection.channel()
        # oslo.messaging replies through the default exchange, routing
        # key = the reply queue's name
        self.replies = kombu.Queue(
            self.reply_q, durable=False, auto_delete=True
        )(channel)
        self.replies.declare()
        self.producer = kombu.Producer(
            channel,
            exchange=sf.glance_exchange('openstack'),
            auto_declare=False,
        )

    def request(self, method, context=None, **args):
        """The decoded request of a call (publish it with ``send``)."""
        msg = {
            'method': method,
            'args': args,
            'version': '1.0',
            '_msg_id': uuid.uuid4().hex,
            '_reply_q': self.reply_q,
            '_timeout': None,
            '_unique_id': uuid.uuid4().hex,
        }
        context = {'user_identity': 'pytest', 'roles': ['admin']} | (
            context or {}
        )
        msg.update((f'_context_{k}', v) for k, v in context.items())
        return msg

    def send(self, msg):
        self.producer.publish(
            json.dumps(sf.envelope(msg)),
            routing_key=self.topic,
            content_type='application/json',
            content_encoding='utf-8',
        )

    def reply(self, msg, timeout, why=None):
        """The reply to ``msg`` (a dict); fails the test with ``why()``
        when none came within ``timeout`` s."""

        def answered():
            raw = self.replies.get(no_ack=True)
            if raw is None:
                return None
            body = json.loads(json.loads(raw.body)['oslo.message'])
            if body.get('_msg_id') == msg['_msg_id'] and body.get('ending'):
                return body
            return None

        body, _ = sf.wait_until(answered, timeout, message=why)
        return body

    def close(self):
        self.connection.release()


def test_a_request_delivered_twice_does_not_stop_the_rpc_server(
    tmp_path, module_vhost, module_glance_mysql, services
):
    """A publisher's retry (or a redelivery) brings the same request, with
    the same ``_unique_id``, twice.  oslo.messaging acks it and drops the
    copy; our duplicate-ack fix for the notification listener must not ack
    it a second time (that raised in the consumer and broke the RPC
    consumer: nothing answered afterwards)."""
    world = sf.make_world(tmp_path, module_vhost, module_glance_mysql)
    svc = services(world.config(scrub_time=3600), env=world.env())
    raw = RawRpc(module_vhost.transport_url, world.rpc_topic)
    try:
        first = raw.request('status')
        raw.send(first)
        reply = raw.reply(first, 15, why=svc.log_tail)
        assert reply is not None
        assert (
            reply['failure'] is None and reply['result']['scrub_time'] == 3600
        )

        raw.send(first)  # the very same request again

        image_id = world.pending()
        for method, args in (
            ('status', {}),
            ('restore', {'image_id': image_id}),
        ):
            again = raw.request(method, **args)
            raw.send(again)
            reply = raw.reply(
                again,
                15,
                why=lambda m=method: (
                    f'no answer to {m} after a duplicate:\n{svc.log_tail()}'
                ),
            )
            assert reply is not None
            assert reply['failure'] is None, reply['failure']
        assert reply['result']['image_id'] == image_id
        # the copy was seen and dropped (oslo.messaging's own log line)
        assert svc.count(r'ignoring duplicate message') == 1, svc.log_tail()
        assert 'MessageStateError' not in svc.log(), svc.log_tail()
        assert svc.alive()
    finally:
        raw.close()


def test_an_oslo_messaging_of_another_shape_stops_the_start(
    tmp_path, module_vhost, module_glance_mysql
):
    """The duplicate-ack fix checks what it relies on; the service does
    not run without it (the listener would stall again), it says why."""
    world = sf.make_world(tmp_path, module_vhost, module_glance_mysql)
    config = sf.write_service_config(
        tmp_path / 'service.conf', world.config(scrub_time=3600)
    )
    # a future oslo.messaging that caches notification ids on receipt
    rc, out, err, _ = sf.run_cli(
        [],
        config,
        timeout=60,
        env=hook_env(SL_TEST_OSLO_USE_CACHE=1),
        binary=sf.SERVICE,
    )

    assert rc == 2, err
    assert 'Traceback' not in err, err
    assert err.splitlines()[-1] == (
        'ERROR: the installed oslo.messaging is not one scrub-listener was '
        'checked against (14.0.0 to 18.3.1): NotificationAMQPListener '
        'caches ids on receipt (use_cache). Install a version in that '
        'range (see requirements.txt).'
    )
    assert 'scrub-listener started' not in err
