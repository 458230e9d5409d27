"""scrub_listener.glance_db: the claim protocol (claim, renew, finish).

On the real Glance schema (SQLite), one step at a time, in one thread;
tests/functional/test_concurrency_*.py runs the same steps from racing
threads and processes on every database.  Here: what a claim takes,
skips or finds busy, takeovers (after lease_time, or at once from a dead
process of this host), renew, finish and the status each verdict leaves
(issue 7, findings 1 and 2), and the scrub of a half-finished Glance
delete (finding 7).

The other unit tests of glance_db: test_glance_db_reads.py (image ids,
what the sweep and the listing find), test_glance_db_locations.py
(location decoding, the shared-data check), test_glance_db_restore.py.
"""

import dataclasses
import os
import uuid

import pytest

from scrub_listener import exceptions
from scrub_listener import glance_db
from scrub_listener import holders
from tests.unit.conftest import ago
from tests.unit.conftest import path_of
from tests.unit.glance_db_helpers import FAILED
from tests.unit.glance_db_helpers import GONE
from tests.unit.glance_db_helpers import finish as _finish
from tests.unit.glance_db_helpers import verify_files as _verify_files
from tools import glance_rows


def _claimed(status):
    return status.startswith('scrubbing:')


# ------------------------------------------------------------------- claim


def test_claim_moves_locations_to_scrubbing(glance, gdb):
    image = glance.make_image()
    [claim] = gdb.claim([glance.deletion(image)])
    assert claim.skip_reason is None and not claim.busy
    [location] = claim.locations
    assert location.uri == 'file://' + glance.path(image)
    assert location.store == 'fs'
    assert location.size == 1024
    assert not location.shared
    [row] = glance.locations(image)
    assert row.status == f'scrubbing:{claim.token}'
    assert len(row.status) <= 30  # Glance's column
    assert glance.image(image).status == 'pending_delete'
    assert 'uri' not in repr(location)  # may hold credentials


def test_second_claim_is_busy_until_lease_expires(glance):
    gdb = glance_db.GlanceDB(glance.engine, lease_time=600)
    image = glance.make_image()
    deletion = glance.deletion(image)
    [first] = gdb.claim([deletion])
    assert first.locations

    [second] = gdb.claim([deletion])
    assert second.busy and second.locations == []

    [third] = gdb.claim([deletion], now=ago(-601))
    assert not third.busy
    assert [loc.id for loc in third.locations] == [
        loc.id for loc in first.locations
    ]
    # a takeover: never handed back to pending_delete
    assert [loc.taken_over for loc in third.locations] == [True]
    assert not any(loc.taken_over for loc in first.locations)


def test_claim_skips_restored_image(glance, gdb):
    image = glance.make_image()
    deletion = glance.deletion(image)
    gdb.restore(image, _verify_files, 60)
    [claim] = gdb.claim([deletion])
    assert claim.locations == []
    assert 'active' in claim.skip_reason
    assert claim.superseded_by is None
    assert [r.status for r in glance.locations(image)] == ['active']


def test_claim_skips_missing_image(gdb):
    deletion = glance_db.Deletion(str(uuid.uuid4()), None, ago(10))
    [claim] = gdb.claim([deletion])
    assert claim.skip_reason and claim.locations == []


def test_claim_of_old_deletion_after_redelete_is_superseded(glance, gdb):
    image = glance.make_image(deleted_at=ago(300))
    old = glance.deletion(image)
    gdb.restore(image, _verify_files, 60)
    new_time = ago(5)
    glance.glance_delete(image, new_time)

    [claim] = gdb.claim([old])

    assert claim.locations == []
    assert claim.superseded_by == new_time
    assert [r.status for r in glance.locations(image)] == ['pending_delete']


def test_claim_of_newer_deletion_than_the_row_is_skipped(glance, gdb):
    image = glance.make_image(deleted_at=ago(300))
    [claim] = gdb.claim([glance_db.Deletion(image, None, ago(1))])
    assert claim.skip_reason and claim.superseded_by is None
    assert [r.status for r in glance.locations(image)] == ['pending_delete']


