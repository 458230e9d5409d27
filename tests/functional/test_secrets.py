"""Secrets never leave the process: a planted secret, grepped everywhere.

A unique secret is planted where operators keep credentials: in the
location URLs of ``pending_delete`` images (legacy S3 and Swift URLs carry
``user:key@``; a ``file://`` URL can too), in the database passwords of
``[database] connection`` / ``[scrub_queue] connection`` and in the broker
password of ``transport_url``.  Then every command an operator runs is run
as a real process, with ``debug`` on and a ``log_file``, and every output
is searched for the secret: stdout, stderr, the log file and the
due-queue's ``last_error`` column.  It must never appear, and the commands
must still do their job (exit codes, rows).

The configuration only has file stores, so the S3/Swift locations are
refused (their reason is recorded and listed) while the plain ``file://``
locations are scrubbed.
"""

import dataclasses
import datetime
import json
import os
import signal
import urllib.parse
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy import pool

from scrub_listener import exceptions
from tests.functional import service_fixtures as sf
from tests.functional.conftest import KEY
from tests.functional.conftest import MANAGE
from tests.functional.conftest import RESTORE
from tests.functional.conftest import SCRUB_LISTENER
from tests.functional.conftest import run_cli
from tools import glance_rows
from tools import harness
from tools.hooks import hook_env

glance_mysql = sf.glance_mysql
services = sf.services
vhost = sf.vhost

# oslo.messaging in this process imports eventlet-era modules that warn
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


def new_secret():
    return f'S3cr3t-{uuid.uuid4().hex}'


# ------------------------------------------------------------ the grep


class Outputs:
    """Every text a test's processes wrote, by name, for the secret grep."""

    def __init__(self):
        self.texts = []

    def add(self, name, text):
        self.texts.append((name, text or ''))

    def add_result(self, result):
        """A conftest.CliResult: its stdout and stderr."""
        what = ' '.join(os.path.basename(a) for a in result.argv[3:])
        self.add(f'stdout of {what}', result.stdout)
        self.add(f'stderr of {what}', result.stderr)
        return result

    def add_file(self, name, path):
        try:
            with open(path, encoding='utf-8', errors='replace') as f:
                self.add(name, f.read())
        except FileNotFoundError:
            self.add(name, '')

    def add_queue(self, rows):
        for row in rows:
            self.add(f'due-queue row {row["id"]}', repr(row))

    def leaks(self, secret):
        return [
            f'{name}:\n    ...{text[max(0, i - 200) : i + 80]}...'
            for name, text in self.texts
            if (i := text.find(secret)) >= 0
        ]

    def assert_clean(self, secret):
        leaks = self.leaks(secret)
        assert not leaks, 'the secret leaked in:\n' + '\n'.join(leaks)


# ---------------------------------------------- secrets in location URLs


@dataclasses.dataclass
class Planted:
    """The pending_delete images of one test, and their secret."""

    secret: str
    clean_path: str
    clean: str  # one plain file:// location: scrubbed
    mixed: str  # a file:// location and an s3:// one with credentials
    swift: str  # swift+https://user:key@..., percent-encoded user
    s3_slash: str  # legacy S3 secret key with "/" and "+" in it
    file_userinfo: str  # file://user:secret@/<store>/... (a netloc!)

    @property
    def refused(self):
        """Images whose every location is outside our (file) stores."""
        return [self.swift, self.s3_slash]


def _data_file(store_dir):
    path = os.path.join(store_dir, f'data-{uuid.uuid4().hex}')
    with open(path, 'wb') as f:
        f.write(os.urandom(1024))
    return path


