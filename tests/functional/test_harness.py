"""The test harness works against the real services.

These tests double as executable documentation of what a real glance-api
33.0.0 does with ``delayed_delete = True``: the rows and files it leaves
for a scrubber, and the notification it sends.
"""

import json
import os
import time
import uuid

import kombu
import pytest
import sqlalchemy as sa
from oslo_config import cfg

from tools import harness

ENCRYPTION_KEY = '0123456789abcdef0123456789abcdef'


def _insert_image_with_children(url):
    image_id = str(uuid.uuid4())
    now = sa.func.now()
    meta = sa.MetaData()
    meta.reflect(sa.create_engine(url), only=harness.GLANCE_IMAGE_TABLES)
    t = meta.tables
    common = {'created_at': now, 'deleted': False}
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            t['images']
            .insert()
            .values(
                id=image_id, status='active', min_disk=0, min_ram=0, **common
            )
        )
        conn.execute(
            t['image_locations']
            .insert()
            .values(image_id=image_id, value='file:///x', **common)
        )
        conn.execute(
            t['image_properties']
            .insert()
            .values(image_id=image_id, name='p', value='v', **common)
        )
        conn.execute(
            t['image_tags']
            .insert()
            .values(image_id=image_id, value='tag', **common)
        )
        conn.execute(
            t['image_members']
            .insert()
            .values(image_id=image_id, member='m', can_share=False, **common)
        )
    engine.dispose()
    return image_id


def _count(url, table):
    return harness.fetch_all(url, f'SELECT COUNT(*) AS n FROM {table}')[0]['n']


def test_glance_schema(glance_db_url):
    tables = harness.table_names(glance_db_url)
    assert set(harness.GLANCE_IMAGE_TABLES) <= tables
    version = harness.fetch_all(
        glance_db_url, 'SELECT version_num FROM alembic_version'
    )
    assert version == [{'version_num': '2024_1_contract01'}]


def test_truncate_glance_tables(glance_db_url):
    _insert_image_with_children(glance_db_url)
    assert _count(glance_db_url, 'images') == 1
    harness.truncate_glance_tables(glance_db_url)
    for table in harness.GLANCE_IMAGE_TABLES:
        assert _count(glance_db_url, table) == 0, table
    # left behind for the next test, which must not see them
    _insert_image_with_children(glance_db_url)


def test_session_db_is_clean_for_each_test(glance_db_url):
    for table in harness.GLANCE_IMAGE_TABLES:
        assert _count(glance_db_url, table) == 0, table


def test_sqlite_glance_db_url(sqlite_glance_db_url):
    assert sqlite_glance_db_url.startswith('sqlite:////')
    assert 'images' in harness.table_names(sqlite_glance_db_url)
    assert _count(sqlite_glance_db_url, 'images') == 0


def test_uncached_db_sync_matches_cached_copy():
    cached = harness.create_glance_database('sqlite')
    fresh = harness.create_glance_database('sqlite', cache=False)
    try:
        assert harness.table_names(cached) == harness.table_names(fresh)
        assert cached != fresh
    finally:
        harness.drop_database(cached)
        harness.drop_database(fresh)
    assert not os.path.exists(sa.engine.make_url(cached).database)


def test_empty_database(queue_db_url):
    assert harness.table_names(queue_db_url) == set()
    harness.fetch_all(queue_db_url, 'CREATE TABLE q (id INTEGER PRIMARY KEY)')
    harness.fetch_all(queue_db_url, 'INSERT INTO q (id) VALUES (1)')
    assert harness.fetch_all(queue_db_url, 'SELECT id FROM q') == [{'id': 1}]


