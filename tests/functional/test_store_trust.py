"""Store trust with glance_store's real FilesystemStore on real directories.

Two levels:

* ``scrub_listener.store.Stores`` in this process on real single- and
  multi-store file configurations (glance_store's own driver does the
  unlinking): what data a URI names (``data_key``), which paths the
  driver would touch, when its "not found" is believed, and that one
  malformed location fails alone.
* ``scrub-listener --sweep-once`` as a subprocess on a real Glance schema
  (SQLite: the database is not the point here), judged by the files and
  rows it leaves.

An "unmounted" data directory is simulated the way an NFS unmount looks
to the process: the directory replaced by an empty one (the mount point
left behind) or gone altogether.
"""

import os

import pytest
from glance_store import location as store_location
from oslo_config import cfg

from scrub_listener import exceptions
from scrub_listener import glance_db
from scrub_listener import model
from scrub_listener import opts
from scrub_listener import store
from tests.functional.conftest import assert_ok
from tools import harness

SECRET = 's3cr3t-Pa55'


# ------------------------------------------------------------- in process


@pytest.fixture
def dirs(tmp_path):
    made = {}
    for name in ('fs', 'fs2', 'outside', 'work'):
        made[name] = str(tmp_path / name)
        os.mkdir(made[name])
    return made


@pytest.fixture
def make_stores(tmp_path, monkeypatch):
    """Parse a config into cfg.CONF, as the commands do; fresh scheme
    maps per test (glance_store keeps them in module globals)."""
    monkeypatch.setattr(store_location, 'SCHEME_TO_CLS_MAP', {})
    monkeypatch.setattr(store_location, 'SCHEME_TO_CLS_BACKEND_MAP', {})
    conf = cfg.CONF

    def make(sections):
        path = harness.write_config(str(tmp_path / 'stores.conf'), sections)
        opts.register_opts(conf)
        conf(['--config-file', path], project='scrub-listener')
        store.register_opts(conf)
        return store.Stores(conf)

    yield make
    conf.reset()
    conf.clear()


def _sections(mode, dirs):
    if mode == 'single':
        return {
            'glance_store': {
                'stores': 'file,http',
                'default_store': 'file',
                'filesystem_store_datadir': dirs['fs'],
            }
        }
    return {
        'DEFAULT': {'enabled_backends': {'fs': 'file', 'fs2': 'file'}},
        'glance_store': {'default_backend': 'fs'},
        'fs': {'filesystem_store_datadir': dirs['fs']},
        'fs2': {'filesystem_store_datadir': dirs['fs2']},
    }


@pytest.fixture(params=['single', 'multi'])
def stores(request, make_stores, dirs):
    made = make_stores(_sections(request.param, dirs))
    # Real stores are never empty for long; an empty one is not trusted.
    for name in ('fs', 'fs2'):
        _write(os.path.join(dirs[name], 'another-image'))
    return made


def _write(path, data=b'0123456789'):
    with open(path, 'wb') as f:
        f.write(data)
    return path


def _loc(stores, uri, location_id=1, store_name='fs'):
    return glance_db.Location(
        id=location_id,
        image_id='00000000-0000-0000-0000-00000000000a',
        uri=uri,
        store=store_name if stores.multi else None,
        size=None,
    )


@pytest.mark.parametrize(
    'spelling',
    ['{d}/./{n}', '{d}//{n}', '{d}/sub/../{n}', '/{d}/{n}', '{d}/{n} '],
)
def test_equal_keys_name_the_file_the_driver_deletes(stores, dirs, spelling):
    """A pending location spelled differently from a live one: same key,
    and glance_store's delete of the one really removes the other's
    file (which is why the keys must be equal)."""
    os.mkdir(os.path.join(dirs['fs'], 'sub'))
    live_path = _write(os.path.join(dirs['fs'], 'img'))
    live = 'file://' + live_path
    pending = 'file://' + spelling.format(d=dirs['fs'], n='img')

    assert stores.data_key(pending) == stores.data_key(live)
    assert store.data_key(pending) == store.data_key(live)
    assert stores.delete(_loc(stores, pending)) == model.StoreAnswer.REMOVED
    assert not os.path.exists(live_path)


def test_symlink_to_the_file_has_its_key(stores, dirs):
    live_path = _write(os.path.join(dirs['fs'], 'img'))
    os.symlink(live_path, os.path.join(dirs['fs'], 'alias'))
    alias = f'file://{dirs["fs"]}/alias'
    assert stores.data_key(alias) == stores.data_key('file://' + live_path)
    assert stores.data_key(alias) != stores.data_key(
        'file://' + os.path.join(dirs['fs'], 'another-image')
    )


