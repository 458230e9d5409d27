"""Helpers and fixtures for the functional tests of the always-on service.

The service runs as a real subprocess (``scrub-listener --config-file F``,
no ``--sweep-once``), on the real RabbitMQ, MariaDB and PostgreSQL of the
machine, with the real Glance schema (``tools/harness.py``).  Everything
made here has a unique name and is removed after the test, and every
process started here is killed in the fixture teardown: the servers are
shared with CI.

What is here:

``ScrubService``
    One service process: start, wait for ``scrub-listener started on``,
    read its log, signal it, stop it (SIGTERM, then SIGKILL of its whole
    process group).
``service_config``
    The ``{section: {option: value}}`` of a service config file.
``GlancePublisher``
    Publishes notifications exactly like glance-api 33 does (exchange
    ``glance``, topic, non-durable; routing key ``notifications.info``;
    oslo envelope 2.0), or any raw body, with kombu.
``write_hooks`` / ``DeleteLog`` / ``SweepLog``
    A ``sitecustomize.py`` put first on the service's ``PYTHONPATH``: it
    wraps glance_store's filesystem ``Store.delete`` (one log line per call
    and process, optional delay) and ``Sweeper.sweep`` (start/end lines,
    optional delay).  The product code is not changed; the wrappers only
    observe and slow down.
``TcpProxy``
    A TCP proxy in front of a database server that the test can cut and
    restore: "the database is unreachable" without touching the shared
    server.
``wait_until``
    Bounded polling.

Fixtures: ``services`` (factory, kills everything after the test),
``vhost`` (a fresh RabbitMQ vhost with its transport URL and a publisher),
``glance_mysql`` / ``glance_postgresql`` (a Glance database per test).
"""

import dataclasses
import datetime
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import kombu
import pytest
import sqlalchemy as sa
from sqlalchemy import pool

from tools import glance_rows
from tools import harness

BIN_DIR = os.path.dirname(sys.executable)
SERVICE = os.path.join(BIN_DIR, 'scrub-listener')
MANAGE = os.path.join(BIN_DIR, 'scrub-listener-manage')

STARTED_RE = re.compile(r'scrub-listener started on ')

# ------------------------------------------------------------------ waiting


def wait_until(predicate, timeout, interval=0.05, message=None):
    """Poll ``predicate()`` until truthy; return (value, elapsed seconds).

    Fails the test with ``message`` (or a generic one) after ``timeout``.
    """
    started = time.monotonic()
    deadline = started + timeout
    while True:
        value = predicate()
        if value:
            return value, time.monotonic() - started
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            pytest.fail(
                f'not true within {timeout} s: {text or predicate}',
                pytrace=False,
            )
        time.sleep(interval)


# ---------------------------------------------------------- config + process


def service_config(
    workdir,
    *,
    glance_url,
    transport_url,
    store_dir,
    queue_url=None,
    scrub_time=0,
    wakeup_time=3600,
    pool_size=2,
    lease_time=10,
    rpc_timeout=10,
    extra=None,
):
    """Sections of a scrub-listener config file for a service under test.

    ``wakeup_time`` defaults to an hour, so that only notifications (and
    the sweep at start-up) bring work: a test that wants the periodic
    sweep sets it small.  ``queue_url`` None: SQLite under ``state_path``.
    """
    sections = {
        'DEFAULT': {
            'transport_url': transport_url,
            'scrub_time': scrub_time,
            'wakeup_time': wakeup_time,
            'scrub_pool_size': pool_size,
            'enabled_backends': {'fs': 'file'},
            'state_path': os.path.join(workdir, 'state'),
            'debug': False,
            'use_stderr': True,
        },
        'database': {'connection': glance_url},
        'glance_store': {'default_backend': 'fs'},
        'fs': {'filesystem_store_datadir': store_dir},
        'scrub_queue': {'connection': queue_url},
        'scrubber': {'lease_time': lease_time},
        'listener': {},
        'rpc': {'timeout': rpc_timeout, 'connect_retries': 1},
        'service': {'graceful_shutdown_timeout': 30},
    }
    for section, options in (extra or {}).items():
        sections.setdefault(section, {}).update(options)
    return sections


