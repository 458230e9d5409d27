"""Fixtures for the functional tests of the scrub-listener CLIs.

The product runs as a subprocess (real process boundary, real exit codes
and output) against a real Glance schema (``glance-manage db_sync``, from
``tests/conftest.py``) and a real file store in a temp dir.

``env``
    An :class:`Env` on the session Glance database of each backend
    (``[sqlite]``, ``[mysql]``, ``[postgresql]``), emptied before each
    test.  The due-queue lives where an operator would put it: the
    default SQLite file under ``state_path`` for the sqlite run, a
    database on the same server for the others (one per session, emptied
    before each test).
``sqlite_env``
    The same on SQLite only, for tests where the database is not the
    point (configuration errors, bad arguments).
``undeletable``
    ``undeletable(path)`` makes a directory refuse deletes, for root too
    (``chattr +i``); undone after the test.  Skips if that is impossible.
``module_glance_api``
    Module-scoped factory of a real glance-api (MariaDB, ``delayed_delete``,
    backends ``fs`` and ``fs2``), one per ``encryption_key``.
``cluster``
    A ``concurrency_fixtures.Cluster`` on the session Glance database of
    each backend: the races of ``test_concurrency_*.py``.
"""

import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import time

import pytest
import sqlalchemy as sa
from sqlalchemy import pool

from scrub_listener import glance_db as product_glance_db
from scrub_listener import queue as product_queue
from tests.functional import concurrency_fixtures
from tools import glance_rows
from tools import harness
from tools import service_process
from tools import world

SCRUB_LISTENER = service_process.SERVICE
MANAGE = service_process.MANAGE

#: How the tests restore: in the databases, no running service needed.
RESTORE = ('restore', '--direct')

KEY = '0123456789abcdef0123456789abcdef'
OTHER_KEY = 'fedcba9876543210fedcba9876543210'

CLI_TIMEOUT = 120


def utcnow():
    return product_glance_db.utcnow()


def ago(seconds):
    """Naive UTC ``seconds`` ago, like the timestamps Glance writes."""
    return utcnow() - datetime.timedelta(seconds=seconds)


# ------------------------------------------------------------------ the CLIs


@dataclasses.dataclass
class CliResult:
    """Exit code, stdout and stderr of one command run."""

    argv: list
    returncode: int
    stdout: str
    stderr: str
    elapsed: float

    @property
    def error_lines(self):
        return [
            line
            for line in self.stderr.splitlines()
            if line.startswith('ERROR:')
        ]

    def __str__(self):
        return (
            f'$ {" ".join(self.argv)}\nexit {self.returncode} after '
            f'{self.elapsed:.1f} s\n--- stdout\n{self.stdout}'
            f'--- stderr\n{self.stderr}'
        )


def run_cli(argv, timeout=CLI_TIMEOUT):
    started = time.monotonic()
    proc = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return CliResult(
        [str(a) for a in argv],
        proc.returncode,
        proc.stdout,
        proc.stderr,
        time.monotonic() - started,
    )


def assert_ok(result):
    assert result.returncode == 0, str(result)
    assert 'Traceback' not in result.stderr, str(result)
    return result


def assert_error(result, code, *fragments):
    """Exit ``code``, exactly one ``ERROR:`` line holding ``fragments``."""
    assert result.returncode == code, str(result)
    assert 'Traceback' not in result.stderr, str(result)
    assert len(result.error_lines) == 1, str(result)
    line = result.error_lines[0]
    for fragment in fragments:
        assert fragment in line, f'{fragment!r} not in {line!r}\n{result}'
    return line


def summary(result):
    """The ``Done: ...`` line of a sweep-once."""
    lines = [x for x in result.stdout.splitlines() if x.startswith('Done:')]
    assert len(lines) == 1, str(result)
    return lines[0]


def assert_summary(result, scrubbed, failed, skipped=0, bytes_freed=None):
    line = summary(result)
    expected = f'scrubbed {scrubbed}, failed {failed}, skipped {skipped},'
    assert expected in line, f'{expected!r} not in {line!r}\n{result}'
    if bytes_freed is not None:
        assert f' {bytes_freed} bytes freed' in line, f'{line!r}\n{result}'
    return line


# ------------------------------------------------------------ the databases


def _rows(engine, query):
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]


def _norm(row):
    """Row dict with ``deleted`` as a bool (tinyint on MariaDB)."""
    if row is not None and 'deleted' in row:
        row['deleted'] = bool(row['deleted'])
    return row


