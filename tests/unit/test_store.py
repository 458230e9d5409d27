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
from scrub_listener import model
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

    def make(sections, append=''):
        path = harness.write_config(str(tmp_path / 'test.conf'), sections)
        with open(path, 'a') as f:  # raw lines for the last section
            f.write(append)
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
        },
        # oslo MultiStrOpt: one value per line
        append=(
            f'filesystem_store_datadirs = {dirs["extra"]}:200\n'
            f'filesystem_store_datadirs = {dirs["fs2"]}\n'
        ),
    )
    assert cfg.CONF.glance_store.filesystem_store_datadirs == [
        f'{dirs["fs"]}:100',
        f'{dirs["extra"]}:200',
        dirs['fs2'],
    ]
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
    _file(dirs['fs'], 'another-image')  # an empty datadir is not trusted
    path = _file(dirs['fs'], 'img')
    location = _loc('file://' + path, 'fs' if mode == 'multi' else None)
    assert stores.delete(location) == model.StoreAnswer.REMOVED
    assert not os.path.exists(path)
    assert stores.delete(location) == model.StoreAnswer.ALREADY_GONE


def test_delete_failure_is_a_store_error(multi, dirs):
    # unlink() of a directory fails: glance_store says Forbidden
    os.mkdir(os.path.join(dirs['fs'], 'subdir'))
    location = _loc('file://' + os.path.join(dirs['fs'], 'subdir'), 'fs')
    with pytest.raises(exceptions.StoreError) as info:
        multi.delete(location)
    assert 'location 1' in str(info.value)
    # one unlink() that failed removed nothing
    assert info.value.data_intact is True
    assert os.path.isdir(os.path.join(dirs['fs'], 'subdir'))


