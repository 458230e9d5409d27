"""scrub_listener.store.Stores with glance_store's real file driver.

glance_store keeps its configuration in the global ``cfg.CONF`` and its
scheme maps in module globals; the ``make_stores`` fixture parses a
config file into ``cfg.CONF`` (as the commands do) and gives every test
fresh scheme maps, then clears both.
"""

import os

import pytest
from glance_store import exceptions as store_exc
from glance_store import location as store_location
from oslo_config import cfg

from scrub_listener import exceptions
from scrub_listener import glance_db
from scrub_listener import opts
from scrub_listener import store
from tools import harness


@pytest.fixture
def dirs(tmp_path):
    names = ('fs', 'fs2', 'outside', 'extra')
    made = {name: tmp_path / name for name in names}
    for path in made.values():
        path.mkdir()
    return {name: str(path) for name, path in made.items()}


@pytest.fixture
def make_stores(tmp_path, monkeypatch):
    monkeypatch.setattr(store_location, 'SCHEME_TO_CLS_MAP', {})
    monkeypatch.setattr(store_location, 'SCHEME_TO_CLS_BACKEND_MAP', {})
    conf = cfg.CONF

    def make(sections):
        path = harness.write_config(str(tmp_path / 'test.conf'), sections)
        opts.register_opts(conf)
        conf(
            ['--config-file', path],
            project='scrub-listener',
            default_config_files=[],
        )
        store.register_opts(conf)
        return store.Stores(conf)

    yield make
    conf.reset()
    conf.clear()


@pytest.fixture
def multi(make_stores, dirs):
    return make_stores(
        {
            'DEFAULT': {'enabled_backends': {'fs': 'file', 'fs2': 'file'}},
            'glance_store': {'default_backend': 'fs'},
            'fs': {'filesystem_store_datadir': dirs['fs']},
            'fs2': {'filesystem_store_datadir': dirs['fs2']},
        }
    )


@pytest.fixture
def single(make_stores, dirs):
    return make_stores(
        {
            'glance_store': {
                'stores': 'file,http',
                'default_store': 'file',
                'filesystem_store_datadir': dirs['fs'],
            }
        }
    )


def _file(directory, name, data=b'0123456789'):
    path = os.path.join(directory, name)
    with open(path, 'wb') as f:
        f.write(data)
    return path


def _loc(uri, store_name=None, size=None, location_id=1):
    return glance_db.Location(
        id=location_id,
        image_id='00000000-0000-0000-0000-000000000001',
        uri=uri,
        store=store_name,
        size=size,
    )


# -------------------------------------------------------------- resolving


def test_multi_store_uses_the_store_metadata(multi, dirs):
    path = _file(dirs['fs2'], 'img')
    assert multi.multi
    assert multi.resolve(_loc('file://' + path, 'fs2')) == 'fs2'


def test_multi_store_without_store_metadata_finds_the_backend(multi, dirs):
    one = _file(dirs['fs'], 'one')
    two = _file(dirs['fs2'], 'two')
    assert multi.resolve(_loc('file://' + one)) == 'fs'
    assert multi.resolve(_loc('file://' + two)) == 'fs2'
    with pytest.raises(exceptions.LocationRefused, match='no enabled backend'):
        multi.resolve(_loc('file://' + _file(dirs['outside'], 'x')))


@pytest.mark.parametrize('store_name', ['nope', 'os_glance_staging_store', ''])
def test_multi_store_unknown_backend_is_refused(multi, dirs, store_name):
    path = _file(dirs['fs'], 'img')
    with pytest.raises(exceptions.LocationRefused):
        multi.resolve(_loc('file://' + path, store_name))


def test_store_metadata_must_match_the_directory(multi, dirs):
    path = _file(dirs['fs2'], 'img')
    with pytest.raises(exceptions.LocationRefused, match='outside'):
        multi.resolve(_loc('file://' + path, 'fs'))


@pytest.mark.parametrize(
    'uri',
    [
        'rbd://fsid/images/x/snap',
        'swift+https://auth/container/x',
        'http://example.com/x',
        '/no/scheme/at/all',
        '',
    ],
)
def test_scheme_without_backend_is_refused(multi, single, uri):
    with pytest.raises(exceptions.LocationRefused):
        multi.resolve(_loc(uri, 'fs'))
    if not uri.startswith('http'):
        with pytest.raises(exceptions.LocationRefused):
            single.resolve(_loc(uri))


def test_dotdot_escape_is_refused(multi, dirs):
    victim = _file(dirs['outside'], 'victim')
    sneaky = os.path.join(dirs['fs'], '..', 'outside', 'victim')
    for location in (_loc('file://' + sneaky, 'fs'), _loc('file://' + sneaky)):
        with pytest.raises(exceptions.LocationRefused):
            multi.resolve(location)
        with pytest.raises(exceptions.LocationRefused):
            multi.delete(location)
    assert os.path.exists(victim)


def test_symlink_escape_is_refused(multi, dirs):
    victim = _file(dirs['outside'], 'victim')
    link = os.path.join(dirs['fs'], 'link')
    os.symlink(victim, link)
    os.symlink(dirs['outside'], os.path.join(dirs['fs'], 'dirlink'))
    for path in (link, os.path.join(dirs['fs'], 'dirlink', 'victim')):
        with pytest.raises(exceptions.LocationRefused):
            multi.delete(_loc('file://' + path, 'fs'))
    assert os.path.exists(victim)


