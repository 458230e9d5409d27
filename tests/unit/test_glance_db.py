"""scrub_listener.glance_db on the real Glance schema (SQLite).

The claim protocol is exercised here one step at a time, in one thread;
tests/functional/test_concurrency.py runs the same steps from racing
threads and processes on every database.
"""

import base64
import dataclasses
import json
import os
import random
import string
import uuid

import pytest

from scrub_listener import exceptions
from scrub_listener import glance_db
from scrub_listener import holders
from tests.unit.conftest import ago
from tests.unit.conftest import path_of
from tools import glance_rows

KEY = '0123456789abcdef0123456789abcdef'
OTHER_KEY = 'fedcba9876543210fedcba9876543210'


def _encrypt(key, url, blocksize=16):
    from glance.common import crypt

    return crypt.urlsafe_encrypt(key, url, blocksize)


def _verify_files(locations):
    for location in locations:
        if not os.path.exists(path_of(location.uri)):
            raise exceptions.DataGone(
                image_id=location.image_id, reason='file missing'
            )


GONE = glance_db.Verdict.GONE
FAILED = glance_db.Verdict.FAILED


def _finish(gdb, claim, verdicts, images):
    """finish() with {location id: Verdict} of ``claim``'s locations."""
    by_id = {loc.id: loc for loc in claim.locations}
    return gdb.finish(
        claim.token, [(by_id[i], v) for i, v in verdicts.items()], images
    )


def _claimed(status):
    return status.startswith('scrubbing:')


def _snapshot(glance, image_id):
    return (
        tuple(glance.image(image_id)),
        [tuple(r) for r in glance.locations(image_id)],
        *(
            [tuple(r) for r in glance.children(t, image_id)]
            for t in ('image_properties', 'image_tags', 'image_members')
        ),
    )


# ------------------------------------------------------------ image ids


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


# ---------------------------------------------------- location decryption


def _random_url(rng):
    alphabet = string.ascii_letters + string.digits + '-._~%/+:@'
    scheme = rng.choice(['file', 'rbd', 'swift+https', 'http', 's3'])
    body = ''.join(rng.choices(alphabet, k=rng.randint(0, 120)))
    if rng.random() < 0.2:
        body += ''.join(rng.choices('éüß中文😀', k=rng.randint(1, 5)))
    return f'{scheme}://{body}'


@pytest.mark.parametrize('blocksize', [16, 64])
@pytest.mark.parametrize('key', [KEY[:16], KEY[:24], KEY])
def test_decrypt_location_reads_what_glance_encrypts(key, blocksize):
    rng = random.Random(f'{key}{blocksize}')
    urls = [_random_url(rng) for _ in range(150)]
    # block boundary lengths: the NUL delimiter lands in a new block
    urls += ['file:///' + 'a' * n for n in range(0, 40)]
    for url in urls:
        ciphertext = _encrypt(key, url, blocksize)
        assert glance_db.decrypt_location(key, ciphertext) == url


def test_same_url_encrypts_differently_each_time():
    one, two = (_encrypt(KEY, 'file:///x') for _ in range(2))
    assert one != two
    assert glance_db.decrypt_location(KEY, one) == 'file:///x'
    assert glance_db.decrypt_location(KEY, two) == 'file:///x'


def test_decrypt_location_wrong_key_always_corrupt():
    # Regression: ~0.6% of wrong-key decryptions used to return junk
    # ("" most often) instead of raising.
    rng = random.Random(7)
    junk = []
    for _ in range(2000):
        url = _random_url(rng)
        ciphertext = _encrypt(KEY, url, rng.choice([16, 64]))
        try:
            junk.append(glance_db.decrypt_location(OTHER_KEY, ciphertext))
        except exceptions.CorruptLocation:
            pass
    assert junk == []


def test_decrypt_location_wrong_key_never_yields_a_url():
    # What holds today even with the bug above: junk is never a URL that
    # a store would accept.
    rng = random.Random(8)
    for _ in range(2000):
        ciphertext = _encrypt(KEY, _random_url(rng), rng.choice([16, 64]))
        try:
            text = glance_db.decrypt_location(OTHER_KEY, ciphertext)
        except exceptions.CorruptLocation:
            continue
        assert '://' not in text


