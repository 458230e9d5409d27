"""End to end: a real glance-api 33.0.0, the real broker, the running service.

glance-api (``delayed_delete = True``, notifications ``messagingv2`` to a
fresh vhost, MariaDB) deletes images through its REST API; the
scrub-listener service, started first (its pool queue must exist before
Glance publishes), scrubs them from the ``image.delete`` notification
alone (``wakeup_time`` an hour: no sweep helps), and restores them over
RPC.
"""

import os
import signal
import time

from tests.functional import service_fixtures as sf

services = sf.services
vhost = sf.vhost


def _reload(svc, sections, scrub_time):
    sections['DEFAULT']['scrub_time'] = scrub_time
    sf.write_service_config(svc.config_file, sections)
    before = svc.count('Configuration reloaded')
    svc.send(signal.SIGHUP)
    svc.wait_for_log(
        rf'Configuration reloaded: scrub_time {scrub_time} s',
        10,
        count=1,
    )
    assert svc.count('Configuration reloaded') == before + 1


def test_delete_scrub_restore_through_a_real_glance_api(
    tmp_path, vhost, glance_api, services
):
    api = glance_api(transport_url=vhost.transport_url)
    world = sf.make_world(tmp_path, vhost, api.db_url)
    world.store_dir = api.store_dir
    sections = world.config()
    # Glance publishes to the topic "notifications" of exchange "glance"
    # (the defaults); the service gets its own pool queue there.
    svc = services(sections, env=world.env())
    queue = sf.sqlite_queue_url(world.workdir)

    # -- deleted through the API: scrubbed within seconds ------------------
    first = api.create_image('e2e-1', os.urandom(64 * 1024))
    assert os.path.exists(world.path(first))
    started = time.monotonic()
    api.delete_image(first)
    world.wait_scrubbed([first], 15, svc)
    latency = time.monotonic() - started
    print(f'\nDELETE /v2/images -> data gone, rows deleted: {latency:.2f} s')
    assert latency < 5
    assert api.get_image(first) is None
    assert svc.count(rf'Scrubbed image {first}: 1 location\(s\), 65536 ') == 1
    assert svc.count('Sweep found') == 1  # only the one at start

    # a burst of API deletes: all scrubbed, none twice
    burst = [
        api.create_image(f'burst-{i}', os.urandom(4096)) for i in range(10)
    ]
    for image_id in burst:
        api.delete_image(image_id)
    world.wait_scrubbed(burst, 20, svc)
    assert world.deletes.paths_deleted_more_than_once() == {}
    assert len(world.deletes.calls()) == 1 + len(burst)

    # -- deleted, then restored over RPC -----------------------------------
    _reload(svc, sections, 3600)
    data = os.urandom(100 * 1024 + 7)
    second = api.create_image('e2e-2', data, tags=['keep'], os_distro='cirros')
    api.delete_image(second)
    # the notification reached the service: its deletion is queued
    sf.wait_until(
        lambda: [r for r in sf.queue_rows(queue) if r['image_id'] == second],
        10,
        message=svc.log_tail,
    )
    assert api.get_image(second) is None  # Glance hides pending_delete

    rc, out, err, took = sf.run_cli(['restore', second], svc.config_file)
    assert rc == 0, err
    assert out.startswith(
        f'Image {second} restored to active: 1 location(s), 1 properties, '
        '1 tags'
    )
    image = api.get_image(second)
    assert image['status'] == 'active'
    assert image['tags'] == ['keep']
    assert image['os_distro'] == 'cirros'
    assert image['size'] == len(data)
    status, body = api.download(second)
    assert status == 200
    assert body == data
    print(f'restore over RPC (CLI process incl.): {took:.2f} s')

    # -- deleted again after the restore: a new deletion, scrubbed --------
    _reload(svc, sections, 0)
    started = time.monotonic()
    api.delete_image(second)
    world.wait_scrubbed([second], 15, svc)
    print(
        'second DELETE of the restored image -> scrubbed: '
        f'{time.monotonic() - started:.2f} s'
    )
    assert api.get_image(second) is None
    assert svc.alive()
    assert sf.queue_rows(queue) == []
