"""The benchmark (tools/bench) still runs and still checks its outcome.

A small variant of ``python -m tools.bench compare`` (N = 50, SQLite, so
it needs no server and takes a few seconds) runs both tools for real and
must report verified outcomes; the bench's checker must reject a run that
did nothing; the slow-store patch must reach a child process.  The full
benchmark is run by hand (``tox -e bench``), not in CI.
"""

import json
import os
import subprocess
import sys

from tools.bench import runs
from tools.bench import workload

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _bench(tmp_path, *args):
    # why a private TMPDIR: everything the bench makes (store, configs,
    # SQLite databases, harness templates) lands there, so the test can
    # check that nothing is left behind.
    tmpdir = tmp_path / 'tmp'
    tmpdir.mkdir()
    out = tmp_path / 'bench.json'
    proc = subprocess.run(
        [sys.executable, '-m', 'tools.bench', *args, '--json', str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TMPDIR=str(tmpdir)),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(out) as f:
        data = json.load(f)
    assert os.listdir(tmpdir) == [], 'the bench left files or databases'
    return proc.stdout, data


def test_compare_smoke_reports_verified_runs(tmp_path):
    # pool 1: glance-scrubber's own threads lock each other out on SQLite
    # and it silently leaves images behind (the bench reports that run as
    # WRONG OUTCOME); on MariaDB any pool size works.
    stdout, data = _bench(
        tmp_path,
        'compare',
        '--backend',
        'sqlite',
        '-n',
        '50',
        '--pool',
        '1',
        '--keep',
        '2',
        '--repeat',
        '1',
        '--no-startup',
        '--quiet-wait',
        '0',
    )
    [entry] = data
    by_tool = {run['tool']: run for run in entry['runs']}
    assert sorted(by_tool) == sorted(runs.TOOLS)
    for run in by_tool.values():
        assert run['n'] == 50
        assert run['ok'] and run['verified'] and run['problems'] == []
        assert run['rate'] > 0 and run['wall'] > 0
        assert run['cpu'] > 0 and run['rss_mib'] > 10
    assert by_tool['scrub-listener']['tool_summary'].startswith(
        'scrubbed 50, failed 0'
    )
    run_lines = [line for line in stdout.splitlines() if '  verified' in line]
    assert len(run_lines) == 2, stdout
    assert 'scrub-listener/glance-scrubber:' in stdout
    assert 'machine' in entry and entry['machine']['nproc'] >= 1


def test_verify_rejects_a_run_that_did_nothing():
    load = workload.Workload(backend='sqlite', count=3, size=100, keep=1)
    with load:
        problems = load.verify()
        assert any('image rows' in p for p in problems), problems
        assert any('location rows' in p for p in problems), problems
        assert any('3 data file(s)' in p for p in problems), problems
        workdir, url = load.workdir, load.glance_url
    assert not os.path.exists(workdir)
    assert not os.path.exists(url.split('sqlite:///', 1)[1])


def test_slow_store_patch_reaches_the_child():
    env = runs.child_env(delete_delay=0.25)
    code = (
        'import time\n'
        'from glance_store._drivers import filesystem as fs\n'
        'store = object.__new__(fs.Store)\n'
        'start = time.monotonic()\n'
        'try:\n'
        '    fs.Store.delete(store, None)\n'
        'except Exception:\n'
        '    pass\n'
        'print(time.monotonic() - start)\n'
    )
    proc = subprocess.run(
        [sys.executable, '-c', code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    assert float(proc.stdout.strip().splitlines()[-1]) >= 0.25
