"""Races of the claim protocol, one interleaving at a time.

Threads on real databases (ids ``[sqlite]``, ``[mysql]``,
``[postgresql]``): scrub claims, restores, takeovers and data shared
between images, each side paused at a known point while the other runs.
The set-up is in ``concurrency_fixtures.py`` (see its docstring for the
invariant every test ends with).
"""

import collections
import contextlib
import dataclasses
import datetime
import os
import random
import threading

import futurist
import pytest

from scrub_listener import exceptions
from scrub_listener import glance_db
from scrub_listener import model
from scrub_listener import scrubber as scrubber_mod
from tests.functional.concurrency_fixtures import KEY
from tests.functional.concurrency_fixtures import RESTORE_REFUSALS
from tests.functional.concurrency_fixtures import SECOND
from tests.functional.concurrency_fixtures import WINDOW
from tests.functional.concurrency_fixtures import FileStores
from tests.functional.concurrency_fixtures import Outcome
from tests.functional.concurrency_fixtures import Paused
from tests.functional.concurrency_fixtures import _path
from tests.functional.concurrency_fixtures import _read
from tests.functional.concurrency_fixtures import ago
from tests.functional.concurrency_fixtures import finish_claim
from tests.functional.concurrency_fixtures import run_threads
from tests.functional.concurrency_fixtures import utcnow
from tests.functional.concurrency_fixtures import verify_files
from tools import glance_rows


def test_restore_waits_for_a_claim_in_flight_then_refuses(cluster):
    """claim → restore: the restore queues on the image row while the
    claim's transaction is open, then sees ``scrubbing`` and refuses."""
    originals = cluster.make_images(1)
    [image_id] = originals
    deletion = cluster.deletion(image_id)
    scrub_side = cluster.glance_db()
    restore_side = cluster.glance_db()
    paused = Paused(scrub_side.engine, 'UPDATE image_locations')

    claim = Outcome(lambda: scrub_side.claim([deletion]))
    assert paused.reached.wait(30)
    restore = Outcome(
        lambda: restore_side.restore(image_id, verify_files, WINDOW)
    )
    assert restore.blocked(), 'restore did not wait for the open claim'
    paused.go.set()
    claim.join()
    restore.join()

    assert claim.error is None
    [claimed] = claim.result
    assert len(claimed.locations) == 1
    assert isinstance(restore.error, exceptions.ScrubInProgress), restore.error
    # the scrubber goes on: delete, finish
    os.unlink(_path(claimed.locations[0].uri))
    finish_claim(
        scrub_side, claimed, [claimed.locations[0].id], [], {image_id}
    )
    cluster.assert_final_state(originals, restored=set())


def test_claim_waits_for_a_restore_in_flight_then_skips(cluster):
    """restore → claim: the claim queues on the image row while the
    restore (checking the data) holds it, then finds the image active."""
    originals = cluster.make_images(1)
    [image_id] = originals
    deletion = cluster.deletion(image_id)
    scrub_side = cluster.glance_db()
    restore_side = cluster.glance_db()
    in_verify = threading.Event()
    go = threading.Event()

    def slow_verify(locations):
        verify_files(locations)
        in_verify.set()
        assert go.wait(60)

    restore = Outcome(
        lambda: restore_side.restore(image_id, slow_verify, WINDOW)
    )
    assert in_verify.wait(30)
    claim = Outcome(lambda: scrub_side.claim([deletion]))
    assert claim.blocked(), 'claim did not wait for the open restore'
    go.set()
    restore.join()
    claim.join()

    assert restore.error is None, restore.error
    [claimed] = claim.result
    assert claimed.locations == []
    assert 'active' in claimed.skip_reason
    cluster.assert_final_state(originals, restored={image_id})