def test_claim_of_removed_location_takes_only_that_one(glance, gdb):
    live = glance.make_image(status='active')
    removed = glance.add_location(live, glance.write_file('old'))
    glance.remove_location(removed, ago(120))
    [claim] = gdb.claim([glance.location_deletion(removed)])
    assert [loc.id for loc in claim.locations] == [removed]
    statuses = {r.id: r.status for r in glance.locations(live)}
    assert _claimed(statuses[removed])
    assert [s for i, s in statuses.items() if i != removed] == ['active']
    [again] = gdb.claim([glance.location_deletion(removed)])
    assert again.busy


# ------------------------------------------------------------------ finish


def test_finish_done_closes_the_image(glance, gdb):
    image = glance.make_image()
    [claim] = gdb.claim([glance.deletion(image)])
    closed = _finish(gdb, claim, {claim.locations[0].id: GONE}, {image})
    assert closed == {image}
    assert glance.image(image).status == 'deleted'
    assert glance.image(image).deleted
    [row] = glance.locations(image)
    assert (row.status, bool(row.deleted)) == ('deleted', True)


def test_finish_failed_hands_location_back(glance, gdb):
    url2 = glance.write_file('second')
    image = glance.make_image()
    second = glance.add_location(image, url2, status='pending_delete')
    [claim] = gdb.claim([glance.deletion(image)])
    first = [loc.id for loc in claim.locations if loc.id != second][0]

    closed = _finish(gdb, claim, {first: GONE, second: FAILED}, {image})

    assert closed == set()
    assert glance.image(image).status == 'pending_delete'
    statuses = {r.id: r.status for r in glance.locations(image)}
    assert statuses == {first: 'deleted', second: 'pending_delete'}


def test_finish_leaves_image_open_while_a_location_is_claimed(glance, gdb):
    image = glance.make_image()
    second = glance.add_location(
        image, glance.write_file('2'), status='pending_delete'
    )
    [claim] = gdb.claim([glance.deletion(image)])
    first = [loc.id for loc in claim.locations if loc.id != second][0]
    assert _finish(gdb, claim, {first: GONE}, {image}) == set()
    assert glance.image(image).status == 'pending_delete'
    assert _finish(gdb, claim, {second: GONE}, {image}) == {image}


def test_finish_only_moves_scrubbing_rows(glance, gdb):
    image = glance.make_image()
    [row] = glance.locations(image)
    # not claimed: a stray finish must not mark it deleted
    location = glance_db.Location(row.id, image, 'file:///x', 'fs', None)
    assert gdb.finish('0' * 20, [(location, GONE)], set()) == set()
    assert glance.locations(image)[0].status == 'pending_delete'


def test_finish_does_not_close_a_restored_image(glance, gdb):
    image = glance.make_image()
    gdb.restore(image, _verify_files, 60)
    assert gdb.finish('0' * 20, [], {image}) == set()
    assert glance.image(image).status == 'active'


# ------------------------------------------- takeovers and renew (issue 7)


def test_failed_delete_after_a_takeover_is_never_revivable(glance):
    """Finding 1 at the DB level: B took A's claim over; B's delete
    failed; the row is scrub_interrupted, restore refuses, and the next
    claim takes it again at once (no lease to wait for)."""
    gdb = glance_db.GlanceDB(glance.engine, lease_time=600)
    image = glance.make_image()
    deletion = glance.deletion(image)
    [a] = gdb.claim([deletion])
    [b] = gdb.claim([deletion], now=ago(-601))
    [location] = b.locations
    assert location.taken_over
    _finish(gdb, b, {location.id: FAILED}, {image})
    [row] = glance.locations(image)
    assert row.status == 'scrub_interrupted'
    with pytest.raises(exceptions.DataGone) as info:
        gdb.restore(image, _verify_files, 60)
    assert 'interrupted' in str(info.value)
    # A's finish of its own (failed) delete moves nothing now
    _finish(gdb, a, {location.id: FAILED}, {image})
    assert glance.locations(image)[0].status == 'scrub_interrupted'
    [c] = gdb.claim([deletion])
    assert [loc.taken_over for loc in c.locations] == [True]


