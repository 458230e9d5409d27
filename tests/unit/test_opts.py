"""scrub_listener.opts: every option listed, glance-scrubber's kept.

glance's own option objects are read in a subprocess: importing
``glance.scrubber`` registers them on the global ``cfg.CONF`` and would
clash with ours in this process.
"""

import json
import os
import re
import subprocess
import sys

import pytest
from oslo_config import cfg
from oslo_log import log as logging

from scrub_listener import opts
from scrub_listener.cmd import common
from tools import harness

GLANCE_SCRUBBER_NAMES = (
    'scrub_time',
    'scrub_pool_size',
    'wakeup_time',
    'daemon',
    'metadata_encryption_key',
    'enabled_backends',
)

_DUMP_GLANCE_OPTS = r"""
import json, warnings
warnings.simplefilter('ignore')
from oslo_config import cfg
import scrub_listener.opts  # must not register anything by itself
assert 'scrub_time' not in cfg.CONF, 'scrub_listener.opts registers on import'
import glance.scrubber as s
import glance.common.config as c
out = {}
for o in (s.scrubber_opts + s.scrubber_cmd_opts + s.scrubber_cmd_cli_opts
          + c.common_opts):
    out[o.name] = {
        'type': type(o).__name__,
        'default': o.default,
        'min': getattr(o.type, 'min', None),
        'secret': o.secret,
    }
print(json.dumps(out))
"""


@pytest.fixture(scope='module')
def glance_opts():
    proc = subprocess.run(
        [sys.executable, '-c', _DUMP_GLANCE_OPTS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fresh_conf():
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    return conf


def _registered(conf):
    found = set()
    for name in conf:
        value = conf._get_opt_info(name) if name not in conf._groups else None
        if value is not None:
            found.add(('DEFAULT', name))
    for group in conf._groups:
        for name in conf[group]:
            found.add((group, name))
    return found


def test_list_opts_covers_every_registered_option():
    listed = {
        (group, opt.dest)
        for group, group_opts in opts.list_opts()
        for opt in group_opts
    }
    builtin = _registered(cfg.ConfigOpts())  # config_source, ...
    assert _registered(_fresh_conf()) - builtin == listed


def test_every_option_has_help_and_no_duplicates():
    for group, group_opts in opts.list_opts():
        names = [opt.name for opt in group_opts]
        assert len(names) == len(set(names)), group
        for opt in group_opts:
            assert opt.help and len(opt.help) > 20, (group, opt.name)


def test_secrets_are_secret():
    listed = {
        (group, opt.name): opt
        for group, group_opts in opts.list_opts()
        for opt in group_opts
    }
    for key in (
        ('DEFAULT', 'metadata_encryption_key'),
        ('database', 'connection'),
        ('scrub_queue', 'connection'),
    ):
        assert listed[key].secret, key


def test_entry_point_for_the_sample_generator():
    from importlib import metadata

    points = [
        ep
        for ep in metadata.entry_points(group='oslo.config.opts')
        if ep.name == 'scrub_listener'
    ]
    assert [ep.load() for ep in points] == [opts.list_opts]


@pytest.mark.parametrize('name', GLANCE_SCRUBBER_NAMES)
def test_glance_scrubber_option_kept(glance_opts, name):
    ours = {opt.name: opt for opt in opts.scrubber_compat_opts}
    assert name in ours
    if name not in glance_opts:  # enabled_backends: glance_store's own
        assert isinstance(ours[name], cfg.DictOpt)
        return
    theirs = glance_opts[name]
    assert type(ours[name]).__name__ == theirs['type']
    assert ours[name].default == theirs['default']
    assert ours[name].secret == theirs['secret']


@pytest.mark.parametrize(
    'name',
    [
        'scrub_time',
        'scrub_pool_size',
        # was min=1: a glance-scrubber.conf with 0 did not load
        'wakeup_time',
    ],
)
def test_glance_scrubber_minimum_kept(glance_opts, name):
    ours = {opt.name: opt for opt in opts.scrubber_compat_opts}[name]
    assert getattr(ours.type, 'min', None) == glance_opts[name]['min']


def _uncommented_sample(path):
    """glance's shipped glance-scrubber.conf with every value set."""
    source = os.path.join(sys.prefix, 'etc', 'glance', 'glance-scrubber.conf')
    if not os.path.exists(source):
        pytest.skip(f'{source} not installed with glance')
    lines = []
    with open(source) as f:
        for line in f:
            match = re.match(r'^#([a-z_]+) = (.*)$', line)
            if match and match.group(2) != '<None>':
                line = f'{match.group(1)} = {match.group(2)}\n'
            lines.append(line)
    with open(path, 'w') as f:
        f.writelines(lines)
    return path


def test_glance_scrubbers_sample_config_loads(tmp_path):
    path = _uncommented_sample(str(tmp_path / 'glance-scrubber.conf'))
    conf = _fresh_conf()
    logging.register_options(conf)
    conf(
        ['--config-file', path],
        project='scrub-listener',
        default_config_files=[],
    )
    common._check_values(conf)
    assert conf.scrub_time == 0
    assert conf.scrub_pool_size == 1
    assert conf.wakeup_time == 300
    assert conf.daemon is False


def test_operator_values_read(tmp_path):
    path = harness.write_config(
        str(tmp_path / 'glance-scrubber.conf'),
        {
            'DEFAULT': {
                'scrub_time': 86400,
                'scrub_pool_size': 8,
                'wakeup_time': 600,
                'daemon': True,
                'delayed_delete': True,  # glance's, unknown to us: ignored
                'metadata_encryption_key': 'k' * 32,
                'enabled_backends': {'fast': 'file', 'slow': 'file'},
            },
            'database': {'connection': 'mysql+pymysql://glance@db/glance'},
            'glance_store': {'default_backend': 'fast'},
            'os_glance_staging_store': {'filesystem_store_datadir': '/x'},
        },
    )
    conf = _fresh_conf()
    conf(
        ['--config-file', path],
        project='scrub-listener',
        default_config_files=[],
    )
    common._check_values(conf)
    assert conf.scrub_time == 86400
    assert conf.scrub_pool_size == 8
    assert conf.enabled_backends == {'fast': 'file', 'slow': 'file'}
    assert conf.database.connection.startswith('mysql+pymysql://')
    assert conf.scrub_queue.connection.endswith('/scrub-queue.sqlite')


@pytest.mark.parametrize(
    'section, option, value',
    [
        ('DEFAULT', 'scrub_time', -1),
        ('DEFAULT', 'scrub_pool_size', 0),
        ('DEFAULT', 'scrub_time', 'soon'),
        ('scrubber', 'lease_time', 9),
        ('scrub_queue', 'batch_size', 0),
    ],
)
def test_bad_values_name_the_option(tmp_path, section, option, value):
    path = harness.write_config(
        str(tmp_path / 'bad.conf'), {section: {option: value}}
    )
    conf = _fresh_conf()
    conf(
        ['--config-file', path],
        project='scrub-listener',
        default_config_files=[],
    )
    with pytest.raises(cfg.Error) as info:
        common._check_values(conf)
    assert option in str(info.value)