def write_service_config(path, sections):
    return harness.write_config(str(path), sections)


class ScrubService:
    """A ``scrub-listener`` service process (its own process group)."""

    def __init__(self, config_file, log_path, env=None, name='service'):
        self.config_file = str(config_file)
        self.log_path = str(log_path)
        self.env = env or {}
        self.name = name
        self.proc = None
        self._log = None
        self.started_in = None

    def start(self, wait=True, timeout=60):
        env = dict(os.environ, PYTHONWARNINGS='ignore', **self.env)
        self._log = open(self.log_path, 'ab')
        self.proc = subprocess.Popen(
            [SERVICE, '--config-file', self.config_file],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        if wait:
            self.wait_started(timeout)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def wait_started(self, timeout=60):
        started = time.monotonic()
        deadline = started + timeout
        while not STARTED_RE.search(self.log()):
            if self.proc.poll() is not None:
                pytest.fail(
                    f'{self.name} exited with {self.proc.returncode} during '
                    f'start:\n{self.log_tail()}',
                    pytrace=False,
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f'{self.name} did not log "scrub-listener started on" '
                    f'within {timeout} s:\n{self.log_tail()}',
                    pytrace=False,
                )
            time.sleep(0.05)
        self.started_in = time.monotonic() - started
        return self.started_in

    def log(self):
        try:
            with open(self.log_path, 'rb') as f:
                return f.read().decode('utf-8', 'replace')
        except FileNotFoundError:
            return ''

    def log_tail(self, lines=40):
        return '\n'.join(self.log().splitlines()[-lines:])

    def count(self, pattern):
        return len(re.findall(pattern, self.log()))

    def wait_for_log(self, pattern, timeout=30, count=1):
        """Wait until ``pattern`` occurs ``count`` times in the log."""
        wait_until(
            lambda: self.count(pattern) >= count,
            timeout,
            message=lambda: (
                f'{pattern!r} x{count} in the log of '
                f'{self.name}:\n{self.log_tail()}'
            ),
        )

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def send(self, signum):
        self.proc.send_signal(signum)

    def wait(self, timeout):
        """Wait for the exit; return (returncode, seconds) or fail."""
        started = time.monotonic()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f'{self.name} still running {timeout} s after the signal:\n'
                f'{self.log_tail()}',
                pytrace=False,
            )
        return rc, time.monotonic() - started

    def terminate(self, timeout=30):
        """SIGTERM; return (returncode, seconds to exit)."""
        self.send(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self):
        """SIGKILL the whole process group, at once."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def cleanup(self):
        """Kill whatever is left (teardown).

        SIGKILL at once: a graceful stop takes seconds and the tests that
        are about it send SIGTERM themselves.
        """
        self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None


def run_cli(args, config_file, timeout=120, env=None, binary=MANAGE):
    """Run a command; return (returncode, stdout, stderr, seconds)."""
    started = time.monotonic()
    proc = subprocess.run(
        [binary, '--config-file', str(config_file), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONWARNINGS='ignore', **(env or {})),
    )
    return (
        proc.returncode,
        proc.stdout,
        proc.stderr,
        time.monotonic() - started,
    )


@pytest.fixture
def services(tmp_path):
    """Factory: ``services(sections, name=..., env=..., start=True)``.

    Writes ``<tmp>/<name>.conf``, starts the service and waits for its
    start line.  Every process is killed after the test.
    """
    made = []

    def factory(sections, name=None, env=None, start=True, timeout=60):
        name = name or f'service{len(made)}'
        config = write_service_config(tmp_path / f'{name}.conf', sections)
        svc = ScrubService(
            config, tmp_path / f'{name}.log', env=env, name=name
        )
        made.append(svc)
        if start:
            svc.start(timeout=timeout)
        return svc

    yield factory
    for svc in made:
        svc.cleanup()


# ------------------------------------------------------------------ hooks

SITECUSTOMIZE = textwrap.dedent(
    '''\
    """Test hooks for scrub-listener processes (tests/functional).

    SL_TEST_DELETE_LOG: append "<pid> <event> <time> <path>" per call of
    glance_store's filesystem Store.delete (event: call, then ok or
    notfound or error); SL_TEST_DELETE_DELAY: seconds slept before each
    delete.  SL_TEST_SWEEP_LOG / SL_TEST_SWEEP_DELAY: the same for
    scrub_listener.sweep.Sweeper.sweep (start / end lines).
    """
    import functools
    import importlib.abc
    import importlib.util
    import os
    import sys
    import time


    def _line(path, text):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (text + '\\n').encode())
        finally:
            os.close(fd)


    def _patch_fs(module):
        original = module.Store.delete
        log = os.environ.get('SL_TEST_DELETE_LOG')
        delay = float(os.environ.get('SL_TEST_DELETE_DELAY') or 0)

        @functools.wraps(original)
        def delete(self, location, *args, **kwargs):
            path = getattr(location.store_location, 'path', '?')
            pid = os.getpid()
            if log:
                _line(log, f'{pid} call {time.time():.6f} {path}')
            if delay:
                time.sleep(delay)
            event = 'ok'
            try:
                return original(self, location, *args, **kwargs)
            except Exception as exc:
                event = 'notfound' if 'NotFound' in type(exc).__name__ else (
                    'error')
                raise
            finally:
                if log:
                    _line(log, f'{pid} {event} {time.time():.6f} {path}')

        module.Store.delete = delete


    def _patch_sweep(module):
        original = module.Sweeper.sweep
        log = os.environ.get('SL_TEST_SWEEP_LOG')
        delay = float(os.environ.get('SL_TEST_SWEEP_DELAY') or 0)

        @functools.wraps(original)
        def sweep(self, *args, **kwargs):
            pid = os.getpid()
            if log:
                _line(log, f'{pid} start {time.time():.6f}')
            try:
                if delay:
                    time.sleep(delay)
                return original(self, *args, **kwargs)
            finally:
                if log:
                    _line(log, f'{pid} end {time.time():.6f}')

        module.Sweeper.sweep = sweep


    TARGETS = {
        'glance_store._drivers.filesystem': _patch_fs,
        'scrub_listener.sweep': _patch_sweep,
    }


    class _Loader(importlib.abc.Loader):
        def __init__(self, wrapped, patch):
            self._wrapped = wrapped
            self._patch = patch

        def create_module(self, spec):
            return self._wrapped.create_module(spec)

        def exec_module(self, module):
            self._wrapped.exec_module(module)
            self._patch(module)


    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in TARGETS:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, TARGETS[name])
            return spec


    sys.meta_path.insert(0, _Finder())
    '''
)


def write_hooks(directory):
    """Write the sitecustomize.py into ``directory``; return env additions.

    The returned dict goes into the service's environment (PYTHONPATH
    first).  Set SL_TEST_* variables on top of it.
    """
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, 'sitecustomize.py'), 'w') as f:
        f.write(SITECUSTOMIZE)
    path = os.environ.get('PYTHONPATH')
    return {'PYTHONPATH': directory + (os.pathsep + path if path else '')}


@dataclasses.dataclass
class DeleteEvent:
    pid: int
    event: str
    time: float
    path: str


class DeleteLog:
    """The SL_TEST_DELETE_LOG written by the hooks, parsed."""

    def __init__(self, path):
        self.path = str(path)

    def events(self):
        try:
            with open(self.path) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        events = []
        for line in lines:
            pid, event, when, path = line.split(' ', 3)
            events.append(DeleteEvent(int(pid), event, float(when), path))
        return events

    def calls(self, event='call'):
        return [e for e in self.events() if e.event == event]

    def calls_by_path(self, event='call'):
        counts = {}
        for e in self.calls(event):
            counts[e.path] = counts.get(e.path, 0) + 1
        return counts

    def paths_deleted_more_than_once(self):
        return {p: n for p, n in self.calls_by_path().items() if n > 1}


class SweepLog:
    """The SL_TEST_SWEEP_LOG written by the hooks: [(pid, start, end)]."""

    def __init__(self, path):
        self.path = str(path)

    def runs(self):
        try:
            with open(self.path) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        runs, open_runs = [], {}
        for line in lines:
            pid, event, when = line.split()
            if event == 'start':
                if int(pid) in open_runs:
                    # a second start before the first ended: overlap
                    runs.append((int(pid), open_runs[int(pid)], None))
                open_runs[int(pid)] = float(when)
            else:
                runs.append((int(pid), open_runs.pop(int(pid)), float(when)))
        runs.extend((pid, start, None) for pid, start in open_runs.items())
        return sorted(runs, key=lambda r: r[1])


# ---------------------------------------------------------------- RabbitMQ


def glance_delete_message(image_id, name='img', deleted_at=None, **payload):
    """The decoded message glance-api 33.0.0 sends on a delayed delete.

    Shape copied from the message seen on RabbitMQ (see NOTES.md and
    tests/functional/test_harness.py): no locations, ``deleted_at`` to the
    second, ``status`` pending_delete.
    """
    now = datetime.datetime.now(datetime.UTC)
    stamp = (deleted_at or now).strftime('%Y-%m-%dT%H:%M:%SZ')
    body = {
        'id': image_id,
        'name': name,
        'status': 'pending_delete',
        'created_at': stamp,
        'updated_at': stamp,
        'min_disk': 0,
        'min_ram': 0,
        'protected': False,
        'checksum': 'd41d8cd98f00b204e9800998ecf8427e',
        'owner': None,
        'disk_format': 'raw',
        'container_format': 'bare',
        'size': 1024,
        'virtual_size': 1024,
        'is_public': False,
        'visibility': 'shared',
        'properties': {},
        'tags': [],
        'deleted': True,
        'deleted_at': stamp,
    }
    body.update(payload)
    return {
        'message_id': str(uuid.uuid4()),
        'publisher_id': 'image.localhost',
        'event_type': 'image.delete',
        'priority': 'INFO',
        'payload': body,
        'timestamp': now.strftime('%Y-%m-%d %H:%M:%S.%f'),
        '_unique_id': uuid.uuid4().hex,
    }


def envelope(message):
    """oslo.messaging's 2.0 envelope around a message dict."""
    return {'oslo.version': '2.0', 'oslo.message': json.dumps(message)}


