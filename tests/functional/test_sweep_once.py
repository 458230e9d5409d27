"""``scrub-listener --sweep-once`` on a real Glance schema and file store.

Tests that cross the database (what is due, claims, failures recorded,
shared data, the due-queue) run on SQLite, MariaDB and PostgreSQL; tests
of store resolution and decryption alone (``sqlite_env``) on SQLite.
Glance rows are written as glance-api 33 writes them
(tools/glance_rows.py); the product runs as a subprocess and is judged by
what it leaves: files, rows, exit code, output, and what
``scrub-listener-manage list`` shows.
"""

import datetime
import os
import subprocess

import pytest
import sqlalchemy as sa

from scrub_listener import queue as product_queue
from tests.functional.conftest import KEY
from tests.functional.conftest import OTHER_KEY
from tests.functional.conftest import SCRUB_LISTENER
from tests.functional.conftest import ago
from tests.functional.conftest import assert_ok
from tests.functional.conftest import assert_summary
from tests.functional.conftest import run_cli
from tests.functional.conftest import summary
from tools import glance_rows
from tools import harness
from tools.service_process import wait_until

HOUR = 3600


def _read(path):
    with open(path, 'rb') as f:
        return f.read()


def test_due_images_scrubbed_not_due_and_active_untouched(env):
    """Every visibility is scrubbed once due, ``community`` included
    (glance-scrubber never scrubs those); images not yet due and live
    images are not touched."""
    env.configure(scrub_time=HOUR)
    due = [
        env.make_image(
            deleted_at=ago(2 * HOUR), visibility=visibility, data=b'a' * size
        )
        for visibility, size in (
            ('private', 1000),
            ('public', 2000),
            ('shared', 3000),
            ('community', 4000),
        )
    ]
    not_due = env.make_image(deleted_at=ago(HOUR - 120))
    active = env.make_image(status='active')
    before = {i: env.snapshot(i) for i in (not_due, active)}

    result = assert_ok(env.sweep())

    assert 'Sweep: 4 deletions due, 4 new in the queue' in result.stdout
    line = assert_summary(result, scrubbed=4, failed=0, bytes_freed=10000)
    assert '4 locations' in line
    for image_id in due:
        env.assert_scrubbed(image_id)
    for image_id in (not_due, active):
        assert env.snapshot(image_id) == before[image_id]
        assert os.path.exists(env.data_path(image_id))


def test_multi_location_image(env):
    data = os.urandom(3000)
    paths = [
        os.path.join(env.store_dir, name) for name in ('one', 'two', 'three')
    ]
    image_id = env.make_image(
        data=data,
        locations=[
            (env.write_file(path, data), {'store': 'fs'}) for path in paths
        ],
    )

    result = assert_ok(env.sweep())

    line = assert_summary(result, scrubbed=1, failed=0, bytes_freed=9000)
    assert '3 locations' in line
    env.assert_scrubbed(image_id, paths)
    assert len(env.locations(image_id)) == 3


def test_location_removed_from_active_image(env):
    """PATCH remove /locations/1 on a live image: glance-scrubber never
    deletes that data.  Only the removed location goes; the image, its
    other location and that location's data stay."""
    env.configure(scrub_time=HOUR)
    images = {}
    for name, removed_at in (('due', ago(2 * HOUR)), ('early', ago(60))):
        data = os.urandom(2048)
        keep = os.path.join(env.store_dir, f'{name}-keep')
        drop = os.path.join(env.store_dir, f'{name}-drop')
        image_id = env.make_image(
            status='active',
            data=data,
            locations=[
                (env.write_file(keep, data), {'store': 'fs'}),
                (env.write_file(drop, data), {'store': 'fs'}),
            ],
        )
        kept_row, dropped_row = env.locations(image_id)
        env.remove_location(dropped_row['id'], removed_at)
        images[name] = (image_id, keep, drop, data)
    before_early = env.snapshot(images['early'][0])

    result = assert_ok(env.sweep())

    assert_summary(result, scrubbed=1, failed=0, bytes_freed=2048)
    image_id, keep, drop, data = images['due']
    assert not os.path.exists(drop)
    assert _read(keep) == data
    image = env.image(image_id)
    assert (image['status'], image['deleted']) == ('active', False)
    kept_row, dropped_row = env.locations(image_id)
    assert (kept_row['status'], kept_row['deleted']) == ('active', False)
    assert (dropped_row['status'], dropped_row['deleted']) == (
        'deleted',
        True,
    )
    image_id, keep, drop, data = images['early']
    assert env.snapshot(image_id) == before_early
    assert _read(keep) == _read(drop) == data