@pytest.mark.parametrize(
    'uri, expected',
    [
        ('http://example.com/img', model.StoreAnswer.NOT_OURS),
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
    monkeypatch.setattr(multi, '_resolve', lambda location: ('fs', ['fs']))
    _file(dirs['fs'], 'img')
    location = _loc(uri.format(fs=dirs['fs']), 'fs')
    if expected is exceptions.StoreError:
        with pytest.raises(
            exceptions.StoreError, match='refuses deletes'
        ) as e:
            multi.delete(location)
        assert e.value.data_intact is True
        assert os.path.exists(os.path.join(dirs['fs'], 'img'))
    else:
        assert multi.delete(location) == expected


def test_check_present(multi, dirs):
    _file(dirs['fs'], 'another-image')  # an empty datadir is not trusted
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


# ---------------------------------------------------------- data identity


def _key(uri):
    return store.data_key(uri)


def test_data_key_names_the_file_the_driver_unlinks(dirs):
    path = _file(dirs['fs'], 'img')
    sub = os.path.join(dirs['fs'], 'sub')
    os.mkdir(sub)
    os.symlink(path, os.path.join(dirs['fs'], 'alias'))
    same = [
        'file://' + path,
        f'file://{dirs["fs"]}/./img',
        f'file://{dirs["fs"]}//img',
        f'file://{dirs["fs"]}/sub/../img',
        f'file://{dirs["fs"]}/nosuchdir/../img',
        f'file://{dirs["fs"]}/alias',
        f'filesystem://{path}',
        f'file://{path} ',  # the driver strips the path
        'file:///' + path,  # netloc '' + path '//…' is still the file
    ]
    assert {_key(uri) for uri in same} == {('file', os.path.realpath(path))}
    assert _key('file://' + _file(dirs['fs'], 'other')) != _key(same[0])


def test_data_key_of_a_host_part_is_the_relative_path(
    dirs, tmp_path, monkeypatch
):
    """file://localhost/p and file://backup/p name the relative paths
    localhost/p and backup/p to the filesystem driver, not /p."""
    monkeypatch.chdir(tmp_path)
    path = _file(dirs['fs'], 'img')
    for host in ('localhost', 'backup'):
        key = _key(f'file://{host}{path}')
        assert key != _key('file://' + path)
        assert key == ('file', str(tmp_path / host) + path)


def test_data_key_rbd_ignores_the_snapshot():
    assert _key('rbd://fsid/images/img/snap') == _key(
        'rbd://fsid/images/img/x'
    )
    assert _key('rbd://fsid/images/img/snap') == (
        'rbd',
        'fsid',
        'images',
        'img',
    )
    assert _key('rbd://fsid/images/a%2Fb/snap')[3] == 'a/b'
    distinct = {
        _key('rbd://fsid/images/img/snap'),
        _key('rbd://other/images/img/snap'),
        _key('rbd://fsid/vms/img/snap'),
        _key('rbd://fsid/images/img2/snap'),
        _key('rbd://img'),
    }
    assert len(distinct) == 5


@pytest.mark.parametrize(
    'a, b',
    [
        (
            's3://AKIA:s3cr3t@S3.Example.com/bucket/img',
            's3://s3.example.com/bucket/img',
        ),
        (
            's3+https://s3.example.com:443/bucket/img',
            's3://s3.example.com:80/bucket/img',
        ),
        (
            's3://AKIA:s3/cr3t@s3.example.com/bucket/img',
            's3+https://s3.example.com/bucket/img',
        ),
        (
            'swift+https://acct:user:pa55@auth.example.com/v3/glance/img',
            'swift://auth.example.com/v3/glance/img',
        ),
        (
            'swift+http://auth.example.com/v3/glance//./img',
            'swift://auth.example.com/v3/glance/img',
        ),
        ('http://example.com/a%20b?x=1#f', 'https://EXAMPLE.com/a b'),
        (
            'cinder://fs/12345678-1234-1234-1234-123456789ABC',
            'cinder://12345678-1234-1234-1234-123456789abc',
        ),
    ],
)
def test_data_key_normalises_other_schemes(a, b):
    assert _key(a) == _key(b)
    assert 's3cr3t' not in repr(_key(a)) and 'pa55' not in repr(_key(a))


@pytest.mark.parametrize(
    'a, b',
    [
        ('s3://s3.example.com/bucket/img', 's3://s3.example.com/bucket/img2'),
        ('s3://s3.example.com/bucket/img', 's3://s3.example.com/other/img'),
        (
            's3://s3.example.com/bucket/img',
            's3://other.example.com/bucket/img',
        ),
        (
            's3://s3.example.com/bucket/img',
            's3://s3.example.com:9000/bucket/img',
        ),
        ('swift://auth/glance/img', 's3://auth/glance/img'),
        (
            'cinder://12345678-1234-1234-1234-123456789abc',
            'cinder://12345678-1234-1234-1234-123456789abd',
        ),
    ],
)
def test_data_key_tells_different_data_apart(a, b):
    assert _key(a) != _key(b)


@pytest.mark.parametrize(
    'uri',
    [
        'file://[::1/x',
        'file://',
        'file:///x\x00y',
        'FILE:///x',
        '/no/scheme',
        '',
        None,
        b'file:///x',
        'rbd://fsid/images/img',
        'rbd://fsid//img/snap',
        'cinder://not-a-volume-id',
        's3://AKIA:s3cr3t@host-only',
    ],
)
def test_data_key_of_an_unparseable_uri_equals_nothing(uri):
    key = _key(uri)
    assert key != _key(uri)
    assert key != _key('file:///x')
    assert 's3cr3t' not in repr(key)
    assert len({key, _key(uri)}) == 2  # hashable


def test_stores_data_key(multi, single, dirs):
    path = _file(dirs['fs'], 'img')
    for stores in (multi, single):
        assert stores.data_key(f'file://{dirs["fs"]}/./img') == _key(
            'file://' + path
        )


# ------------------------------------------- what the driver would touch


@pytest.mark.parametrize('host', ['backup', 'localhost'])
@pytest.mark.parametrize('mode', ['multi-store', 'multi', 'single'])
def test_host_part_in_file_uri_is_refused(
    request, dirs, tmp_path, monkeypatch, host, mode
):
    """The driver unlinks netloc + path: file://backup/<datadir>/x is
    backup/<datadir>/x under the working directory."""
    stores = request.getfixturevalue(mode.split('-')[0])
    monkeypatch.chdir(tmp_path)
    real = _file(dirs['fs'], 'img')
    decoy_dir = tmp_path / host / dirs['fs'].lstrip('/')
    decoy_dir.mkdir(parents=True)
    decoy = _file(str(decoy_dir), 'img')
    location = _loc(
        f'file://{host}{real}',
        'fs' if mode == 'multi-store' else None,
        location_id=77,
    )
    for call in (stores.resolve, stores.delete):
        with pytest.raises(exceptions.LocationRefused, match='relative') as e:
            call(location)
        assert 'location 77' in str(e.value)
    with pytest.raises(exceptions.DataGone, match='cannot verify'):
        stores.check_present(location)
    assert os.path.exists(decoy) and os.path.exists(real)


# --------------------------------------------------------- NotFound trust


def _empty(directory):
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))


