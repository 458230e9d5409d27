"""glance-scrubber's own reference scenarios, ported to scrub-listener.

Sources (glance 33.0.0, shipped in the PyPI package):
``glance/tests/functional/serial/test_scrubber.py`` (class TestScrubber)
and ``glance/tests/unit/test_scrubber.py`` (TestScrubber,
TestScrubDBQueue).  Each test names the original it ports.  Where Glance
went through a real glance-api (the delete), the rows are written here
exactly as glance-api 33 leaves them (tools/glance_rows.py); the real-API
round trip is in test_glance_api_e2e.py.  Where the original only checked
that nothing crashed, these assert the rows and files.

The scenarios run on SQLite; the two whose outcome depends on the
database (paging, failure then retry through the due-queue) run on
SQLite, MariaDB and PostgreSQL.  The same behaviours are covered on all
three backends in test_sweep_once.py and test_restore.py.

Not ported, because scrub-listener has no such mode: the daemon-mode
scenarios (``test_delayed_delete`` with ``daemon=True``,
``test_scrubber_restore_image_with_daemon_running``,
``test_scrubber_restore_image_with_daemon_raise_error``): the always-on
service and its restore over RPC are tested with the service.  The
``--restore`` + ``--daemon`` exclusion is ported as ``--restore`` +
``--sweep-once``.
"""

import os
import shutil
import time
import uuid

from tests.functional.conftest import SCRUB_LISTENER
from tests.functional.conftest import ago
from tests.functional.conftest import assert_error
from tests.functional.conftest import assert_ok
from tests.functional.conftest import assert_summary
from tests.functional.conftest import run_cli
from tools import harness

MIB = 1024 * 1024


def _is_scrubbed(env, image_id):
    """The condition of Glance's ``wait_for_scrub``."""
    image = env.image(image_id)
    return image['status'] == 'deleted' and image['deleted'] is True


def test_delayed_delete_and_scrubber_app(sqlite_env):
    """Ports ``TestScrubber.test_delayed_delete`` and
    ``TestScrubber.test_scrubber_app``: a 1 MiB image deleted with
    ``delayed_delete`` is ``pending_delete``, is not scrubbed before
    ``scrub_time``, and the one-shot scrubber app (not daemon) scrubs it
    once it is due."""
    env = sqlite_env
    env.configure(scrub_time=3600)
    image_id = env.make_image(data=os.urandom(MIB), deleted_at=ago(600))
    assert env.image(image_id)['status'] == 'pending_delete'

    early = assert_ok(env.sweep())

    assert_summary(early, scrubbed=0, failed=0)
    assert env.image(image_id)['status'] == 'pending_delete'
    assert os.path.getsize(env.data_path(image_id)) == MIB

    env.configure(scrub_time=0)
    result = assert_ok(env.sweep())

    assert_summary(result, scrubbed=1, failed=0, bytes_freed=MIB)
    assert _is_scrubbed(env, image_id)
    env.assert_scrubbed(image_id)


def test_scrubber_delete_handles_exception(sqlite_env):
    """Ports ``TestScrubber.test_scrubber_delete_handles_exception`` and
    unit ``TestScrubber.test_store_delete_notfound_exception`` /
    ``test_store_delete_successful``: one image's file was removed from
    the store behind the scrubber's back (store NotFound is ignored, the
    image is scrubbed), the other's is deleted normally."""
    env = sqlite_env
    removed = env.make_image(data=os.urandom(MIB))
    os.remove(env.data_path(removed))
    normal = env.make_image(data=os.urandom(1024))

    result = assert_ok(env.sweep())

    assert_summary(result, scrubbed=2, failed=0, bytes_freed=1024)
    for image_id in (removed, normal):
        assert _is_scrubbed(env, image_id)
        env.assert_scrubbed(image_id)


def test_store_delete_store_exceptions(env):
    """Ports unit ``TestScrubber.test_store_delete_store_exceptions``:
    "all store exceptions, other than NotFound, cause image scrubbing to
    fail ... no attempt would be made to update the status of image".
    The store's delete fails for real (the data path is a directory:
    unlink fails with EISDIR, for root too).  Beyond glance: once the
    backoff has passed and the store works again, the next run scrubs it
    (glance-scrubber retries every wakeup, silently, forever)."""
    env.configure(extra={'scrub_queue': {'retry_backoff': 1}})
    image_id = env.make_image()
    path = env.data_path(image_id)
    os.remove(path)
    os.makedirs(os.path.join(path, 'inside'))

    result = env.sweep()

    assert result.returncode == 1, str(result)
    assert_summary(result, scrubbed=0, failed=1)
    assert env.image(image_id)['status'] == 'pending_delete'
    assert [r['status'] for r in env.locations(image_id)] == ['pending_delete']
    assert os.path.isdir(os.path.join(path, 'inside'))

    shutil.rmtree(path)
    time.sleep(1.2)  # retry_backoff 1 s, +10 % jitter at most
    retry = assert_ok(env.sweep())

    assert_summary(retry, scrubbed=1, failed=0)
    env.assert_scrubbed(image_id)