def test_multi_store_location_without_store_metadata(sqlite_env):
    """No ``store`` in meta_data (older images, hand-made locations):
    resolved by scheme and data directory, glance-scrubber fails forever
    with "Unknown scheme"."""
    env = sqlite_env
    env.configure(two_stores=True)
    in_fs = env.make_image(backend=None)
    data = os.urandom(500)
    path = os.path.join(env.store2_dir, 'in-fs2')
    in_fs2 = env.make_image(
        data=data, locations=[(env.write_file(path, data), {})]
    )

    result = assert_ok(env.sweep())

    assert_summary(result, scrubbed=2, failed=0)
    env.assert_scrubbed(in_fs)
    env.assert_scrubbed(in_fs2, [path])


def test_single_store_configuration(sqlite_env):
    """``[glance_store] stores / default_store / filesystem_store_datadir``
    without ``enabled_backends``, as single-store Glance writes it."""
    env = sqlite_env
    env.configure(single_store=True)
    image_id = env.make_image(backend=None)
    outside = env.write_file(os.path.join(env.outside_dir, 'x'), b'keep')
    refused = env.make_image(backend=None, locations=[(outside, {})])

    result = env.sweep()

    assert result.returncode == 1, str(result)
    assert_summary(result, scrubbed=1, failed=1)
    env.assert_scrubbed(image_id)
    assert os.path.exists(os.path.join(env.outside_dir, 'x'))
    assert env.image(refused)['status'] == 'pending_delete'


@pytest.mark.parametrize(
    'single_store', [False, True], ids=['multi-store', 'single-store']
)
def test_store_with_several_data_directories(sqlite_env, single_store):
    """``filesystem_store_datadirs = DIR:PRIORITY`` (repeated), with a
    space and a non-ASCII letter in one path: data in either directory is
    scrubbed."""
    env = sqlite_env
    dirs = [
        os.path.join(str(env.tmp), 'dirs', name)
        for name in ('first', 'second é dir')
    ]
    images = {}
    for directory in dirs:
        path = os.path.join(directory, 'data')
        url = env.write_file(path, b'x' * 10)
        images[env.make_image(data=b'x' * 10, locations=[(url, {})])] = path
    if single_store:
        store = (
            '[DEFAULT]\n[glance_store]\nstores = file\ndefault_store = file\n'
        )
    else:
        store = (
            '[DEFAULT]\nenabled_backends = fs:file\n'
            '[glance_store]\ndefault_backend = fs\n[fs]\n'
        )
    conf = env.tmp / 'datadirs.conf'
    conf.write_text(
        f'{store}'
        'filesystem_store_datadir =\n'
        f'filesystem_store_datadirs = {dirs[0]}:100\n'
        f'filesystem_store_datadirs = {dirs[1]}:200\n'
        f'[database]\nconnection = {env.glance_url}\n'
    )
    local = harness.write_config(
        str(env.tmp / 'local.conf'),
        {'DEFAULT': {'state_path': env.state_path}},
    )

    result = assert_ok(
        run_cli(
            [
                SCRUB_LISTENER,
                '--config-file',
                conf,
                '--config-file',
                local,
                '--sweep-once',
            ]
        )
    )

    assert_summary(result, scrubbed=2, failed=0, bytes_freed=20)
    for image_id, path in images.items():
        env.assert_scrubbed(image_id, [path])


