"""What every test service of the harness shares: the servers' addresses
(overridable by environment), unique names, ``HarnessError``, the lookup
of console scripts next to the interpreter, and oslo.config files.

Part of ``tools.harness`` (which re-exports it); see its docstring.
"""

import os
import shutil
import sys
import uuid

BACKENDS = ('sqlite', 'mysql', 'postgresql')

MYSQL_URL = os.environ.get(
    'SCRUB_LISTENER_TEST_MYSQL_URL',
    'mysql+pymysql://root@127.0.0.1:3306/?charset=utf8mb4',
)
POSTGRESQL_URL = os.environ.get(
    'SCRUB_LISTENER_TEST_POSTGRESQL_URL',
    'postgresql+psycopg2://postgres@127.0.0.1:5432/postgres',
)
RABBIT_URL = os.environ.get(
    'SCRUB_LISTENER_TEST_RABBIT_URL', 'rabbit://guest:guest@127.0.0.1:5672/'
)

#: Prefix of every database, vhost and temp dir this module creates.
NAME_PREFIX = 'sl_test_'

#: Tables of the Glance schema the project relies on.
GLANCE_IMAGE_TABLES = (
    'images',
    'image_locations',
    'image_properties',
    'image_tags',
    'image_members',
)

_START_HINTS = {
    'mysql': 'start-stop-daemon --start --oknodo --background '
    '--exec /usr/sbin/mariadbd',
    'postgresql': 'pg_ctlcluster --skip-systemctl-redirect '
    '$(ls /etc/postgresql) main start',
    'rabbit': 'rabbitmq-server -detached',
}


class HarnessError(Exception):
    """A test service is missing, misbehaves, or answered unexpectedly."""


def unique_name(prefix=NAME_PREFIX):
    """Return ``<prefix><8 hex chars>``, usable as a DB or vhost name."""
    return prefix + uuid.uuid4().hex[:8]


def bin_path(name, error=HarnessError):
    """Path of a console script installed next to the running python
    (else found on PATH).

    Raises ``error(message)`` if there is none: ``HarnessError`` for the
    harness, the benchmarks' own exit for theirs.
    """
    path = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if not found:
        raise error(f'{name} not found next to {sys.executable}')
    return found


# ------------------------------------------------------------------- config


def _format_value(value):
    if isinstance(value, bool):
        return 'True' if value else 'False'
    if isinstance(value, (list, tuple)):
        return ','.join(_format_value(v) for v in value)
    if isinstance(value, dict):
        return ','.join(f'{k}:{_format_value(v)}' for k, v in value.items())
    text = str(value)
    # oslo.config continues a value on lines that start with whitespace
    return text.replace('\n', '\n    ')


def write_config(path, sections):
    """Write an oslo.config INI file from ``{section: {option: value}}``.

    bool -> True/False, list/tuple -> comma separated (ListOpt), dict ->
    ``k:v,k2:v2`` (DictOpt), None -> option left out, multi-line strings
    as continuation lines.  Sections keep their dict order.
    """
    lines = []
    for section, options in sections.items():
        lines.append(f'[{section}]')
        for key, value in options.items():
            if value is None:
                continue
            lines.append(f'{key} = {_format_value(value)}')
        lines.append('')
    with open(path, 'w') as f:
        f.write('\n'.join(lines))
    return path