# why these flags: oslo.messaging declares the control exchange as a
# non-durable, non-auto-delete topic exchange; another declaration would
# fail with PRECONDITION_FAILED on whichever side comes second.
def glance_exchange(name='glance', durable=False):
    return kombu.Exchange(
        name, type='topic', durable=durable, auto_delete=False
    )


class GlancePublisher:
    """Publish to RabbitMQ exactly as glance-api's messagingv2 driver."""

    def __init__(self, transport_url, exchange='glance', durable=False):
        # durable: as glance-api declares it with amqp_durable_queues
        self.connection = kombu.Connection(harness.amqp_url(transport_url))
        self.exchange = glance_exchange(exchange, durable)
        self.producer = kombu.Producer(
            self.connection.channel(), exchange=self.exchange
        )
        self.exchange(self.producer.channel).declare()

    def publish(self, message, routing_key='notifications.info'):
        """Publish a message dict inside the oslo envelope."""
        self.publish_raw(json.dumps(envelope(message)), routing_key)
        return message

    def publish_raw(
        self, body, routing_key='notifications.info', content_type=None
    ):
        """Publish any body (str/bytes), JSON content type by default."""
        self.producer.publish(
            body,
            routing_key=routing_key,
            content_type=content_type or 'application/json',
            content_encoding='utf-8',
        )

    def image_delete(self, image_id, **kwargs):
        """Publish a Glance-shaped image.delete for ``image_id``."""
        return self.publish(glance_delete_message(image_id, **kwargs))

    def close(self):
        self.connection.release()


