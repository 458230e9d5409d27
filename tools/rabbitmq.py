"""RabbitMQ vhosts for tests and benchmarks: ``rabbitmqctl``, unique
vhosts with full rights, their transport URLs, and their removal.

Part of ``tools.harness`` (which re-exports it); see its docstring.
"""

import shutil
import socket
import subprocess
import urllib.parse

from tools.services import _START_HINTS
from tools.services import NAME_PREFIX
from tools.services import RABBIT_URL
from tools.services import HarnessError
from tools.services import unique_name

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
