"""scrub_listener.scrubber.Scrubber: real Glance rows, a fake store."""

import os
import threading
import time

import futurist
import pytest
from sqlalchemy import exc as sa_exc

from scrub_listener import exceptions
from scrub_listener import model
from scrub_listener import scrubber
from tests.unit.conftest import ago
from tests.unit.conftest import path_of


@pytest.fixture(scope='module')
def executor():
    # module scope: futurist's shutdown waits ~1 s for idle workers
    pool = futurist.ThreadPoolExecutor(max_workers=3)
    yield pool
    pool.shutdown(wait=True)


@pytest.fixture
def scrub(gdb, stores, executor):
    return scrubber.Scrubber(gdb, stores, executor)


def _statuses(glance, image_id):
    return {r.id: r.status for r in glance.locations(image_id)}


def test_scrub_deletes_data_and_rows(glance, scrub, stores):
    images = [glance.make_image(data=b'x' * n) for n in (100, 200, 300)]
    outcomes = scrub.scrub([glance.deletion(i) for i in images])
    assert [o.status for o in outcomes] == [model.Result.SCRUBBED] * 3
    assert [o.bytes_freed for o in outcomes] == [100, 200, 300]
    assert all(o.image_deleted and o.locations == 1 for o in outcomes)
    for image_id in images:
        assert glance.image(image_id).status == 'deleted'
        assert set(_statuses(glance, image_id).values()) == {'deleted'}
        assert not os.path.exists(glance.path(image_id))


def test_one_failing_location_keeps_the_image_pending(glance, scrub, stores):
    image = glance.make_image()
    bad_url = glance.write_file('bad')
    bad = glance.add_location(image, bad_url, status='pending_delete')
    stores.fail[bad_url] = exceptions.StoreError(
        'location x: disk on fire', data_intact=True
    )
    other = glance.make_image()

    [failed, ok] = scrub.scrub(
        [glance.deletion(image), glance.deletion(other)]
    )

    assert failed.status == model.Result.FAILED
    assert 'disk on fire' in failed.reason
    assert failed.locations == 1  # the good one is gone
    assert not failed.image_deleted
    assert glance.image(image).status == 'pending_delete'
    statuses = _statuses(glance, image)
    assert statuses.pop(bad) == 'pending_delete'  # back, for a retry
    assert set(statuses.values()) == {'deleted'}
    assert os.path.exists(path_of(bad_url))
    assert not os.path.exists(glance.path(image))
    # the other image of the batch is not held back
    assert ok.status == model.Result.SCRUBBED
    assert glance.image(other).status == 'deleted'

    # the retry after the store recovered finishes the job
    del stores.fail[bad_url]
    [retry] = scrub.scrub([glance.deletion(image)])
    assert retry.status == model.Result.SCRUBBED and retry.image_deleted
    assert glance.image(image).status == 'deleted'


def test_refused_location_fails_and_keeps_the_data(glance, gdb, executor):
    class RefusingStores:
        def delete(self, location):
            raise exceptions.LocationRefused(
                f'location {location.id}: outside the store'
            )

    image = glance.make_image()
    [outcome] = scrubber.Scrubber(gdb, RefusingStores(), executor).scrub(
        [glance.deletion(image)]
    )
    assert outcome.status == model.Result.FAILED
    assert 'outside the store' in outcome.reason
    assert os.path.exists(glance.path(image))
    assert set(_statuses(glance, image).values()) == {'pending_delete'}


def test_shared_data_is_kept(glance, scrub, stores):
    live = glance.make_image(status='active')
    url = 'file://' + glance.path(live)
    dead = glance.make_image(locations=[(url, {'store': 'fs'})])

    [outcome] = scrub.scrub([glance.deletion(dead)])

    assert outcome.status == model.Result.SCRUBBED
    assert outcome.bytes_freed == 0
    assert stores.calls == []
    assert os.path.exists(glance.path(live))
    assert glance.image(dead).status == 'deleted'
    assert set(_statuses(glance, dead).values()) == {'deleted'}
    assert set(_statuses(glance, live).values()) == {'active'}


def test_already_gone_counts_as_scrubbed(glance, scrub):
    image = glance.make_image()
    os.unlink(glance.path(image))
    [outcome] = scrub.scrub([glance.deletion(image)])
    assert outcome.status == model.Result.SCRUBBED
    assert outcome.bytes_freed == 0
    assert glance.image(image).status == 'deleted'


def test_restored_image_is_skipped(glance, gdb, scrub, stores):
    image = glance.make_image()
    deletion = glance.deletion(image)
    gdb.restore(image, lambda locations: None, 60)
    [outcome] = scrub.scrub([deletion])
    assert outcome.status == model.Result.SKIPPED
    assert stores.calls == []
    assert os.path.exists(glance.path(image))