class Env(world.GlanceDatabase):
    """One Glance DB + file store + scrub-listener config, for one test."""

    def __init__(self, glance_url, queue_url, tmp_path):
        super().__init__(glance_url)
        self.queue_url = queue_url
        self.tmp = tmp_path
        self.store_dir = str(tmp_path / 'images')
        self.store2_dir = str(tmp_path / 'images2')
        self.outside_dir = str(tmp_path / 'elsewhere')
        self.state_path = str(tmp_path / 'state')
        for path in (self.store_dir, self.store2_dir):
            harness.make_datadir(path)
        os.makedirs(self.outside_dir, exist_ok=True)
        self.config_file = str(tmp_path / 'scrub-listener.conf')
        self.configure()

    # -- configuration

    def sections(
        self,
        scrub_time=0,
        key=None,
        single_store=False,
        two_stores=False,
        extra=None,
    ):
        default = {
            'scrub_time': scrub_time,
            'scrub_pool_size': 2,
            'state_path': self.state_path,
            'metadata_encryption_key': key,
        }
        sections = {'DEFAULT': default}
        if single_store:
            sections['glance_store'] = {
                'stores': 'file,http',
                'default_store': 'file',
                'filesystem_store_datadir': self.store_dir,
            }
        else:
            backends = {'fs': 'file'}
            if two_stores:
                backends['fs2'] = 'file'
            default['enabled_backends'] = backends
            sections['glance_store'] = {'default_backend': 'fs'}
            sections['fs'] = {'filesystem_store_datadir': self.store_dir}
            if two_stores:
                sections['fs2'] = {'filesystem_store_datadir': self.store2_dir}
        sections['database'] = {'connection': self.glance_url}
        if self.queue_url:
            sections['scrub_queue'] = {'connection': self.queue_url}
        for section, options in (extra or {}).items():
            sections.setdefault(section, {}).update(options)
        return sections

    def configure(self, path=None, **kwargs):
        """(Re)write the config file (``sections`` kwargs); return it."""
        return harness.write_config(
            path or self.config_file, self.sections(**kwargs)
        )

    # -- running the product

    def sweep(self, *args, config=None):
        return run_cli(
            [
                SCRUB_LISTENER,
                '--config-file',
                config or self.config_file,
                '--sweep-once',
                *args,
            ]
        )

    def manage(self, *args, config=None):
        return run_cli(
            [MANAGE, '--config-file', config or self.config_file, *args]
        )

    def restore(self, image_id, config=None):
        return self.manage(*RESTORE, image_id, config=config)

    def list_json(self, *args, config=None):
        """``list --format json``; returns {image id: row}."""
        result = assert_ok(
            self.manage('list', '--format', 'json', *args, config=config)
        )
        return {row['id']: row for row in json.loads(result.stdout)}

    # -- Glance rows

    def make_image(self, **kwargs):
        """glance_rows.make_image in our store; deleted a minute ago."""
        status = kwargs.get('status', 'pending_delete')
        if status in ('pending_delete', 'deleted'):
            kwargs.setdefault('deleted_at', ago(60))
        kwargs.setdefault('data', os.urandom(1024))
        return glance_rows.make_image(self.engine, self.store_dir, **kwargs)

    def write_file(self, path, data):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(data)
        return 'file://' + path

    def data_path(self, image_id):
        return os.path.join(self.store_dir, image_id)

    def image(self, image_id):
        t = self.tables['images']
        rows = _rows(self.engine, sa.select(t).where(t.c.id == image_id))
        return _norm(rows[0]) if rows else None

    def locations(self, image_id):
        t = self.tables['image_locations']
        query = sa.select(t).where(t.c.image_id == image_id).order_by(t.c.id)
        return [_norm(r) for r in _rows(self.engine, query)]

    def children(self, table, image_id):
        t = self.tables[table]
        query = sa.select(t).where(t.c.image_id == image_id).order_by(t.c.id)
        return [_norm(r) for r in _rows(self.engine, query)]

    def snapshot(self, image_id, touched_ok=False):
        """Every Glance row of an image, to assert "nothing changed".

        ``touched_ok``: leave out the locations' ``updated_at``, which a
        scrub attempt that failed legitimately bumps (claimed, then handed
        back to ``pending_delete``).
        """
        snap = {
            'image': self.image(image_id),
            **{
                table: self.children(table, image_id)
                for table in harness.GLANCE_IMAGE_TABLES[1:]
            },
        }
        if touched_ok:
            for row in snap['image_locations']:
                row.pop('updated_at')
        return snap

    def update_location(self, location_id, **values):
        t = self.tables['image_locations']
        with self.engine.begin() as conn:
            conn.execute(
                t.update().where(t.c.id == location_id).values(values)
            )

    def add_child(self, table, image_id, deleted_at=None, **values):
        """Insert a property/tag/member row (deleted if ``deleted_at``)."""
        now = utcnow()
        row = {
            'image_id': image_id,
            'created_at': now,
            'updated_at': deleted_at or now,
            'deleted_at': deleted_at,
            'deleted': deleted_at is not None,
            **values,
        }
        with self.engine.begin() as conn:
            conn.execute(self.tables[table].insert(), row)

    def queue_url_effective(self):
        return self.queue_url or (
            f'sqlite:///{os.path.join(self.state_path, "scrub-queue.sqlite")}'
        )

    def enqueue(self, image_id, deleted_at, due_at=None):
        """Queue a deletion the way a (late) image.delete event does."""
        os.makedirs(self.state_path, exist_ok=True)
        engine = sa.create_engine(
            self.queue_url_effective(), poolclass=pool.NullPool
        )
        try:
            due_queue = product_queue.DueQueue(engine)
            due_queue.create_schema()
            deletion = product_glance_db.Deletion(image_id, None, deleted_at)
            return due_queue.enqueue([(deletion, due_at or ago(1))])
        finally:
            engine.dispose()

    def queue_rows(self):
        """Rows of the due-queue table ([] if it does not exist yet)."""
        url = self.queue_url_effective()
        if url.startswith('sqlite:') and not os.path.exists(
            url[len('sqlite:///') :]
        ):
            return []
        if 'scrub_queue' not in harness.table_names(url):
            return []
        return harness.fetch_all(url, 'SELECT * FROM scrub_queue')

    # -- assertions

    def assert_scrubbed(self, image_id, paths=None):
        """Data gone, every location row and the image ``deleted``."""
        image = self.image(image_id)
        assert image['status'] == 'deleted', image
        assert image['deleted'] is True, image
        locations = self.locations(image_id)
        assert locations
        for row in locations:
            assert row['status'] == 'deleted', row
            assert row['deleted'] is True, row
        for path in paths or [self.data_path(image_id)]:
            assert not os.path.lexists(path), path