def test_location_outside_store_dir_is_refused(env):
    """A location that is not inside a configured store is never deleted:
    a file elsewhere, a ``..`` escape, a symlink out of the store, a store
    or scheme that is not ours.  The sweep goes on with the others, exits
    1, and ``list`` shows each refusal with its reason and attempts."""
    victims = {}

    def refused(name, url, meta):
        victims[name] = env.make_image(
            locations=[(url, meta)], name=name, owner=f'owner-{name}'
        )

    outside = os.path.join(env.outside_dir, 'precious')
    env.write_file(outside, b'precious')
    refused('outside', 'file://' + outside, {'store': 'fs'})
    escape = os.path.join(env.store_dir, '..', 'elsewhere', 'precious')
    refused('dotdot', 'file://' + escape, {'store': 'fs'})
    link = os.path.join(env.store_dir, 'link')
    os.symlink(outside, link)
    refused('symlink', 'file://' + link, {'store': 'fs'})
    refused('no-store', 'file://' + outside, {})
    refused('other-store', 'file://' + outside, {'store': 'ceph'})
    refused('http', 'http://example.com/image', {'store': 'fs'})
    good = env.make_image(data=b'q' * 10)
    before = {
        name: env.snapshot(i, touched_ok=True) for name, i in victims.items()
    }

    result = env.sweep()

    assert result.returncode == 1, str(result)
    assert 'Traceback' not in result.stderr
    assert_summary(result, scrubbed=1, failed=len(victims), bytes_freed=10)
    env.assert_scrubbed(good)
    assert _read(outside) == b'precious'
    assert os.path.islink(link)
    listing = env.list_json()
    assert set(listing) == set(victims.values())
    for name, image_id in victims.items():
        assert env.snapshot(image_id, touched_ok=True) == before[name], name
        row = listing[image_id]
        assert row['name'] == name
        assert row['owner'] == f'owner-{name}'
        assert row['size'] == 1024
        assert row['state'] == 'failed', row
        assert row['attempts'] == 1, row
        assert row['next_attempt_at'] > row['deleted_at'], row
        assert row['last_error'], row
    for name in ('outside', 'dotdot', 'symlink'):
        assert 'outside the store' in listing[victims[name]]['last_error']
    assert 'no enabled backend' in listing[victims['no-store']]['last_error']
    assert 'ceph' in listing[victims['other-store']]['last_error']
    table = assert_ok(env.manage('list', '--owner', 'owner-outside')).stdout
    assert victims['outside'] in table
    assert 'failed (1 attempts): ' in table
    assert 'outside the store' in table
    assert '1 image(s) pending delete' in table


@pytest.mark.parametrize('key', [None, KEY], ids=['plain', 'encrypted'])
def test_data_shared_with_live_location_is_kept(env, key):
    """Another image, alive, points at the same data: the deleted image's
    row is marked, the data stays.  With encryption the two rows hold
    different ciphertexts of the same URL."""
    env.configure(key=key)
    data = os.urandom(4096)
    path = os.path.join(env.store_dir, 'shared')
    url = env.write_file(path, data)
    live = env.make_image(
        status='active',
        data=data,
        locations=[(url, {'store': 'fs'})],
        encrypt_key=key,
    )
    dead = env.make_image(
        data=data, locations=[(url, {'store': 'fs'})], encrypt_key=key
    )
    live_before = env.snapshot(live)
    if key:
        values = {env.locations(i)[0]['value'] for i in (live, dead)}
        assert len(values) == 2

    result = assert_ok(env.sweep())

    assert_summary(result, scrubbed=1, failed=0, bytes_freed=0)
    env.assert_scrubbed(dead, paths=[])
    assert _read(path) == data
    assert env.snapshot(live) == live_before


def test_encrypted_locations_are_scrubbed(sqlite_env):
    """URLs encrypted by Glance's own crypt with metadata_encryption_key."""
    env = sqlite_env
    env.configure(key=KEY)
    images = [env.make_image(encrypt_key=KEY) for _ in range(3)]
    for image_id in images:
        assert not env.locations(image_id)[0]['value'].startswith('file:')

    result = assert_ok(env.sweep())

    assert_summary(result, scrubbed=3, failed=0, bytes_freed=3 * 1024)
    for image_id in images:
        env.assert_scrubbed(image_id)


def test_wrong_key_or_corrupt_ciphertext_fails_cleanly(env):
    """Nothing is deleted when a location cannot be decrypted; the
    failure and its reason are recorded, the sweep goes on."""
    env.configure(key=KEY)
    wrong_key = env.make_image(encrypt_key=OTHER_KEY)
    corrupt = env.make_image(encrypt_key=KEY)
    plain = env.make_image()  # written before the key was set
    truncated = env.make_image(encrypt_key=KEY)
    (row,) = env.locations(corrupt)
    env.update_location(row['id'], value='%%% not base64 %%%')
    (row,) = env.locations(truncated)
    env.update_location(row['id'], value=row['value'][:-8])
    good = env.make_image(encrypt_key=KEY)
    broken = [wrong_key, corrupt, plain, truncated]
    before = {i: env.snapshot(i) for i in broken}

    result = env.sweep()

    assert result.returncode == 1, str(result)
    assert 'Traceback' not in result.stderr
    assert_summary(result, scrubbed=1, failed=4)
    env.assert_scrubbed(good)
    listing = env.list_json()
    for image_id in broken:
        assert os.path.exists(env.data_path(image_id))
        assert env.snapshot(image_id) == before[image_id]
        row = listing[image_id]
        assert (row['state'], row['attempts']) == ('failed', 1), row
        assert 'decrypt' in row['last_error'], row