def plant(engine, store_dir, key=None):
    """Create the images of a Planted in the Glance DB and the store."""
    secret = new_secret()

    def image(*urls):
        return glance_rows.make_image(
            engine,
            store_dir,
            locations=[(url, {'store': 'fs'}) for url in urls],
            deleted_at=glance_rows.utcnow() - datetime.timedelta(minutes=1),
            encrypt_key=key,
        )

    clean_path = _data_file(store_dir)
    return Planted(
        secret=secret,
        clean_path=clean_path,
        clean=image('file://' + clean_path),
        mixed=image(
            'file://' + _data_file(store_dir),
            f's3://AKIAEXAMPLE:{secret}@s3.example.com/bucket/obj',
        ),
        swift=image(
            f'swift+https://project%3Auser:{secret}%2Fx@keystone.example'
            '.com/v3/container/obj'
        ),
        s3_slash=image(
            f's3+https://AKIAEXAMPLE:ab/{secret}+cd@s3.example.com/b/o'
        ),
        file_userinfo=image(
            f'file://operator:{secret}@' + _data_file(store_dir)
        ),
    )


def _log_options(env_or_tmp, name):
    """[DEFAULT] options: everything logged, to stderr and to a file."""
    log_file = os.path.join(str(env_or_tmp), f'{name}.log')
    return log_file, {'debug': True, 'use_stderr': True, 'log_file': log_file}


@pytest.mark.parametrize('key', [None, KEY], ids=['plain', 'encrypted'])
def test_location_secrets_stay_inside(env, key):
    planted = plant(env.engine, env.store_dir, key)
    secret = planted.secret
    log_file, log_opts = _log_options(env.tmp, 'commands')
    env.configure(key=key, extra={'DEFAULT': log_opts})
    out = Outputs()

    dry = out.add_result(env.sweep('--dry-run'))
    assert dry.returncode == 0, str(dry)
    assert 'REFUSED' in dry.stdout, str(dry)

    sweep = out.add_result(env.sweep())
    # the S3/Swift locations are refused: failures, exit 1
    assert sweep.returncode == 1, str(sweep)
    assert 'Traceback' not in sweep.stderr, str(sweep)
    env.assert_scrubbed(planted.clean, paths=[planted.clean_path])
    for image_id in [planted.mixed, *planted.refused]:
        assert env.image(image_id)['status'] == 'pending_delete'

    table = out.add_result(env.manage('list'))
    assert table.returncode == 0, str(table)
    listed = out.add_result(env.manage('list', '--format', 'json'))
    assert listed.returncode == 0, str(listed)
    rows = {row['id']: row for row in json.loads(listed.stdout)}
    for image_id in [planted.mixed, *planted.refused]:
        assert rows[image_id]['state'] == 'failed', rows[image_id]
        assert rows[image_id]['last_error'], rows[image_id]
        assert f'{image_id[:8]}' in table.stdout

    before = env.snapshot(planted.swift, touched_ok=True)
    refused = out.add_result(env.restore(planted.swift))
    # its data cannot be verified: not restored, nothing changed
    assert refused.returncode == 6, str(refused)
    assert env.snapshot(planted.swift, touched_ok=True) == before
    other = out.add_result(env.restore(planted.file_userinfo))
    assert other.returncode in (5, 6), str(other)

    out.add_file('log_file', log_file)
    out.add_queue(env.queue_rows())
    assert env.queue_rows(), 'the failures must stay queued'
    out.assert_clean(secret)


# ---------------------------------- secrets in database and broker URLs


def _closed_port():
    return harness.free_port()


def _unreachable_db_urls(secret):
    port = _closed_port()
    return {
        'mysql': f'mysql+pymysql://glance:{secret}@127.0.0.1:{port}/glance',
        'postgresql': (
            f'postgresql+psycopg2://glance:{secret}@127.0.0.1:{port}/glance'
        ),
        # a password with reserved characters, percent-encoded as it must
        'encoded': (
            f'mysql+pymysql://glance:p%40ss%3A{secret}%2F@127.0.0.1:{port}/g'
        ),
    }


def _bad_db_urls(secret):
    """Invalid URLs an operator may write: a configuration error (2)."""
    port = _closed_port()
    return {
        # "@" not percent-encoded: the secret would be read as a host
        'raw-at': f'mysql+pymysql://glance:p@{secret}@127.0.0.1:{port}/g',
        'bad-port': f'mysql+pymysql://glance:{secret}@127.0.0.1:nope/g',
    }


