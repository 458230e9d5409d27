"""scrub_listener.db: engines, SQLite BEGIN IMMEDIATE, deadlock retry."""

import logging

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc

from scrub_listener import db
from scrub_listener import exceptions
from scrub_listener import redaction


def _operational(text):
    return sa_exc.OperationalError('SELECT 1', {}, Exception(text))


@pytest.mark.parametrize(
    'url', ['not a url', 'nosuchdialect://x/y', 'mysql+nosuchdriver://x/y']
)
def test_bad_urls_are_config_errors(url):
    with pytest.raises(exceptions.ConfigError) as info:
        db.create_engine(url, '[database] connection')
    assert '[database] connection' in str(info.value)


def test_sqlite_transactions_begin_immediate(tmp_path):
    engine = db.create_engine(f'sqlite:///{tmp_path / "x.db"}', 'test')
    statements = []
    event.listen(
        engine,
        'before_cursor_execute',
        lambda conn, cursor, statement, *args: statements.append(statement),
    )
    with engine.begin() as conn:
        conn.execute(sa.text('CREATE TABLE t (x INTEGER)'))
    with engine.connect() as conn:
        conn.execute(sa.text('SELECT * FROM t')).all()
    assert statements.count('BEGIN IMMEDIATE') == 2
    engine.dispose()


def test_sqlite_second_writer_waits_for_the_first(tmp_path):
    # BEGIN IMMEDIATE takes the write lock up front: a second writer
    # cannot even start its transaction while the first one is open.
    engine = db.create_engine(f'sqlite:///{tmp_path / "x.db"}', 'test')
    other = sa.create_engine(
        f'sqlite:///{tmp_path / "x.db"}', connect_args={'timeout': 0.1}
    )
    with engine.begin() as conn:
        conn.execute(sa.text('CREATE TABLE t (x INTEGER)'))
    with engine.begin() as conn:
        conn.execute(sa.text('SELECT * FROM t')).all()  # reads only
        with other.connect() as second:
            with pytest.raises(sa_exc.OperationalError, match='locked'):
                second.execute(sa.text('INSERT INTO t VALUES (1)'))
                second.commit()
    engine.dispose()
    other.dispose()


@pytest.mark.parametrize(
    'text',
    [
        '(1213, Deadlock found when trying to get lock)',
        'deadlock detected',
        '(1205, Lock wait timeout exceeded; try restarting transaction)',
    ],
)
def test_deadlocks_are_retried(text):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _operational(text)
        return 'done'

    assert db.with_deadlock_retry(flaky) == 'done'
    assert len(calls) == 3


def test_deadlock_retry_gives_up():
    calls = []

    def always():
        calls.append(1)
        raise _operational('Deadlock found')

    with pytest.raises(sa_exc.OperationalError):
        db.with_deadlock_retry(always, attempts=4)
    assert len(calls) == 4


def test_other_errors_are_not_retried():
    calls = []

    def broken():
        calls.append(1)
        raise _operational('no such table: images')

    with pytest.raises(sa_exc.OperationalError):
        db.with_deadlock_retry(broken)
    assert len(calls) == 1


def test_unreachable_database_hides_the_password():
    url = 'mysql+pymysql://glance:s3cret@db.example:3306/glance'
    with pytest.raises(exceptions.DatabaseUnavailable) as info:
        with db.translate_errors('Glance database', url):
            raise _operational('(2003, "Can\'t connect to MySQL server")')
    assert 's3cret' not in str(info.value)
    assert 'db.example' in str(info.value)
    assert info.value.exit_code == 3


def test_other_operational_errors_pass_through():
    with pytest.raises(sa_exc.OperationalError):
        with db.translate_errors('Glance database', 'sqlite:///x'):
            raise _operational('no such column: foo')


# -- secrets: statement parameters and passwords never reach a text


SECRET = 'S3cr3t-91c2'


@pytest.fixture
def _no_secrets():
    redaction.forget_secrets()
    yield
    redaction.forget_secrets()


