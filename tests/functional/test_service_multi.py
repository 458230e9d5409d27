"""Several service processes on one shared due-queue (MariaDB/PostgreSQL).

The services share the vhost and the listener pool (so they compete for
notifications), the Glance database and the due-queue database.  Every
store delete is logged with the pid that made it (sitecustomize hook), so
"no image scrubbed twice" is checked on what really reached the store.
"""

import collections
import os
import random
import threading
import time

import oslo_messaging
import pytest

from scrub_listener import exceptions
from tests.functional import service_fixtures as sf
from tools import glance_rows

services = sf.services
module_vhost = sf.module_vhost
empty_db_factory = sf.empty_db_factory
glance_mysql = sf.glance_mysql

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


@pytest.fixture(params=['mysql', 'postgresql'])
def backend(request):
    return request.param


@pytest.fixture
def glance_url(backend):
    yield from sf._database(backend)


def _world(tmp_path, module_vhost, glance_url):
    return sf.make_world(tmp_path, module_vhost, glance_url)


def _start(services, world, name, queue_url, env, **config):
    workdir = os.path.join(world.workdir, name)
    os.makedirs(workdir, exist_ok=True)
    batch_size = config.pop('batch_size', 20)
    sections = world.config(workdir=workdir, queue_url=queue_url, **config)
    sections['scrub_queue']['batch_size'] = batch_size
    return services(sections, name=name, env=env)


def _bulk(world, count, size=128, deleted_at=None):
    eng = sf.engine(world.glance_url)
    try:
        return glance_rows.bulk_pending_images(
            eng,
            world.store_dir,
            count,
            size,
            deleted_at=deleted_at or glance_rows.utcnow(),
        )
    finally:
        eng.dispose()


def _leftovers(world, queue_url):
    """What a finished run must not leave: (scrubbing rows, queue rows)."""
    locations = sf.location_statuses(world.glance_url)
    scrubbing = [
        i
        for i, s in locations.items()
        if any(x.startswith('scrubbing') for x in s)
    ]
    return scrubbing, sf.queue_rows(queue_url)


def _wait_queue_empty(world, queue_url, timeout=15):
    sf.wait_until(
        lambda: _leftovers(world, queue_url) == ([], []),
        timeout,
        message=lambda: _leftovers(world, queue_url),
    )


# ------------------------------------------------------ sharing the work


def test_two_services_scrub_500_images_once_each(
    tmp_path, module_vhost, glance_url, empty_db_factory, backend, services
):
    world = _world(tmp_path, module_vhost, glance_url)
    queue_url = empty_db_factory(backend)
    env = world.env(SL_TEST_DELETE_DELAY=0.002)
    a = _start(services, world, 'a', queue_url, env)
    b = _start(services, world, 'b', queue_url, env)
    images = _bulk(world, 500)

    started = time.monotonic()
    for image_id in images:
        world.publisher.image_delete(image_id)
    # and every event a second time, as a redelivery (another
    # _unique_id): both services may now hold the same deletion
    for image_id in images:
        world.publisher.image_delete(image_id)
    world.wait_scrubbed(images, 120, a)
    elapsed = time.monotonic() - started

    deletes = world.deletes
    by_pid = collections.Counter(e.pid for e in deletes.calls())
    print(
        f'\n{backend}: 500 images (1,000 events) scrubbed by two services '
        f'in {elapsed:.1f} s; store deletes per process: {dict(by_pid)}'
    )
    assert deletes.paths_deleted_more_than_once() == {}
    assert len(deletes.calls()) == 500
    assert set(by_pid) == {a.pid, b.pid}, 'both services took part'
    _wait_queue_empty(world, queue_url)
    assert set(sf.image_statuses(world.glance_url, images).values()) == {
        'deleted'
    }
    assert a.alive() and b.alive()


# ---------------------------------------------------- a crash mid-drain


def test_sigkill_mid_drain_leaves_nothing_behind(
    tmp_path, module_vhost, glance_mysql, empty_db_factory, services
):
    world = _world(tmp_path, module_vhost, glance_mysql)
    queue_url = empty_db_factory('mysql')
    lease = 10
    slow = _start(
        services,
        world,
        'slow',
        queue_url,
        world.env(SL_TEST_DELETE_DELAY=0.3),
        lease_time=lease,
        batch_size=50,
    )
    images = _bulk(world, 40)
    for image_id in images:
        world.publisher.image_delete(image_id)
    sf.wait_until(lambda: len(world.deletes.calls('ok')) >= 4, 20)

    slow.kill()
    killed_at = time.monotonic()
    scrubbing, queued = _leftovers(world, queue_url)
    in_flight = len(world.deletes.calls()) - len(world.deletes.calls('ok'))
    print(
        f'\nSIGKILL with {len(scrubbing)} image(s) in "scrubbing", '
        f'{len(queued)} queue row(s), {in_flight} store delete(s) cut short'
    )
    assert queued, 'the kill came too late to test anything'

    fresh = _start(
        services,
        world,
        'fresh',
        queue_url,
        world.env(),
        lease_time=lease,
    )
    world.wait_scrubbed(images, 60, fresh)
    took = time.monotonic() - killed_at
    print(f'taken over and finished {took:.1f} s after the kill')
    _wait_queue_empty(world, queue_url)
    assert not any(os.path.exists(world.path(i)) for i in images)
    assert set(sf.image_statuses(world.glance_url, images).values()) == {
        'deleted'
    }
    # nothing waited much longer than the lease (+ the busy re-check and
    # the idle poll of the drain)
    assert took < lease + 20