def test_decrypt_location_truncated_is_corrupt_or_exact():
    rng = random.Random(9)
    for _ in range(200):
        url = _random_url(rng)
        ciphertext = _encrypt(KEY, url, rng.choice([16, 64]))
        for cut in sorted({1, 2, 4, 22, len(ciphertext) // 2, 40}):
            if cut >= len(ciphertext):
                continue
            try:
                text = glance_db.decrypt_location(KEY, ciphertext[:-cut])
            except exceptions.CorruptLocation:
                continue
            # whole blocks cut after the NUL delimiter: still the URL
            assert text == url


@pytest.mark.parametrize(
    'ciphertext',
    [
        '',
        'file:///var/lib/glance/images/x',  # a plain, unencrypted URL
        'not base64 at all !!!',
        'é' * 44,
        'AAAA',
        base64.urlsafe_b64encode(b'\0' * 16).decode(),  # IV only
        base64.urlsafe_b64encode(b'\1' * 40).decode(),  # not block aligned
        base64.urlsafe_b64encode(os.urandom(47)).decode(),
        _encrypt(KEY, 'file:///x')[:-1],
    ],
)
def test_decrypt_location_garbage_is_corrupt(ciphertext):
    with pytest.raises(exceptions.CorruptLocation) as info:
        glance_db.decrypt_location(KEY, ciphertext)
    assert 'metadata_encryption_key' in str(info.value)


def test_decrypt_location_bad_key_length_is_corrupt():
    with pytest.raises(exceptions.CorruptLocation):
        glance_db.decrypt_location('short', _encrypt(KEY, 'file:///x'))


# ------------------------------------------------------------- finding work


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


def test_claim_reports_unreadable_locations(glance):
    gdb = glance_db.GlanceDB(glance.engine)
    image = glance.make_image()
    bad = glance.add_location(image, 'file:///x', status='pending_delete')
    glance.update('image_locations', bad, meta_data='[1, 2]')
    [claim] = gdb.claim([glance.deletion(image)])
    assert len(claim.locations) == 1
    assert [e[0] for e in claim.errors] == [bad]
    assert 'meta_data' in claim.errors[0][1]
    statuses = {r.id: r.status for r in glance.locations(image)}
    assert statuses[bad] == 'pending_delete'  # never claimed


def test_claim_with_wrong_key_reports_corrupt_location(glance):
    image = glance.make_image(encrypt_key=KEY)
    gdb = glance_db.GlanceDB(glance.engine, encryption_key=KEY)
    [claim] = gdb.claim([glance.deletion(image)])
    assert claim.locations[0].uri == 'file://' + glance.path(image)

    other = glance.make_image(encrypt_key=OTHER_KEY)
    [claim] = gdb.claim([glance.deletion(other)])
    assert claim.locations == [] or claim.locations[0].uri != (
        'file://' + glance.path(other)
    )


def test_claim_marks_data_a_live_location_uses_as_shared(glance, gdb):
    live = glance.make_image(status='active')
    url = 'file://' + glance.path(live)
    dead = glance.make_image(locations=[(url, {'store': 'fs'})])
    other = glance.make_image()
    [shared, own] = gdb.claim([glance.deletion(dead), glance.deletion(other)])
    assert [loc.shared for loc in shared.locations] == [True]
    assert [loc.shared for loc in own.locations] == [False]


def test_claim_marks_shared_data_with_encrypted_urls(glance):
    gdb = glance_db.GlanceDB(glance.engine, encryption_key=KEY)
    other = glance.make_image(encrypt_key=KEY)
    [claim] = gdb.claim([glance.deletion(other)])  # fills the URL index
    assert not claim.locations[0].shared

    live = glance.make_image(status='active', encrypt_key=KEY)
    url = 'file://' + glance.path(live)
    dead = glance.make_image(
        locations=[(url, {'store': 'fs'})], encrypt_key=KEY
    )
    [claim] = gdb.claim([glance.deletion(dead)])
    assert [loc.shared for loc in claim.locations] == [True]


def test_claim_does_not_count_deleted_locations_as_sharing(glance, gdb):
    url = glance.write_file('common')
    one = glance.make_image(locations=[(url, {'store': 'fs'})])
    two = glance.make_image(locations=[(url, {'store': 'fs'})])
    claims = gdb.claim([glance.deletion(one), glance.deletion(two)])
    assert [loc.shared for c in claims for loc in c.locations] == [
        False,
        False,
    ]


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


# ----------------------------------------------------------------- restore


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


def test_location_meta_data_json(glance, gdb):
    image = glance.make_image(
        locations=[
            (glance.write_file('a'), {'store': 'fs2', 'extra': [1]}),
            (glance.write_file('b'), {}),
        ]
    )
    [claim] = gdb.claim([glance.deletion(image)])
    assert [loc.store for loc in claim.locations] == ['fs2', None]
    assert json.loads(glance.locations(image)[0].meta_data)['store'] == 'fs2'


# ------------------------------------------- issue 7: the safety findings


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


def test_a_revived_old_location_is_seen_by_the_shared_data_check(glance):
    """Finding 4: with encrypted URLs the live-URL index refreshed from a
    watermark (ids above max - 1000, or updated within 120 s of the
    newest seen) and missed an old row revived by a restore while
    glance-api's clock ran ahead.  Now every live row is read."""
    gdb = glance_db.GlanceDB(glance.engine, encryption_key=KEY)
    restored = glance.make_image(encrypt_key=KEY)
    url = 'file://' + glance.path(restored)
    filler = glance.make_image(status='active', encrypt_key=KEY)
    ahead = ago(-3600)  # glance-api's clock an hour ahead
    rows = [
        {
            'image_id': filler,
            'value': _encrypt(KEY, f'file:///elsewhere/{n}'),
            'meta_data': '{}',
            'status': 'active',
            'created_at': ahead,
            'updated_at': ahead,
            'deleted': False,
        }
        for n in range(1001)
    ]
    with glance.engine.begin() as conn:
        conn.execute(glance.tables['image_locations'].insert(), rows)
    warm = glance.make_image(encrypt_key=KEY)
    gdb.claim([glance.deletion(warm)])  # fills the index
    gdb.restore(restored, _verify_files, 60)  # its row is live again
    dead = glance.make_image(
        locations=[(url, {'store': 'fs'})], encrypt_key=KEY
    )
    [claim] = gdb.claim([glance.deletion(dead)])
    assert [loc.shared for loc in claim.locations] == [True]


def test_shared_data_is_compared_by_data_key(glance):
    """Finding 5: URLs naming one file with different spellings are one
    data object when the data key says so."""
    gdb = glance_db.GlanceDB(
        glance.engine, data_key=lambda uri: os.path.normpath(path_of(uri))
    )
    live = glance.make_image(status='active')
    path = glance.path(live)
    spelled = 'file://' + os.path.join(os.path.dirname(path), '.', live)
    dead = glance.make_image(locations=[(spelled, {'store': 'fs'})])
    [claim] = gdb.claim([glance.deletion(dead)])
    assert [loc.shared for loc in claim.locations] == [True]


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