def _db_cases():
    cases = []
    for section in ('database', 'scrub_queue'):
        for name in ('mysql', 'postgresql', 'encoded'):
            cases.append(
                pytest.param(section, name, 3, id=f'{section}-{name}')
            )
        for name in ('raw-at', 'bad-port'):
            cases.append(
                pytest.param(section, name, 2, id=f'{section}-{name}')
            )
    return cases


def _every_command(env, image_id, config):
    """Run what an operator runs; return the CliResults."""
    return [
        env.sweep(config=config),
        env.sweep('--dry-run', config=config),
        env.manage('list', config=config),
        env.manage('list', '--format', 'json', config=config),
        env.manage(*RESTORE, image_id, config=config),
    ]


@pytest.mark.parametrize(('section', 'which', 'code'), _db_cases())
def test_database_password_stays_inside(sqlite_env, section, which, code):
    env = sqlite_env
    secret = new_secret()
    urls = {**_unreachable_db_urls(secret), **_bad_db_urls(secret)}
    image_id = env.make_image()
    log_file, log_opts = _log_options(env.tmp, 'db')
    config = env.configure(
        path=str(env.tmp / 'db.conf'),
        extra={'DEFAULT': log_opts, section: {'connection': urls[which]}},
    )
    out = Outputs()

    for result in _every_command(env, image_id, config):
        out.add_result(result)
        assert result.returncode == code, str(result)
        assert len(result.error_lines) == 1, str(result)
        assert 'Traceback' not in result.stderr, str(result)
        if code == 3:
            # the URL is still named, password masked
            assert '***@127.0.0.1' in result.error_lines[0], str(result)

    assert os.path.exists(env.data_path(image_id))
    out.add_file('log_file', log_file)
    out.assert_clean(secret)


def _broker_url(secret, port=None):
    return f'rabbit://guest:{secret}@127.0.0.1:{port or _closed_port()}/'


@pytest.mark.parametrize(
    'restore', [['manage', 'restore'], ['listener', '--restore']]
)
def test_broker_password_stays_inside_when_unreachable(sqlite_env, restore):
    env = sqlite_env
    secret = new_secret()
    image_id = env.make_image()
    log_file, log_opts = _log_options(env.tmp, 'broker')
    config = env.configure(
        path=str(env.tmp / 'broker.conf'),
        extra={
            'DEFAULT': {**log_opts, 'transport_url': _broker_url(secret)},
            'rpc': {'timeout': 2, 'connect_retries': 0},
        },
    )
    binary = MANAGE if restore[0] == 'manage' else SCRUB_LISTENER
    result = run_cli([binary, '--config-file', config, restore[1], image_id])
    out = Outputs()
    out.add_result(result)

    assert result.returncode == 8, str(result)
    assert len(result.error_lines) == 1, str(result)
    assert env.image(image_id)['status'] == 'pending_delete'
    out.add_file('log_file', log_file)
    out.assert_clean(secret)


def test_broker_password_stays_inside_a_malformed_transport_url(sqlite_env):
    env = sqlite_env
    secret = new_secret()
    image_id = env.make_image()
    config = env.configure(
        path=str(env.tmp / 'badurl.conf'),
        extra={
            'DEFAULT': {
                'transport_url': f'rabbit://guest:{secret}@127.0.0.1:x/'
            },
            'rpc': {'timeout': 2, 'connect_retries': 0},
        },
    )
    out = Outputs()
    result = out.add_result(env.manage('restore', image_id, config=config))

    assert result.returncode == 2, str(result)
    assert len(result.error_lines) == 1, str(result)
    assert 'transport_url' in result.error_lines[0], str(result)
    out.assert_clean(secret)