def test_superseded_deletion_is_reported(glance, gdb, scrub, stores):
    image = glance.make_image(deleted_at=ago(600))
    old = glance.deletion(image)
    gdb.restore(image, lambda locations: None, 60)
    glance.glance_delete(image, ago(5))
    [outcome] = scrub.scrub([old])
    assert outcome.status == model.Result.SKIPPED
    assert outcome.superseded_by == glance.image(image).deleted_at
    assert stores.calls == []


def test_busy_image_is_left_alone(glance, gdb, scrub, stores):
    image = glance.make_image()
    gdb.claim([glance.deletion(image)])  # another worker has it
    [outcome] = scrub.scrub([glance.deletion(image)])
    assert outcome.status == model.Result.BUSY
    assert stores.calls == []
    assert os.path.exists(glance.path(image))


def test_corrupt_location_fails_the_deletion(glance, scrub, stores):
    image = glance.make_image()
    bad = glance.add_location(image, 'file:///x', status='pending_delete')
    glance.update('image_locations', bad, meta_data='{not json')
    [outcome] = scrub.scrub([glance.deletion(image)])
    assert outcome.status == model.Result.FAILED
    assert f'location {bad}' in outcome.reason
    assert glance.image(image).status == 'pending_delete'


def test_image_row_without_locations_is_closed(glance, scrub):
    image = glance.make_image(locations=[])
    [outcome] = scrub.scrub([glance.deletion(image)])
    assert outcome.status == model.Result.SCRUBBED
    assert outcome.image_deleted
    assert glance.image(image).status == 'deleted'


def test_removed_location_of_live_image(glance, scrub):
    live = glance.make_image(status='active')
    url = glance.write_file('old')
    removed = glance.add_location(live, url)
    glance.remove_location(removed, ago(100))
    [outcome] = scrub.scrub([glance.location_deletion(removed)])
    assert outcome.status == model.Result.SCRUBBED
    assert not outcome.image_deleted
    assert glance.image(live).status == 'active'
    assert not os.path.exists(path_of(url))
    assert os.path.exists(glance.path(live))


def test_unexpected_error_hands_claims_back(glance, gdb, stores):
    class Exploding:
        def submit(self, func, *args):
            raise RuntimeError('pool is gone')

    image = glance.make_image()
    with pytest.raises(RuntimeError):
        scrubber.Scrubber(gdb, stores, Exploding()).scrub(
            [glance.deletion(image)]
        )
    # not left "scrubbing" until lease_time: restorable right away
    assert set(_statuses(glance, image).values()) == {'pending_delete'}
    gdb.restore(image, lambda locations: None, 60)
    assert glance.image(image).status == 'active'


def test_failed_claim_renewal_does_not_hand_back_running_deletes(
    glance, gdb, stores, executor, monkeypatch
):
    """A batch outlasting the renewal period whose renewal fails (DB blip)
    still waits for its deletes and then records them: the rows are never
    handed back to pending_delete while a delete may be running."""
    image = glance.make_image()
    started = []

    def broken_renew(location_ids, stamp, now=None):
        started.append(location_ids)
        raise RuntimeError('database went away')

    monkeypatch.setattr(gdb, 'renew', broken_renew)
    slow = stores.delete

    def slow_delete(location):
        time.sleep(0.3)
        return slow(location)

    monkeypatch.setattr(stores, 'delete', slow_delete)
    # lease_time 0.3 s: a renewal every 0.1 s while the delete runs
    scrub = scrubber.Scrubber(gdb, stores, executor, lease_time=0.3)

    [outcome] = scrub.scrub([glance.deletion(image)])

    assert started, 'the batch was meant to try a renewal'
    assert outcome.status == model.Result.SCRUBBED
    assert glance.image(image).status == 'deleted'
    assert not os.path.exists(glance.path(image))


# ------------------------------------------- issue 7: the safety findings


def _flaky(func, failures):
    """``func`` that raises a lost-connection OperationalError first."""
    left = [failures]

    def call(*args, **kwargs):
        if left[0]:
            left[0] -= 1
            raise sa_exc.OperationalError('UPDATE', {}, Exception('gone'))
        return func(*args, **kwargs)

    return call


def test_finish_is_retried_while_the_database_is_away(
    glance, gdb, stores, executor, monkeypatch
):
    """Finding 9: a blip during finish used to strand the batch as
    'scrubbing' for lease_time; the worker still holds the claim and the
    verdicts, so it records them once the database answers."""
    images = [glance.make_image() for _ in range(3)]
    monkeypatch.setattr(gdb, 'finish', _flaky(gdb.finish, 2))
    waits = []
    scrub = scrubber.Scrubber(gdb, stores, executor, sleep=waits.append)

    outcomes = scrub.scrub([glance.deletion(i) for i in images])

    assert [o.status for o in outcomes] == [model.Result.SCRUBBED] * 3
    assert len(waits) == 2
    for image_id in images:
        assert glance.image(image_id).status == 'deleted'


