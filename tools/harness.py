"""Real services for tests and benchmarks: Glance databases, glance-api,
RabbitMQ vhosts.

Plain Python (no pytest), so the pytest fixtures in ``tests/conftest.py``
and the benchmark scripts under ``tools/`` share one implementation.

Everything created here has a unique name (``sl_test_<hex8>``) and is meant
to be dropped again by the caller, because the database and message servers
are shared with other sessions and with CI.

Databases::

    url = create_glance_database('postgresql')  # real `glance-manage db_sync`
    truncate_glance_tables(url)                  # rows of images + children
    drop_database(url)
    url = create_empty_database('mysql')         # no schema at all

glance-api (glance 33.0.0 under gunicorn, no keystone, admin context)::

    with GlanceApi(url, workdir, transport_url=..., encryption_key=...) as api:
        image_id = api.create_image('name', b'data', os_distro='x',
                                    tags=['t'])
        api.delete_image(image_id)

RabbitMQ::

    vhost, transport_url = create_vhost()
    delete_vhost(vhost)

Server addresses can be overridden with ``SCRUB_LISTENER_TEST_MYSQL_URL``,
``SCRUB_LISTENER_TEST_POSTGRESQL_URL`` (both SQLAlchemy URLs of a database
the admin connection may use) and ``SCRUB_LISTENER_TEST_RABBIT_URL``.
"""

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid

import requests
import sqlalchemy as sa
from sqlalchemy import pool

BACKENDS = ('sqlite', 'mysql', 'postgresql')

MYSQL_URL = os.environ.get(
    'SCRUB_LISTENER_TEST_MYSQL_URL',
    'mysql+pymysql://root@127.0.0.1:3306/?charset=utf8mb4',
)
POSTGRESQL_URL = os.environ.get(
    'SCRUB_LISTENER_TEST_POSTGRESQL_URL',
    'postgresql+psycopg2://postgres@127.0.0.1:5432/postgres',
)
RABBIT_URL = os.environ.get(
    'SCRUB_LISTENER_TEST_RABBIT_URL', 'rabbit://guest:guest@127.0.0.1:5672/'
)

#: Prefix of every database, vhost and temp dir this module creates.
NAME_PREFIX = 'sl_test_'

#: Tables of the Glance schema the project relies on.
GLANCE_IMAGE_TABLES = (
    'images',
    'image_locations',
    'image_properties',
    'image_tags',
    'image_members',
)

_START_HINTS = {
    'mysql': 'start-stop-daemon --start --oknodo --background '
    '--exec /usr/sbin/mariadbd',
    'postgresql': 'pg_ctlcluster --skip-systemctl-redirect '
    '$(ls /etc/postgresql) main start',
    'rabbit': 'rabbitmq-server -detached',
}


class HarnessError(Exception):
    """A test service is missing, misbehaves, or answered unexpectedly."""


def unique_name(prefix=NAME_PREFIX):
    """Return ``<prefix><8 hex chars>``, usable as a DB or vhost name."""
    return prefix + uuid.uuid4().hex[:8]


