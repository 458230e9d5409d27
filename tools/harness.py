"""Real services for tests and benchmarks: Glance databases, glance-api,
RabbitMQ vhosts.

Plain Python (no pytest), so the pytest fixtures in ``tests/conftest.py``
and the benchmark scripts under ``tools/`` share one implementation.

Everything created here has a unique name (``sl_test_<hex8>``) and is meant
to be dropped again by the caller, because the database and message servers
are shared with other sessions and with CI.

Databases::

    url = create_glance_database('postgresql')  # real `glance-manage db_sync`
    truncate_glance_tables(url)                  # rows of images + children
    drop_database(url)
    url = create_empty_database('mysql')         # no schema at all

glance-api (glance 33.0.0 under gunicorn, no keystone, admin context)::

    with GlanceApi(url, workdir, transport_url=..., encryption_key=...) as api:
        image_id = api.create_image('name', b'data', os_distro='x',
                                    tags=['t'])
        api.delete_image(image_id)

RabbitMQ::

    vhost, transport_url = create_vhost()
    delete_vhost(vhost)

Server addresses can be overridden with ``SCRUB_LISTENER_TEST_MYSQL_URL``,
``SCRUB_LISTENER_TEST_POSTGRESQL_URL`` (both SQLAlchemy URLs of a database
the admin connection may use) and ``SCRUB_LISTENER_TEST_RABBIT_URL``.

The implementation is split by service: ``tools/services.py`` (what they
share: addresses, names, ``HarnessError``, console scripts, config
files), ``tools/databases.py``, ``tools/rabbitmq.py`` and
``tools/glance_api.py``.  This module re-exports their names, so callers
keep using ``from tools import harness``.
"""

from tools.databases import _admin_url
from tools.databases import _url_string
from tools.databases import backend_of
from tools.databases import check_backend
from tools.databases import create_empty_database
from tools.databases import create_glance_database
from tools.databases import db_sync
from tools.databases import drop_database
from tools.databases import drop_templates
from tools.databases import fetch_all
from tools.databases import table_names
from tools.databases import truncate_glance_tables
from tools.glance_api import ALLOW_ALL_POLICY
from tools.glance_api import DATADIR_MARKER
from tools.glance_api import GlanceApi
from tools.glance_api import free_port
from tools.glance_api import glance_paste_ini
from tools.glance_api import make_datadir
from tools.glance_api import stop_all_glance_apis
from tools.rabbitmq import _rabbitmqctl
from tools.rabbitmq import amqp_url
from tools.rabbitmq import create_vhost
from tools.rabbitmq import delete_vhost
from tools.rabbitmq import rabbit_transport_url
from tools.services import BACKENDS
from tools.services import GLANCE_IMAGE_TABLES
from tools.services import MYSQL_URL
from tools.services import NAME_PREFIX
from tools.services import POSTGRESQL_URL
from tools.services import RABBIT_URL
from tools.services import HarnessError
from tools.services import bin_path
from tools.services import unique_name
from tools.services import write_config

__all__ = [
    'ALLOW_ALL_POLICY',
    'BACKENDS',
    'DATADIR_MARKER',
    'GLANCE_IMAGE_TABLES',
    'GlanceApi',
    'HarnessError',
    'MYSQL_URL',
    'NAME_PREFIX',
    'POSTGRESQL_URL',
    'RABBIT_URL',
    '_admin_url',
    '_rabbitmqctl',
    '_url_string',
    'amqp_url',
    'backend_of',
    'bin_path',
    'check_backend',
    'create_empty_database',
    'create_glance_database',
    'create_vhost',
    'db_sync',
    'delete_vhost',
    'drop_database',
    'drop_templates',
    'fetch_all',
    'free_port',
    'glance_paste_ini',
    'make_datadir',
    'rabbit_transport_url',
    'stop_all_glance_apis',
    'table_names',
    'truncate_glance_tables',
    'unique_name',
    'write_config',
]
