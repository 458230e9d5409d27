"""``scrub-listener-manage restore`` and ``list`` on a real Glance schema.

A restore must leave an image that really works again (data, locations,
properties, tags, members), or refuse with a distinct exit code and change
nothing.  Tests run on SQLite, MariaDB and PostgreSQL, except the
argument checks that never reach a database and the decryption of
locations (SQLite only).
"""

import datetime
import os

import pytest

from tests.functional.conftest import KEY
from tests.functional.conftest import ago
from tests.functional.conftest import assert_error
from tests.functional.conftest import assert_ok
from tests.functional.conftest import assert_summary

HOUR = 3600


def _read(path):
    with open(path, 'rb') as f:
        return f.read()


def _by_name(rows, column='name'):
    return {row[column]: row for row in rows}


def test_restore_brings_back_data_locations_properties_tags_members(env):
    """What Glance soft-deleted with the image comes back; a property
    deleted earlier, on the live image, stays deleted."""
    data = os.urandom(64 * 1024)
    deleted_at = ago(60)
    image_id = env.make_image(
        data=data,
        deleted_at=deleted_at,
        properties={'os_distro': 'cirros', 'hw_disk_bus': 'scsi'},
        tags=['t1', 't2'],
        members=['tenant-b'],
    )
    env.add_child(
        'image_properties',
        image_id,
        deleted_at=ago(2 * HOUR),
        name='removed_earlier',
        value='x',
    )
    env.add_child(
        'image_tags', image_id, deleted_at=ago(2 * HOUR), value='old-tag'
    )

    result = assert_ok(env.restore(image_id))

    assert (
        f'Image {image_id} restored to active: 1 location(s), 2 properties, '
        '2 tags, 1 members brought back.'
    ) in result.stdout
    image = env.image(image_id)
    assert image['status'] == 'active'
    assert image['deleted'] is False
    assert image['deleted_at'] is None
    (location,) = env.locations(image_id)
    assert location['status'] == 'active'
    assert location['deleted'] is False
    assert location['deleted_at'] is None
    props = _by_name(env.children('image_properties', image_id))
    assert {n: (p['value'], p['deleted']) for n, p in props.items()} == {
        'os_distro': ('cirros', False),
        'hw_disk_bus': ('scsi', False),
        'removed_earlier': ('x', True),
    }
    assert props['removed_earlier']['deleted_at'] is not None
    tags = _by_name(env.children('image_tags', image_id), 'value')
    assert {t: row['deleted'] for t, row in tags.items()} == {
        't1': False,
        't2': False,
        'old-tag': True,
    }
    (member,) = env.children('image_members', image_id)
    assert (member['member'], member['deleted']) == ('tenant-b', False)
    assert member['deleted_at'] is None
    assert _read(env.data_path(image_id)) == data

    # A restored image is alive: a sweep leaves it alone.
    sweep = assert_ok(env.sweep())
    assert_summary(sweep, scrubbed=0, failed=0)
    assert _read(env.data_path(image_id)) == data
    assert env.image(image_id)['status'] == 'active'


def test_restore_multi_location_keeps_earlier_removed_locations_removed(env):
    """Every location of the deletion comes back.  Locations removed from
    the live image before the delete stay as they are: one removed an hour
    before and not scrubbed yet stays ``pending_delete``; one removed two
    minutes before and already scrubbed stays ``deleted`` and does not
    make the restore think the image's data is gone."""
    env.configure(scrub_time=3 * HOUR)
    data = os.urandom(2048)
    names = ('a', 'b', 'removed', 'scrubbed')
    paths = [os.path.join(env.store_dir, n) for n in names]
    image_id = env.make_image(
        status='active',
        data=data,
        locations=[(env.write_file(p, data), {'store': 'fs'}) for p in paths],
    )
    first, second, removed, scrubbed = env.locations(image_id)
    env.remove_location(removed['id'], ago(HOUR))
    env.remove_location(scrubbed['id'], ago(120))
    env.update_location(scrubbed['id'], status='deleted', updated_at=ago(60))
    os.unlink(paths[3])
    env.glance_delete(image_id, ago(10))

    result = assert_ok(env.restore(image_id))

    assert 'restored to active: 2 location(s)' in result.stdout
    assert env.image(image_id)['status'] == 'active'
    rows = env.locations(image_id)
    assert [(r['status'], r['deleted']) for r in rows] == [
        ('active', False),
        ('active', False),
        ('pending_delete', True),
        ('deleted', True),
    ]
    for path in paths[:3]:
        assert _read(path) == data


def test_restore_encrypted_locations(sqlite_env):
    """The data check decrypts the URL; the stored ciphertext is kept."""
    env = sqlite_env
    env.configure(key=KEY)
    data = os.urandom(4096)
    image_id = env.make_image(data=data, encrypt_key=KEY)
    (before,) = env.locations(image_id)

    assert_ok(env.restore(image_id))

    (after,) = env.locations(image_id)
    assert after['status'] == 'active'
    assert after['value'] == before['value']
    from glance.common import crypt

    assert crypt.urlsafe_decrypt(KEY, after['value']) == (
        'file://' + env.data_path(image_id)
    )
    assert _read(env.data_path(image_id)) == data


# ------------------------------------------------------------ refusals


def _assert_refused(env, image_id, code, *fragments):
    """Restore fails with ``code`` and changes no row and no file."""
    before = env.snapshot(image_id)
    path = env.data_path(image_id)
    data = _read(path) if os.path.exists(path) else None

    line = assert_error(env.restore(image_id), code, *fragments)

    assert env.snapshot(image_id) == before
    if data is not None:
        assert _read(path) == data
    return line