def test_get_all_images_paged(env):
    """Ports unit ``TestScrubDBQueue.test_get_all_images`` and
    ``test_get_all_images_paged``: 15 images, pages of 4: every one is
    found and scrubbed, none twice."""
    env.configure(extra={'scrub_queue': {'batch_size': 4}})
    images = [env.make_image(data=b'p' * 10) for _ in range(15)]

    result = assert_ok(env.sweep())

    assert 'Sweep: 15 deletions due' in result.stdout
    assert_summary(result, scrubbed=15, failed=0, bytes_freed=150)
    for image_id in images:
        env.assert_scrubbed(image_id)


def test_scrubber_exits_when_jobs_cannot_be_fetched(sqlite_env):
    """Ports unit ``TestScrubber.test_scrubber_exits``: when the jobs
    cannot be fetched (Glance DB down) the scrubber stops with an error,
    here exit 3 and one ERROR line."""
    env = sqlite_env
    sections = env.sections()
    sections['database']['connection'] = (
        'mysql+pymysql://root@127.0.0.1:1/glance'
    )
    conf = harness.write_config(str(env.tmp / 'down.conf'), sections)

    assert_error(env.sweep(config=conf), 3, 'cannot reach the Glance database')


def test_scrubber_restore_image(sqlite_env):
    """Ports ``TestScrubber.test_scrubber_restore_image`` and unit
    ``TestScrubber.test_scrubber_revert_image_status``: a pending_delete
    image is restored, exit 0, ``active`` (the API view is in
    test_glance_api_e2e.py)."""
    env = sqlite_env
    data = os.urandom(MIB)
    image_id = env.make_image(data=data)

    result = assert_ok(env.restore(image_id))

    assert f'Image {image_id} restored to active' in result.stdout
    image = env.image(image_id)
    assert (image['status'], image['deleted']) == ('active', False)
    with open(env.data_path(image_id), 'rb') as f:
        assert f.read() == data


def test_scrubber_restore_active_image_raise_error(sqlite_env):
    """Ports ``TestScrubber.test_scrubber_restore_active_image_raise_error``
    (glance: exit 1, "cannot restore the image from active to active
    (wanted from_state=pending_delete)"); here exit 5 and the status."""
    env = sqlite_env
    image_id = env.make_image(status='active')
    before = env.snapshot(image_id)

    assert_error(
        env.restore(image_id),
        5,
        f'Image {image_id} is active, not pending_delete',
    )
    assert env.snapshot(image_id) == before


def test_scrubber_restore_image_non_exist(sqlite_env):
    """Ports ``TestScrubber.test_scrubber_restore_image_non_exist``
    (glance: exit 1, "No image found with ID fake_image_id").  Here a
    string that is no image id at all is refused before any query (exit
    2); a well-formed id of no image gets glance's message (exit 4).
    Another pending_delete image is not touched."""
    env = sqlite_env
    other = env.make_image()
    before = env.snapshot(other)
    missing = str(uuid.uuid4())

    assert_error(
        env.restore('fake_image_id'),
        2,
        "'fake_image_id' is not a valid image id",
    )
    assert_error(env.restore(missing), 4, f'No image found with ID {missing}')
    assert env.snapshot(other) == before


def test_scrubber_restore_and_sweep_once_not_together(sqlite_env):
    """Ports ``TestScrubber.test_scrubber_restore_image_with_daemon_raise_
    error`` ("The restore and daemon options should not be set
    together"): glance-scrubber's ``--restore`` flag with a scrubbing
    pass is refused before anything runs."""
    env = sqlite_env
    image_id = env.make_image()
    before = env.snapshot(image_id)

    result = run_cli(
        [
            SCRUB_LISTENER,
            '--config-file',
            env.config_file,
            '--sweep-once',
            '--restore',
            image_id,
        ]
    )

    assert_error(result, 2, 'should not be set together')
    assert env.snapshot(image_id) == before
