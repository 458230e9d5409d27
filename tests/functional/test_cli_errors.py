"""Bad configuration, unreachable databases, an operator's old config.

Every error is one ``ERROR: ...`` line on stderr naming what is wrong, a
documented exit code (2 usage/config, 3 database unreachable), no
traceback, and nothing changed.
"""

import os

import pytest

from tests.functional.conftest import MANAGE
from tests.functional.conftest import RESTORE
from tests.functional.conftest import SCRUB_LISTENER
from tests.functional.conftest import ago
from tests.functional.conftest import assert_error
from tests.functional.conftest import assert_ok
from tests.functional.conftest import assert_summary
from tests.functional.conftest import run_cli
from tools import harness


def _with(env, section, option, value):
    """Write env's config with one option set (None: removed)."""
    sections = env.sections()
    sections.setdefault(section, {})[option] = value
    if value is None:
        del sections[section][option]
    return harness.write_config(str(env.tmp / 'test.conf'), sections)


@pytest.mark.parametrize(
    ('section', 'option', 'value', 'named'),
    [
        ('DEFAULT', 'scrub_time', 'abc', 'scrub_time'),
        ('DEFAULT', 'scrub_time', '-5', 'scrub_time'),
        ('DEFAULT', 'scrub_pool_size', '0', 'scrub_pool_size'),
        (
            'DEFAULT',
            'metadata_encryption_key',
            'too-short',
            'metadata_encryption_key',
        ),
        ('database', 'connection', 'not a url', '[database] connection'),
        (
            'database',
            'connection',
            'mysql://root@127.0.0.1/glance',
            'missing driver',
        ),
        (
            'scrub_queue',
            'connection',
            'nosuchdb://x/y',
            '[scrub_queue] connection',
        ),
    ],
    ids=[
        'scrub_time-abc',
        'scrub_time-negative',
        'pool-zero',
        'key-length',
        'database-url',
        'mysqldb-not-installed',
        'queue-url',
    ],
)
def test_bad_config_value(sqlite_env, section, option, value, named):
    env = sqlite_env
    image_id = env.make_image()
    before = env.snapshot(image_id)
    conf = _with(env, section, option, value)

    result = env.sweep(config=conf)

    assert_error(result, 2, named)
    assert env.snapshot(image_id) == before
    assert os.path.exists(env.data_path(image_id))


def test_scrub_time_too_large(sqlite_env):
    """A typo'd scrub_time (99999999999 s, 3,000 years) is a config error
    naming the option, not a crash."""
    env = sqlite_env
    image_id = env.make_image()
    before = env.snapshot(image_id)
    conf = _with(env, 'DEFAULT', 'scrub_time', '99999999999')

    result = env.sweep(config=conf)

    assert env.snapshot(image_id) == before
    assert_error(result, 2, 'scrub_time')


def test_bad_config_value_in_manage(sqlite_env):
    env = sqlite_env
    conf = _with(env, 'DEFAULT', 'scrub_time', 'abc')
    image_id = env.make_image()
    assert_error(env.manage(*RESTORE, image_id, config=conf), 2, 'scrub_time')
    assert env.image(image_id)['status'] == 'pending_delete'


def test_missing_database_connection(sqlite_env):
    env = sqlite_env
    conf = _with(env, 'database', 'connection', None)
    for result in (
        env.sweep(config=conf),
        env.restore('5f0a4c3e-3b1f-4b53-9d4b-0a6f1c1e2a11', config=conf),
    ):
        assert_error(result, 2, '[database] connection')