def test_store_failure_recorded_and_not_retried_before_backoff(
    env, undeletable
):
    """The store refuses the delete (the data file sits in an immutable
    directory: that fails for root too).  The failure is recorded with its
    reason and attempts, the exit code says so, and the next run does not
    retry before the backoff.  (Retry once the backoff passed:
    test_glance_reference_scenarios.test_store_delete_store_exceptions.)"""
    data = os.urandom(1024)
    path = os.path.join(env.store_dir, 'locked', 'data')
    image_id = env.make_image(
        data=data, locations=[(env.write_file(path, data), {'store': 'fs'})]
    )
    before = env.snapshot(image_id, touched_ok=True)
    undeletable(os.path.dirname(path))

    first = env.sweep()
    second = env.sweep()

    assert first.returncode == 1, str(first)
    assert 'Traceback' not in first.stderr
    assert_summary(first, scrubbed=0, failed=1)
    assert 'Traceback' not in second.stderr
    assert_summary(second, scrubbed=0, failed=0)
    assert _read(path) == data
    assert env.snapshot(image_id, touched_ok=True) == before
    row = env.list_json()[image_id]
    assert (row['state'], row['attempts']) == ('failed', 1), row
    assert 'store delete failed' in row['last_error'], row
    assert path in row['last_error'], row
    next_attempt = datetime.datetime.fromisoformat(
        row['next_attempt_at'].rstrip('Z')
    )
    assert next_attempt > ago(-20), row  # default retry_backoff: 30 s


def test_unwritable_store_dir_is_a_failure_not_a_scrub(
    sqlite_env, undeletable
):
    """The whole store directory refuses deletes (read-only mount,
    immutable, wrong permissions).  glance_store then disables the store's
    write access at start and refuses every delete without trying.  That
    must be a failure: data still there, rows still ``pending_delete``,
    exit 1 -- not "scrubbed" with the data left behind untracked.

    (Found by this test: Stores.delete took glance_store's
    StoreDeleteNotSupported for "not our data", a success.)"""
    env = sqlite_env
    image_id = env.make_image()
    before = env.snapshot(image_id, touched_ok=True)
    undeletable(env.store_dir)

    result = env.sweep()

    assert os.path.exists(env.data_path(image_id))
    assert env.snapshot(image_id, touched_ok=True) == before
    assert result.returncode == 1, str(result)
    assert_summary(result, scrubbed=0, failed=1)


def test_dry_run_changes_nothing(env):
    env.configure(scrub_time=HOUR)
    due = env.make_image(deleted_at=ago(2 * HOUR), data=b'd' * 1234)
    outside = env.write_file(os.path.join(env.outside_dir, 'x'), b'keep')
    refused = env.make_image(
        deleted_at=ago(2 * HOUR), locations=[(outside, {'store': 'fs'})]
    )
    not_due = env.make_image()
    images = (due, refused, not_due)
    before = {i: env.snapshot(i) for i in images}

    result = assert_ok(env.sweep('--dry-run'))

    lines = {
        line.split()[0]: line
        for line in result.stdout.splitlines()
        if line[:36] in images
    }
    assert set(lines) == {due, refused}, result.stdout
    (location,) = env.locations(due)
    fields = lines[due].split()
    assert fields[1:4] == [str(location['id']), 'fs', '1234'], lines[due]
    assert 'REFUSED' in lines[refused]
    assert 'location(s) would be scrubbed' in result.stdout
    for image_id in images:
        assert env.snapshot(image_id) == before[image_id]
    assert os.path.exists(env.data_path(due))
    assert env.queue_rows() == []