def test_service_with_unreachable_broker(sqlite_env, services, tmp_path):
    """The service scrubs while the broker is down, and logs no password."""
    env = sqlite_env
    planted = plant(env.engine, env.store_dir)
    secret = planted.secret
    sections = env.sections(
        extra={
            'DEFAULT': {
                'transport_url': _broker_url(secret),
                'debug': True,
                'wakeup_time': 3600,
            },
            'scrubber': {'lease_time': 10},
        }
    )
    svc = services(sections, name='nobroker', start=False)
    svc.start(wait=False)
    # the start-up sweep and the drain work without the broker
    sf.wait_until(
        lambda: env.image(planted.clean)['status'] == 'deleted',
        30,
        message=svc.log_tail,
    )
    svc.wait_for_log('Failed to scrub image', 30)
    rc, _ = svc.terminate()

    assert rc == 0, svc.log_tail()
    out = Outputs()
    out.add('service log (stdout and stderr)', svc.log())
    out.add_queue(env.queue_rows())
    out.assert_clean(secret)


# ------------------------------------------ the service, on a real broker


@pytest.fixture
def secret_broker_user(vhost):
    """A RabbitMQ user with a planted-secret password on ``vhost``.

    Returns (secret, transport URL); the user is deleted after the test.
    """
    secret = new_secret()
    user = harness.unique_name('sl_test_user_')
    harness._rabbitmqctl('add_user', user, secret)
    try:
        harness._rabbitmqctl(
            'set_permissions', '-p', vhost.name, user, '.*', '.*', '.*'
        )
        base = urllib.parse.urlsplit(harness.RABBIT_URL)
        url = (
            f'rabbit://{user}:{secret}@{base.hostname}:{base.port or 5672}/'
            f'{urllib.parse.quote(vhost.name, safe="")}'
        )
        yield secret, url
    finally:
        harness._rabbitmqctl('delete_user', user)


def _queue_engine(url):
    return sa.create_engine(url, poolclass=pool.NullPool)


@pytest.mark.parametrize('key', [None, KEY], ids=['plain', 'encrypted'])
def test_service_keeps_every_secret_inside(
    tmp_path, vhost, secret_broker_user, services, glance_mysql, key
):
    """The service scrubs, fails, restores over RPC and stops: no secret.

    The broker password and the location credentials share one secret, so
    one grep covers both.
    """
    broker_secret, transport_url = secret_broker_user
    world = sf.make_world(tmp_path, vhost, glance_mysql)
    engine = _queue_engine(glance_mysql)
    try:
        planted = plant(engine, world.store_dir, key)
    finally:
        engine.dispose()
    sections = world.config(
        transport_url=transport_url,
        extra={
            'DEFAULT': {
                'debug': True,
                'metadata_encryption_key': key,
                'log_file': str(tmp_path / 'service-file.log'),
            }
        },
    )
    svc = services(sections, name='secrets', env=world.env())
    world.wait_scrubbed([planted.clean], 30, svc)
    svc.wait_for_log('Failed to scrub image', 30)

    # restore over RPC: refused (its data cannot be verified), typed
    rc, stdout, stderr, _ = sf.run_cli(
        ['restore', planted.swift], svc.config_file
    )
    assert rc == 6, stderr
    rpc_error = _rpc_restore_errors(transport_url, world.rpc_topic, planted)
    rc_list, list_out, list_err, _ = sf.run_cli(
        ['list', '--format', 'json'], svc.config_file
    )
    assert rc_list == 0, list_err
    svc.send(signal.SIGTERM)
    rc_stop, _ = svc.wait(30)
    assert rc_stop == 0, svc.log_tail()

    out = Outputs()
    for name, text in (
        ('restore stdout', stdout),
        ('restore stderr', stderr),
        ('errors returned over RPC', rpc_error),
        ('list stdout', list_out),
        ('list stderr', list_err),
        ('service stdout and stderr', svc.log()),
    ):
        out.add(name, text)
    out.add_file('service log_file', str(tmp_path / 'service-file.log'))
    out.add_queue(sf.queue_rows(sf.sqlite_queue_url(world.workdir)))
    for secret in (broker_secret, planted.secret):
        out.assert_clean(secret)