@pytest.mark.parametrize('host', ['localhost', 'backup', f'admin:{SECRET}@h'])
@pytest.mark.parametrize(
    'with_store', [True, False], ids=['store', 'no-store']
)
def test_host_part_is_a_relative_path_and_refused(
    stores, dirs, monkeypatch, host, with_store
):
    """file://HOST/<datadir>/x: the driver would unlink HOST/<datadir>/x
    under the working directory.  Refused; neither the decoy there nor
    the file in the store is touched, nothing is reported deleted."""
    monkeypatch.chdir(dirs['work'])
    real = _write(os.path.join(dirs['fs'], 'img'), b'real')
    decoy_dir = os.path.join(dirs['work'], host + dirs['fs'])
    os.makedirs(decoy_dir)
    decoy = _write(os.path.join(decoy_dir, 'img'), b'decoy')
    uri = f'file://{host}{real}'
    location = _loc(stores, uri, 8, 'fs' if with_store else None)

    assert stores.data_key(uri) == ('file', os.path.realpath(decoy))
    assert stores.data_key(uri) != stores.data_key('file://' + real)
    for call in (stores.resolve, stores.delete):
        with pytest.raises(exceptions.LocationRefused) as info:
            call(location)
        assert 'location 8' in str(info.value)
        assert 'relative' in str(info.value)
        assert SECRET not in str(info.value)
    with pytest.raises(exceptions.DataGone, match='cannot verify'):
        stores.check_present(location)
    assert open(decoy, 'rb').read() == b'decoy'
    assert open(real, 'rb').read() == b'real'


def _unmount(datadir):
    """What an NFS unmount leaves: the mount point, empty."""
    os.rename(datadir, datadir + '.mounted')
    os.mkdir(datadir)


def _remount(datadir):
    if os.path.isdir(datadir):
        os.rmdir(datadir)
    os.rename(datadir + '.mounted', datadir)


@pytest.mark.parametrize('after', ['empty', 'missing'])
def test_unmounted_datadir_is_not_already_gone(stores, dirs, after):
    path = _write(os.path.join(dirs['fs'], 'img'), b'precious')
    location = _loc(stores, 'file://' + path)
    _unmount(dirs['fs'])
    if after == 'missing':
        os.rmdir(dirs['fs'])

    unmounted = "looks unmounted/empty: not trusting 'not found'"
    with pytest.raises(exceptions.StoreError, match=unmounted):
        stores.delete(location)
    # restore must not be told "data gone" either
    with pytest.raises(exceptions.StoreError, match=unmounted):
        stores.check_present(location)

    _remount(dirs['fs'])
    stores.check_present(location)
    assert stores.delete(location) == model.StoreAnswer.REMOVED
    assert stores.delete(location) == model.StoreAnswer.ALREADY_GONE


def test_guessed_backend_checks_the_datadir_that_holds_the_path(
    make_stores, dirs
):
    """Store-less location in a data directory mounted inside another
    backend's: whichever backend is guessed, the inner one must look
    mounted for 'not found' to count."""
    inner = os.path.join(dirs['fs'], 'nfs')
    os.mkdir(inner)
    sections = _sections('multi', dirs)
    sections['fs2'] = {'filesystem_store_datadir': inner}
    stores = make_stores(sections)
    _write(os.path.join(dirs['fs'], 'another-image'))
    _write(os.path.join(inner, 'another-image'))
    path = _write(os.path.join(inner, 'img'))
    location = glance_db.Location(
        id=3, image_id='i', uri='file://' + path, store=None, size=None
    )
    assert stores.resolve(location) == 'fs'  # the guess

    _unmount(inner)
    with pytest.raises(exceptions.StoreError, match='unmounted'):
        stores.delete(location)
    _remount(inner)
    assert stores.delete(location) == model.StoreAnswer.REMOVED


def test_malformed_location_fails_alone(stores, dirs):
    """A batch as the scrubber hands it over, one location at a time:
    the malformed ones fail with their id, the others are deleted."""
    good = [_write(os.path.join(dirs['fs'], f'good{i}')) for i in range(2)]
    uris = {
        1: 'file://' + good[0],
        2: 'file://[::1' + dirs['fs'] + '/x',
        3: f'file://{dirs["fs"]}/x\x00y',
        4: 'file://',
        5: 'file://' + good[1],
    }
    outcomes = {}
    for location_id, uri in uris.items():
        location = _loc(stores, uri, location_id)
        try:
            stores.resolve(location)  # what --dry-run does
            outcomes[location_id] = stores.delete(location)
        except exceptions.LocationRefused as exc:
            assert f'location {location_id}:' in str(exc)
            outcomes[location_id] = 'refused'

    assert outcomes == {
        1: model.StoreAnswer.REMOVED,
        2: 'refused',
        3: 'refused',
        4: 'refused',
        5: model.StoreAnswer.REMOVED,
    }
    assert not any(os.path.exists(path) for path in good)


