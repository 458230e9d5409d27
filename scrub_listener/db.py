"""SQLAlchemy engines for the Glance database and the due-queue database.

Both sides of every race in scrub-listener (two scrubbers, a scrub and a
restore) serialise on row locks taken with ``SELECT ... FOR UPDATE`` inside
one transaction.  MariaDB and PostgreSQL give us real row locks.  SQLite has
no row locks and ignores ``FOR UPDATE``; there every transaction is started
with ``BEGIN IMMEDIATE`` instead, which takes the database write lock up
front, so a transaction that reads-then-writes can never be interleaved
with another writer (and never hits SQLITE_BUSY on lock upgrade).
"""

import contextlib
import logging

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc

from scrub_listener import exceptions

LOG = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT = 30  # seconds a writer waits for the SQLite lock


def create_engine(url, name):
    """Return an Engine for ``url``; ``name`` says which DB in errors."""
    try:
        parsed = sa.engine.make_url(url)
    except sa_exc.ArgumentError as exc:
        raise exceptions.ConfigError(
            f'{name} connection URL is not valid: {exc}'
        ) from exc
    if parsed.get_backend_name() == 'sqlite':
        engine = sa.create_engine(
            parsed,
            connect_args={
                'timeout': SQLITE_BUSY_TIMEOUT,
                'check_same_thread': False,
            },
        )
        _begin_immediate(engine)
        return engine
    options = {}
    if parsed.get_backend_name() == 'mysql':
        # Correctness rests on row locks (FOR UPDATE), never on snapshots;
        # REPEATABLE READ only adds gap locks, i.e. deadlocks between
        # instances claiming from one queue.
        options['isolation_level'] = 'READ COMMITTED'
    try:
        return sa.create_engine(
            parsed, pool_pre_ping=True, pool_size=10, **options
        )
    except (ImportError, sa_exc.NoSuchModuleError) as exc:
        raise exceptions.ConfigError(
            f'{name} connection URL names a missing driver: {exc}'
        ) from exc


def _begin_immediate(engine):
    # pysqlite's own transaction handling would BEGIN lazily (DEFERRED) at
    # the first write; take control of BEGIN so it is IMMEDIATE.
    @event.listens_for(engine, 'connect')
    def _connect(dbapi_conn, record):
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, 'begin')
    def _begin(conn):
        conn.exec_driver_sql('BEGIN IMMEDIATE')


def is_sqlite(engine):
    return engine.dialect.name == 'sqlite'


@contextlib.contextmanager
def translate_errors(name, url):
    """Turn a lost/unreachable database into DatabaseUnavailable."""
    try:
        yield
    except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
        if exc.connection_invalidated or _is_connect_error(exc):
            safe_url = sa.engine.make_url(url).render_as_string(
                hide_password=True
            )
            raise exceptions.DatabaseUnavailable(
                f'cannot reach the {name} ({safe_url}): {exc.orig}'
            ) from exc
        raise


def _is_connect_error(exc):
    text = str(exc.orig).lower()
    return any(
        marker in text
        for marker in (
            "can't connect",
            'connection refused',
            'could not connect',
            'unable to open database',
            'unknown database',
            'does not exist',
            'access denied',
            'server closed the connection',
            'lost connection',
            'gone away',
            'timeout expired',
        )
    )


def is_deadlock(exc):
    """True for a lock conflict the transaction should simply retry."""
    text = str(getattr(exc, 'orig', exc)).lower()
    return 'deadlock' in text or 'lock wait timeout' in text


def with_deadlock_retry(func, attempts=5):
    """Run ``func()``; rerun it when the database reports a deadlock.

    Deadlocks are possible when two workers lock overlapping sets of rows;
    we lock in primary key order to make them rare, and retry when the
    database still picks us as the victim (it rolled our work back).
    """
    for attempt in range(1, attempts + 1):
        try:
            return func()
        except sa_exc.OperationalError as exc:
            if attempt == attempts or not is_deadlock(exc):
                raise
            LOG.debug('Deadlock, retrying (%d/%d)', attempt, attempts)
    raise AssertionError('unreachable')