def test_work_left_by_dead_scrubbers_is_finished(env):
    """A worker claimed locations (``scrubbing``) and died: once its
    claim is older than ``lease_time`` the next sweep finishes the job,
    also from a fresh due-queue (another host, queue file lost).  And a
    migration case: glance-scrubber deleted the data and marked the
    location ``deleted``, then died before marking the image; the image
    is closed."""
    env.configure(extra={'scrubber': {'lease_time': 10}})
    image_id = env.make_image()
    removed_from_live = env.make_image(
        status='active',
        locations=[
            (env.write_file(os.path.join(env.store_dir, p), b'x'), {})
            for p in ('keep', 'drop')
        ],
    )
    keep_row, drop_row = env.locations(removed_from_live)
    env.remove_location(drop_row['id'], ago(120))
    for row in (*env.locations(image_id), drop_row):
        env.update_location(row['id'], status='scrubbing', updated_at=ago(60))
    half_done = env.make_image()
    os.unlink(env.data_path(half_done))
    (row,) = env.locations(half_done)
    env.update_location(row['id'], status='deleted')

    result = assert_ok(env.sweep())

    assert_summary(result, scrubbed=3, failed=0)
    env.assert_scrubbed(image_id)
    env.assert_scrubbed(half_done)
    assert not os.path.exists(os.path.join(env.store_dir, 'drop'))
    assert os.path.exists(os.path.join(env.store_dir, 'keep'))
    assert [r['status'] for r in env.locations(removed_from_live)] == [
        'active',
        'deleted',
    ]
    assert env.image(removed_from_live)['status'] == 'active'


def test_location_claimed_by_another_worker_is_left_alone(env):
    """A live claim (``scrubbing``, fresh) belongs to another worker: this
    sweep neither deletes nor marks anything of that image."""
    image_id = env.make_image()
    (row,) = env.locations(image_id)
    env.update_location(row['id'], status='scrubbing', updated_at=ago(1))
    before = env.snapshot(image_id)

    result = assert_ok(env.sweep())

    assert 'busy elsewhere 1' in summary(result)
    assert_summary(result, scrubbed=0, failed=0)
    assert env.snapshot(image_id) == before
    assert os.path.exists(env.data_path(image_id))


def test_first_start_of_two_instances_on_a_new_queue(sqlite_env):
    """Two instances (two hosts, or the service and a cron sweep-once)
    start for the first time on a new shared PostgreSQL due-queue.  Made
    deterministic: the other instance's CREATE TABLE is held open in a
    transaction until ours has checked for the table and blocks on it.
    Ours must then use the table the other one made.  (Found by this
    test: the start crashed with a traceback on the duplicate table.)"""
    env = sqlite_env
    url = harness.create_empty_database('postgresql')
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    proc = None
    try:
        conf = harness.write_config(
            str(env.tmp / 'pg-queue.conf'),
            env.sections(extra={'scrub_queue': {'connection': url}}),
        )
        image_id = env.make_image()
        with engine.connect() as other:
            transaction = other.begin()
            product_queue.ENTRIES.create(other)
            proc = subprocess.Popen(
                [SCRUB_LISTENER, '--config-file', conf, '--sweep-once'],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            _wait_for_lock_waiter(engine, proc)
            transaction.commit()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        engine.dispose()
        harness.drop_database(url)

    assert 'Traceback' not in out + err, out + err
    assert proc.returncode == 0, out + err
    env.assert_scrubbed(image_id)


def _wait_for_lock_waiter(engine, proc, timeout=30):
    """Until a session of the database waits for a lock (ours)."""
    query = sa.text(
        'SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = '
        "'Lock' AND datname = current_database()"
    )

    def waiting():
        assert proc.poll() is None, proc.communicate()
        with engine.connect() as conn:
            return conn.execute(query).scalar()

    wait_until(
        waiting,
        timeout,
        message='scrub-listener never waited on the queue table lock',
    )


def test_half_finished_glance_delete_is_listed_restorable_and_scrubbed(env):
    """Issue 7, finding 7: glance-api's DELETE cut between its two
    transactions leaves the image pending_delete with deleted = 0 and
    deleted_at NULL.  Its deletion time is the updated_at the first
    transaction wrote: list shows it, restore brings it back, and once
    deleted that way again a sweep scrubs it (nothing raises on the NULL).
    """
    restorable = env.make_image(status='active')
    scrubbable = env.make_image(status='active', tags=['t'], members=['m'])
    for image_id in (restorable, scrubbable):
        glance_rows.half_finished_delete(env.engine, image_id, ago(120))

    listed = env.list_json()
    assert set(listed) == {restorable, scrubbable}
    assert_ok(env.restore(restorable))
    assert env.image(restorable)['status'] == 'active'
    assert os.path.exists(env.data_path(restorable))

    result = assert_ok(env.sweep())

    assert_summary(result, scrubbed=1, failed=0)
    # finished as Glance's image_destroy would have: gone from the API
    env.assert_scrubbed(scrubbable)
    for table in ('image_tags', 'image_members'):
        assert [r['deleted'] for r in env.children(table, scrubbable)] == [
            True
        ]
    assert env.image(restorable)['status'] == 'active'