# ------------------------------------------------------------ the product


def _last_errors(env):
    return {i: row['last_error'] for i, row in env.list_json().items()}


def test_sweep_refuses_relative_file_locations(sqlite_env, monkeypatch):
    """file://localhost/… and file://backup/<datadir>/… through a real
    sweep: refused, never unlinked relative to the working directory,
    never marked deleted; the credentials never show."""
    env = sqlite_env
    work = env.tmp / 'cwd'
    work.mkdir()
    monkeypatch.chdir(work)  # the sweep subprocess inherits it
    victims, decoys, reals = {}, [], []
    for host in ('localhost', 'backup', f'admin:{SECRET}@localhost'):
        real = os.path.join(env.store_dir, f'img-{len(victims)}')
        env.write_file(real, b'real')
        decoy = str(work / (host + real))
        env.write_file(decoy, b'decoy')
        victims[host] = env.make_image(
            locations=[(f'file://{host}{real}', {'store': 'fs'})]
        )
        decoys.append(decoy)
        reals.append(real)
    good = env.make_image(data=b'g' * 10)
    before = {i: env.snapshot(i, touched_ok=True) for i in victims.values()}

    result = env.sweep()

    assert result.returncode == 1, str(result)
    assert 'Traceback' not in result.stderr
    env.assert_scrubbed(good)
    for path in decoys + reals:
        assert os.path.exists(path), path
    for image_id in victims.values():
        assert env.snapshot(image_id, touched_ok=True) == before[image_id]
    errors = _last_errors(env)
    for image_id in victims.values():
        assert 'relative' in errors[image_id], errors[image_id]
    listing = assert_ok(env.manage('list')).stdout
    for text in (result.stdout, result.stderr, listing, str(errors)):
        assert SECRET not in text


def test_sweep_with_an_unmounted_datadir_scrubs_nothing(sqlite_env):
    """The service starts while the NFS export is unmounted: the empty
    mount point must not turn every due image into 'already gone', and
    restore must not report the data gone."""
    env = sqlite_env
    image_id = env.make_image(data=b'precious')
    before = env.snapshot(image_id, touched_ok=True)
    _unmount(env.store_dir)

    result = env.sweep()

    assert result.returncode == 1, str(result)
    assert 'Traceback' not in result.stderr
    assert env.snapshot(image_id, touched_ok=True) == before
    assert 'looks unmounted/empty' in _last_errors(env)[image_id]
    mounted = os.path.join(env.store_dir + '.mounted', image_id)
    assert open(mounted, 'rb').read() == b'precious'

    restore = env.restore(image_id)
    assert restore.returncode not in (0, 6), str(restore)
    assert 'unmounted' in restore.stderr + restore.stdout
    assert env.snapshot(image_id, touched_ok=True) == before


def test_sweep_malformed_location_fails_only_that_image(sqlite_env):
    env = sqlite_env
    bad = env.make_image(locations=[('file://[::1/x', {'store': 'fs'})])
    (bad_location,) = env.locations(bad)
    good = env.make_image(data=b'g' * 10)

    dry = assert_ok(env.sweep('--dry-run'))
    assert 'Traceback' not in dry.stderr
    (line,) = [ln for ln in dry.stdout.splitlines() if ln.startswith(bad)]
    assert 'REFUSED' in line

    result = env.sweep()

    assert result.returncode == 1, str(result)
    assert 'Traceback' not in result.stderr
    env.assert_scrubbed(good)
    assert env.image(bad)['status'] == 'pending_delete'
    error = _last_errors(env)[bad]
    assert f'location {bad_location["id"]}' in error, error
    assert 'malformed' in error, error


def test_sweep_keeps_data_a_live_location_names_differently(sqlite_env):
    """A pending location file://<d>/./<id> names the file of a live
    image's file://<d>/<id>: the data stays."""
    env = sqlite_env
    data = os.urandom(2048)
    path = os.path.join(env.store_dir, 'shared')
    env.write_file(path, data)
    live = env.make_image(
        status='active', locations=[('file://' + path, {'store': 'fs'})]
    )
    dotted = f'file://{env.store_dir}/./shared'
    dead = env.make_image(locations=[(dotted, {'store': 'fs'})])

    assert_ok(env.sweep())

    env.assert_scrubbed(dead, paths=[])
    assert open(path, 'rb').read() == data
    assert env.image(live)['status'] == 'active'