@pytest.mark.parametrize('mode', ['multi', 'single'])
@pytest.mark.parametrize('damage', ['empty', 'missing', 'a file', 'device'])
def test_not_found_in_an_unmounted_looking_datadir_is_an_error(
    request, dirs, monkeypatch, mode, damage
):
    stores = request.getfixturevalue(mode)
    _file(dirs['fs'], 'another-image')
    path = os.path.join(dirs['fs'], 'img')
    location = _loc('file://' + path, 'fs' if mode == 'multi' else None)
    if damage == 'empty':
        _empty(dirs['fs'])
    elif damage == 'missing':
        _empty(dirs['fs'])
        os.rmdir(dirs['fs'])
    elif damage == 'a file':
        _empty(dirs['fs'])
        os.rmdir(dirs['fs'])
        _file(os.path.dirname(dirs['fs']), 'fs')
    else:  # remounted: same path, another device
        real_stat = os.stat

        def stat(p, *args, **kwargs):
            result = real_stat(p, *args, **kwargs)
            if os.path.realpath(p) == os.path.realpath(dirs['fs']):
                fields = list(result)
                fields[2] += 1  # st_dev
                return os.stat_result(fields)
            return result

        monkeypatch.setattr(store.os, 'stat', stat)
    # a file in its place: the driver itself fails (not a directory)
    message = (
        'location 1'
        if damage == 'a file'
        else "looks unmounted/empty: not trusting 'not found'"
    )
    with pytest.raises(exceptions.StoreError, match=message) as info:
        stores.delete(location)
    # nothing was removed: the rows may go back to a restore
    assert info.value.data_intact is True
    with pytest.raises(exceptions.StoreError, match=message):
        stores.check_present(location)


def test_not_found_in_a_healthy_datadir_is_trusted(multi, dirs):
    _file(dirs['fs'], 'another-image')
    location = _loc('file://' + os.path.join(dirs['fs'], 'img'), 'fs')
    assert multi.delete(location) == model.StoreAnswer.ALREADY_GONE
    with pytest.raises(exceptions.DataGone, match='no longer in its store'):
        multi.check_present(location)


def test_not_found_checks_every_datadir_holding_the_path(make_stores, dirs):
    """A data directory mounted inside another one (fs2 inside fs): an
    empty inner one is not trusted, whichever backend is guessed."""
    inner = os.path.join(dirs['fs'], 'nfs')
    os.mkdir(inner)
    stores = make_stores(
        {
            'DEFAULT': {'enabled_backends': {'fs': 'file', 'fs2': 'file'}},
            'glance_store': {'default_backend': 'fs'},
            'fs': {'filesystem_store_datadir': dirs['fs']},
            'fs2': {'filesystem_store_datadir': inner},
        }
    )
    _file(dirs['fs'], 'in-the-outer-one')
    for store_name in ('fs', 'fs2', None):
        location = _loc(f'file://{inner}/img', store_name)
        with pytest.raises(exceptions.StoreError, match='unmounted'):
            stores.delete(location)


# A scheme without a real backend here: the real rbd location class,
# registered under two backend names, and glance_store calls faked.


