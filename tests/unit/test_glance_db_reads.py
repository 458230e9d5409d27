"""scrub_listener.glance_db: image ids and the reads (SQLite).

Validation of image ids; what the sweep (``iter_due_*``), the listing
(``iter_pending_images``), ``get_deletion_times`` and ``describe`` find
on the real Glance schema, a half-finished Glance delete included
(issue 7, finding 7).
"""

import uuid

import pytest

from scrub_listener import exceptions
from scrub_listener import glance_db
from tests.unit.conftest import ago
from tests.unit.glance_db_helpers import snapshot as _snapshot
from tests.unit.glance_db_helpers import verify_files as _verify_files
from tools import glance_rows

# --------------------------------------------------------------- image ids


@pytest.mark.parametrize(
    'image_id',
    [
        str(uuid.uuid4()),
        str(uuid.uuid4()).upper(),
        uuid.uuid4(),
        '12345678-1234-5678-1234-567812345678',
    ],
)
def test_validate_image_id_accepts_uuids(image_id):
    assert glance_db.validate_image_id(image_id) == str(image_id)


@pytest.mark.parametrize(
    'image_id',
    [
        '',
        None,
        123,
        'x' * 36,
        'not-an-id',
        "'; DROP TABLE images; --",
        '12345678-1234-5678-1234-56781234567',  # one digit short
        '12345678-1234-5678-1234-5678123456789',  # one too many
        '{12345678-1234-5678-1234-567812345678}',  # 38 chars
        'urn:uuid:12345678-1234-5678-1234-567812345678',
        ' 12345678-1234-5678-1234-567812345678',
        '12345678-1234-5678-1234-567812345678\n',
        '../../etc/passwd',
        'é' * 36,
        b'12345678-1234-5678-1234-567812345678',
    ],
)
def test_validate_image_id_refuses_garbage(image_id):
    with pytest.raises(exceptions.InvalidImageId) as info:
        glance_db.validate_image_id(image_id)
    assert info.value.exit_code == 2
    assert 'is not a valid image id' in str(info.value)


@pytest.mark.parametrize(
    'image_id',
    [
        '\n' + str(uuid.uuid4())[1:],
        str(uuid.uuid4()) + '\n',
        '{' + uuid.uuid4().hex + '}',
        uuid.uuid4().hex,
    ],
)
def test_validate_image_id_wants_the_canonical_form(image_id):
    with pytest.raises(exceptions.InvalidImageId):
        glance_db.validate_image_id(image_id)


def test_a_huge_refused_image_id_is_quoted_short():
    with pytest.raises(exceptions.InvalidImageId) as info:
        glance_db.validate_image_id('f' * 100_000)
    assert len(str(info.value)) < 120
    assert '100000 characters' in str(info.value)


# ------------------------------------------------------------ finding work


def test_iter_due_images_pages_every_visibility(glance, gdb):
    due = sorted(
        glance.make_image(deleted_at=ago(120), visibility=v)
        for v in ('public', 'private', 'shared', 'community', 'community')
    )
    glance.make_image(deleted_at=ago(10))  # not due yet
    glance.make_image(status='active')
    glance.make_image(status='deleted')

    pages = list(gdb.iter_due_images(ago(60), page_size=2))

    assert [len(p) for p in pages] == [2, 2, 1]
    found = [d for page in pages for d in page]
    assert [d.image_id for d in found] == due
    for deletion in found:
        assert deletion.location_id is None
        assert (
            deletion.deleted_at == glance.image(deletion.image_id).deleted_at
        )


def test_iter_due_removed_locations(glance, gdb):
    live = glance.make_image(status='active')
    removed = glance.add_location(live, glance.write_file('old'))
    glance.remove_location(removed, ago(120))
    recent = glance.add_location(live, glance.write_file('recent'))
    glance.remove_location(recent, ago(10))
    # a pending_delete image's locations are its own deletion's business
    glance.make_image(deleted_at=ago(120))

    found = [d for p in gdb.iter_due_removed_locations(ago(60), 10) for d in p]

    assert found == [glance.location_deletion(removed)]


def test_stale_scrubbing_location_of_live_image_is_found_again(glance):
    gdb = glance_db.GlanceDB(glance.engine, lease_time=10)
    live = glance.make_image(status='active')
    removed = glance.add_location(live, glance.write_file('old'))
    glance.remove_location(removed, ago(120))
    [claim] = gdb.claim([glance.location_deletion(removed)])
    assert [loc.id for loc in claim.locations] == [removed]
    # claimed just now: not found; claimed > lease_time ago: found
    assert list(gdb.iter_due_removed_locations(ago(60), 10)) == []
    glance.update('image_locations', removed, updated_at=ago(11))
    found = [
        d.location_id
        for p in gdb.iter_due_removed_locations(ago(60), 10)
        for d in p
    ]
    assert found == [removed]


def test_get_deletion_times(glance, gdb):
    pending = glance.make_image()
    active = glance.make_image(status='active')
    times = gdb.get_deletion_times([pending, active, str(uuid.uuid4())])
    assert times == {pending: glance.image(pending).deleted_at}


def test_iter_pending_images_filters(glance, gdb):
    a = glance.make_image(owner='alice', name='one', deleted_at=ago(500))
    b = glance.make_image(owner='bob', name='two', deleted_at=ago(50))
    glance.add_location(b, glance.write_file('b2'), status='pending_delete')
    glance.make_image(status='active', owner='alice')

    everything = {i.id: i for i in gdb.iter_pending_images(page_size=1)}
    assert set(everything) == {a, b}
    assert everything[b].locations == 2
    assert everything[a].owner == 'alice'
    assert [i.id for i in gdb.iter_pending_images(owner='alice')] == [a]
    assert [i.id for i in gdb.iter_pending_images(name='two')] == [b]
    assert [i.id for i in gdb.iter_pending_images(deleted_since=ago(100))] == [
        b
    ]


def test_describe_changes_nothing(glance, gdb):
    image = glance.make_image()
    before = _snapshot(glance, image)
    locations, errors = gdb.describe(glance.deletion(image))
    assert errors == []
    assert [loc.uri for loc in locations] == ['file://' + glance.path(image)]
    assert locations[0].store == 'fs'
    assert locations[0].size == 1024
    assert _snapshot(glance, image) == before


def test_half_finished_glance_delete_is_swept_listed_and_restorable(
    glance, gdb
):
    """Finding 7: Glance's DELETE cut between its two transactions leaves
    pending_delete, deleted = 0, deleted_at NULL.  Its deletion time is
    the image's updated_at: the sweep finds it, list shows it, restore
    brings it back."""
    image = glance.make_image(status='active', properties={'a': 'b'})
    when = ago(600)
    glance_rows.half_finished_delete(glance.engine, image, when)
    [page] = list(gdb.iter_due_images(ago(300), 100))
    assert page == [glance_db.Deletion(image, None, when)]
    assert gdb.get_deletion_times({image}) == {image: when}
    [listed] = list(gdb.iter_pending_images())
    assert listed.deleted_at == when and listed.locations == 1
    result = gdb.restore(image, _verify_files, 60)
    assert (result.locations, result.properties) == (1, 1)
    assert glance.image(image).status == 'active'