@pytest.mark.parametrize(
    'image_id',
    [
        "' OR '1'='1",
        '{12345678-1234-5678-1234-567812345678}',
        '',
    ],
    ids=['sql', 'braces', 'empty'],
)
def test_restore_garbage_id(sqlite_env, image_id):
    """Refused before any query (the unknown-but-valid id and the active
    image are in test_glance_reference_scenarios.py)."""
    env = sqlite_env
    other = env.make_image()
    before = env.snapshot(other)

    result = env.restore(image_id)

    assert_error(result, 2, 'not a valid image id')
    assert env.snapshot(other) == before


def test_restore_already_scrubbed_image(env):
    """As a finished scrub leaves it: data gone, rows ``deleted``."""
    image_id = env.make_image(status='deleted')
    os.unlink(env.data_path(image_id))
    (row,) = env.locations(image_id)
    env.update_location(row['id'], status='deleted')

    _assert_refused(env, image_id, 5, image_id, 'is deleted')


def test_restore_partly_scrubbed_image(env):
    """As a scrub leaves an image when one location was scrubbed and the
    other failed: the image stays pending_delete, part of its data is
    gone (test_sweep_once covers producing this state)."""
    data = os.urandom(1000)
    gone = os.path.join(env.store_dir, 'gone')
    kept = os.path.join(env.store_dir, 'kept')
    image_id = env.make_image(
        data=data,
        locations=[
            (env.write_file(gone, data), {'store': 'fs'}),
            (env.write_file(kept, data), {'store': 'fs'}),
        ],
    )
    os.unlink(gone)
    scrubbed_row, _ = env.locations(image_id)
    env.update_location(scrubbed_row['id'], status='deleted')

    _assert_refused(env, image_id, 6, 'data is gone', 'already scrubbed')
    assert _read(kept) == data


@pytest.mark.parametrize('damage', ['missing', 'truncated'])
def test_restore_when_data_is_not_in_store(env, damage):
    data = os.urandom(2048)
    image_id = env.make_image(data=data)
    path = env.data_path(image_id)
    if damage == 'missing':
        os.unlink(path)
        expected = 'no longer in its store'
    else:
        with open(path, 'wb') as f:
            f.write(data[:100])
        expected = 'holds 100 bytes'

    _assert_refused(env, image_id, 6, image_id, 'data is gone', expected)


def test_restore_while_scrub_in_progress(env):
    """A scrubber has claimed the location (status ``scrubbing``, fresh)."""
    image_id = env.make_image()
    (location,) = env.locations(image_id)
    env.update_location(location['id'], status='scrubbing', updated_at=ago(1))

    _assert_refused(env, image_id, 7, image_id, 'being scrubbed')


# ------------------------------------------------ after a restore


def test_late_queue_entry_after_restore_does_not_scrub(env):
    """The image.delete event of the deletion arrives after the restore
    (or the queue entry outlived it): the sweep drops it, the data stays."""
    data = os.urandom(1500)
    image_id = env.make_image(data=data)
    deleted_at = env.image(image_id)['deleted_at']
    assert_ok(env.restore(image_id))
    assert env.enqueue(image_id, deleted_at) == 1

    result = assert_ok(env.sweep())

    assert_summary(result, scrubbed=0, failed=0, skipped=1)
    assert _read(env.data_path(image_id)) == data
    image = env.image(image_id)
    assert (image['status'], image['deleted']) == ('active', False)
    assert [r['status'] for r in env.locations(image_id)] == ['active']


def test_deleted_again_after_restore_is_scrubbed(env):
    """Restore, then Glance deletes the image again: the new deletion is
    scrubbed by the next sweep, also with a stale entry of the old one
    still queued."""
    image_id = env.make_image(properties={'os_distro': 'cirros'})
    old_deleted_at = env.image(image_id)['deleted_at']
    assert_ok(env.restore(image_id))
    env.enqueue(image_id, old_deleted_at)
    new_deleted_at = ago(5)
    env.glance_delete(image_id, new_deleted_at)

    result = assert_ok(env.sweep())

    assert_summary(result, scrubbed=1, failed=0, skipped=1)
    env.assert_scrubbed(image_id)
    assert env.image(image_id)['deleted_at'] > old_deleted_at


# ---------------------------------------------- finding what to restore


def test_list_filters_and_formats(env):
    """The API hides pending_delete images; ``list`` is how an operator
    finds the id to restore: by owner, name, deletion time."""
    env.configure(scrub_time=HOUR)
    t0 = ago(3 * HOUR)
    a = env.make_image(owner='alice', name='web', deleted_at=t0)
    b = env.make_image(
        owner='alice',
        name='db',
        deleted_at=t0 + datetime.timedelta(hours=2, minutes=30),
        data=b'b' * 77,
    )
    c = env.make_image(
        owner='bob', name='web', deleted_at=t0 + datetime.timedelta(hours=1)
    )
    env.make_image(status='active', owner='alice', name='web')

    every = env.list_json()
    assert set(every) == {a, b, c}
    row = every[b]
    assert row['owner'] == 'alice'
    assert row['name'] == 'db'
    assert row['size'] == 77
    assert row['state'] == 'waiting'
    deleted = datetime.datetime.fromisoformat(row['deleted_at'].rstrip('Z'))
    due = datetime.datetime.fromisoformat(row['due_at'].rstrip('Z'))
    assert due - deleted == datetime.timedelta(hours=1)
    assert every[a]['state'] in ('not queued', 'due')

    assert set(env.list_json('--owner', 'alice')) == {a, b}
    since = (t0 + datetime.timedelta(minutes=30)).isoformat() + 'Z'
    assert set(env.list_json('--deleted-since', since)) == {b, c}