def test_restore_waits_for_a_failed_scrub_to_hand_back_then_succeeds(
    cluster,
):
    """finish(failed) → restore: the data is still there, the failed
    location goes back to pending_delete under the lock, the restore that
    waited for it then succeeds."""
    originals = cluster.make_images(1)
    [image_id] = originals
    scrub_side = cluster.glance_db()
    restore_side = cluster.glance_db()
    [claimed] = scrub_side.claim([cluster.deletion(image_id)])
    with pytest.raises(exceptions.ScrubInProgress):
        restore_side.restore(image_id, verify_files, WINDOW)
    paused = Paused(scrub_side.engine, 'UPDATE image_locations')

    finish = Outcome(
        lambda: finish_claim(
            scrub_side, claimed, [], [claimed.locations[0].id], {image_id}
        )
    )
    assert paused.reached.wait(30)
    restore = Outcome(
        lambda: restore_side.restore(image_id, verify_files, WINDOW)
    )
    assert restore.blocked(), 'restore did not wait for the open finish'
    paused.go.set()
    finish.join()
    restore.join()

    assert finish.error is None and restore.error is None, restore.error
    cluster.assert_final_state(originals, restored={image_id})


def test_racing_claims_take_each_location_once(cluster):
    """Six workers claim the same 40 deletions at the same instant: each
    location goes to exactly one of them, the others see it busy; no
    deadlock escapes."""
    originals = cluster.make_images(40)
    deletions = cluster.deletions(list(originals))
    workers = [cluster.glance_db() for _ in range(6)]

    def claim(worker):
        mine = list(deletions)
        random.shuffle(mine)  # lock order must not depend on call order
        return worker.claim(mine)

    results = run_threads(*[lambda w=w: claim(w) for w in workers])

    owners = collections.Counter()
    for claims in results:
        for c in claims:
            assert c.skip_reason is None
            assert c.busy or c.locations
            for location in c.locations:
                owners[location.id] += 1
    assert len(owners) == 40
    assert set(owners.values()) == {1}


def test_concurrent_restores_of_different_images(cluster):
    """Four operators restore 25 different images each at the same time:
    every restore succeeds, none is refused or fails.

    Regression: on MariaDB restores scanned every image_locations row
    FOR UPDATE (looking for other images sharing the data) while holding
    their own rows; two restores deadlocked and 12-20 % of them failed
    with "Deadlock found" even after the retries."""
    originals = cluster.make_images(100)
    ids = sorted(originals)
    workers = [cluster.glance_db() for _ in range(4)]
    errors = []

    def restore_all(worker, chunk):
        for image_id in chunk:
            try:
                worker.restore(image_id, verify_files, WINDOW)
            except Exception as exc:
                errors.append(f'{image_id}: {exc!r:.200}')

    run_threads(
        *[
            lambda w=w, k=k: restore_all(w, ids[k::4])
            for k, w in enumerate(workers)
        ]
    )

    assert errors == [], f'{len(errors)} failed, e.g. {errors[0]}'
    cluster.assert_final_state(originals, restored=set(ids))


def test_thread_storm_of_scrubs_and_restores(cluster):
    """Three scrubbers and three restorers hammer 60 images at once
    (random batches, random order), then one last scrub cleans up."""
    originals = cluster.make_images(60)
    ids = sorted(originals)
    deletions = dict(zip(ids, cluster.deletions(ids), strict=True))
    restored = set()
    restored_lock = threading.Lock()
    refusals = collections.Counter()

    def scrubber(seed):
        rng = random.Random(seed)
        worker = cluster.glance_db()
        for _ in range(8):
            batch = [deletions[i] for i in rng.sample(ids, 10)]
            claims = worker.claim(batch)
            done = []
            for c in claims:
                for location in c.locations:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(_path(location.uri))
                    done.append(location.id)
            images = {
                c.deletion.image_id
                for c in claims
                if not (c.skip_reason or c.busy)
            }
            finish_claim(worker, claims, done, [], images)

    def restorer(seed):
        rng = random.Random(seed)
        worker = cluster.glance_db()
        for image_id in rng.sample(ids, 15):
            try:
                worker.restore(image_id, verify_files, WINDOW)
            except RESTORE_REFUSALS as exc:
                refusals[type(exc).__name__] += 1
            else:
                with restored_lock:
                    restored.add(image_id)

    run_threads(
        *[lambda s=s: scrubber(s) for s in range(3)],
        *[lambda s=s: restorer(100 + s) for s in range(3)],
    )
    # last pass: whatever is still pending_delete goes
    final = scrubber_mod.Scrubber(
        cluster.glance_db(), FileStores(), futurist.SynchronousExecutor()
    )
    image_rows, _ = cluster.rows(ids)
    leftover = [
        deletions[i] for i in ids if image_rows[i].status == 'pending_delete'
    ]
    for outcome in final.scrub(leftover):
        assert outcome.status == model.Result.SCRUBBED, outcome
    cluster.assert_final_state(originals, restored=restored)
    assert restored, 'no restore won: the race was not exercised'


