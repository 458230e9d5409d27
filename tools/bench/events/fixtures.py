"""The world an event-path scenario runs in, and the service process.

:class:`World`: a Glance 33.0.0 database on MariaDB (real ``glance-manage
db_sync``, :mod:`tools.harness`), a file store, a RabbitMQ vhost, the
due-queue on SQLite under ``state_path`` or a fresh database, the config
files and every service started in it; all removed again on exit.
:class:`ServiceProcess`: ``scrub-listener --config-file F`` in its own
process group.  Used by every scenario of ``python -m tools.bench
events``; measures nothing itself.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time

import sqlalchemy as sa
from sqlalchemy import pool as sa_pool

from tools import glance_rows
from tools import harness
from tools.bench.events import common
from tools.bench.events import notifications


class World:
    """Glance DB, store, due-queue DB, vhost, config files, processes."""

    def __init__(self, queue_backend='sqlite', keep_logs=None):
        self.queue_backend = queue_backend
        self.keep_logs = keep_logs
        self.workdir = None
        self.glance_url = None
        self.queue_url = None
        self.vhost = None
        self.transport_url = None
        self.broker = None
        self.services = []
        self.created = {}
        self._glance_engine = None
        self._queue_engine = None

    def path(self, *parts):
        return os.path.join(self.workdir, *parts)

    @property
    def store_dir(self):
        return self.path('images')

    def setup(self):
        self.workdir = tempfile.mkdtemp(prefix=harness.NAME_PREFIX + 'events_')
        try:
            for sub in ('images', 'state', 'logs', 'hooks'):
                os.makedirs(self.path(sub))
            self.glance_url = harness.create_glance_database('mysql')
            if self.queue_backend != 'sqlite':
                self.queue_url = harness.create_empty_database(
                    self.queue_backend
                )
            self.vhost, self.transport_url = harness.create_vhost()
            self.broker = notifications.Broker(self.transport_url)
            # What to look for after the run: all of it must be gone.
            self.created = {
                'vhost': self.vhost,
                'databases': [
                    sa.engine.make_url(url).database
                    for url in (self.glance_url, self.queue_url)
                    if url
                ],
                'workdir': self.workdir,
            }
        except BaseException:
            self.cleanup()
            raise
        return self

    def __enter__(self):
        return self.setup()

    def __exit__(self, *exc):
        self.cleanup()

    def cleanup(self):
        for svc in self.services:
            svc.kill()
            if self.keep_logs and os.path.exists(svc.log_path):
                os.makedirs(self.keep_logs, exist_ok=True)
                shutil.copyfile(
                    svc.log_path,
                    os.path.join(
                        self.keep_logs, os.path.basename(svc.log_path)
                    ),
                )
        self.services = []
        if self.broker is not None:
            self.broker.close()
            self.broker = None
        for engine in (self._glance_engine, self._queue_engine):
            if engine is not None:
                engine.dispose()
        self._glance_engine = self._queue_engine = None
        if self.vhost:
            with contextlib.suppress(harness.HarnessError):
                harness.delete_vhost(self.vhost)
            self.vhost = None
        for attr in ('glance_url', 'queue_url'):
            url = getattr(self, attr)
            if url:
                harness.drop_database(url)
                setattr(self, attr, None)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    # -- databases ---------------------------------------------------------

    @property
    def glance(self):
        if self._glance_engine is None:
            self._glance_engine = sa.create_engine(
                self.glance_url, poolclass=sa_pool.NullPool
            )
        return self._glance_engine

    @property
    def sqlite_queue_path(self):
        return self.path('state', 'scrub-queue.sqlite')

    @property
    def queue(self):
        """Autocommit engine on the due-queue: each poll sees commits."""
        if self._queue_engine is None:
            if self.queue_url:
                url = self.queue_url
            else:
                # read-only: never creates the file before the service.
                url = (
                    f'sqlite:///file:{self.sqlite_queue_path}?mode=ro&uri=true'
                )
            self._queue_engine = sa.create_engine(
                url, isolation_level='AUTOCOMMIT'
            )
        return self._queue_engine

    def queue_count(self):
        try:
            with self.queue.connect() as conn:
                return conn.execute(
                    sa.text('SELECT COUNT(*) FROM scrub_queue')
                ).scalar()
        except sa.exc.DBAPIError:
            return 0  # the service has not created it yet

    def queue_rows(self):
        with self.queue.connect() as conn:
            return conn.execute(
                sa.text(
                    'SELECT image_id, location_id, deleted_at, due_at, '
                    'attempts, last_error FROM scrub_queue'
                )
            ).all()

    def reset_queue(self):
        """Empty due-queue for the next run (the service recreates it)."""
        if self._queue_engine is not None:
            self._queue_engine.dispose()
            self._queue_engine = None
        if self.queue_url:
            harness.fetch_all(
                self.queue_url, 'DROP TABLE IF EXISTS scrub_queue'
            )
        else:
            for suffix in ('', '-journal', '-wal', '-shm'):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.sqlite_queue_path + suffix)

    def pending_images(self, count, size, active=False):
        """``count`` pending_delete images (rows as glance-api writes them,
        data files); with ``active`` made live again (to delete later)."""
        ids = glance_rows.bulk_pending_images(
            self.glance, self.store_dir, count, size
        )
        if active:
            with self.glance.begin() as conn:
                conn.execute(
                    sa.text(
                        "UPDATE images SET status = 'active', deleted = 0, "
                        'deleted_at = NULL'
                    )
                )
                conn.execute(
                    sa.text(
                        "UPDATE image_locations SET status = 'active', "
                        'deleted = 0, deleted_at = NULL'
                    )
                )
        return ids

    def glance_rows(self, ids=None):
        """{id: (status, deleted, deleted_at, location status)}."""
        with self.glance.connect() as conn:
            rows = conn.execute(
                sa.text(
                    'SELECT i.id, i.status, i.deleted, i.deleted_at, '
                    'l.status AS loc_status FROM images i JOIN '
                    'image_locations l ON l.image_id = i.id'
                )
            ).all()
        out = {
            r.id: (r.status, bool(r.deleted), r.deleted_at, r.loc_status)
            for r in rows
        }
        if ids is not None:
            out = {i: out.get(i) for i in ids}
        return out

    # -- service -----------------------------------------------------------

    def config(
        self,
        name,
        scrub_time=common.NEVER,
        wakeup_time=3600,
        pool_size=8,
        batch_size=None,
        prefetch=None,
        extra=None,
    ):
        sections = {
            'DEFAULT': {
                'transport_url': self.transport_url,
                'scrub_time': scrub_time,
                'wakeup_time': wakeup_time,
                'scrub_pool_size': pool_size,
                'enabled_backends': {'fs': 'file'},
                'state_path': self.path('state'),
                'debug': False,
                'use_stderr': True,
            },
            'database': {'connection': self.glance_url},
            'glance_store': {'default_backend': 'fs'},
            'fs': {'filesystem_store_datadir': self.store_dir},
            'scrub_queue': {'connection': self.queue_url},
            'listener': {'batch_size': batch_size, 'prefetch': prefetch},
            'rpc': {'timeout': 30},
            'service': {'graceful_shutdown_timeout': 30},
        }
        for section, options in (extra or {}).items():
            sections.setdefault(section, {}).update(options)
        return harness.write_config(self.path(f'{name}.conf'), sections)

    def service(self, name, config, env=None):
        svc = ServiceProcess(
            config, self.path('logs', f'{name}.log'), env, self.workdir
        )
        self.services.append(svc)
        return svc


class ServiceProcess:
    """``scrub-listener --config-file F``, its own process group."""

    def __init__(self, config, log_path, env=None, cwd=None):
        self.config = config
        self.log_path = log_path
        self.env = env or {}
        self.cwd = cwd
        self.proc = None
        self._log = None
        self.spawned_at = None
        self.started_at = None

    def start(self, timeout=90):
        env = dict(os.environ, PYTHONWARNINGS='ignore', **self.env)
        self._log = open(self.log_path, 'ab')
        self.spawned_at = time.time()
        self.proc = subprocess.Popen(
            [common.bin_path('scrub-listener'), '--config-file', self.config],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.cwd,
            start_new_session=True,
        )
        return self

    def wait_started(self, timeout=90):
        deadline = time.monotonic() + timeout
        while common.STARTED not in self.log():
            if self.proc.poll() is not None:
                raise harness.HarnessError(
                    f'scrub-listener exited with {self.proc.returncode} '
                    f'during start:\n{self.log_tail()}'
                )
            if time.monotonic() > deadline:
                raise harness.HarnessError(
                    f'scrub-listener not started within {timeout} s:\n'
                    f'{self.log_tail()}'
                )
            time.sleep(0.05)
        self.started_at = time.time()
        return self.started_at - self.spawned_at

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self):
        try:
            with open(self.log_path, 'rb') as f:
                return f.read().decode('utf-8', 'replace')
        except FileNotFoundError:
            return ''

    def log_tail(self, lines=25):
        return '\n'.join(self.log().splitlines()[-lines:])

    def problems_in_log(self, expected=()):
        """Log lines that say something went wrong.

        ``expected``: words of an error record we caused on purpose; every
        line of that record (same time, pid, level and logger prefix) is
        left out.
        """
        bad = ('ERROR', 'CRITICAL', 'Traceback', 'Dropping malformed')
        lines = [
            line
            for line in self.log().splitlines()
            if any(word in line for word in bad)
        ]
        prefixes = set()
        for line in lines:
            if expected and all(word in line for word in expected):
                prefixes.add(line.split(' [', 1)[0])
        return [
            line
            for line in lines
            if not any(line.startswith(prefix) for prefix in prefixes)
        ]

    def stop(self, timeout=60):
        """SIGTERM and wait; return (exit code, seconds) (None: killed)."""
        if not self.alive():
            return (self.proc.returncode if self.proc else None), 0.0
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = None
        self._close_log()
        return rc, time.monotonic() - started

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._close_log()

    def _close_log(self):
        if self._log is not None:
            self._log.close()
            self._log = None


def wait_count(world, svc, n, timeout, on_sample=None):
    deadline = time.monotonic() + timeout
    while True:
        count = world.queue_count()
        if on_sample:
            on_sample()
        if count >= n:
            return count
        if not svc.alive() or time.monotonic() > deadline:
            return count
        time.sleep(0.2)
