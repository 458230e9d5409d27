"""scrub_listener.glance_db: restore, on the real Glance schema (SQLite).

What a restore brings back (image, locations, properties, tags, members
of this deletion only: issue 7, finding 8), and each refusal, which
changes nothing: unknown, active or claimed image, data gone or partly
scrubbed, unreadable location, no location, a location scrubbed inside
the deletion window, an encryption key Glance deleted.
"""

import os
import uuid

import pytest

from scrub_listener import exceptions
from scrub_listener import glance_db
from tests.unit.conftest import ago
from tests.unit.conftest import path_of
from tests.unit.glance_db_helpers import FAILED
from tests.unit.glance_db_helpers import GONE
from tests.unit.glance_db_helpers import KEY
from tests.unit.glance_db_helpers import OTHER_KEY
from tests.unit.glance_db_helpers import finish as _finish
from tests.unit.glance_db_helpers import snapshot as _snapshot
from tests.unit.glance_db_helpers import verify_files as _verify_files


def test_restore_brings_everything_of_the_deletion_back(glance, gdb):
    image = glance.make_image(
        status='active',
        properties={'os_distro': 'debian', 'hw_disk_bus': 'scsi'},
        tags=['golden', 'x'],
        members=['tenant-a'],
    )
    # removed on purpose long before the delete: stays removed
    old_url = glance.write_file('old')
    old = glance.add_location(image, old_url)
    glance.remove_location(old, ago(3600))
    glance.glance_delete(image, ago(30))

    result = gdb.restore(image, _verify_files, 60)

    assert result == glance_db.RestoreResult(
        image, 1, 2, 2, 1, deleted_at=result.deleted_at
    )
    assert result.deleted_at is not None  # which deletion was undone
    row = glance.image(image)
    assert (row.status, bool(row.deleted), row.deleted_at) == (
        'active',
        False,
        None,
    )
    by_id = {r.id: r for r in glance.locations(image)}
    assert by_id[old].status == 'pending_delete'
    live = [r for i, r in by_id.items() if i != old]
    assert [(r.status, bool(r.deleted), r.deleted_at) for r in live] == [
        ('active', False, None)
    ]
    for table in ('image_properties', 'image_tags', 'image_members'):
        rows = glance.children(table, image)
        assert rows and all(not r.deleted for r in rows), table


def test_restore_leaves_children_deleted_before_the_window(glance, gdb):
    image = glance.make_image(status='active', properties={'keep': 'x'})
    t = glance.tables['image_properties']
    with glance.engine.begin() as conn:
        conn.execute(
            t.insert(),
            {
                'image_id': image,
                'name': 'removed',
                'value': 'y',
                'created_at': ago(9000),
                'deleted': True,
                'deleted_at': ago(7200),
            },
        )
    glance.glance_delete(image, ago(10))
    result = gdb.restore(image, _verify_files, 60)
    assert result.properties == 1
    live = {
        r.name
        for r in glance.children('image_properties', image)
        if not r.deleted
    }
    assert live == {'keep'}


def test_restore_errors_change_nothing(glance, gdb):
    missing = str(uuid.uuid4())
    with pytest.raises(exceptions.ImageNotFound) as info:
        gdb.restore(missing, _verify_files, 60)
    assert info.value.exit_code == 4

    with pytest.raises(exceptions.InvalidImageId):
        gdb.restore('nope', _verify_files, 60)

    active = glance.make_image(status='active')
    with pytest.raises(exceptions.NotPendingDelete) as info:
        gdb.restore(active, _verify_files, 60)
    assert info.value.exit_code == 5
    assert 'active' in str(info.value)

    claimed = glance.make_image()
    gdb.claim([glance.deletion(claimed)])
    before = _snapshot(glance, claimed)
    with pytest.raises(exceptions.ScrubInProgress) as info:
        gdb.restore(claimed, _verify_files, 60)
    assert info.value.exit_code == 7
    assert _snapshot(glance, claimed) == before

    gone = glance.make_image()
    os.unlink(glance.path(gone))
    before = _snapshot(glance, gone)
    with pytest.raises(exceptions.DataGone) as info:
        gdb.restore(gone, _verify_files, 60)
    assert info.value.exit_code == 6
    assert _snapshot(glance, gone) == before


