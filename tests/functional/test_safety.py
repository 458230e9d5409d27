"""Issue 7's findings, with real processes, signals and a slow store.

Each test interrupts a real ``scrub-listener --sweep-once`` while its
store deletes are in flight (the test hooks slow glance_store's
filesystem delete down, see service_fixtures.write_hooks) and judges by
what is left: rows, files, exit codes, and whether a restore would bring
back an image whose data may still be deleted.
"""

import datetime
import os
import signal
import subprocess

from tests.functional import service_fixtures as sf
from tests.functional.conftest import SCRUB_LISTENER
from tests.functional.conftest import assert_ok
from tests.functional.conftest import assert_summary
from tests.functional.conftest import utcnow


def _slow_sweep(env, tmp_path, delay):
    """Start a --sweep-once whose store deletes each take ``delay`` s."""
    hooks = sf.write_hooks(tmp_path / 'hooks')
    deletes = sf.DeleteLog(tmp_path / 'deletes.log')
    environ = dict(
        os.environ,
        **hooks,
        SL_TEST_DELETE_DELAY=str(delay),
        SL_TEST_DELETE_LOG=deletes.path,
    )
    proc = subprocess.Popen(
        [SCRUB_LISTENER, '--config-file', env.config_file, '--sweep-once'],
        env=environ,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, deletes


def _wait_for_deletes_in_flight(proc, deletes, count):
    def in_flight():
        if proc.poll() is not None:
            raise AssertionError(f'exited {proc.returncode} too early')
        return len(deletes.calls()) >= count

    sf.wait_until(in_flight, 60, message='no store delete started')


def _statuses(env, image_id):
    return [row['status'] for row in env.locations(image_id)]


def test_ctrl_c_during_sweep_once_never_revives_data_being_deleted(
    env, tmp_path
):
    """Issue 7, finding 3: Ctrl-C (SIGINT) while deletes run.  Deletes
    that had started become ``scrub_interrupted`` (a restore is refused:
    their data may still go), those never started go back to
    ``pending_delete``, nothing is left ``scrubbing``; the next pass
    scrubs everything."""
    env.configure(extra={'DEFAULT': {'scrub_pool_size': 2}})
    images = [env.make_image() for _ in range(6)]
    proc, deletes = _slow_sweep(env, tmp_path, delay=3)
    _wait_for_deletes_in_flight(proc, deletes, 2)

    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 130, stderr
    assert 'Traceback' not in stderr, stderr
    statuses = {i: _statuses(env, i) for i in images}
    everything = [s for rows in statuses.values() for s in rows]
    assert not [s for s in everything if s.startswith('scrubbing')]
    interrupted = [i for i, s in statuses.items() if 'scrub_interrupted' in s]
    assert len(interrupted) == 2, statuses  # the two in flight
    assert everything.count('pending_delete') == 4, statuses
    listed = env.list_json()
    shown = {i for i, row in listed.items() if row['state'] == 'interrupted'}
    assert shown == set(interrupted)
    for image_id in interrupted:
        result = env.restore(image_id)
        assert result.returncode == 6, str(result)
        assert 'interrupted' in result.stderr
        assert env.image(image_id)['status'] == 'pending_delete'

    result = assert_ok(env.sweep())
    assert_summary(result, scrubbed=6, failed=0)
    for image_id in images:
        env.assert_scrubbed(image_id)


def test_restart_after_sigkill_takes_over_its_own_claims_at_once(
    env, tmp_path
):
    """Crash recovery without the wait: a --sweep-once killed with
    SIGKILL mid-scrub leaves claims (``scrubbing``) and due-queue leases
    of a process that no longer runs; the next run on the same host takes
    them over at once although lease_time is ten minutes."""
    env.configure(extra={'scrubber': {'lease_time': 600}})
    images = [env.make_image() for _ in range(4)]
    proc, deletes = _slow_sweep(env, tmp_path, delay=30)
    _wait_for_deletes_in_flight(proc, deletes, 1)
    proc.kill()
    proc.communicate(timeout=30)
    claimed = [
        s for i in images for s in _statuses(env, i) if s != 'pending_delete'
    ]
    assert claimed and all(s.startswith('scrubbing:') for s in claimed)

    result = assert_ok(env.sweep())

    assert_summary(result, scrubbed=4, failed=0)
    for image_id in images:
        env.assert_scrubbed(image_id)


def test_a_stopped_worker_whose_claim_was_taken_over_never_revives_data(
    env, tmp_path, undeletable
):
    """Issue 7, finding 1, with real processes: worker A claims, starts
    its store delete and is stopped (SIGSTOP) past lease_time; worker B
    takes the claim over and its delete fails; a restore is refused
    (the row is scrub_interrupted, not pending_delete); A resumes and its
    delete completes: the image is still pending_delete, never active
    without data, and the next pass finishes it."""
    env.configure(
        extra={
            'scrubber': {'lease_time': 10},
            'scrub_queue': {'retry_backoff': 1},
        }
    )
    image_id = env.make_image()
    a, deletes = _slow_sweep(env, tmp_path, delay=2)
    try:
        _wait_for_deletes_in_flight(a, deletes, 1)
        a.send_signal(signal.SIGSTOP)
        [row] = env.locations(image_id)
        claimed_at = row['updated_at']
        # why a wait on the clock: lease expiry is a wall-clock time
        sf.wait_until(
            lambda: utcnow() > claimed_at + datetime.timedelta(seconds=11),
            30,
        )
        undeletable(env.store_dir)  # B's store delete fails
        b = env.sweep()
        assert b.returncode == 1, str(b)
        assert_summary(b, scrubbed=0, failed=1)
        assert _statuses(env, image_id) == ['scrub_interrupted']

        refused = env.restore(image_id)
        assert refused.returncode == 6, str(refused)
        assert env.image(image_id)['status'] == 'pending_delete'
    finally:
        undeletable.unlock()
        a.send_signal(signal.SIGCONT)
    a.communicate(timeout=60)
    # A's delete went through after all; its finish moved nothing
    assert deletes.calls('ok'), deletes.events()
    assert not os.path.exists(env.data_path(image_id))
    assert env.image(image_id)['status'] == 'pending_delete'
    assert _statuses(env, image_id) == ['scrub_interrupted']

    # B's failure backs its entry off for a second: retried after that
    sf.wait_until(lambda: env.sweep().returncode == 0, 60)
    env.assert_scrubbed(image_id)