def bind_queue(transport_url, name, routing_key='notifications.info'):
    """Declare a non-durable queue bound to glance/``routing_key``."""
    with kombu.Connection(harness.amqp_url(transport_url)) as conn:
        queue = kombu.Queue(
            name,
            glance_exchange(),
            routing_key=routing_key,
            durable=False,
            auto_delete=False,
        )
        queue(conn.default_channel).declare()


def queue_depth(transport_url, name):
    """(messages ready, consumers) of a queue, or None if it is missing."""
    with kombu.Connection(harness.amqp_url(transport_url)) as conn:
        channel = conn.channel()
        try:
            _, messages, consumers = channel.queue_declare(name, passive=True)
        except Exception:
            return None
        return messages, consumers


def drain_queue(transport_url, name, timeout=2.0):
    """Read (and ack) every message of a queue.

    Returns the decoded messages; a body that is not an oslo envelope is
    returned as ``{'raw': body}``.
    """
    out = []
    with kombu.Connection(harness.amqp_url(transport_url)) as conn:
        queue = kombu.Queue(name, glance_exchange(), no_declare=True)
        bound = queue(conn.default_channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = bound.get(no_ack=True)
            if message is None:
                time.sleep(0.05)
                continue
            deadline = time.monotonic() + timeout
            try:
                body = json.loads(message.body)
                out.append(json.loads(body['oslo.message']))
            except (ValueError, TypeError, KeyError):
                out.append({'raw': message.body})
    return out


@dataclasses.dataclass
class Vhost:
    name: str
    transport_url: str
    publisher: GlancePublisher


def _vhost():
    try:
        name, url = harness.create_vhost()
    except harness.HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    publisher = GlancePublisher(url)
    try:
        yield Vhost(name, url, publisher)
    finally:
        publisher.close()
        harness.delete_vhost(name)


@pytest.fixture
def vhost():
    """A fresh RabbitMQ vhost, its transport URL and a Glance publisher."""
    yield from _vhost()


# --------------------------------------------------------------- databases


def engine(url):
    return sa.create_engine(url, poolclass=pool.NullPool)


def _database(backend):
    try:
        url = harness.create_glance_database(backend)
    except harness.HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield url
    finally:
        harness.drop_database(url)


@pytest.fixture
def glance_mysql():
    """A Glance database (real schema) on MariaDB, dropped after."""
    yield from _database('mysql')


@pytest.fixture
def glance_postgresql():
    """A Glance database (real schema) on PostgreSQL, dropped after."""
    yield from _database('postgresql')


@pytest.fixture
def empty_db_factory():
    """Factory ``(backend) -> url`` of fresh empty databases, dropped after."""
    made = []

    def factory(backend):
        try:
            url = harness.create_empty_database(backend)
        except harness.HarnessError as exc:
            pytest.fail(str(exc), pytrace=False)
        made.append(url)
        return url

    yield factory
    for url in made:
        harness.drop_database(url)


def image_statuses(url, image_ids=None):
    """{image id: status} (all images, or those of ``image_ids``)."""
    rows = harness.fetch_all(url, 'SELECT id, status FROM images')
    result = {r['id']: r['status'] for r in rows}
    if image_ids is not None:
        return {i: result.get(i) for i in image_ids}
    return result


def location_statuses(url, image_ids=None):
    """{image id: [location statuses]}."""
    rows = harness.fetch_all(
        url, 'SELECT image_id, status FROM image_locations ORDER BY id'
    )
    result = {}
    for r in rows:
        if image_ids is None or r['image_id'] in image_ids:
            result.setdefault(r['image_id'], []).append(r['status'])
    return result


def queue_rows(url):
    """Rows of the due-queue table (list of dicts); [] if no table yet."""
    if 'scrub_queue' not in harness.table_names(url):
        return []
    return harness.fetch_all(url, 'SELECT * FROM scrub_queue ORDER BY id')


def sqlite_queue_url(workdir):
    """The due-queue URL a service with default settings uses."""
    return f'sqlite:///{os.path.join(workdir, "state", "scrub-queue.sqlite")}'


def make_pending(url, store_dir, data=None, **kwargs):
    """One pending_delete image (file + rows, like glance-api 33)."""
    eng = engine(url)
    try:
        return glance_rows.make_image(
            eng, store_dir, data=data or os.urandom(1024), **kwargs
        )
    finally:
        eng.dispose()


def scrubbed(url, store_dir, image_id):
    """True when the image's file is gone and its rows say 'deleted'."""
    if os.path.exists(os.path.join(store_dir, image_id)):
        return False
    statuses = image_statuses(url, [image_id])
    locations = location_statuses(url, [image_id]).get(image_id, [])
    return statuses[image_id] == 'deleted' and all(
        s == 'deleted' for s in locations
    )


# --------------------------------------------------------------- TCP proxy


class TcpProxy:
    """Forward 127.0.0.1:<port> to a server; ``cut()`` / ``restore()``.

    While cut, every open connection is closed and new ones are accepted
    and closed at once: to a client the database is unreachable, the
    server itself is untouched (it is shared with CI).
    """

    def __init__(self, target_host, target_port):
        self.target = (target_host, target_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(('127.0.0.1', 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._down = False
        self._closed = False
        self._lock = threading.Lock()
        self._pairs = set()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def url_for(self, url):
        """``url`` (a SQLAlchemy URL string) pointing at the proxy."""
        parsed = sa.engine.make_url(url)
        return parsed.set(host='127.0.0.1', port=self.port).render_as_string(
            hide_password=False
        )

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._down or self._closed:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            pair = (client, server)
            with self._lock:
                self._pairs.add(pair)
            threading.Thread(
                target=self._pump, args=(pair,), daemon=True
            ).start()

    def _pump(self, pair):
        client, server = pair
        peers = {client: server, server: client}
        try:
            while True:
                readable, _, _ = select.select(list(peers), [], [], 0.5)
                if pair not in self._pairs:
                    return
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            self._close_pair(pair)

    def _close_pair(self, pair):
        with self._lock:
            self._pairs.discard(pair)
        for sock in pair:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def cut(self):
        self._down = True
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._close_pair(pair)

    def restore(self):
        self._down = False

    def close(self):
        self._closed = True
        self.cut()
        self._listener.close()


# ---------------------------------------------------------- one test's world


@dataclasses.dataclass
class World:
    """What a single-service test needs, wired together.

    ``config(**kw)``: sections for a service on this world
    (``service_config`` keywords) with this world's own listener pool and
    RPC topic, so that services of earlier tests on the same vhost never
    see its messages; ``env(**vars)``: environment with the sitecustomize
    hooks, the delete log and any SL_TEST_* variables; ``deletes``: that
    log.
    """

    workdir: str
    glance_url: str
    store_dir: str
    vhost: Vhost
    hook_env: dict
    deletes: DeleteLog
    pool: str
    rpc_topic: str

    @property
    def publisher(self):
        return self.vhost.publisher

    def config(self, workdir=None, **kwargs):
        sections = service_config(
            workdir or self.workdir,
            glance_url=kwargs.pop('glance_url', self.glance_url),
            transport_url=kwargs.pop(
                'transport_url', self.vhost.transport_url
            ),
            store_dir=self.store_dir,
            **kwargs,
        )
        sections['listener']['pool'] = self.pool
        sections['rpc']['topic'] = self.rpc_topic
        return sections

    def env(self, **extra):
        return dict(self.hook_env, **{k: str(v) for k, v in extra.items()})

    def pending(self, data=None, **kwargs):
        return make_pending(self.glance_url, self.store_dir, data, **kwargs)

    def path(self, image_id):
        return os.path.join(self.store_dir, image_id)

    def scrubbed(self, image_id):
        return scrubbed(self.glance_url, self.store_dir, image_id)

    def not_scrubbed(self, image_ids):
        """Those of ``image_ids`` not scrubbed yet (two queries in all)."""
        statuses = image_statuses(self.glance_url)
        locations = location_statuses(self.glance_url)
        return [
            i
            for i in image_ids
            if statuses.get(i) != 'deleted'
            or any(s != 'deleted' for s in locations.get(i, []))
            or os.path.exists(self.path(i))
        ]

    def wait_scrubbed(self, image_ids, timeout=30, service=None):
        """Wait until every image is scrubbed; return the seconds taken."""
        image_ids = list(image_ids)

        def left():
            return self.not_scrubbed(image_ids)

        def why():
            text = f'{len(left())} of {len(image_ids)} not scrubbed'
            if service is not None:
                text += f'; log:\n{service.log_tail()}'
            return text

        _, elapsed = wait_until(lambda: not left(), timeout, message=why)
        return elapsed

    def pool_depth(self):
        """(ready, consumers) of this world's listener pool queue."""
        return queue_depth(self.vhost.transport_url, self.pool)


def make_world(tmp_path, vhost, glance_url):
    store_dir = tmp_path / 'images'
    harness.make_datadir(store_dir)
    deletes = DeleteLog(tmp_path / 'deletes.log')
    hook_env = write_hooks(tmp_path / 'hooks')
    hook_env['SL_TEST_DELETE_LOG'] = deletes.path
    return World(
        str(tmp_path),
        glance_url,
        str(store_dir),
        vhost,
        hook_env,
        deletes,
        pool=harness.unique_name('sl_test_pool_'),
        rpc_topic=harness.unique_name('sl_test_rpc_'),
    )


@pytest.fixture(scope='module')
def module_vhost():
    """A RabbitMQ vhost shared by the tests of a module."""
    yield from _vhost()


@pytest.fixture(scope='module')
def module_glance_mysql():
    """A MariaDB Glance database shared by the tests of a module."""
    yield from _database('mysql')


@pytest.fixture
def world(tmp_path, module_vhost, module_glance_mysql):
    """A World on the module's vhost and MariaDB Glance database.

    The Glance tables are emptied first: no earlier test's image can be
    picked up by this test's sweep.
    """
    harness.truncate_glance_tables(module_glance_mysql)
    return make_world(tmp_path, module_vhost, module_glance_mysql)


# ------------------------------------------------------ RPC, in this process


class RpcCaller:
    """oslo.messaging RPC client in the test process (global cfg.CONF).

    ``call(method, **kwargs)`` with an admin context by default.  Close
    it (or use ``with``) to drop its broker connections.
    """

    def __init__(
        self,
        transport_url,
        topic,
        allowed=('scrub_listener.exceptions',),
        roles=('admin',),
        timeout=15,
    ):
        import oslo_messaging
        from oslo_config import cfg

        self._transport = oslo_messaging.get_rpc_transport(
            cfg.CONF, url=transport_url, allowed_remote_exmods=list(allowed)
        )
        self._client = oslo_messaging.get_rpc_client(
            self._transport,
            oslo_messaging.Target(topic=topic, version='1.0'),
            timeout=timeout,
        )
        self._context = {'user_identity': 'pytest', 'roles': list(roles)}

    def call(self, method, **kwargs):
        return self._client.call(self._context, method, **kwargs)

    def close(self):
        self._transport.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def queue_properties(vhost_name, queue_name):
    """{'durable': bool, 'type': str} of a queue, from rabbitmqctl."""
    out = harness._rabbitmqctl(
        'list_queues',
        '--vhost',
        vhost_name,
        '--no-table-headers',
        '--quiet',
        'name',
        'durable',
        'type',
    )
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == queue_name:
            return {'durable': parts[1] == 'true', 'type': parts[2]}
    return None