@dataclasses.dataclass
class Takeover:
    """One image claimed by worker ``a``, then taken over by ``b`` (its
    claim judged stale ``lease_time`` + 1 s later: a paused ``a``, or
    clocks apart); ``restorer`` is a third party."""

    originals: dict
    image_id: str
    deletion: glance_db.Deletion
    a: glance_db.GlanceDB
    b: glance_db.GlanceDB
    restorer: glance_db.GlanceDB
    a_claim: glance_db.Claim
    b_claim: glance_db.Claim
    ids: list
    later: datetime.datetime


def _take_over(cluster):
    originals = cluster.make_images(1)
    [image_id] = originals
    deletion = cluster.deletion(image_id)
    a = cluster.glance_db(lease_time=10)
    b = cluster.glance_db(lease_time=10)
    later = utcnow() + 11 * SECOND
    [a_claim] = a.claim([deletion])
    [b_claim] = b.claim([deletion], now=later)
    ids = [loc.id for loc in a_claim.locations]
    assert [loc.id for loc in b_claim.locations] == ids
    return Takeover(
        originals,
        image_id,
        deletion,
        a,
        b,
        cluster.glance_db(),
        a_claim,
        b_claim,
        ids,
        later,
    )


def test_old_owner_cannot_hand_back_a_claim_that_was_taken_over(cluster):
    t = _take_over(cluster)
    # the old owner's delete failed (store timeout): it hands back
    finish_claim(t.a, t.a_claim, [], t.ids, {t.image_id})
    try:
        t.restorer.restore(t.image_id, verify_files, WINDOW)
    except RESTORE_REFUSALS:
        restored = set()
    else:
        restored = {t.image_id}
    # the new owner's delete goes through
    for location in t.b_claim.locations:
        FileStores().delete(location)
    finish_claim(t.b, t.b_claim, t.ids, [], {t.image_id})

    cluster.assert_final_state(t.originals, restored=restored)


def test_takeover_then_failed_delete_is_never_revivable(cluster):
    """Issue 7, finding 1: A claims and stalls past lease_time; B takes
    over; B's delete fails and B finishes; a restore comes; A's delete
    then completes.  The restore must have been refused: the row went to
    scrub_interrupted, not back to pending_delete."""
    t = _take_over(cluster)
    assert all(loc.taken_over for loc in t.b_claim.locations)
    finish_claim(t.b, t.b_claim, [], t.ids, {t.image_id})  # B's failed
    _, rows = cluster.rows([t.image_id])
    assert {r.status for r in rows[t.image_id]} == {'scrub_interrupted'}

    with pytest.raises(exceptions.DataGone) as info:
        t.restorer.restore(t.image_id, verify_files, WINDOW)
    assert 'interrupted' in str(info.value)
    # A wakes up: its delete completes, its finish moves nothing
    for location in t.a_claim.locations:
        FileStores().delete(location)
    finish_claim(t.a, t.a_claim, t.ids, [], {t.image_id})
    # the next scrub claims the interrupted row at once and completes
    [again] = t.b.claim([t.deletion])
    assert [loc.id for loc in again.locations] == t.ids
    finish_claim(t.b, again, t.ids, [], {t.image_id})
    cluster.assert_final_state(t.originals, restored=set())