def test_restore_refuses_partly_scrubbed_image(glance, gdb):
    image = glance.make_image()
    second = glance.add_location(
        image, glance.write_file('two'), status='pending_delete'
    )
    glance.update(
        'image_locations', second, deleted_at=glance.image(image).deleted_at
    )
    [claim] = gdb.claim([glance.deletion(image)])
    first = [loc.id for loc in claim.locations if loc.id != second][0]
    _finish(gdb, claim, {first: GONE, second: FAILED}, {image})
    before = _snapshot(glance, image)
    with pytest.raises(exceptions.DataGone) as info:
        gdb.restore(image, _verify_files, 60)
    assert '1 of its 2 locations' in str(info.value)
    assert _snapshot(glance, image) == before


def test_restore_refuses_unreadable_location(glance):
    image = glance.make_image(encrypt_key=OTHER_KEY)
    gdb = glance_db.GlanceDB(glance.engine, encryption_key=KEY)
    before = _snapshot(glance, image)
    with pytest.raises(exceptions.NotRestorable):
        gdb.restore(image, _verify_files, 60)
    assert _snapshot(glance, image) == before


def test_restore_then_claim_skips(glance, gdb, stores):
    image = glance.make_image()
    deletion = glance.deletion(image)
    gdb.restore(image, _verify_files, 60)
    [claim] = gdb.claim([deletion])
    assert claim.skip_reason and claim.locations == []
    assert os.path.exists(glance.path(image))


def test_image_without_locations_is_not_restorable(glance, gdb):
    image = glance.make_image(locations=[])
    with pytest.raises(exceptions.DataGone) as info:
        gdb.restore(image, _verify_files, 60)
    assert 'no location' in str(info.value)


@pytest.mark.parametrize(
    'removed_before, restored',
    [(120, True), (40, False)],
    ids=['outside-the-window', 'inside-the-window'],
)
def test_restore_beside_a_location_scrubbed_before_the_delete(
    glance, gdb, removed_before, restored
):
    """A location removed from the live image and scrubbed before the
    image was deleted.  Outside deletion_window it is not this
    deletion's: the restore goes through without it.  Inside the window
    it cannot be told apart from one of this deletion's (only Glance's
    deleted_at may decide: a scrubber's updated_at is another clock, see
    test_restore_leaves_out_no_location_of_its_deletion), so the restore
    is refused: the safe side."""
    image = glance.make_image(status='active')
    moved = glance.add_location(image, glance.write_file('moved-away'))
    glance.remove_location(moved, ago(removed_before))
    [claim] = gdb.claim([glance.location_deletion(moved)])
    os.unlink(path_of(claim.locations[0].uri))
    _finish(gdb, claim, {moved: GONE}, set())
    glance.glance_delete(image, glance_db.utcnow())

    if restored:
        result = gdb.restore(image, _verify_files, 60)
        assert result.locations == 1
        assert glance.image(image).status == 'active'
    else:
        with pytest.raises(exceptions.DataGone):
            gdb.restore(image, _verify_files, 60)
        assert glance.image(image).status == 'pending_delete'


def test_restore_revives_members_and_tags_of_the_deletion_only(glance, gdb):
    """Finding 8: a member whose access was revoked just before the delete
    stays revoked (members and tags carry the image's exact deleted_at)."""
    image = glance.make_image(
        status='active', members=['kept'], tags=['kept-tag']
    )
    revoked = glance.children('image_members', image)[0].id + 1000
    member_table = glance.tables['image_members']
    with glance.engine.begin() as conn:
        conn.execute(
            member_table.insert(),
            {
                'id': revoked,
                'image_id': image,
                'member': 'revoked',
                'can_share': False,
                'status': 'accepted',
                'created_at': ago(100),
                'updated_at': ago(5),
                'deleted_at': ago(5),
                'deleted': True,
            },
        )
    glance.glance_delete(image, glance_db.utcnow())
    result = gdb.restore(image, _verify_files, 60)
    assert (result.members, result.tags) == (1, 1)
    members = {
        r.member: bool(r.deleted)
        for r in glance.children('image_members', image)
    }
    assert members == {'kept': False, 'revoked': True}


def test_image_whose_encryption_key_glance_deleted_is_not_restored(
    glance, gdb
):
    image = glance.make_image(
        status='active',
        properties={
            'cinder_encryption_key_id': 'b0e1-...',
            'cinder_encryption_key_deletion_policy': 'on_image_deletion',
        },
    )
    glance.glance_delete(image, glance_db.utcnow())
    before = _snapshot(glance, image)
    with pytest.raises(exceptions.DataGone) as info:
        gdb.restore(image, _verify_files, 60)
    assert 'encryption key' in str(info.value)
    assert _snapshot(glance, image) == before
