"""scrub_listener.glance_db: location decoding and shared data (SQLite).

``decrypt_location`` against what Glance's ``metadata_encryption_key``
encrypts (wrong key, truncated and garbage ciphertext), what a claim
makes of unreadable or undecryptable locations and of their meta_data,
and the shared-data check: data a live location still names is flagged
shared (the live-URL index, clear and encrypted URLs: issue 7, findings
4 and 5).
"""

import base64
import json
import os
import random
import string

import pytest

from scrub_listener import exceptions
from scrub_listener import glance_db
from tests.unit.conftest import ago
from tests.unit.conftest import path_of
from tests.unit.glance_db_helpers import KEY
from tests.unit.glance_db_helpers import OTHER_KEY
from tests.unit.glance_db_helpers import verify_files as _verify_files


def _encrypt(key, url, blocksize=16):
    from glance.common import crypt

    return crypt.urlsafe_encrypt(key, url, blocksize)


# ----------------------------------------------------- location decryption


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


# ---------------------------------------------------- unreadable locations


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


# ------------------------------------------------------------- shared data


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