# --------------------------------------- restore racing the scrubs


def _restore_all(caller, image_ids, outcomes, pause):
    for image_id in image_ids:
        try:
            caller.call('restore', image_id=image_id)
            outcomes[image_id] = 'restored'
        except exceptions.ScrubListenerError as exc:
            outcomes[image_id] = type(exc).__name__.removesuffix('_Remote')
        except oslo_messaging.MessagingException as exc:
            outcomes[image_id] = f'messaging: {exc}'
        time.sleep(pause)


def _check_invariant(world, data, outcomes):
    """Over all images: active ⇔ restored, and active ⇒ data intact."""
    statuses = sf.image_statuses(world.glance_url)
    locations = sf.location_statuses(world.glance_url)
    problems = []
    for image_id, content in data.items():
        status = statuses[image_id]
        path = world.path(image_id)
        if status == 'active':
            if not os.path.exists(path):
                problems.append(f'{image_id}: active without data')
                continue
            with open(path, 'rb') as f:
                if f.read() != content:
                    problems.append(f'{image_id}: active, data changed')
            if locations[image_id] != ['active']:
                problems.append(f'{image_id}: active, {locations[image_id]}')
            if outcomes.get(image_id) != 'restored':
                problems.append(f'{image_id}: active, {outcomes[image_id]}')
        elif status == 'deleted':
            if os.path.exists(path):
                problems.append(f'{image_id}: deleted, data still there')
            if locations[image_id] != ['deleted']:
                problems.append(f'{image_id}: deleted, {locations[image_id]}')
            if outcomes.get(image_id) == 'restored':
                problems.append(f'{image_id}: restore said ok, now deleted')
        else:
            problems.append(f'{image_id}: {status}')
    return problems


def test_restore_racing_scrubs_never_leaves_an_active_image_without_data(
    tmp_path, module_vhost, glance_mysql, empty_db_factory, services
):
    glance_url = glance_mysql
    world = _world(tmp_path, module_vhost, glance_url)
    queue_url = empty_db_factory('mysql')
    env = world.env(SL_TEST_DELETE_DELAY=0.1)
    for name in ('a', 'b'):
        _start(
            services,
            world,
            name,
            queue_url,
            env,
            scrub_time=1,
            batch_size=5,
        )
    data = {}
    for image_id in _bulk(world, 120, size=256):
        # distinct content per image, so a mix-up would show
        data[image_id] = os.urandom(256)
        with open(world.path(image_id), 'wb') as f:
            f.write(data[image_id])

    for image_id in data:
        world.publisher.image_delete(image_id)
    order = list(data)
    random.Random(42).shuffle(order)
    outcomes = {}
    callers = [
        sf.RpcCaller(world.vhost.transport_url, world.rpc_topic)
        for _ in range(2)
    ]
    try:
        # two restorers over ~3 s, while the two services scrub
        threads = [
            threading.Thread(
                target=_restore_all,
                args=(caller, order[i::2], outcomes, 0.04),
            )
            for i, caller in enumerate(callers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        for caller in callers:
            caller.close()

    # settle: nothing pending_delete, nothing scrubbing, queue empty
    sf.wait_until(
        lambda: 'pending_delete' not in sf.image_statuses(glance_url).values(),
        30,
        message=lambda: collections.Counter(
            sf.image_statuses(glance_url).values()
        ),
    )
    _wait_queue_empty(world, queue_url)
    tally = collections.Counter(outcomes.values())
    print(f'\nrestore outcomes while scrubbing: {dict(tally)}')
    assert _check_invariant(world, data, outcomes) == []
    assert tally['restored'] > 0
    assert sum(tally.values()) - tally['restored'] > 0
    assert not [o for o in outcomes.values() if o.startswith('messaging')]

    # late (re)deliveries of every event change nothing
    for image_id in data:
        world.publisher.image_delete(image_id)
    barrier = world.pending()
    world.publisher.image_delete(barrier)
    world.wait_scrubbed([barrier], 20)
    time.sleep(1)
    assert _check_invariant(world, data, outcomes) == []
    assert world.deletes.paths_deleted_more_than_once() == {}


def test_status_over_rpc_reports_the_shared_queue(
    tmp_path, module_vhost, glance_mysql, empty_db_factory, services
):
    world = _world(tmp_path, module_vhost, glance_mysql)
    queue_url = empty_db_factory('mysql')
    _start(services, world, 'a', queue_url, world.env(), scrub_time=3600)
    images = _bulk(world, 3)
    for image_id in images:
        world.publisher.image_delete(image_id)
    with sf.RpcCaller(world.vhost.transport_url, world.rpc_topic) as c:
        status, _ = sf.wait_until(
            lambda: (s := c.call('status'))['queued'] == 3 and s,
            10,
        )
    assert status['due'] == 0 and status['in_progress'] == 0
    assert status['scrub_time'] == 3600
    assert status['oldest_due_at'].endswith('Z')