def test_write_config_is_read_by_oslo_config(tmp_path):
    path = harness.write_config(
        str(tmp_path / 'x.conf'),
        {
            'DEFAULT': {'flag': True, 'skipped': None},
            'grp': {
                'names': ['a', 'b'],
                'mapping': {'k': 'v', 'k2': 2},
                'text': 'line1\nline2',
                'port': 5,
            },
        },
    )
    conf = cfg.ConfigOpts()
    conf.register_opts([cfg.BoolOpt('flag'), cfg.StrOpt('skipped')])
    conf.register_opts(
        [
            cfg.ListOpt('names'),
            cfg.DictOpt('mapping'),
            cfg.StrOpt('text'),
            cfg.IntOpt('port'),
        ],
        group='grp',
    )
    conf([], default_config_files=[path])
    assert conf.flag is True
    assert conf.skipped is None
    assert conf.grp.names == ['a', 'b']
    assert conf.grp.mapping == {'k': 'v', 'k2': '2'}
    assert conf.grp.text == 'line1\nline2'
    assert conf.grp.port == 5


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_glance_api_delayed_delete_round_trip(glance_api):
    """Create, download and delete through a real glance-api.

    With ``delayed_delete`` the DELETE only marks rows: the image becomes
    ``pending_delete`` with deleted=1 and deleted_at set, its location
    ``pending_delete`` with deleted=1, and the data stays in the store.
    """
    api = glance_api()
    data = os.urandom(64 * 1024)
    image_id = api.create_image(
        'round-trip', data, os_distro='cirros', tags=['t1']
    )
    api.add_tag(image_id, 't2')
    image = api.get_image(image_id)
    assert image['status'] == 'active'
    assert image['os_distro'] == 'cirros'
    assert sorted(image['tags']) == ['t1', 't2']
    assert image['stores'] == 'fs'
    assert api.download(image_id) == (200, data)
    path = os.path.join(api.store_dir, image_id)
    assert os.path.exists(path)

    api.delete_image(image_id)

    assert api.get_image(image_id) is None
    rows = harness.fetch_all(
        api.db_url,
        'SELECT status, deleted, deleted_at FROM images WHERE id = :id',
        id=image_id,
    )
    assert len(rows) == 1
    assert rows[0]['status'] == 'pending_delete'
    assert rows[0]['deleted']
    assert rows[0]['deleted_at'] is not None
    locations = harness.fetch_all(
        api.db_url,
        'SELECT value, status, deleted, meta_data FROM image_locations '
        'WHERE image_id = :id',
        id=image_id,
    )
    assert [(loc['status'], bool(loc['deleted'])) for loc in locations] == [
        ('pending_delete', True)
    ]
    assert locations[0]['value'] == 'file://' + path
    assert json.loads(locations[0]['meta_data']) == {'store': 'fs'}
    with open(path, 'rb') as f:
        assert f.read() == data

    pgid = api.proc.pid
    api.stop()
    assert not _group_alive(pgid)


def test_glance_api_encrypts_locations(glance_api):
    from glance.common import crypt

    api = glance_api(encryption_key=ENCRYPTION_KEY)
    image_id = api.create_image('secret', b'abc')
    assert api.download(image_id) == (200, b'abc')
    api.delete_image(image_id)
    (row,) = harness.fetch_all(
        api.db_url,
        'SELECT value, status FROM image_locations WHERE image_id = :id',
        id=image_id,
    )
    assert row['status'] == 'pending_delete'
    assert not row['value'].startswith('file://')
    plain = 'file://' + os.path.join(api.store_dir, image_id)
    assert crypt.urlsafe_decrypt(ENCRYPTION_KEY, row['value']) == plain


def test_glance_api_remove_location(glance_api):
    """PATCH remove /locations/N on an active image (glance 33).

    Needs ``show_multiple_locations = True`` (else 403) and a second
    location: the API cannot add a ``file://`` one, so the harness inserts
    the row.  The removed location becomes ``pending_delete`` with
    deleted=1 while the image stays active, and its data stays.  The last
    location cannot be removed (403).
    """
    api = glance_api(encryption_key=ENCRYPTION_KEY, extra_backends=['fs2'])
    image_id = api.create_image('two-locations', b'data')
    copy = os.path.join(api.store_dir_of('fs2'), image_id)
    with open(copy, 'wb') as f:
        f.write(b'data')
    api.add_location_row(image_id, 'file://' + copy, store='fs2')
    assert api.get_image(image_id)['stores'] == 'fs,fs2'

    image = api.remove_location(image_id, 1)

    assert image['status'] == 'active'
    assert image['stores'] == 'fs'
    rows = harness.fetch_all(
        api.db_url,
        'SELECT status, deleted, meta_data FROM image_locations '
        'WHERE image_id = :id ORDER BY id',
        id=image_id,
    )
    assert [(r['status'], bool(r['deleted'])) for r in rows] == [
        ('active', False),
        ('pending_delete', True),
    ]
    assert json.loads(rows[1]['meta_data']) == {'store': 'fs2'}
    assert os.path.exists(copy)
    resp = api.request(
        'PATCH',
        f'/v2/images/{image_id}',
        data=json.dumps([{'op': 'remove', 'path': '/locations/0'}]),
        headers={
            'Content-Type': 'application/openstack-images-v2.1-json-patch'
        },
    )
    assert resp.status_code == 403
    assert api.download(image_id) == (200, b'data')


