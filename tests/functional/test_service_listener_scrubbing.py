"""When and what the running service scrubs.

Set-up as in test_service_listener.py: ``scrub-listener`` as a real
process on a fresh RabbitMQ vhost, Glance on MariaDB (real schema),
notifications as glance-api 33.0.0 publishes them; outcomes checked in
the store, the Glance rows, the due-queue and the service's log;
``wakeup_time`` an hour unless a test is about the sweep.

This module: ``scrub_time`` holds the data until due, then the scrub is
prompt; the periodic sweep scrubs what no notification announced (a
deleted image, a location removed from a live image) and its runs never
overlap; images with several locations and community images.
"""

import datetime
import os
import time

from tests.functional import service_fixtures as sf
from tools import glance_rows

# fixtures (see service_fixtures)
services = sf.services
world = sf.world
module_vhost = sf.module_vhost
module_glance_mysql = sf.module_glance_mysql


# -------------------------------------------------------------- scrub_time


def test_scrub_time_holds_the_data_until_due_then_scrubs_promptly(
    world, services
):
    scrub_time = 3
    svc = services(world.config(scrub_time=scrub_time), env=world.env())
    eng = sf.engine(world.glance_url)
    images = []
    try:
        for _ in range(5):
            image_id = world.pending()
            world.publisher.image_delete(image_id)
            row = glance_rows.image_row(eng, image_id)
            due = row.deleted_at + datetime.timedelta(seconds=scrub_time)
            images.append((image_id, _epoch(due)))
    finally:
        eng.dispose()
    # what is not due yet is still there (the precise check is below, on
    # the times the service called the store)
    now = time.time()
    for image_id, due in images:
        if due > now + 0.2:
            assert os.path.exists(world.path(image_id))

    world.wait_scrubbed([i for i, _ in images], 15, svc)

    latencies = []
    ok = {e.path: e.time for e in world.deletes.calls('ok')}
    called = {e.path: e.time for e in world.deletes.calls()}
    for image_id, due in images:
        # MariaDB keeps Glance's deleted_at to the second; the due time
        # is computed from what it keeps, as the service does.
        assert called[world.path(image_id)] >= due, 'scrubbed before due'
        latencies.append(ok[world.path(image_id)] - due)
    latencies.sort()
    print(
        '\ndue -> data gone latency (s): '
        + ', '.join(f'{x:.3f}' for x in latencies)
    )
    assert latencies[-1] < 1.0


def _epoch(naive_utc):
    return naive_utc.replace(tzinfo=datetime.UTC).timestamp()


# ---------------------------------------------------------- periodic sweep


def test_sweep_scrubs_a_deletion_no_notification_announced(world, services):
    wakeup = 2
    svc = services(world.config(wakeup_time=wakeup), env=world.env())
    svc.wait_for_log('Sweep found 0 due deletions', 10)
    started = time.monotonic()
    image_id = world.pending()

    world.wait_scrubbed([image_id], wakeup + 5, svc)
    elapsed = time.monotonic() - started
    print(f'\npending_delete without event -> scrubbed in {elapsed:.2f} s')
    assert elapsed <= wakeup + 2
    assert svc.count(r'Sweep found 1 due deletions, 1 new') == 1


def test_sweeps_never_overlap(world, services):
    """Each sweep takes longer than wakeup_time: runs must queue, not stack.

    (glance-scrubber's daemon starts a run every wakeup_time whatever the
    previous one is doing.)
    """
    sweeps = sf.SweepLog(os.path.join(world.workdir, 'sweeps.log'))
    env = world.env(SL_TEST_SWEEP_LOG=sweeps.path, SL_TEST_SWEEP_DELAY=1.2)
    svc = services(world.config(wakeup_time=1), env=env)
    image_id = world.pending()
    sf.wait_until(lambda: len(sweeps.runs()) >= 3, 20)
    world.wait_scrubbed([image_id], 10, svc)
    svc.kill()

    runs = sweeps.runs()
    if runs[-1][2] is None:
        runs.pop()  # killed while running
    assert all(end is not None for _, _, end in runs), runs
    for (_, _, end), (_, start, _) in zip(runs, runs[1:], strict=False):
        assert start >= end, (
            f'a sweep started before the previous ended: {runs}'
        )


def test_sweep_scrubs_a_location_removed_from_a_live_image(world, services):
    """PATCH remove /locations/N (delayed_delete) leaves the image active
    and the removed location pending_delete, with no image.delete event:
    glance-scrubber never scrubs it; the periodic sweep must."""
    svc = services(world.config(wakeup_time=1), env=world.env())
    kept, removed = (
        os.path.join(world.store_dir, name) for name in ('kept', 'removed')
    )
    for path in (kept, removed):
        with open(path, 'wb') as f:
            f.write(b'y' * 1024)
    image_id = world.pending(
        status='active',
        locations=[('file://' + p, {'store': 'fs'}) for p in (kept, removed)],
    )
    eng = sf.engine(world.glance_url)
    try:
        table = glance_rows._tables(eng)['image_locations']
        now = glance_rows.utcnow()
        with eng.begin() as conn:
            conn.execute(
                table.update()
                .where(
                    table.c.image_id == image_id,
                    table.c.value == 'file://' + removed,
                )
                .values(
                    status='pending_delete',
                    deleted=True,
                    deleted_at=now,
                    updated_at=now,
                )
            )
    finally:
        eng.dispose()

    sf.wait_until(
        lambda: not os.path.exists(removed), 10, message=svc.log_tail
    )
    # the batch is finished (its verdicts recorded): kept's fate is known
    sf.wait_until(
        lambda: (
            sf.location_statuses(world.glance_url, [image_id])
            == {image_id: ['active', 'deleted']}
        ),
        10,
        message=svc.log_tail,
    )
    assert os.path.exists(kept)
    assert sf.image_statuses(world.glance_url, [image_id]) == {
        image_id: 'active'
    }
    assert sf.location_statuses(world.glance_url, [image_id]) == {
        image_id: ['active', 'deleted']
    }


# ------------------------------------------------------------ image shapes


def test_multi_location_and_community_images_are_scrubbed(world, services):
    svc = services(world.config(), env=world.env())
    paths = [os.path.join(world.store_dir, f'two-{i}') for i in range(2)]
    for path in paths:
        with open(path, 'wb') as f:
            f.write(b'x' * 1024)
    two = world.pending(
        locations=[('file://' + p, {'store': 'fs'}) for p in paths]
    )
    # glance-scrubber never scrubs community images (NOTES.md)
    community = world.pending(visibility='community')
    world.publisher.image_delete(two)
    world.publisher.image_delete(community, visibility='community')
    world.wait_scrubbed([community], 10, svc)
    sf.wait_until(
        lambda: sf.image_statuses(world.glance_url, [two])[two] == 'deleted',
        10,
        message=svc.log_tail,
    )
    assert not any(os.path.exists(p) for p in paths)
    assert sf.location_statuses(world.glance_url, [two]) == {
        two: ['deleted', 'deleted']
    }
    assert svc.count(rf'Scrubbed image {two}: 2 location\(s\)') == 1
