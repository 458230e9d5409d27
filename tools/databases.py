"""Glance databases on SQLite, MariaDB and PostgreSQL for tests and
benchmarks: the backend check, empty databases, the real schema from
``glance-manage db_sync`` (through per-process template copies),
drop, truncate and small queries.

Part of ``tools.harness`` (which re-exports it); see its docstring.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import sqlalchemy as sa
from sqlalchemy import pool

from tools.services import _START_HINTS
from tools.services import BACKENDS
from tools.services import MYSQL_URL
from tools.services import NAME_PREFIX
from tools.services import POSTGRESQL_URL
from tools.services import HarnessError
from tools.services import bin_path
from tools.services import unique_name
from tools.services import write_config

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
            [bin_path('glance-manage'), '--config-file', conf, 'db_sync'],
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


def _new_synced_database(backend, name):
    """Create database ``name`` and ``db_sync`` it; return its URL.

    Dropped again if db_sync fails (or is interrupted).
    """
    url = _new_database(backend, name)
    try:
        db_sync(url)
    except BaseException:
        drop_database(url)
        raise
    return url


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
            _templates[backend] = _new_synced_database(backend, name)
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
        return _new_synced_database(backend, name)
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