def test_renewal_after_a_takeover_returns_nothing_and_fences_finish(cluster):
    """Issue 7, finding 2: after a takeover, A's renewal must not yield a
    claim on B's rows, whatever the clocks say: renew answers which rows
    are still A's (none), and A's finish of a failed delete then moves
    nothing -- B's rows are never handed back while B deletes."""
    t = _take_over(cluster)
    # same instant as B's claim: the old whole-second stamps collided here
    assert t.a.renew(t.a_claim.token, t.ids, now=t.later) == set()
    finish_claim(t.a, t.a_claim, [], t.ids, {t.image_id})  # A's failed
    _, rows = cluster.rows([t.image_id])
    assert {r.status for r in rows[t.image_id]} == {
        f'scrubbing:{t.b_claim.token}'
    }
    with pytest.raises(exceptions.ScrubInProgress):
        t.restorer.restore(t.image_id, verify_files, WINDOW)
    for location in t.b_claim.locations:
        FileStores().delete(location)
    finish_claim(t.b, t.b_claim, t.ids, [], {t.image_id})
    cluster.assert_final_state(t.originals, restored=set())


def test_restore_does_not_drop_the_entry_of_a_newer_deletion(cluster):
    from scrub_listener import restore as restore_mod

    originals = cluster.make_images(1)
    [image_id] = originals
    due_queue = cluster.due_queue(cluster.queue_url())
    gdb = cluster.glance_db()
    old = cluster.deletion(image_id)
    due_queue.enqueue([(old, old.deleted_at)])
    new_time = []

    class DeletedAgainBeforeForget:
        """The image is deleted again (and its event queued) right
        between the restore's commit and its queue clean-up."""

        def forget_deletion(self, forget_id, deleted_at):
            when = utcnow()
            cluster.glance_delete(image_id, when)
            new = cluster.deletion(image_id)
            new_time.append(new.deleted_at)
            due_queue.enqueue([(new, new.deleted_at + 60 * SECOND)])
            due_queue.forget_deletion(forget_id, deleted_at)

    restorer = restore_mod.Restorer(
        gdb, FileStores(), DeletedAgainBeforeForget(), WINDOW
    )
    restorer.restore(image_id)

    entries = due_queue.entries_for({image_id}).get(image_id, [])
    assert [e.deletion.deleted_at for e in entries] == new_time


def test_restore_of_image_sharing_data_with_a_claimed_image(cluster):
    # Regression: restore(B) succeeded although A's scrub had claimed
    # the same data; A's delete then left B active without data.
    url_path = os.path.join(cluster.store_dir, 'shared-data')
    data = os.urandom(512)
    with open(url_path, 'wb') as f:
        f.write(data)
    locations = [('file://' + url_path, {'store': 'fs'})]
    a = glance_rows.make_image(cluster.engine, locations=locations, data=data)
    b = glance_rows.make_image(cluster.engine, locations=locations, data=data)
    scrub_side = cluster.glance_db()
    restore_side = cluster.glance_db()

    [claimed] = scrub_side.claim([cluster.deletion(a)])
    assert not claimed.locations[0].shared
    try:
        restore_side.restore(b, verify_files, WINDOW)
    except RESTORE_REFUSALS:
        restored = False
    else:
        restored = True
    stores = FileStores()
    stores.delete(claimed.locations[0])
    finish_claim(scrub_side, claimed, [claimed.locations[0].id], [], {a})

    if restored:
        assert cluster.image(b).status == 'active'
        assert os.path.exists(url_path), 'active image B lost its data'
        assert _read(url_path) == data


