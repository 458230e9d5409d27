"""Pytest fixtures for the functional tests of the always-on service.

The service runs as a real subprocess (``scrub-listener --config-file F``,
no ``--sweep-once``), on the real RabbitMQ, MariaDB and PostgreSQL of the
machine, with the real Glance schema (``tools/harness.py``).  Everything
made here has a unique name and is removed after the test, and every
process started here is killed in the fixture teardown: the servers are
shared with CI.

The helpers themselves live in ``tools/`` (shared with the benchmarks) and
are re-exported here under their old names:

``tools.world``
    ``World`` / ``make_world`` (a Glance DB, a store, a vhost, the
    service's config sections), ``service_config``, the row readers.
``tools.service_process``
    ``ScrubService`` (= ``ServiceProcess``), ``run_cli``, ``wait_until``.
``tools.publisher``
    ``GlancePublisher`` (notifications exactly as glance-api 33 sends
    them), ``glance_delete_message``, ``envelope``, queue helpers.
``tools.hooks``
    ``DeleteLog`` / ``SweepLog``: what the import hooks of the service's
    processes (``tools/hooks/sitecustomize.py``) wrote.

What is here: ``TcpProxy`` (a database that the test can cut and
restore), ``RpcCaller`` (an oslo.messaging client in the test process),
and the fixtures: ``services`` (factory, kills everything after the
test), ``vhost`` / ``module_vhost`` (a fresh RabbitMQ vhost with its
transport URL and a publisher), ``glance_mysql`` / ``glance_postgresql``
/ ``module_glance_mysql`` (a Glance database), ``empty_db_factory``,
``world`` (a World on the module's vhost and Glance database),
``module_service`` (factory of one started service for a module).
"""

import select
import socket
import threading

import pytest
import sqlalchemy as sa

from tools import harness
from tools import hooks
from tools.hooks import DeleteEvent
from tools.hooks import DeleteLog
from tools.hooks import SweepLog
from tools.publisher import GlancePublisher
from tools.publisher import Vhost
from tools.publisher import bind_queue
from tools.publisher import drain_queue
from tools.publisher import envelope
from tools.publisher import glance_delete_message
from tools.publisher import glance_exchange
from tools.publisher import new_vhost
from tools.publisher import queue_depth
from tools.publisher import queue_properties
from tools.service_process import BIN_DIR
from tools.service_process import MANAGE
from tools.service_process import SERVICE
from tools.service_process import STARTED_RE
from tools.service_process import ServiceProcess as ScrubService
from tools.service_process import run_cli
from tools.service_process import wait_until
from tools.world import World
from tools.world import engine
from tools.world import image_statuses
from tools.world import location_statuses
from tools.world import make_pending
from tools.world import make_world
from tools.world import queue_rows
from tools.world import scrubbed
from tools.world import service_config
from tools.world import sqlite_queue_url
from tools.world import write_service_config

__all__ = [
    'BIN_DIR',
    'DeleteEvent',
    'DeleteLog',
    'GlancePublisher',
    'MANAGE',
    'SERVICE',
    'STARTED_RE',
    'ScrubService',
    'SweepLog',
    'Vhost',
    'World',
    'bind_queue',
    'drain_queue',
    'engine',
    'envelope',
    'glance_delete_message',
    'glance_exchange',
    'image_statuses',
    'location_statuses',
    'make_pending',
    'make_world',
    'queue_depth',
    'queue_properties',
    'queue_rows',
    'run_cli',
    'scrubbed',
    'service_config',
    'sqlite_queue_url',
    'wait_until',
    'write_service_config',
    'RpcCaller',
    'TcpProxy',
    'write_hooks',
]


def write_hooks(directory=None):
    """Environment additions that switch the import hooks on.

    (The hooks are ``tools/hooks/sitecustomize.py``; ``directory`` is no
    longer written to.)  Set SL_TEST_* variables on top of it.
    """
    return hooks.hook_env()


# ------------------------------------------------------------- processes


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
        svc.close()


# ------------------------------------------------------ RabbitMQ, databases


def _vhost():
    try:
        with new_vhost() as made:
            yield made
    except harness.HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def vhost():
    """A fresh RabbitMQ vhost, its transport URL and a Glance publisher."""
    yield from _vhost()


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


@pytest.fixture(scope='module')
def module_service(tmp_path_factory, module_vhost, module_glance_mysql):
    """Factory ``(name, **config) -> (world, service, config_file,
    sections, workdir)``: one started service on the module's vhost and
    Glance database (its own World, pool and RPC topic), killed after the
    module."""
    made = []

    def factory(name, **config):
        tmp = tmp_path_factory.mktemp(name)
        world = make_world(tmp, module_vhost, module_glance_mysql)
        sections = world.config(**config)
        config_file = write_service_config(tmp / 'service.conf', sections)
        service = ScrubService(config_file, tmp / 'service.log', name=name)
        made.append(service)
        service.start()
        return world, service, config_file, sections, str(tmp)

    yield factory
    for service in made:
        service.close()


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


# ------------------------------------------------------ RPC, in this process


class RpcCaller:
    """oslo.messaging RPC client in the test process (global cfg.CONF).

    ``call(method, **kwargs)`` with an admin context by default,
    ``call_as(ctxt, method, **kwargs)`` with any context.  Close it (or
    use ``with``) to drop its broker connections.
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

    def call_as(self, ctxt, method, **kwargs):
        return self._client.call(ctxt, method, **kwargs)

    def close(self):
        self._transport.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