def _rpc_restore_errors(transport_url, topic, planted):
    """What restores of the planted images return over RPC, as text.

    A typed error's ``str()`` carries the server's message *and* its
    traceback (chained causes included): all of it crossed the broker.
    """
    texts = []
    with sf.RpcCaller(transport_url, topic) as caller:
        for image_id in (
            planted.s3_slash,
            planted.mixed,
            planted.file_userinfo,
        ):
            with pytest.raises(exceptions.ScrubListenerError) as info:
                caller.call('restore', image_id=image_id)
            error = info.value
            texts.append(f'{error}\n{error.kwargs!r}\n{error.args!r}')
    return '\n'.join(texts)


# --------------------------------- a store driver whose errors quote URLs

# Store drivers put URLs in their error texts: glance_store's BadStoreUri
# is "The Store URI was malformed: <uri>", credentials and all.  The
# SL_TEST_STORE_SECRET import hook (tools/hooks/sitecustomize.py) makes
# the file driver fail that way on data files named "badstore-*", quoting
# a Swift URL with the planted secret.


def _badstore_image(engine, store_dir):
    path = os.path.join(store_dir, f'badstore-{uuid.uuid4().hex}')
    with open(path, 'wb') as f:
        f.write(os.urandom(1024))
    return glance_rows.make_image(
        engine,
        store_dir,
        locations=[('file://' + path, {'store': 'fs'})],
        deleted_at=glance_rows.utcnow() - datetime.timedelta(minutes=1),
    )


def test_store_error_texts_stay_inside(sqlite_env, monkeypatch):
    env = sqlite_env
    secret = new_secret()
    for name, value in hook_env(SL_TEST_STORE_SECRET=secret).items():
        monkeypatch.setenv(name, value)
    image_id = _badstore_image(env.engine, env.store_dir)
    log_file, log_opts = _log_options(env.tmp, 'store')
    env.configure(extra={'DEFAULT': log_opts})
    out = Outputs()

    dry = out.add_result(env.sweep('--dry-run'))
    assert dry.returncode == 0, str(dry)
    restore = out.add_result(env.restore(image_id))
    # its data cannot be verified: not restored, the driver's error named
    assert restore.returncode != 0, str(restore)
    assert 'BadStoreUri' in restore.error_lines[0], str(restore)
    assert env.image(image_id)['status'] == 'pending_delete'
    sweep = out.add_result(env.sweep())
    assert sweep.returncode == 1, str(sweep)
    assert env.image(image_id)['status'] == 'pending_delete'
    listed = out.add_result(env.manage('list', '--format', 'json'))
    (row,) = json.loads(listed.stdout)
    assert 'BadStoreUri' in row['last_error'], row
    out.add_result(env.manage('list'))

    out.add_file('log_file', log_file)
    out.add_queue(env.queue_rows())
    out.assert_clean(secret)


def test_store_error_texts_stay_inside_rpc_replies(
    tmp_path, vhost, services, glance_mysql
):
    """A refused restore over RPC returns the driver's error, masked."""
    secret = new_secret()
    world = sf.make_world(tmp_path, vhost, glance_mysql)
    engine = _queue_engine(glance_mysql)
    try:
        image_id = _badstore_image(engine, world.store_dir)
    finally:
        engine.dispose()
    sections = world.config(scrub_time=3600)
    svc = services(
        sections,
        name='badstore',
        env=world.env(SL_TEST_STORE_SECRET=secret),
    )

    with sf.RpcCaller(vhost.transport_url, world.rpc_topic) as caller:
        with pytest.raises(exceptions.ScrubListenerError) as info:
            caller.call('restore', image_id=image_id)
    svc.terminate()

    out = Outputs()
    out.add('service stdout and stderr', svc.log())
    # str() of a typed RPC error: the server's message and its traceback,
    # chained causes included (store.py raises them "from None", so that
    # no driver text rides along)
    out.add('error returned over RPC (message, traceback)', str(info.value))
    out.assert_clean(secret)
    assert 'BadStoreUri' in info.value.message
