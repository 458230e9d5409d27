"""End to end with a real glance-api 33.0.0 (gunicorn, MariaDB,
``delayed_delete = True``, file stores ``fs`` and ``fs2``).

Images are uploaded and deleted through the API; scrub-listener runs as
the operator runs it, on the same database and store directories; what
the API serves afterwards is the verdict.  One glance-api per module (per
``metadata_encryption_key``), so each test works on its own images only.
"""

import os

import pytest

from tests.functional.conftest import KEY
from tests.functional.conftest import MANAGE
from tests.functional.conftest import RESTORE
from tests.functional.conftest import SCRUB_LISTENER
from tests.functional.conftest import assert_ok
from tests.functional.conftest import run_cli
from tools import harness


def _scrub_listener_conf(api, tmp_path):
    """scrub-listener's config for this glance-api, as an operator would
    write it from glance-api.conf."""
    return harness.write_config(
        str(tmp_path / 'scrub-listener.conf'),
        {
            'DEFAULT': {
                'scrub_time': 0,
                'enabled_backends': 'fs:file,fs2:file',
                'metadata_encryption_key': api.encryption_key,
                'state_path': str(tmp_path / 'state'),
            },
            'database': {'connection': api.db_url},
            'glance_store': {'default_backend': 'fs'},
            'fs': {'filesystem_store_datadir': api.store_dir},
            'fs2': {'filesystem_store_datadir': api.store_dir_of('fs2')},
        },
    )


def _rows(api, image_id):
    image = harness.fetch_all(
        api.db_url,
        'SELECT status, deleted FROM images WHERE id = :id',
        id=image_id,
    )[0]
    locations = harness.fetch_all(
        api.db_url,
        'SELECT status, deleted FROM image_locations WHERE image_id = :id '
        'ORDER BY id',
        id=image_id,
    )
    return (
        (image['status'], bool(image['deleted'])),
        [(loc['status'], bool(loc['deleted'])) for loc in locations],
    )


@pytest.fixture(params=[None, KEY], ids=['plain', 'encrypted'])
def api(request, module_glance_api):
    return module_glance_api(request.param)


def test_delete_via_api_then_sweep_once_scrubs(api, tmp_path):
    conf = _scrub_listener_conf(api, tmp_path)
    data = os.urandom(256 * 1024)
    image_id = api.create_image(
        'e2e-scrub', data, tags=['t1'], os_distro='cirros'
    )
    path = os.path.join(api.store_dir, image_id)
    assert api.download(image_id) == (200, data)
    api.delete_image(image_id)
    assert os.path.exists(path)
    assert _rows(api, image_id) == (
        ('pending_delete', True),
        [('pending_delete', True)],
    )

    result = assert_ok(
        run_cli([SCRUB_LISTENER, '--config-file', conf, '--sweep-once'])
    )

    assert 'failed 0,' in result.stdout, str(result)
    assert not os.path.exists(path)
    assert _rows(api, image_id) == (('deleted', True), [('deleted', True)])
    assert api.get_image(image_id) is None


def test_delete_via_api_then_restore_serves_same_bytes(api, tmp_path):
    conf = _scrub_listener_conf(api, tmp_path)
    data = os.urandom(300 * 1024 + 7)
    image_id = api.create_image(
        'e2e-restore', data, tags=['t1', 't2'], os_distro='cirros'
    )
    api.delete_image(image_id)
    assert api.get_image(image_id) is None
    # The API hides it; the operator finds the id with list.
    listing = assert_ok(
        run_cli(
            [MANAGE, '--config-file', conf, 'list', '--name', 'e2e-restore']
        )
    ).stdout
    assert image_id in listing

    result = assert_ok(
        run_cli([MANAGE, '--config-file', conf, *RESTORE, image_id])
    )

    assert f'Image {image_id} restored to active' in result.stdout
    image = api.get_image(image_id)
    assert image is not None
    assert image['status'] == 'active'
    assert image['os_distro'] == 'cirros'
    assert sorted(image['tags']) == ['t1', 't2']
    assert image['size'] == len(data)
    assert image['stores'] == 'fs'
    assert api.download(image_id) == (200, data)

    # The restored image is alive: a sweep leaves it, the API still serves
    # it, and it can be deleted and scrubbed again.
    sweep = [SCRUB_LISTENER, '--config-file', conf, '--sweep-once']
    assert_ok(run_cli(sweep))
    assert api.download(image_id) == (200, data)
    api.delete_image(image_id)
    assert_ok(run_cli(sweep))
    assert not os.path.exists(os.path.join(api.store_dir, image_id))
    assert _rows(api, image_id) == (('deleted', True), [('deleted', True)])


def test_location_removed_via_api_is_scrubbed(module_glance_api, tmp_path):
    """PATCH remove /locations/1 on an active image: the removed copy's
    data is scrubbed, the image keeps serving from the other one."""
    api = module_glance_api(None)
    conf = _scrub_listener_conf(api, tmp_path)
    data = os.urandom(64 * 1024)
    image_id = api.create_image('e2e-two-copies', data)
    copy = os.path.join(api.store_dir_of('fs2'), image_id)
    with open(copy, 'wb') as f:
        f.write(data)
    api.add_location_row(image_id, 'file://' + copy, store='fs2')
    assert api.get_image(image_id)['stores'] == 'fs,fs2'
    api.remove_location(image_id, 1)

    assert_ok(run_cli([SCRUB_LISTENER, '--config-file', conf, '--sweep-once']))

    assert not os.path.exists(copy)
    assert os.path.exists(os.path.join(api.store_dir, image_id))
    assert _rows(api, image_id) == (
        ('active', False),
        [('active', False), ('deleted', True)],
    )
    image = api.get_image(image_id)
    assert (image['status'], image['stores']) == ('active', 'fs')
    assert api.download(image_id) == (200, data)