def _bin(name):
    """Path of a console script installed next to the running python."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if not found:
        raise HarnessError(f'{name} not found next to {sys.executable}')
    return found


# ---------------------------------------------------------------- databases


def _admin_url(backend):
    if backend == 'mysql':
        return sa.engine.make_url(MYSQL_URL)
    if backend == 'postgresql':
        return sa.engine.make_url(POSTGRESQL_URL)
    raise HarnessError(f'no server for backend {backend!r}')


def _url_string(url):
    return url.render_as_string(hide_password=False)


def _engine(url, **kwargs):
    return sa.create_engine(url, poolclass=pool.NullPool, **kwargs)


def _mysql_fix_root_login():
    """Let root log in over TCP with an empty password (see NOTES.md).

    MariaDB on Debian sets root up for unix_socket auth only.  Done only
    after a TCP login failed with "access denied", through the local socket
    (needs the OS root user); a no-op where the login already works.
    """
    client = shutil.which('mariadb') or shutil.which('mysql')
    if not client:
        return False
    sql = (
        "ALTER USER 'root'@'localhost' IDENTIFIED VIA "
        "mysql_native_password USING PASSWORD('')"
    )
    proc = subprocess.run(
        [client, '-uroot', '-e', sql],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.returncode == 0


_checked = set()
_checked_lock = threading.Lock()


def check_backend(backend):
    """Raise HarnessError with a clear message if ``backend`` is unusable.

    Checked once per process and backend.  For MariaDB an "access denied"
    for root over TCP is repaired once (see ``_mysql_fix_root_login``).
    """
    if backend not in BACKENDS:
        raise HarnessError(
            f'unknown backend {backend!r}; expected one of {BACKENDS}'
        )
    if backend == 'sqlite' or backend in _checked:
        return
    with _checked_lock:
        if backend in _checked:
            return
        url = _admin_url(backend)
        for attempt in (1, 2):
            try:
                with _engine(url).connect() as conn:
                    conn.execute(sa.text('SELECT 1'))
                break
            except sa.exc.OperationalError as exc:
                text = str(exc.orig)
                denied = 'Access denied' in text or '1698' in text
                if (
                    backend == 'mysql'
                    and denied
                    and attempt == 1
                    and _mysql_fix_root_login()
                ):
                    continue
                raise HarnessError(
                    f'{backend} server at {url.host}:{url.port} is not '
                    f'usable ({text.strip()}). Tests need it running; '
                    f'start it with: {_START_HINTS[backend]}'
                ) from exc
        _checked.add(backend)


def _server_execute(backend, *statements):
    """Run statements on the server's admin connection in autocommit."""
    check_backend(backend)
    engine = _engine(_admin_url(backend), isolation_level='AUTOCOMMIT')
    with engine.connect() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))


def _new_database(backend, name):
    """Create an empty database ``name``; return its URL string."""
    if backend == 'sqlite':
        tmpdir = tempfile.mkdtemp(prefix=name + '_')
        return f'sqlite:///{os.path.join(tmpdir, name + ".db")}'
    if backend == 'mysql':
        _server_execute(
            backend,
            f'CREATE DATABASE `{name}` CHARACTER SET utf8mb4 '
            'COLLATE utf8mb4_general_ci',
        )
    else:
        _server_execute(backend, f'CREATE DATABASE "{name}"')
    return _url_string(_admin_url(backend).set(database=name))


def create_empty_database(backend):
    """Create a uniquely named database without any table; return its URL.

    sqlite: a not yet existing file in a new temp dir, e.g.
    ``sqlite:////tmp/sl_test_1a2b3c4d_xyz/sl_test_1a2b3c4d.db``;
    mysql: ``mysql+pymysql://root@127.0.0.1:3306/NAME?charset=utf8mb4``;
    postgresql: ``postgresql+psycopg2://postgres@127.0.0.1:5432/NAME``.
    """
    check_backend(backend)
    return _new_database(backend, unique_name())


def backend_of(url):
    """'sqlite', 'mysql' or 'postgresql' for a SQLAlchemy URL."""
    name = sa.engine.make_url(url).get_backend_name()
    if name not in BACKENDS:
        raise HarnessError(f'unsupported database URL {url}')
    return name


def drop_database(url):
    """Drop a database made by this module (sqlite: remove file + dir).

    Idempotent.  PostgreSQL uses ``WITH (FORCE)`` so connections leaked by
    a crashed test (or a still running glance-api) do not block the drop.
    """
    url = sa.engine.make_url(url)
    backend = backend_of(url)
    name = url.database
    if backend == 'sqlite':
        if not name:
            return
        for suffix in ('', '-journal', '-wal', '-shm'):
            try:
                os.unlink(name + suffix)
            except FileNotFoundError:
                pass
        parent = os.path.dirname(name)
        if os.path.basename(parent).startswith(NAME_PREFIX):
            shutil.rmtree(parent, ignore_errors=True)
        return
    if not name or not name.startswith(NAME_PREFIX):
        raise HarnessError(f'refusing to drop {name!r}: not made by harness')
    if backend == 'mysql':
        _server_execute(backend, f'DROP DATABASE IF EXISTS `{name}`')
    else:
        _server_execute(backend, f'DROP DATABASE IF EXISTS "{name}" (FORCE)')