def test_renew_answers_which_rows_are_still_ours(glance):
    """Finding 2: after a takeover the old claim's renewal gets nothing
    back (it used to return a fresh stamp that could equal the new
    owner's), and its finish cannot touch the new owner's rows."""
    gdb = glance_db.GlanceDB(glance.engine, lease_time=600)
    image = glance.make_image()
    deletion = glance.deletion(image)
    [a] = gdb.claim([deletion])
    ids = [loc.id for loc in a.locations]
    assert gdb.renew(a.token, ids) == set(ids)
    later = ago(-601)
    [b] = gdb.claim([deletion], now=later)
    assert gdb.renew(a.token, ids, now=later) == set()
    _finish(gdb, a, {ids[0]: FAILED}, {image})
    assert glance.locations(image)[0].status == f'scrubbing:{b.token}'
    assert gdb.renew(b.token, ids) == set(ids)


@pytest.mark.parametrize(
    'verdict, clean, expected',
    [
        (glance_db.Verdict.GONE, True, 'deleted'),
        (glance_db.Verdict.GONE, False, 'deleted'),
        (glance_db.Verdict.FAILED, True, 'pending_delete'),
        (glance_db.Verdict.FAILED, False, 'scrub_interrupted'),
        (glance_db.Verdict.NOT_STARTED, True, 'pending_delete'),
        (glance_db.Verdict.NOT_STARTED, False, 'scrub_interrupted'),
        (glance_db.Verdict.UNKNOWN, True, 'scrub_interrupted'),
        (glance_db.Verdict.UNKNOWN, False, 'scrub_interrupted'),
    ],
)
def test_target_status_is_the_protocol_table(verdict, clean, expected):
    location = glance_db.Location(1, 'i', 'file:///x', None, None)
    location = dataclasses.replace(location, taken_over=not clean)
    assert glance_db.target_status(location, verdict) == expected


def test_claims_of_a_dead_process_of_this_host_are_taken_over_at_once(
    glance,
):
    """Crash recovery: a claim written by a process of this host that no
    longer runs is taken over without waiting for lease_time; a claim of
    a live process (or of another host) waits."""
    dead_pids = {4242}
    alive = lambda pid: pid not in dead_pids  # noqa: E731
    here = holders.Process('host-a', pid=1000, alive=alive)
    image = glance.make_image()
    deletion = glance.deletion(image)
    for writer, taken in (
        (holders.Process('host-a', pid=4242, alive=alive), True),
        (holders.Process('host-a', pid=1001, alive=alive), False),
        (holders.Process('host-b', pid=4242, alive=alive), False),
        (holders.Process('host-a', pid=1000, alive=alive), True),  # pid reuse
    ):
        token = writer.new_token()
        [row] = glance.locations(image)
        glance.update(
            'image_locations',
            row.id,
            status=f'scrubbing:{token}',
            updated_at=ago(1),
        )
        gdb = glance_db.GlanceDB(glance.engine, lease_time=600, process=here)
        [claim] = gdb.claim([deletion])
        assert claim.busy is not taken, (writer.host, writer.pid)
        if claim.busy:
            assert claim.busy_until > ago(-590)


def test_half_finished_glance_delete_is_scrubbed(glance, gdb):
    image = glance.make_image(status='active')
    glance_rows.half_finished_delete(glance.engine, image, ago(600))
    [deletion] = next(gdb.iter_due_images(ago(300), 100))
    [claim] = gdb.claim([deletion])
    assert claim.skip_reason is None
    [location] = claim.locations
    os.unlink(path_of(location.uri))
    assert _finish(gdb, claim, {location.id: GONE}, {image}) == {image}
    assert glance.image(image).status == 'deleted'