@pytest.fixture
def two_cephs(multi, monkeypatch):
    from glance_store._drivers import rbd as rbd_driver

    entry = {'location_class': rbd_driver.StoreLocation, 'store': None}
    monkeypatch.setitem(
        store_location.SCHEME_TO_CLS_BACKEND_MAP,
        'rbd',
        {'ceph1': entry, 'ceph2': entry},
    )
    holds = {'ceph1': set(), 'ceph2': set()}
    calls = []

    def delete(uri, backend, context=None):
        calls.append(('delete', backend))
        if uri not in holds[backend]:
            raise store_exc.NotFound(image=uri)
        holds[backend].discard(uri)

    def get_size(uri, backend, context=None):
        calls.append(('size', backend))
        if isinstance(holds[backend], Exception):
            raise holds[backend]
        if uri not in holds[backend]:
            raise store_exc.NotFound(image=uri)
        return 10

    monkeypatch.setattr(store.glance_store, 'delete', delete)
    monkeypatch.setattr(
        store.glance_store, 'get_size_from_uri_and_backend', get_size
    )
    return multi, holds, calls


RBD = 'rbd://fsid/images/img/snap'


def test_guessed_backend_not_found_but_another_holds_it(two_cephs):
    stores, holds, calls = two_cephs
    holds['ceph2'].add(RBD)
    with pytest.raises(exceptions.StoreError, match='ceph2') as info:
        stores.delete(_loc(RBD, None, location_id=9))
    assert 'location 9' in str(info.value)
    assert info.value.data_intact is True
    assert RBD in holds['ceph2']  # never deleted from a backend not chosen
    assert ('delete', 'ceph2') not in calls


def test_guessed_backend_not_found_and_no_other_holds_it(two_cephs):
    stores, holds, calls = two_cephs
    assert stores.delete(_loc(RBD, None)) == model.StoreAnswer.ALREADY_GONE
    assert ('size', 'ceph2') in calls


def test_guessed_backend_not_found_and_another_cannot_answer(two_cephs):
    stores, holds, calls = two_cephs
    holds['ceph2'] = store_exc.BackendException('cluster unreachable')
    with pytest.raises(exceptions.StoreError, match='ceph2') as info:
        stores.delete(_loc(RBD, None))
    assert info.value.data_intact is True


@pytest.mark.parametrize(
    'scheme, exc',
    [
        ('rbd', store_exc.Forbidden()),  # may have stopped half-way
        ('rbd', store_exc.InUseByStore()),  # RBD: snapshot already gone
        ('file', store_exc.TimeoutError(timeout=5)),  # unlink still running
        ('file', TypeError('x')),
    ],
)
def test_failure_that_may_have_removed_data_is_not_intact(
    two_cephs, dirs, monkeypatch, scheme, exc
):
    stores, holds, calls = two_cephs

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(store.glance_store, 'delete', fail)
    uri = RBD if scheme == 'rbd' else 'file://' + _file(dirs['fs'], 'img')
    location = _loc(uri, 'ceph1' if scheme == 'rbd' else 'fs')
    with pytest.raises(exceptions.StoreError) as info:
        stores.delete(location)
    assert getattr(info.value, 'data_intact', False) is False


def test_not_found_with_store_metadata_keeps_todays_rule(two_cephs):
    stores, holds, calls = two_cephs
    holds['ceph2'].add(RBD)
    assert stores.delete(_loc(RBD, 'ceph1')) == model.StoreAnswer.ALREADY_GONE
    assert calls == [('delete', 'ceph1')]


# ---------------------------------------- one bad location, one failure


@pytest.mark.parametrize(
    'uri', ['file://[::1/x', 'file:///x\x00y', None, 'file://', 'rbd://a/b']
)
@pytest.mark.parametrize('mode', ['multi', 'single'])
def test_malformed_uri_fails_only_that_location(request, mode, uri):
    stores = request.getfixturevalue(mode)
    location = _loc(uri, 'fs' if mode == 'multi' else None, location_id=42)
    for call in (stores.resolve, stores.delete):
        with pytest.raises(exceptions.LocationRefused, match='location 42'):
            call(location)
    with pytest.raises(exceptions.DataGone, match='location 42'):
        stores.check_present(location)