def db_sync(url):
    """Run the real ``glance-manage db_sync`` against ``url``.

    Raises HarnessError with the command output on failure; returns the
    elapsed seconds.
    """
    with tempfile.TemporaryDirectory(prefix=NAME_PREFIX) as tmp:
        conf = os.path.join(tmp, 'glance-manage.conf')
        write_config(conf, {'database': {'connection': url}})
        started = time.monotonic()
        proc = subprocess.run(
            [_bin('glance-manage'), '--config-file', conf, 'db_sync'],
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(os.environ, PYTHONWARNINGS='ignore'),
        )
        elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise HarnessError(
            f'glance-manage db_sync failed for {url} '
            f'(exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}'
        )
    return elapsed


# Template cache: one db_sync per backend per process, then copies.
# Measured on 2 cores: db_sync 1.4 s (sqlite), 1.6 s (mysql), 1.4 s
# (postgresql), mostly process start + glance imports; a copy takes
# <0.01 s (sqlite), 0.07 s (mysql), 0.03 s (postgresql).
_templates = {}
_templates_lock = threading.Lock()


def _template(backend):
    with _templates_lock:
        if backend not in _templates:
            name = unique_name(NAME_PREFIX + 'tmpl_')
            url = _new_database(backend, name)
            try:
                db_sync(url)
            except BaseException:
                drop_database(url)
                raise
            _templates[backend] = url
        return _templates[backend]


@atexit.register
def drop_templates():
    """Drop the per-process template databases (also run at exit)."""
    with _templates_lock:
        while _templates:
            _, url = _templates.popitem()
            try:
                drop_database(url)
            except Exception as exc:
                print(f'harness: could not drop {url}: {exc}', file=sys.stderr)


def _copy_mysql(template, name):
    """Copy schema + rows of MariaDB database ``template`` into ``name``."""
    engine = _engine(_admin_url('mysql'), isolation_level='AUTOCOMMIT')
    with engine.connect() as conn:
        tables = [
            row[0]
            for row in conn.execute(
                sa.text(
                    'SELECT table_name FROM information_schema.tables '
                    'WHERE table_schema = :db'
                ),
                {'db': template},
            )
        ]
        conn.execute(
            sa.text(
                f'CREATE DATABASE `{name}` CHARACTER SET utf8mb4 '
                'COLLATE utf8mb4_general_ci'
            )
        )
        # why: with FK checks off, tables can be created in any order; the
        # REFERENCES clauses of SHOW CREATE TABLE are unqualified, so they
        # point into the new database after USE.
        conn.execute(sa.text('SET SESSION foreign_key_checks = 0'))
        conn.execute(sa.text(f'USE `{name}`'))
        for table in tables:
            ddl = conn.execute(
                sa.text(f'SHOW CREATE TABLE `{template}`.`{table}`')
            ).fetchone()[1]
            conn.execute(sa.text(ddl))
            conn.execute(
                sa.text(
                    f'INSERT INTO `{name}`.`{table}` '
                    f'SELECT * FROM `{template}`.`{table}`'
                )
            )


def create_glance_database(backend, cache=True):
    """Create a uniquely named database with the real Glance schema.

    The schema comes from ``glance-manage db_sync`` (glance 33.0.0).  With
    ``cache`` (default), db_sync runs once per backend and process into a
    template database, and each call copies it: sqlite copies the file,
    PostgreSQL uses ``CREATE DATABASE ... TEMPLATE``, MariaDB replays
    ``SHOW CREATE TABLE`` and copies the rows (only ``alembic_version``
    has any).  Templates are dropped at interpreter exit.

    Returns the SQLAlchemy URL (see ``create_empty_database``).
    """
    check_backend(backend)
    name = unique_name()
    if not cache:
        url = _new_database(backend, name)
        try:
            db_sync(url)
        except BaseException:
            drop_database(url)
            raise
        return url
    template = _template(backend)
    if backend == 'sqlite':
        url = _new_database(backend, name)
        shutil.copyfile(
            sa.engine.make_url(template).database,
            sa.engine.make_url(url).database,
        )
        return url
    template_name = sa.engine.make_url(template).database
    if backend == 'postgresql':
        _server_execute(
            backend, f'CREATE DATABASE "{name}" TEMPLATE "{template_name}"'
        )
    else:
        try:
            _copy_mysql(template_name, name)
        except BaseException:
            _server_execute(backend, f'DROP DATABASE IF EXISTS `{name}`')
            raise
    return _url_string(_admin_url(backend).set(database=name))


