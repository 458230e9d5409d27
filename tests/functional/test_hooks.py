"""The import hooks of tools/hooks, in real child processes.

Tests and benchmarks rely on ``tools/hooks/sitecustomize.py`` to slow
down and observe the store deletes of the product's processes; these
tests check that it does so (a real ``--sweep-once`` on SQLite and a real
file store) and that it does nothing at all when no variable asks for it.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.functional.conftest import assert_ok
from tools import hooks


def test_without_variables_nothing_is_imported_or_patched(tmp_path):
    """The child imports the hooks module and nothing else of ours or of
    glance_store, from any working directory."""
    code = (
        'import json, sys; print(json.dumps(['
        'sys.modules["sitecustomize"].__file__, '
        '[m for m in sys.modules if m.split(".")[0] in '
        '("glance_store", "scrub_listener", "tools")], '
        '[type(f).__name__ for f in sys.meta_path]]))'
    )
    proc = subprocess.run(
        [sys.executable, '-c', code],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env=dict(os.environ, **hooks.hook_env()),
    )
    path, imported, finders = json.loads(proc.stdout)
    assert path == os.path.join(hooks.HOOKS_DIR, 'sitecustomize.py')
    assert imported == []
    assert '_PatchingFinder' not in finders


def test_an_unknown_variable_is_refused():
    with pytest.raises(ValueError, match='SL_TEST_TYPO'):
        hooks.hook_env(SL_TEST_TYPO=1)


def test_delete_log_slow_store_and_gone_log_in_a_sweep_once(
    sqlite_env, monkeypatch
):
    """The test hooks and the bench's slow store and gone log, all on, in
    one real sweep-once: each delete is logged (call, then ok), takes at
    least its delay (fixed + per MiB), and is logged as gone."""
    env = sqlite_env
    small = env.make_image(data=os.urandom(1024))
    big = env.make_image(data=os.urandom(1024 * 1024))
    deletes = hooks.DeleteLog(env.tmp / 'deletes.log')
    gone = str(env.tmp / 'gone.log')
    variables = hooks.hook_env(
        SL_TEST_DELETE_LOG=deletes.path,
        BENCH_STORE_DELETE_DELAY=0.2,
        BENCH_STORE_DELETE_DELAY_PER_MIB=0.5,
        BENCH_GONE_LOG=gone,
    )
    for name, value in variables.items():
        monkeypatch.setenv(name, value)

    assert_ok(env.sweep())

    paths = {env.data_path(small): 0.2, env.data_path(big): 0.7}
    events = deletes.events()
    assert sorted((e.event, e.path) for e in events) == sorted(
        (event, path) for path in paths for event in ('call', 'ok')
    )
    took = {
        path: next(
            e.time for e in events if e.event == 'ok' and e.path == path
        )
        - next(e.time for e in events if e.event == 'call' and e.path == path)
        for path in paths
    }
    for path, delay in paths.items():
        assert took[path] >= delay, (path, took[path])
    assert sorted(p for _, p in hooks.read_gone_log(gone)) == sorted(paths)
    env.assert_scrubbed(small)
    env.assert_scrubbed(big)
