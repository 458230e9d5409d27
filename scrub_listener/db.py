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
import time

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc

from scrub_listener import exceptions
from scrub_listener import redaction
from scrub_listener import retry

LOG = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT = 30  # seconds a writer waits for the SQLite lock


def create_engine(url, name):
    """Return an Engine for ``url``; ``name`` says which DB in errors.

    No error quotes ``url``: it holds the database password.  Its
    password is registered as a secret, masked in every output.
    """
    redaction.add_url_secret(url)
    parsed = _parse(url, name)
    redaction.add_secret(parsed.password)
    # hide_parameters: statement parameters (location URLs, which may
    # hold credentials) never go into exception texts, which reach logs,
    # last_error and RPC replies, nor into SQL logging.
    if parsed.get_backend_name() == 'sqlite':
        engine = sa.create_engine(
            parsed,
            hide_parameters=True,
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
            parsed,
            pool_pre_ping=True,
            pool_size=10,
            hide_parameters=True,
            **options,
        )
    except (ImportError, sa_exc.NoSuchModuleError) as exc:
        raise exceptions.ConfigError(
            f'{name} connection URL names a missing driver: {exc}'
        ) from exc


def _parse(url, name):
    """The URL parsed; ConfigError, never quoting it, when it is not valid."""
    try:
        parsed = sa.engine.make_url(url)
    except sa_exc.ArgumentError:
        # from None, and not the parser's text: both may quote the URL.
        raise exceptions.ConfigError(
            f'{name} URL is not valid: expected '
            'dialect+driver://user:password@host:port/database'
        ) from None
    except ValueError:
        raise exceptions.ConfigError(
            f'{name} URL is not valid: its port is not a number'
        ) from None
    if '@' in (parsed.host or ''):
        # SQLAlchemy ends the password at its first "@" and takes the rest
        # for the host name, which every connection error then prints.
        raise exceptions.ConfigError(
            f'{name} URL is not valid: its password holds an "@"; '
            'percent-encode it as %40'
        )
    return parsed


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


def with_deadlock_retry(func, attempts=8, sleep=time.sleep):
    """Run ``func()``; rerun it when the database reports a deadlock.

    Deadlocks are possible when two workers lock overlapping sets of rows;
    we lock in primary key order to make them rare, and retry when the
    database still picks us as the victim (it rolled our work back).
    The victim waits a few jittered milliseconds first (growing with each
    attempt): retried at once, the same transactions meet again, and
    under load (several instances claiming from one MariaDB queue while
    notifications are enqueued) five immediate retries were not enough.
    """
    for attempt, delay in zip(
        range(1, attempts + 1),
        retry.delays(first=0.005, maximum=0.5, jitter=0.5),
        strict=False,
    ):
        try:
            return func()
        except sa_exc.OperationalError as exc:
            if attempt == attempts or not is_deadlock(exc):
                raise
            LOG.debug('Deadlock, retrying (%d/%d)', attempt, attempts)
            sleep(delay)
    raise AssertionError('unreachable')