_delete_order = {}


def _image_tables_in_delete_order(conn):
    """``images`` and every table depending on it, children first."""
    meta = sa.MetaData()
    meta.reflect(conn)
    wanted = {'images'}
    changed = True
    while changed:
        changed = False
        for table in meta.tables.values():
            if table.name in wanted:
                continue
            for fk in table.foreign_keys:
                if fk.column.table.name in wanted:
                    wanted.add(table.name)
                    changed = True
                    break
    return [t.name for t in reversed(meta.sorted_tables) if t.name in wanted]


def truncate_glance_tables(url):
    """Delete all rows of ``images`` and of every table with an FK to it.

    (image_locations, image_properties, image_tags, image_members; found
    by reflection, so tables added by later migrations are covered.)
    Lets a session-scoped Glance database be reused by each test.
    """
    engine = _engine(url)
    with engine.begin() as conn:
        if url not in _delete_order:
            _delete_order[url] = _image_tables_in_delete_order(conn)
        for table in _delete_order[url]:
            conn.execute(sa.text(f'DELETE FROM {table}'))


def fetch_all(url, sql, **params):
    """Run one SQL statement on ``url``; return the rows as dicts."""
    with _engine(url).begin() as conn:
        result = conn.execute(sa.text(sql), params)
        if not result.returns_rows:
            return []
        return [dict(row._mapping) for row in result]


def table_names(url):
    """Names of the tables in database ``url``."""
    engine = _engine(url)
    with engine.connect() as conn:
        return set(sa.inspect(conn).get_table_names())


# ------------------------------------------------------------------- config


def _format_value(value):
    if isinstance(value, bool):
        return 'True' if value else 'False'
    if isinstance(value, (list, tuple)):
        return ','.join(_format_value(v) for v in value)
    if isinstance(value, dict):
        return ','.join(f'{k}:{_format_value(v)}' for k, v in value.items())
    text = str(value)
    # oslo.config continues a value on lines that start with whitespace
    return text.replace('\n', '\n    ')


def write_config(path, sections):
    """Write an oslo.config INI file from ``{section: {option: value}}``.

    bool -> True/False, list/tuple -> comma separated (ListOpt), dict ->
    ``k:v,k2:v2`` (DictOpt), None -> option left out, multi-line strings
    as continuation lines.  Sections keep their dict order.
    """
    lines = []
    for section, options in sections.items():
        lines.append(f'[{section}]')
        for key, value in options.items():
            if value is None:
                continue
            lines.append(f'{key} = {_format_value(value)}')
        lines.append('')
    with open(path, 'w') as f:
        f.write('\n'.join(lines))
    return path


# ----------------------------------------------------------------- RabbitMQ