@pytest.mark.parametrize('key', [None, KEY], ids=['plain', 'encrypted'])
def test_restore_racing_an_open_claim_of_an_image_sharing_its_data(
    cluster, key, request
):
    """Images A and B point at the same data.  A's claim is paused inside
    its transaction (rows locked, not yet ``scrubbing``) while B is
    restored: the restore must wait and refuse, or the claim must then
    see B live and keep the data -- never an active B without data."""
    shared_path = os.path.join(cluster.store_dir, 'shared-data')
    data = os.urandom(512)
    with open(shared_path, 'wb') as f:
        f.write(data)
    locations = [('file://' + shared_path, {'store': 'fs'})]
    a = glance_rows.make_image(
        cluster.engine, locations=locations, data=data, encrypt_key=key
    )
    b = glance_rows.make_image(
        cluster.engine, locations=locations, data=data, encrypt_key=key
    )
    scrub_side = cluster.glance_db(encryption_key=key)
    restore_side = cluster.glance_db(encryption_key=key)
    paused = Paused(scrub_side.engine, 'UPDATE image_locations')

    claim = Outcome(lambda: scrub_side.claim([cluster.deletion(a)]))
    assert paused.reached.wait(30)
    restore = Outcome(lambda: restore_side.restore(b, verify_files, WINDOW))
    restore.blocked()
    paused.go.set()
    claim.join()
    restore.join()

    assert claim.error is None, claim.error
    [claimed] = claim.result
    stores = FileStores()
    for location in claimed.locations:
        if not location.shared:
            stores.delete(location)
    finish_claim(
        scrub_side, claimed, [loc.id for loc in claimed.locations], [], {a}
    )
    if restore.error is None:
        assert cluster.image(b).status == 'active'
        assert os.path.exists(shared_path), 'active image B lost its data'
        assert _read(shared_path) == data
    else:
        assert isinstance(restore.error, RESTORE_REFUSALS), restore.error


def test_live_url_index_sees_rows_committed_out_of_order(cluster):
    # Regression: with metadata_encryption_key the live-URL index missed
    # a live row committed after one with a higher id and later
    # updated_at, and its data was deleted as not shared.
    if cluster.backend == 'sqlite':
        pytest.skip('SQLite writers are serialised: no out-of-order commit')
    live = glance_rows.make_image(
        cluster.engine, cluster.store_dir, status='active', encrypt_key=KEY
    )
    other_live = glance_rows.make_image(
        cluster.engine, cluster.store_dir, status='active', encrypt_key=KEY
    )
    shared_path = os.path.join(cluster.store_dir, 'shared')
    with open(shared_path, 'wb') as f:
        f.write(b'live data')
    shared_url = 'file://' + shared_path
    from glance.common import crypt

    locations = cluster.tables['image_locations']
    t0 = ago(5)

    def location_row(image_id, url, when):
        return {
            'image_id': image_id,
            'value': crypt.urlsafe_encrypt(KEY, url),
            'meta_data': '{"store": "fs"}',
            'status': 'active',
            'created_at': when,
            'updated_at': when,
            'deleted': False,
        }

    scrub_side = cluster.glance_db(encryption_key=KEY)
    slow = cluster.engine.connect()
    slow_tx = slow.begin()
    # glance-api request 1 adds a location to a live image: its
    # transaction takes the lower id and its timestamp first ...
    slow.execute(locations.insert(), location_row(live, shared_url, t0))
    # ... request 2 adds another one and commits first
    with cluster.engine.begin() as conn:
        conn.execute(
            locations.insert(),
            location_row(other_live, 'file:///elsewhere', t0 + SECOND),
        )
    # a claim in between fills the index
    warmup = glance_rows.make_image(
        cluster.engine, cluster.store_dir, encrypt_key=KEY
    )
    [warm] = scrub_side.claim([cluster.deletion(warmup)])
    assert len(warm.locations) == 1
    slow_tx.commit()
    slow.close()
    # now an image with the same data is deleted and claimed
    dead = glance_rows.make_image(
        cluster.engine,
        locations=[(shared_url, {'store': 'fs'})],
        encrypt_key=KEY,
    )

    [claim] = scrub_side.claim([cluster.deletion(dead)])

    assert [loc.shared for loc in claim.locations] == [True]