@pytest.mark.parametrize(
    'url',
    [
        'mysql+pymysql://root@127.0.0.1:1/glance',
        'postgresql+psycopg2://postgres@127.0.0.1:1/glance',
    ],
    ids=['mysql', 'postgresql'],
)
def test_glance_db_unreachable(sqlite_env, url):
    """A closed port: exit 3 within seconds, the URL in the message (no
    password), the store untouched."""
    env = sqlite_env
    path = env.write_file(os.path.join(env.store_dir, 'keep'), b'keep')
    conf = _with(env, 'database', 'connection', url)

    results = [env.sweep(config=conf)]
    if url.startswith('mysql'):
        results += [
            env.manage('list', config=conf),
            env.restore('5f0a4c3e-3b1f-4b53-9d4b-0a6f1c1e2a11', config=conf),
        ]
    for result in results:
        assert_error(result, 3, 'Glance database', '127.0.0.1:1')
        assert result.elapsed < 20, str(result)

    assert os.path.exists(path[len('file://') :])


def test_queue_db_unreachable(sqlite_env):
    """The due-queue database is down: exit 3, the Glance rows and the
    store untouched."""
    env = sqlite_env
    image_id = env.make_image()
    before = env.snapshot(image_id)
    conf = _with(
        env,
        'scrub_queue',
        'connection',
        'postgresql+psycopg2://postgres@127.0.0.1:1/queue',
    )

    for result in (env.sweep(config=conf), env.manage('list', config=conf)):
        assert_error(result, 3, 'due-queue database', '127.0.0.1:1')

    assert env.snapshot(image_id) == before
    assert os.path.exists(env.data_path(image_id))


def test_glance_db_does_not_exist(sqlite_env):
    """Reachable server, no such database."""
    env = sqlite_env
    for backend in ('mysql', 'postgresql'):
        url = harness._admin_url(backend).set(database='sl_test_nosuchdb')
        conf = _with(
            env, 'database', 'connection', url.render_as_string(False)
        )
        result = env.sweep(config=conf)
        assert_error(result, 3, 'Glance database', 'sl_test_nosuchdb')


def test_database_without_glance_tables(sqlite_env, queue_db_url):
    """[database] connection points at some other (empty) database."""
    env = sqlite_env
    conf = _with(env, 'database', 'connection', queue_db_url)

    result = env.sweep(config=conf)

    assert_error(result, 2, '"images" table', 'glance-manage db_sync')

    assert harness.table_names(queue_db_url) == set()


@pytest.mark.parametrize(
    ('section', 'option', 'value'),
    [
        ('DEFAULT', 'enabled_backends', 'fs:nosuchstore'),
        ('glance_store', 'default_backend', 'nope'),
    ],
    ids=['unknown-type', 'unknown-default-backend'],
)
def test_unknown_store_backend(sqlite_env, section, option, value):
    env = sqlite_env
    image_id = env.make_image()
    before = env.snapshot(image_id)
    conf = _with(env, section, option, value)

    result = env.sweep(config=conf)

    assert_error(result, 2, '[glance_store]')
    assert env.snapshot(image_id) == before
    assert os.path.exists(env.data_path(image_id))


def test_state_path_not_creatable(sqlite_env):
    env = sqlite_env
    blocker = env.tmp / 'a-file'
    blocker.write_text('')
    conf = _with(env, 'DEFAULT', 'state_path', str(blocker / 'state'))

    result = env.sweep(config=conf)

    assert_error(result, 2, '[scrub_queue] connection', 'cannot create')


def test_config_file_missing_or_unparsable(sqlite_env):
    env = sqlite_env
    missing = env.tmp / 'nope.conf'
    assert_error(env.sweep(config=missing), 2, 'config files', str(missing))
    broken = env.tmp / 'broken.conf'
    broken.write_text('scrub_time = 5\n[DEFAULT\n')
    assert_error(env.manage('list', config=broken), 2)


def test_usage_errors(sqlite_env):
    env = sqlite_env
    conf = env.config_file
    assert_error(
        run_cli([SCRUB_LISTENER, '--config-file', conf, '--dry-run']),
        2,
        '--dry-run',
    )
    assert_error(
        run_cli(
            [
                SCRUB_LISTENER,
                '--config-file',
                conf,
                '--sweep-once',
                '--restore',
                '5f0a4c3e-3b1f-4b53-9d4b-0a6f1c1e2a11',
            ]
        ),
        2,
        '--restore',
    )
    no_command = run_cli([MANAGE, '--config-file', conf])
    assert no_command.returncode == 2, str(no_command)
    assert 'Traceback' not in no_command.stderr
    bad_time = env.manage('list', '--deleted-since', 'yesterday')
    assert bad_time.returncode == 2, str(bad_time)
    assert 'Traceback' not in bad_time.stderr
    assert '--deleted-since' in bad_time.stderr


