"""scrub_listener.oneshot: one --sweep-once pass and --dry-run."""

import io
import os
import types

import futurist
import pytest

from scrub_listener import exceptions
from scrub_listener import model
from scrub_listener import oneshot
from scrub_listener import scrubber
from scrub_listener import sweep
from tests.unit.conftest import FakeStores
from tests.unit.conftest import ago


class ResolvingStores(FakeStores):
    """FakeStores that also resolve backends (for --dry-run)."""

    def resolve(self, location):
        if 'outside' in location.uri:
            raise exceptions.LocationRefused(
                f'location {location.id}: outside the store'
            )
        return location.store


@pytest.fixture
def parts(gdb, due_queue):
    stores = ResolvingStores()
    schedule = model.Schedule(0)
    scrub = scrubber.Scrubber(
        gdb,
        stores,
        futurist.SynchronousExecutor(),
        queue=due_queue,
        owner='me',
        batch_size=2,
        schedule=schedule,
    )
    return types.SimpleNamespace(
        glance_db=gdb,
        queue=due_queue,
        stores=stores,
        sweeper=sweep.Sweeper(gdb, due_queue, schedule, 2),
        scrubber=scrub,
        release_dead_leases=lambda: None,
    )


def test_sweep_once_scrubs_everything_due_and_reports(glance, parts):
    images = [glance.make_image(data=b'x' * 10) for _ in range(5)]
    failing = glance.make_image(data=b'y' * 10)
    parts.stores.fail['file://' + glance.path(failing)] = (
        exceptions.StoreError('disk on fire')
    )
    out = io.StringIO()

    stats = oneshot.sweep_once(parts, out, progress_interval=0)

    assert (stats.images, stats.failed, stats.bytes_freed) == (5, 1, 50)
    text = out.getvalue()
    assert 'Sweep: 6 deletions due, 6 new in the queue' in text
    assert '  ... scrubbed' in text  # progress lines
    assert 'Done: scrubbed 5, failed 1, skipped 0' in text
    for image_id in images:
        assert not os.path.exists(glance.path(image_id))
    # the failure is backed off, not retried within the pass
    assert parts.queue.count() == 1


def test_sweep_once_leaves_what_became_due_during_the_pass(glance, parts):
    image = glance.make_image(deleted_at=ago(-30))  # due in 30 s
    stats = oneshot.sweep_once(parts, io.StringIO())
    assert stats.handled == 0
    assert os.path.exists(glance.path(image))


def test_dry_run_lists_and_changes_nothing(glance, parts):
    due = glance.make_image(data=b'z' * 7)
    refused = glance.make_image(
        locations=[('file:///outside/x', {'store': 'fs'})]
    )
    empty = glance.make_image(locations=[])
    before = [
        (tuple(glance.image(i)), [tuple(r) for r in glance.locations(i)])
        for i in (due, refused, empty)
    ]
    out = io.StringIO()

    oneshot.dry_run(parts, out)

    text = out.getvalue()
    assert due in text and refused in text and empty in text
    assert 'REFUSED' in text
    assert 'no data left, image row only' in text
    assert '2 location(s) would be scrubbed' in text
    after = [
        (tuple(glance.image(i)), [tuple(r) for r in glance.locations(i)])
        for i in (due, refused, empty)
    ]
    assert after == before
    assert parts.queue.count() == 0
    assert os.path.exists(glance.path(due))