@pytest.fixture(scope='session')
def _queue_databases():
    made = {}
    yield made
    for url in made.values():
        harness.drop_database(url)


def _queue_url(backend, made):
    if backend == 'sqlite':
        return None  # the default: a file under state_path
    if backend not in made:
        try:
            made[backend] = harness.create_empty_database(backend)
        except harness.HarnessError as exc:
            pytest.fail(str(exc), pytrace=False)
    url = made[backend]
    # A test never sees a previous test's queue.  Rows only: the product
    # creates its schema on the first start and finds it afterwards.
    engine = sa.create_engine(url, poolclass=pool.NullPool)
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        with engine.begin() as conn:
            for table in reversed(meta.sorted_tables):
                conn.execute(table.delete())
    finally:
        engine.dispose()
    return url


@pytest.fixture
def env(glance_db_url, _queue_databases, tmp_path):
    backend = harness.backend_of(glance_db_url)
    environment = Env(
        glance_db_url, _queue_url(backend, _queue_databases), tmp_path
    )
    yield environment
    environment.close()


@pytest.fixture
def sqlite_env(sqlite_glance_db_url, tmp_path):
    environment = Env(sqlite_glance_db_url, None, tmp_path)
    yield environment
    environment.close()


# --------------------------------------------------- a store that says no


@pytest.fixture
def undeletable():
    """``undeletable(dir)``: nothing in ``dir`` can be deleted, by root too.

    Tests run as root, for whom permission bits mean nothing; the
    immutable attribute (``chattr +i``) is enforced for root as well.
    Skips the test where the file system or the container does not allow
    it.  Always undone after the test (else tmp cleanup would fail).
    """
    locked = []

    def lock(path):
        if os.geteuid() != 0:
            os.chmod(path, 0o555)
            locked.append(('chmod', path))
            return
        chattr = shutil.which('chattr')
        if not chattr:
            pytest.skip(
                'chattr not installed: cannot make a store dir '
                'undeletable for root'
            )
        proc = subprocess.run(
            [chattr, '+i', path], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.skip(
                f'chattr +i not supported here ({proc.stderr.strip()}): '
                'cannot make a store dir undeletable for root'
            )
        locked.append(('chattr', path))

    def unlock(path=None):
        for kind, locked_path in list(locked):
            if path is not None and locked_path != path:
                continue
            if kind == 'chmod':
                os.chmod(locked_path, 0o755)
            else:
                subprocess.run(['chattr', '-i', locked_path], check=True)
            locked.remove((kind, locked_path))

    lock.unlock = unlock
    yield lock
    unlock()


# ------------------------------------------------------- a real glance-api


@pytest.fixture(scope='module')
def module_glance_api(tmp_path_factory):
    """Factory: ``module_glance_api(encryption_key=None)`` -> GlanceApi.

    One started instance per key for the whole module, on its own MariaDB
    Glance database, backends ``fs`` (default) and ``fs2``.
    """
    apis = {}
    dbs = []

    def factory(encryption_key=None):
        if encryption_key in apis:
            return apis[encryption_key]
        try:
            url = harness.create_glance_database('mysql')
            dbs.append(url)
            workdir = tmp_path_factory.mktemp('glance-api')
            api = harness.GlanceApi(
                url,
                str(workdir),
                encryption_key=encryption_key,
                extra_backends=['fs2'],
            )
            apis[encryption_key] = api
            api.start()
        except harness.HarnessError as exc:
            pytest.fail(str(exc), pytrace=False)
        return api

    yield factory
    for api in apis.values():
        api.stop()
    for url in dbs:
        harness.drop_database(url)


# ------------------------------------------------------------------ races


@pytest.fixture
def cluster(glance_db_url, tmp_path):
    """A Cluster (Glance DB, store, processes) for one race test."""
    c = concurrency_fixtures.Cluster(glance_db_url, tmp_path)
    yield c
    c.close()