def test_prefix_sibling_directory_is_refused(multi, dirs):
    # /tmp/x/fs2 starts with /tmp/x/fs but is not inside it
    path = _file(dirs['fs2'], 'img')
    with pytest.raises(exceptions.LocationRefused):
        multi.resolve(_loc('file://' + path, 'fs'))


def test_the_data_directory_itself_is_refused(multi, dirs):
    with pytest.raises(exceptions.LocationRefused):
        multi.resolve(_loc('file://' + dirs['fs'], 'fs'))
    with pytest.raises(exceptions.LocationRefused):
        multi.resolve(_loc('file://' + dirs['fs'] + '/', 'fs'))


def test_single_store(single, dirs):
    inside = _file(dirs['fs'], 'img')
    assert not single.multi
    assert single.resolve(_loc('file://' + inside)) is None
    # 'store' metadata is irrelevant in single-store mode
    assert single.resolve(_loc('file://' + inside, 'whatever')) is None
    with pytest.raises(exceptions.LocationRefused):
        single.resolve(_loc('file://' + _file(dirs['outside'], 'x')))
    assert single.resolve(_loc('http://example.com/img')) is None


def test_single_store_datadirs_with_priorities(make_stores, dirs):
    stores = make_stores(
        {
            'glance_store': {
                'stores': 'file',
                'default_store': 'file',
                'filesystem_store_datadirs': f'{dirs["fs"]}:100',
            }
        }
    )
    # oslo MultiStrOpt from a file: only one value per line, so add the
    # second directory the way a second line would
    cfg.CONF.set_override(
        'filesystem_store_datadirs',
        [f'{dirs["fs"]}:100', f'{dirs["extra"]}:200', dirs['fs2']],
        group='glance_store',
    )
    for name in ('fs', 'extra', 'fs2'):
        assert stores.resolve(_loc('file://' + _file(dirs[name], 'i'))) is None
    with pytest.raises(exceptions.LocationRefused):
        stores.resolve(_loc('file://' + _file(dirs['outside'], 'i')))


def test_unusable_store_configuration(make_stores, dirs):
    with pytest.raises(exceptions.ConfigError, match='glance_store'):
        make_stores(
            {
                'DEFAULT': {'enabled_backends': {'fs': 'file'}},
                'glance_store': {'default_backend': 'missing'},
                'fs': {'filesystem_store_datadir': dirs['fs']},
            }
        )


# ------------------------------------------------------------------ acting


@pytest.mark.parametrize('mode', ['multi', 'single'])
def test_delete_then_already_gone(request, dirs, mode):
    stores = request.getfixturevalue(mode)
    path = _file(dirs['fs'], 'img')
    location = _loc('file://' + path, 'fs' if mode == 'multi' else None)
    assert stores.delete(location) == store.DELETED
    assert not os.path.exists(path)
    assert stores.delete(location) == store.ALREADY_GONE


def test_delete_failure_is_a_store_error(multi, dirs):
    # unlink() of a directory fails: glance_store says Forbidden
    os.mkdir(os.path.join(dirs['fs'], 'subdir'))
    location = _loc('file://' + os.path.join(dirs['fs'], 'subdir'), 'fs')
    with pytest.raises(exceptions.StoreError) as info:
        multi.delete(location)
    assert 'location 1' in str(info.value)
    assert os.path.isdir(os.path.join(dirs['fs'], 'subdir'))


@pytest.mark.parametrize(
    'uri, expected',
    [
        ('http://example.com/img', store.NOT_OURS),
        ('file:///{fs}/img', exceptions.StoreError),
    ],
)
def test_delete_not_supported(multi, dirs, monkeypatch, uri, expected):
    """The read-only http store's data is somebody else's; a file store
    that says "not supported" (its datadir was read-only at start) is a
    failure to retry, never a reason to forget the data."""

    def refuse(uri, backend, context=None):
        raise store_exc.StoreDeleteNotSupported()

    monkeypatch.setattr(store.glance_store, 'delete', refuse)
    monkeypatch.setattr(multi, 'resolve', lambda location: 'fs')
    _file(dirs['fs'], 'img')
    location = _loc(uri.format(fs=dirs['fs']), 'fs')
    if expected is exceptions.StoreError:
        with pytest.raises(exceptions.StoreError, match='refuses deletes'):
            multi.delete(location)
        assert os.path.exists(os.path.join(dirs['fs'], 'img'))
    else:
        assert multi.delete(location) == expected


def test_check_present(multi, dirs):
    path = _file(dirs['fs'], 'img', b'x' * 10)
    multi.check_present(_loc('file://' + path, 'fs', size=10))
    multi.check_present(_loc('file://' + path, 'fs', size=None))
    with pytest.raises(exceptions.DataGone, match='holds 10 bytes'):
        multi.check_present(_loc('file://' + path, 'fs', size=11))
    os.unlink(path)
    with pytest.raises(exceptions.DataGone, match='no longer in its store'):
        multi.check_present(_loc('file://' + path, 'fs', size=10))
    outside = _file(dirs['outside'], 'img')
    with pytest.raises(exceptions.DataGone, match='cannot verify'):
        multi.check_present(_loc('file://' + outside, 'fs'))