# ------------------------------------------- an operator's real config


def _glance_scrubber_conf(env, single_store):
    """A glance-scrubber.conf as operators have it: the sample's sections
    plus the usual extras, most of which scrub-listener does not use."""
    d = env.tmp
    sections = {
        'DEFAULT': {
            'debug': True,
            'log_file': str(d / 'log' / 'glance-scrubber.log'),
            'daemon': False,
            'wakeup_time': 300,
            'scrub_time': 43200,
            'scrub_pool_size': 4,
            'delayed_delete': True,
            'image_cache_dir': str(d / 'image-cache'),
            'show_multiple_locations': False,
            'digest_algorithm': 'sha256',
        },
        'database': {
            'connection': env.glance_url,
            'max_retries': -1,
            'retry_interval': 10,
            'connection_recycle_time': 3600,
            'max_pool_size': 5,
        },
        'glance_store': {},
        'os_glance_staging_store': {
            'filesystem_store_datadir': str(d / 'staging')
        },
        'os_glance_tasks_store': {
            'filesystem_store_datadir': str(d / 'tasks')
        },
        'oslo_concurrency': {'lock_path': str(d / 'locks')},
        'oslo_policy': {'policy_file': 'policy.yaml'},
        'os_brick': {'lock_path': str(d / 'locks')},
    }
    if single_store:
        sections['glance_store'] = {
            'stores': 'file,http',
            'default_store': 'file',
            'filesystem_store_datadir': env.store_dir,
        }
    else:
        sections['DEFAULT']['enabled_backends'] = 'fs:file'
        sections['glance_store'] = {'default_backend': 'fs'}
        sections['fs'] = {
            'filesystem_store_datadir': env.store_dir,
            'filesystem_store_file_perm': 0,
        }
    os.makedirs(d / 'log', exist_ok=True)
    return harness.write_config(str(d / 'glance-scrubber.conf'), sections)


@pytest.mark.parametrize(
    'single_store', [True, False], ids=['single-store', 'multi-store']
)
def test_operator_glance_scrubber_conf_loads_unchanged(
    sqlite_env, single_store
):
    """The operator's glance-scrubber.conf, not edited.  Only
    ``state_path`` (where our due-queue lives; no glance-scrubber
    equivalent) comes from a second file, so the test does not write
    into /var/lib on a shared machine."""
    env = sqlite_env
    old_conf = _glance_scrubber_conf(env, single_store)
    ours = harness.write_config(
        str(env.tmp / 'scrub-listener.local.conf'),
        {
            'DEFAULT': {'state_path': env.state_path},
            'scrub_queue': {'connection': env.queue_url},
        },
    )
    due = env.make_image(deleted_at=ago(13 * 3600), backend=None)
    not_due = env.make_image(deleted_at=ago(3600), backend=None)
    both = ['--config-file', old_conf, '--config-file', ours]

    result = assert_ok(run_cli([SCRUB_LISTENER, *both, '--sweep-once']))

    assert not result.error_lines, str(result)
    assert_summary(result, scrubbed=1, failed=0)
    env.assert_scrubbed(due)
    assert env.image(not_due)['status'] == 'pending_delete'
    assert os.path.exists(env.data_path(not_due))
    with open(env.tmp / 'log' / 'glance-scrubber.log') as f:
        log = f.read()
    assert f'Scrubbed image {due}' in log
    assert ' DEBUG ' in log
    listing = assert_ok(
        run_cli([MANAGE, *both, 'list', '--format', 'json'])
    ).stdout
    assert not_due in listing
    assert due not in listing