def _rabbitmqctl(*args):
    try:
        proc = subprocess.run(
            [shutil.which('rabbitmqctl') or '/usr/sbin/rabbitmqctl', *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except FileNotFoundError as exc:
        raise HarnessError('rabbitmqctl not found (needs root)') from exc
    if proc.returncode != 0:
        raise HarnessError(
            f'rabbitmqctl {" ".join(args)} failed (exit {proc.returncode}); '
            f'is RabbitMQ running? start it with: {_START_HINTS["rabbit"]}\n'
            f'{proc.stdout}{proc.stderr}'
        )
    return proc.stdout


def rabbit_transport_url(vhost):
    """oslo.messaging transport URL of ``vhost`` on the test broker."""
    base = RABBIT_URL.rstrip('/')
    return f'{base}/{urllib.parse.quote(vhost, safe="")}'


def amqp_url(transport_url):
    """kombu URL (``amqp://...``) for an oslo ``rabbit://`` URL."""
    return 'amqp://' + transport_url.split('://', 1)[1]


def create_vhost():
    """Create a unique vhost with full rights for the broker user.

    Returns ``(vhost_name, transport_url)``.  Each rabbitmqctl call takes
    about 0.4 s (the management plugin is not enabled here).
    """
    parsed = urllib.parse.urlsplit(RABBIT_URL)
    try:
        socket.create_connection(
            (parsed.hostname, parsed.port or 5672), timeout=5
        ).close()
    except OSError as exc:
        raise HarnessError(
            f'RabbitMQ is not reachable at {parsed.hostname}:{parsed.port} '
            f'({exc}); start it with: {_START_HINTS["rabbit"]}'
        ) from exc
    name = unique_name()
    _rabbitmqctl('add_vhost', name)
    try:
        _rabbitmqctl(
            'set_permissions',
            '-p',
            name,
            urllib.parse.unquote(parsed.username or 'guest'),
            '.*',
            '.*',
            '.*',
        )
    except BaseException:
        delete_vhost(name)
        raise
    return name, rabbit_transport_url(name)


def delete_vhost(name):
    """Delete a vhost made by ``create_vhost`` (with its queues)."""
    if not name.startswith(NAME_PREFIX):
        raise HarnessError(f'refusing to delete vhost {name!r}')
    try:
        _rabbitmqctl('delete_vhost', name)
    except HarnessError as exc:
        if 'does_not_exist' not in str(exc) and 'not exist' not in str(exc):
            raise


# --------------------------------------------------------------- glance-api

#: Policy file content that lets the keystone-less admin context do
#: everything.  ``{"default": ""}`` alone is not enough in glance 33: rules
#: without a deprecated ``rule:default`` fallback (copy_image,
#: publicize_image, fetch_image_location, stores_info_detail, ...) check
#: ``role:admin`` through ``context_is_admin`` / ``service_api``, and the
#: unauthenticated context has ``is_admin=True`` but no roles.
ALLOW_ALL_POLICY = {'default': '', 'context_is_admin': '', 'service_api': ''}


DATADIR_MARKER = '.scrub-listener-mounted'


def make_datadir(path):
    """A file store data directory as docs/store-trust.md recommends it:
    with a marker file, so that an empty store is never taken for an
    unmounted one (scrub-listener then distrusts "not found")."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, DATADIR_MARKER), 'a'):
        pass
    return str(path)


def free_port():
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def glance_paste_ini():
    """Path of the glance-api-paste.ini installed with the glance package.

    pip puts the package's ``etc/glance`` data files under
    ``<prefix>/etc/glance``.
    """
    candidates = [
        os.path.join(sys.prefix, 'etc', 'glance', 'glance-api-paste.ini'),
        '/usr/local/etc/glance/glance-api-paste.ini',
        '/usr/etc/glance/glance-api-paste.ini',
        '/etc/glance/glance-api-paste.ini',
    ]
    for path in candidates:
        if os.path.exists(path):
            return path
    raise HarnessError(f'glance-api-paste.ini not found in {candidates}')


class GlanceApi:
    """A real glance-api (glance 33.0.0) under gunicorn, for tests.

    No keystone: the default paste pipeline uses ``unauthenticated-context``,
    so every request runs as an admin context (``is_admin=True``, no
    project).  With ``enforce_new_defaults = False`` and ALLOW_ALL_POLICY
    as policy file every API call is allowed, delete included.

    Config written to ``<workdir>/etc/glance-api.conf``:
    ``[DEFAULT] delayed_delete = True``, ``enabled_backends =
    <backend_name>:file``, ``show_multiple_locations`` (default True: glance
    refuses PATCH ``/locations`` with 403 without it), optional
    ``metadata_encryption_key``; ``[glance_store] default_backend``;
    ``[<backend_name>]``, ``[os_glance_staging_store]``,
    ``[os_glance_tasks_store]`` under ``<workdir>/{images,staging,tasks}``;
    ``[oslo_messaging_notifications] driver = messagingv2`` when
    ``transport_url`` is given, else ``noop``.  ``extra_config`` is merged
    in last (``{section: {option: value}}``).

    The server log (gunicorn + glance, stdout and stderr) is
    ``<workdir>/glance-api.log``.  gunicorn runs in its own session; stop()
    signals the whole process group, so no worker survives.
    """

    def __init__(
        self,
        db_url,
        workdir,
        transport_url=None,
        encryption_key=None,
        backend_name='fs',
        *,
        extra_backends=(),
        show_multiple_locations=True,
        workers=1,
        threads=4,
        extra_config=None,
        start_timeout=60,
    ):
        if encryption_key is not None and len(encryption_key) not in (
            16,
            24,
            32,
        ):
            raise HarnessError('metadata_encryption_key must be 16/24/32 long')
        self.db_url = db_url
        self.workdir = os.path.abspath(workdir)
        self.transport_url = transport_url
        self.encryption_key = encryption_key
        self.backend_name = backend_name
        self.extra_backends = tuple(extra_backends)
        self.show_multiple_locations = show_multiple_locations
        self.workers = workers
        self.threads = threads
        self.extra_config = extra_config or {}
        self.start_timeout = start_timeout
        self.config_dir = os.path.join(self.workdir, 'etc')
        self.log_path = os.path.join(self.workdir, 'glance-api.log')
        self.port = None
        self.proc = None
        self._log = None
        self.session = requests.Session()

    # -- paths and config

    @property
    def store_dir(self):
        """filesystem_store_datadir of the default image backend."""
        return os.path.join(self.workdir, 'images')

    def store_dir_of(self, backend):
        """filesystem_store_datadir of ``backend`` (default or extra)."""
        if backend == self.backend_name:
            return self.store_dir
        return os.path.join(self.workdir, 'images-' + backend)

    @property
    def staging_dir(self):
        return os.path.join(self.workdir, 'staging')

    @property
    def url(self):
        """Base URL, e.g. ``http://127.0.0.1:41234``."""
        return f'http://127.0.0.1:{self.port}'

    @property
    def config_file(self):
        return os.path.join(self.config_dir, 'glance-api.conf')

    def config_sections(self):
        """The glance-api.conf content as ``{section: {option: value}}``."""
        b = self.backend_name
        backends = (b, *self.extra_backends)
        default = {
            'delayed_delete': True,
            'enabled_backends': [f'{name}:file' for name in backends],
            'show_multiple_locations': self.show_multiple_locations,
            'metadata_encryption_key': self.encryption_key,
            'transport_url': self.transport_url,
            'worker_self_reference_url': self.url,
            'debug': False,
        }
        sections = {
            'DEFAULT': default,
            'glance_store': {'default_backend': b},
            **{
                name: {'filesystem_store_datadir': self.store_dir_of(name)}
                for name in backends
            },
            'os_glance_staging_store': {
                'filesystem_store_datadir': self.staging_dir
            },
            'os_glance_tasks_store': {
                'filesystem_store_datadir': os.path.join(self.workdir, 'tasks')
            },
            'database': {'connection': self.db_url},
            'paste_deploy': {
                'config_file': os.path.join(
                    self.config_dir, 'glance-api-paste.ini'
                )
            },
            'oslo_policy': {
                'enforce_scope': False,
                'enforce_new_defaults': False,
                'policy_file': os.path.join(self.config_dir, 'policy.json'),
            },
            'oslo_messaging_notifications': {
                'driver': 'messagingv2' if self.transport_url else 'noop',
                'transport_url': self.transport_url,
            },
            'oslo_concurrency': {
                'lock_path': os.path.join(self.workdir, 'locks')
            },
        }
        for section, options in self.extra_config.items():
            sections.setdefault(section, {}).update(options)
        return sections

    def write_config(self):
        for sub in ('etc', 'staging', 'tasks', 'locks'):
            os.makedirs(os.path.join(self.workdir, sub), exist_ok=True)
        make_datadir(self.store_dir)
        for name in self.extra_backends:
            make_datadir(self.store_dir_of(name))
        shutil.copyfile(
            glance_paste_ini(),
            os.path.join(self.config_dir, 'glance-api-paste.ini'),
        )
        with open(os.path.join(self.config_dir, 'policy.json'), 'w') as f:
            json.dump(ALLOW_ALL_POLICY, f)
        write_config(self.config_file, self.config_sections())

    # -- process

    def start(self):
        """Start gunicorn and wait until GET /v2/images answers 200."""
        if self.proc is not None:
            raise HarnessError('glance-api already started')
        for attempt in range(3):
            self.port = free_port()
            self.write_config()
            self._spawn()
            try:
                self._wait_ready()
                return self
            except HarnessError:
                in_use = 'Address already in use' in self.log_tail()
                self.stop()
                if not in_use or attempt == 2:
                    raise
        return self

    def _spawn(self):
        env = dict(os.environ, OS_GLANCE_CONFIG_DIR=self.config_dir)
        env.setdefault('PYTHONWARNINGS', 'ignore')
        self._log = open(self.log_path, 'ab')
        cmd = [
            _bin('gunicorn'),
            '--bind',
            f'127.0.0.1:{self.port}',
            '--workers',
            str(self.workers),
            '--threads',
            str(self.threads),
            '--timeout',
            '120',
            '--graceful-timeout',
            '5',
            '--access-logfile',
            '-',
            'glance.wsgi.api:application',
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _running.add(self)

    def _wait_ready(self):
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise HarnessError(
                    f'glance-api exited with {self.proc.returncode} during '
                    f'start; log {self.log_path}:\n{self.log_tail()}'
                )
            try:
                resp = self.session.get(
                    self.url + '/v2/images', params={'limit': 1}, timeout=5
                )
                if resp.status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise HarnessError(
                    f'glance-api did not answer within {self.start_timeout}'
                    f' s; log {self.log_path}:\n{self.log_tail()}'
                )
            time.sleep(0.1)

    def stop(self, timeout=10):
        """SIGINT the process group, SIGKILL it after ``timeout`` s."""
        proc, self.proc = self.proc, None
        _running.discard(self)
        if proc is not None:
            _kill_group(proc, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        self.session.close()
        self.session = requests.Session()

    def log_tail(self, lines=60):
        try:
            with open(self.log_path, 'rb') as f:
                data = f.read()
        except FileNotFoundError:
            return ''
        text = data.decode('utf-8', 'replace')
        return '\n'.join(text.splitlines()[-lines:])

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- HTTP helpers

    def request(self, method, path, **kwargs):
        """Raw request to ``<url><path>``; returns the requests.Response."""
        kwargs.setdefault('timeout', 60)
        return self.session.request(method, self.url + path, **kwargs)

    def _check(self, resp, *expected):
        if resp.status_code not in expected:
            raise HarnessError(
                f'{resp.request.method} {resp.request.url} -> '
                f'{resp.status_code} (expected {expected}): {resp.text}'
            )
        return resp

    def create_image(self, name, data, tags=(), **props):
        """POST /v2/images (raw/bare, ``props`` as extra properties or
        image attributes such as ``visibility``), then PUT the data.

        Returns the image id; the image is ``active`` afterwards.
        """
        body = {
            'name': name,
            'disk_format': 'raw',
            'container_format': 'bare',
            'tags': list(tags),
        }
        body.update(props)
        resp = self._check(self.request('POST', '/v2/images', json=body), 201)
        image_id = resp.json()['id']
        if data is not None:
            self.upload(image_id, data)
        return image_id

    def upload(self, image_id, data):
        """PUT /v2/images/ID/file."""
        self._check(
            self.request(
                'PUT',
                f'/v2/images/{image_id}/file',
                data=data,
                headers={'Content-Type': 'application/octet-stream'},
            ),
            204,
        )

    def delete_image(self, image_id):
        """DELETE /v2/images/ID (204 expected)."""
        self._check(self.request('DELETE', f'/v2/images/{image_id}'), 204)

    def get_image(self, image_id):
        """GET /v2/images/ID as a dict, or None on 404."""
        resp = self.request('GET', f'/v2/images/{image_id}')
        if resp.status_code == 404:
            return None
        return self._check(resp, 200).json()

    def download(self, image_id):
        """GET /v2/images/ID/file -> ``(status_code, body bytes)``."""
        resp = self.request('GET', f'/v2/images/{image_id}/file')
        return resp.status_code, resp.content

    def add_tag(self, image_id, tag):
        """PUT /v2/images/ID/tags/TAG."""
        self._check(
            self.request('PUT', f'/v2/images/{image_id}/tags/{tag}'), 204
        )

    def patch(self, image_id, operations):
        """PATCH /v2/images/ID with a JSON-patch list; returns the image."""
        resp = self.request(
            'PATCH',
            f'/v2/images/{image_id}',
            data=json.dumps(operations),
            headers={
                'Content-Type': 'application/openstack-images-v2.1-json-patch'
            },
        )
        return self._check(resp, 200).json()

    def add_location(self, image_id, url, metadata=None, index='-'):
        """PATCH ``add /locations/<index>`` (needs show_multiple_locations).

        In multi-store mode glance fills ``metadata['store']`` itself from
        the URL.  The data must exist: glance reads its size from the store.
        """
        return self.patch(
            image_id,
            [
                {
                    'op': 'add',
                    'path': f'/locations/{index}',
                    'value': {'url': url, 'metadata': metadata or {}},
                }
            ],
        )

    def remove_location(self, image_id, index):
        """PATCH ``remove /locations/<index>``; returns the image.

        Glance 33 allows it only with ``show_multiple_locations = True``
        (403 otherwise), on an ``active`` image (409 otherwise) and never
        for the last location (403 "Cannot remove last location").  With
        delayed_delete the removed location row becomes ``pending_delete``
        (deleted=1) while the image stays active, and the data stays.
        """
        return self.patch(
            image_id, [{'op': 'remove', 'path': f'/locations/{index}'}]
        )

    def add_location_row(self, image_id, url, store=None):
        """INSERT a second ``active`` location for an image into the DB.

        The API cannot do it here: PATCH ``add /locations`` refuses
        ``file://`` ("Invalid location", a restricted scheme), http
        locations must pass the import host filter, and the ``copy-image``
        import fails without keystone (its task row needs an owner, the
        unauthenticated context has no project).  The URL is encrypted with
        ``encryption_key`` like glance does.  ``store`` defaults to the
        default backend.  Returns the new row id.
        """
        value = url
        if self.encryption_key:
            from glance.common import crypt

            value = crypt.urlsafe_encrypt(self.encryption_key, url)
        now = sa.func.now()
        table = sa.Table(
            'image_locations',
            sa.MetaData(),
            sa.Column('id', sa.Integer, primary_key=True),
            sa.Column('image_id', sa.String(36)),
            sa.Column('value', sa.Text),
            sa.Column('meta_data', sa.Text),
            sa.Column('status', sa.String(30)),
            sa.Column('created_at', sa.DateTime),
            sa.Column('updated_at', sa.DateTime),
            sa.Column('deleted', sa.Boolean),
        )
        with _engine(self.db_url).begin() as conn:
            result = conn.execute(
                table.insert().values(
                    image_id=image_id,
                    value=value,
                    meta_data=json.dumps(
                        {'store': store or self.backend_name}
                    ),
                    status='active',
                    created_at=now,
                    updated_at=now,
                    deleted=False,
                )
            )
            return result.inserted_primary_key[0]

    def delete_from_store(self, image_id, store=None):
        """DELETE /v2/stores/STORE/ID (multi-store "delete from store")."""
        store = store or self.backend_name
        self._check(
            self.request('DELETE', f'/v2/stores/{store}/{image_id}'), 204
        )


def _kill_group(proc, timeout):
    # why SIGINT: gunicorn's "quick shutdown"; SIGTERM waits for the
    # gthread workers' 1 s poll loop and takes ~2.5 s.
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    # why: gunicorn's master may exit before a stuck worker; the group
    # outlives it, so always sweep it with SIGKILL.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


_running = set()


@atexit.register
def stop_all_glance_apis():
    """Stop every GlanceApi still running (also run at exit)."""
    for api in list(_running):
        api.stop(timeout=5)