def test_statement_parameters_are_hidden_from_errors(tmp_path):
    # Location URLs are statement parameters; a failed statement's text
    # goes to logs, last_error and RPC replies.
    engine = db.create_engine(f'sqlite:///{tmp_path / "x.db"}', 'test')
    url = f's3://AKIA:{SECRET}@s3.example.com/bucket/obj'
    with pytest.raises(sa_exc.OperationalError) as info:
        with engine.connect() as conn:
            conn.execute(
                sa.text('SELECT * FROM nosuch WHERE v = :v'), {'v': url}
            )
    assert SECRET not in str(info.value)
    assert 'hidden' in str(info.value)
    engine.dispose()


def test_sql_logging_hides_parameters(tmp_path, caplog):
    # An operator who turns on sqlalchemy.engine=INFO (default_log_levels)
    # sees the statements, not the location URLs bound to them.
    engine = db.create_engine(f'sqlite:///{tmp_path / "x.db"}', 'test')
    url = f's3://AKIA:{SECRET}@s3.example.com/bucket/obj'
    with caplog.at_level(logging.INFO, logger='sqlalchemy.engine'):
        with engine.connect() as conn:
            conn.execute(sa.text('SELECT :v'), {'v': url}).all()
    assert 'SELECT ?' in caplog.text
    assert 'hidden' in caplog.text
    assert SECRET not in caplog.text
    engine.dispose()


@pytest.mark.parametrize(
    'url',
    [
        'sqlite:///x.db',
        'mysql+pymysql://glance:pw@db/glance',
        'postgresql+psycopg2://glance:pw@db/glance',
    ],
)
def test_every_engine_hides_parameters(url, _no_secrets):
    engine = db.create_engine(url, 'test')
    assert engine.hide_parameters is True
    engine.dispose()


@pytest.mark.parametrize(
    ('url', 'reason'),
    [
        (f'mysql+pymysql://glance:{SECRET}@db:nope/glance', 'port'),
        (f'mysql+pymysql://glance:p@{SECRET}@db/glance', '%40'),
        (f'mysql+pymysql glance {SECRET}', 'dialect+driver://'),
    ],
    ids=['bad-port', 'raw-at-in-password', 'not-a-url'],
)
def test_bad_urls_never_quote_the_password(url, reason, _no_secrets):
    with pytest.raises(exceptions.ConfigError) as info:
        db.create_engine(url, '[database] connection')
    text = str(info.value)
    assert SECRET not in text and reason in text, text
    assert info.value.__cause__ is None  # no traceback holding the URL


def test_the_password_is_a_registered_secret(_no_secrets):
    url = f'mysql+pymysql://glance:{SECRET}@db.example/glance'
    db.create_engine(url, 'test').dispose()
    # a driver's text quoting it, outside any URL, is masked too
    assert redaction.redact(f'auth failed ({SECRET})') == 'auth failed (***)'


def test_unreachable_database_error_is_redacted(_no_secrets):
    url = f'mysql+pymysql://glance:{SECRET}@127.0.0.1:1/glance'
    engine = db.create_engine(url, 'test')
    with pytest.raises(exceptions.DatabaseUnavailable) as info:
        with db.translate_errors('Glance database', url):
            engine.connect()
    assert SECRET not in str(info.value)
    assert 'glance:***@127.0.0.1:1' in str(info.value)
    engine.dispose()


def test_a_deadlock_victim_waits_a_little_longer_each_time():
    """Retried at once, the same transactions meet again: the victim
    waits jittered milliseconds, growing, before each new attempt."""
    failures = [3]
    waits = []

    def work():
        if failures[0]:
            failures[0] -= 1
            raise sa_exc.OperationalError(
                'SELECT', {}, Exception('(1213) Deadlock found')
            )
        return 'done'

    assert db.with_deadlock_retry(work, sleep=waits.append) == 'done'
    assert len(waits) == 3
    assert 0 < waits[0] < waits[2] < 0.1