@pytest.mark.parametrize(
    'exc',
    [TypeError('boom'), ValueError('bad'), KeyError('k'), RuntimeError('x')],
)
def test_unexpected_store_exception_names_the_location(
    multi, dirs, monkeypatch, exc
):
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(store.glance_store, 'delete', fail)
    monkeypatch.setattr(
        store.glance_store, 'get_size_from_uri_and_backend', fail
    )
    location = _loc('file://' + _file(dirs['fs'], 'img'), 'fs', location_id=5)
    with pytest.raises(exceptions.StoreError, match='location 5') as info:
        multi.delete(location)
    assert type(exc).__name__ in str(info.value)
    with pytest.raises(exceptions.StoreError, match='location 5'):
        multi.check_present(location)


# ---------------------------------------------------------------- secrets


SECRET = 's3cr3t/Pa55'


@pytest.fixture
def s3_backend(multi, monkeypatch):
    """The real s3 location class as an enabled backend 's3'."""
    from glance_store._drivers import s3 as s3_driver

    entry = {'location_class': s3_driver.StoreLocation, 'store': None}
    for scheme in ('s3', 's3+https'):
        monkeypatch.setitem(
            store_location.SCHEME_TO_CLS_BACKEND_MAP, scheme, {'s3': entry}
        )
    return multi


@pytest.mark.parametrize(
    'uri',
    [
        f's3://AKIA:{SECRET}@host',  # BadStoreUri quotes the URI
        f's3://AKIA:{SECRET}@http://host/bucket/img',
    ],
)
def test_malformed_uri_text_never_carries_the_secret(s3_backend, uri):
    location = _loc(uri, 's3', location_id=3)
    for call in (s3_backend.resolve, s3_backend.delete):
        with pytest.raises(exceptions.LocationRefused) as info:
            call(location)
        assert 'location 3' in str(info.value)
        assert 's3cr3t' not in str(info.value), info.value
        assert 'Pa55' not in str(info.value), info.value
    with pytest.raises(exceptions.DataGone) as info:
        s3_backend.check_present(location)
    assert 's3cr3t' not in str(info.value)


def test_store_error_text_never_carries_the_secret(s3_backend, monkeypatch):
    uri = f's3+https://AKIA:{SECRET}@host/bucket/img'

    def fail(uri, *args, **kwargs):
        # the URI, and its secret quoted apart, as a driver might
        raise store_exc.BackendException(
            f'cannot reach {uri}: key {SECRET} refused for '
            f's3://AKIA:{SECRET}@host'
        )

    monkeypatch.setattr(store.glance_store, 'delete', fail)
    monkeypatch.setattr(
        store.glance_store, 'get_size_from_uri_and_backend', fail
    )
    location = _loc(uri, 's3', location_id=4)
    for call in (s3_backend.delete, s3_backend.check_present):
        with pytest.raises(exceptions.StoreError) as info:
            call(location)
        text = str(info.value)
        assert 'location 4' in text and 'BackendException' in text
        assert 's3cr3t' not in text and 'Pa55' not in text, text
        assert info.value.__cause__ is None  # no chained raw text
        assert info.value.__suppress_context__


def test_realpath_agrees_with_os_path_realpath(tmp_path):
    """The shortcut for files in a data directory gives what
    os.path.realpath gives, symlinks and odd spellings included."""
    real_root = tmp_path / 'real'
    real_root.mkdir()
    datadir = tmp_path / 'datadir'  # a symlink to the real directory
    datadir.symlink_to(real_root)
    outside = tmp_path / 'outside'
    outside.write_bytes(b'x')
    (real_root / 'file').write_bytes(b'x')
    (real_root / 'sub').mkdir()
    (real_root / 'escape').symlink_to(outside)
    (real_root / 'loop').symlink_to(real_root / 'loop')
    store.remember_data_directory(str(datadir) + '/')
    names = ['file', 'missing', 'sub', 'escape', 'loop', '.', '..', '']
    paths = [f'{datadir}/{name}' for name in names]
    paths += [
        f'{datadir}//file',
        f'{datadir}/./file',
        f'{datadir}/sub/../file',
    ]
    for path in paths:
        assert store.realpath(path) == os.path.realpath(path), path