def _bind_notification_queue(conn):
    # why these flags: oslo.messaging declares the control exchange as a
    # non-durable, non-auto-delete topic exchange; a different declaration
    # would make one side fail with PRECONDITION_FAILED.
    exchange = kombu.Exchange(
        'glance', type='topic', durable=False, auto_delete=False
    )
    queue = kombu.Queue(
        harness.unique_name(),
        exchange,
        routing_key='notifications.info',
        durable=False,
        exclusive=True,
    )
    bound = queue(conn.default_channel)
    bound.declare()
    return bound


def _wait_for_event(queue, event_type, timeout=30):
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = queue.get(no_ack=True)
        if message is None:
            time.sleep(0.05)
            continue
        envelope = json.loads(message.body)
        body = json.loads(envelope['oslo.message'])
        seen.append(body['event_type'])
        if body['event_type'] == event_type:
            return envelope, body, seen
    pytest.fail(f'no {event_type} notification within {timeout} s: {seen}')


def test_glance_api_sends_image_delete_notification(glance_api, rabbit_vhost):
    """glance-api 33 publishes ``image.delete`` to exchange ``glance``.

    The queue must be bound before the delete: nothing is kept for a queue
    that does not exist yet.  Seen on RabbitMQ with routing key
    ``notifications.info``, envelope ``{"oslo.version": "2.0",
    "oslo.message": "<json string>"}``, the decoded message was::

        {"message_id": "2086624b-0eb1-451e-8e3e-b4133314289b",
         "publisher_id": "image.localhost",
         "event_type": "image.delete",
         "priority": "INFO",
         "payload": {"id": "69aaa90a-9aca-4ee4-859c-a842ba9a881c",
                     "name": "notify", "status": "pending_delete",
                     "created_at": "2026-11-25T15:52:10Z",
                     "updated_at": "2026-11-25T15:52:10Z",
                     "min_disk": 0, "min_ram": 0, "protected": false,
                     "checksum": "8d777f385d3dfec8815d20f7496026dc",
                     "owner": null, "disk_format": "raw",
                     "container_format": "bare", "size": 4,
                     "virtual_size": 4, "is_public": false,
                     "visibility": "shared",
                     "properties": {"os_distro": "cirros"},
                     "tags": ["t1"], "deleted": true,
                     "deleted_at": "2026-11-25T15:52:10Z"},
         "timestamp": "2026-11-25 15:52:10.199811",
         "_unique_id": "801c095fc19042f9b11e08a8e57ef866"}

    No locations in the payload; ``deleted_at`` is to the second.  The
    events on the queue for create + upload + delete, in order:
    image.create, image.update, image.prepare, image.upload,
    image.activate, image.update, image.delete.  Run with ``-s`` to see
    the current body.
    """
    api = glance_api(transport_url=rabbit_vhost)
    with kombu.Connection(harness.amqp_url(rabbit_vhost)) as conn:
        queue = _bind_notification_queue(conn)
        image_id = api.create_image(
            'notify', b'data', os_distro='cirros', tags=['t1']
        )
        api.delete_image(image_id)
        envelope, body, seen = _wait_for_event(queue, 'image.delete')

    assert envelope['oslo.version'] == '2.0'
    assert body['publisher_id'] == 'image.localhost'
    assert body['priority'] == 'INFO'
    payload = body['payload']
    assert payload['id'] == image_id
    assert payload['status'] == 'pending_delete'
    assert payload['deleted'] is True
    assert payload['deleted_at']
    assert payload['properties'] == {'os_distro': 'cirros'}
    assert payload['tags'] == ['t1']
    assert 'locations' not in payload
    assert seen[0] == 'image.create'
    assert seen[-1] == 'image.delete'
    print(json.dumps({'seen': seen, 'message': body}, indent=1))


def test_glance_api_start_failure_shows_log(tmp_path):
    api = harness.GlanceApi(
        'mysql+pymysql://root@127.0.0.1:1/none', str(tmp_path)
    )
    api.extra_config = {'DEFAULT': {'enabled_backends': 'os_glance_x:file'}}
    with pytest.raises(harness.HarnessError, match='(?s)exited.*os_glance_'):
        api.start()
    assert api.proc is None


def test_rabbit_vhost(rabbit_vhost):
    with kombu.Connection(harness.amqp_url(rabbit_vhost)) as conn:
        conn.connect()
        assert conn.connected


def test_create_and_delete_vhost():
    name, url = harness.create_vhost()
    try:
        assert url.endswith('/' + name)
        with kombu.Connection(harness.amqp_url(url)) as conn:
            conn.connect()
    finally:
        harness.delete_vhost(name)
    harness.delete_vhost(name)  # idempotent