def test_finish_that_never_succeeds_leaves_the_claim_not_revivable(
    glance, gdb, stores, executor, monkeypatch
):
    image = glance.make_image()
    monkeypatch.setattr(gdb, 'finish', _flaky(gdb.finish, 10**6))
    ticks = iter(range(0, 10**6, 100))  # 100 s per look at the clock
    scrub = scrubber.Scrubber(
        gdb,
        stores,
        executor,
        lease_time=600,
        sleep=lambda s: None,
        clock=lambda: next(ticks),
    )
    with pytest.raises(sa_exc.OperationalError):
        scrub.scrub([glance.deletion(image)])
    [row] = glance.locations(image)
    assert row.status.startswith('scrubbing:')
    with pytest.raises(exceptions.ScrubInProgress):
        gdb.restore(image, lambda locations: None, 60)


def test_an_unexpected_store_exception_fails_one_location_only(
    glance, scrub, stores
):
    """Finding 6: a ValueError (``file://[...``) escaped the handled
    errors and failed the whole batch with a traceback, every retry."""
    bad = glance.make_image()
    good = glance.make_image()
    [bad_row] = glance.locations(bad)
    stores.fail[bad_row.value] = ValueError('Invalid IPv6 URL')

    [failed, ok] = scrub.scrub([glance.deletion(bad), glance.deletion(good)])

    assert failed.status == model.Result.FAILED
    assert f'location {bad_row.id}' in failed.reason
    assert 'ValueError' in failed.reason
    assert ok.status == model.Result.SCRUBBED
    # nobody knows what the store did: never revived, retried at once
    assert glance.locations(bad)[0].status == 'scrub_interrupted'


@pytest.mark.parametrize(
    'error, status',
    [
        (exceptions.StoreError('refused', data_intact=True), 'pending_delete'),
        (exceptions.StoreError('timed out'), 'scrub_interrupted'),
        (exceptions.LocationRefused('outside the stores'), 'pending_delete'),
        (TimeoutError('read timed out'), 'scrub_interrupted'),
    ],
)
def test_only_a_clean_refusal_keeps_the_data_revivable(
    glance, scrub, stores, error, status
):
    """A store error is not proof that the data is intact (a timeout, a
    delete that stopped half-way): only the store adapter's clean
    refusals hand the row back to pending_delete."""
    image = glance.make_image()
    [row] = glance.locations(image)
    stores.fail[row.value] = error
    [outcome] = scrub.scrub([glance.deletion(image)])
    assert outcome.status == model.Result.FAILED
    assert glance.locations(image)[0].status == status


def test_interrupt_marks_running_deletes_interrupted_and_returns_the_rest(
    glance, gdb, stores, monkeypatch
):
    """Finding 3 in one process: KeyboardInterrupt while one delete runs
    and two wait in the pool.  The running one's row becomes
    scrub_interrupted (its delete may still complete), the waiting ones
    go back to pending_delete, and the interrupt propagates."""
    images = [glance.make_image() for _ in range(3)]
    running = threading.Event()
    release = threading.Event()

    def hold(location):
        running.set()
        assert release.wait(30)

    stores.before_delete = hold
    real_wait = scrubber.waiters.wait_for_all

    def interrupted_wait(futures, timeout=None):
        assert running.wait(30)
        raise KeyboardInterrupt

    monkeypatch.setattr(scrubber.waiters, 'wait_for_all', interrupted_wait)
    pool = futurist.ThreadPoolExecutor(max_workers=1)
    try:
        scrub = scrubber.Scrubber(gdb, stores, pool)
        with pytest.raises(KeyboardInterrupt):
            scrub.scrub([glance.deletion(i) for i in images])
        statuses = sorted(glance.locations(i)[0].status for i in images)
        assert statuses == [
            'pending_delete',
            'pending_delete',
            'scrub_interrupted',
        ]
        [in_flight] = [
            i
            for i in images
            if glance.locations(i)[0].status == 'scrub_interrupted'
        ]
        with pytest.raises(exceptions.DataGone):
            gdb.restore(in_flight, lambda locations: None, 60)
    finally:
        release.set()
        monkeypatch.setattr(scrubber.waiters, 'wait_for_all', real_wait)
        pool.shutdown(wait=True)
    # the delete that was running completes after all: nothing revived it
    assert not os.path.exists(glance.path(in_flight))
    assert glance.image(in_flight).status == 'pending_delete'
