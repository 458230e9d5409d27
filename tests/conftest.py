"""Shared pytest fixtures on the real test services (see tools/harness.py).

Database fixtures are parametrized over the backends in
``SCRUB_LISTENER_TEST_BACKENDS`` (comma separated, default
``sqlite,mysql,postgresql``); test ids end in ``[sqlite]``, ``[mysql]``,
``[postgresql]``.  A server that is down makes the test fail with a clear
message, never skip: CI runs them all.

Fixtures:

``glance_db_url``
    URL of a Glance database (real ``glance-manage db_sync`` schema), one
    per backend per session, emptied (images and child tables) before each
    test.
``sqlite_glance_db_url``
    The same on sqlite only, for tests that need just one cheap database.
``queue_db_url``
    URL of a fresh empty database per test and backend, for the project's
    own due-queue tables.
``rabbit_vhost``
    oslo.messaging transport URL of a fresh RabbitMQ vhost, deleted after.
``glance_api``
    Factory: ``glance_api(**kwargs) -> harness.GlanceApi``, started on a
    fresh Glance database (MariaDB unless ``backend=`` or
    ``db_url=`` say otherwise); other kwargs go to ``GlanceApi``.  All are
    stopped and their databases dropped after the test.
"""

import os

import pytest

from tools import harness


def _enabled_backends():
    raw = os.environ.get(
        'SCRUB_LISTENER_TEST_BACKENDS', ','.join(harness.BACKENDS)
    )
    backends = [b.strip() for b in raw.split(',') if b.strip()]
    unknown = sorted(set(backends) - set(harness.BACKENDS))
    if unknown or not backends:
        raise pytest.UsageError(
            f'SCRUB_LISTENER_TEST_BACKENDS={raw!r}: unknown {unknown}; '
            f'choose from {",".join(harness.BACKENDS)}'
        )
    return backends


BACKENDS = _enabled_backends()


def _harness_call(func, *args, **kwargs):
    """Call into the harness; turn HarnessError into a readable failure."""
    try:
        return func(*args, **kwargs)
    except harness.HarnessError as exc:
        message = str(exc)
    # outside the except block: no chained traceback around the message
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope='session', params=BACKENDS, ids=BACKENDS)
def _session_glance_db(request):
    url = _harness_call(harness.create_glance_database, request.param)
    yield url
    harness.drop_database(url)


@pytest.fixture
def glance_db_url(_session_glance_db):
    """Glance DB URL per backend; images and child tables emptied."""
    harness.truncate_glance_tables(_session_glance_db)
    return _session_glance_db


@pytest.fixture(scope='session')
def _session_sqlite_glance_db():
    url = _harness_call(harness.create_glance_database, 'sqlite')
    yield url
    harness.drop_database(url)


@pytest.fixture
def sqlite_glance_db_url(_session_sqlite_glance_db):
    """sqlite Glance DB URL; images and child tables emptied."""
    harness.truncate_glance_tables(_session_sqlite_glance_db)
    return _session_sqlite_glance_db


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
def queue_db_url(request):
    """Fresh empty database per test and backend (no tables)."""
    url = _harness_call(harness.create_empty_database, request.param)
    yield url
    harness.drop_database(url)


@pytest.fixture
def rabbit_vhost():
    """Transport URL (``rabbit://guest:guest@host:5672/<vhost>``)."""
    name, url = _harness_call(harness.create_vhost)
    yield url
    harness.delete_vhost(name)


def _glance_api_backend():
    for backend in ('mysql', 'postgresql', 'sqlite'):
        if backend in BACKENDS:
            return backend


@pytest.fixture
def glance_api(tmp_path):
    """Factory for started ``harness.GlanceApi`` instances.

    ``glance_api(transport_url=None, encryption_key=None, backend_name='fs',
    backend=None, db_url=None, **kwargs)``: without ``db_url`` a fresh Glance
    database is made on ``backend`` (default MariaDB, the first enabled of
    mysql, postgresql, sqlite: sqlite locks under concurrent API writes).
    The API's workdir is ``tmp_path/glance-api-<n>``.
    """
    apis = []
    dbs = []

    def factory(backend=None, db_url=None, **kwargs):
        if db_url is None:
            db_url = _harness_call(
                harness.create_glance_database,
                backend or _glance_api_backend(),
            )
            dbs.append(db_url)
        workdir = tmp_path / f'glance-api-{len(apis)}'
        api = harness.GlanceApi(db_url, str(workdir), **kwargs)
        apis.append(api)
        _harness_call(api.start)
        return api

    yield factory
    for api in apis:
        api.stop()
    for url in dbs:
        harness.drop_database(url)
