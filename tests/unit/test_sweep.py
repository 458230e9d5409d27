"""scrub_listener.sweep.Sweeper: Glance's pending rows → due-queue."""

import datetime

from scrub_listener import model
from scrub_listener import sweep
from tests.unit.conftest import ago

HOUR = 3600


def test_sweep_queues_what_is_due_once(glance, gdb, due_queue):
    due = {glance.make_image(deleted_at=ago(2 * HOUR)) for _ in range(5)}
    glance.make_image(deleted_at=ago(60))  # not due
    live = glance.make_image(status='active')
    removed = glance.add_location(live, glance.write_file('old'))
    glance.remove_location(removed, ago(2 * HOUR))
    sweeper = sweep.Sweeper(gdb, due_queue, model.Schedule(HOUR), page_size=2)

    assert sweeper.sweep() == (6, 6)
    assert sweeper.sweep() == (6, 0)

    entries = due_queue.entries_for(due | {live})
    assert set(entries) == due | {live}
    [location_entry] = entries[live]
    assert location_entry.deletion.location_id == removed
    for image_id in due:
        [entry] = entries[image_id]
        deleted_at = glance.image(image_id).deleted_at
        assert entry.deletion.deleted_at == deleted_at
        assert entry.due_at == deleted_at + datetime.timedelta(hours=1)


def test_iter_due_uses_the_current_scrub_time(glance, gdb, due_queue):
    image = glance.make_image(deleted_at=ago(600))
    schedule = model.Schedule(HOUR)
    sweeper = sweep.Sweeper(gdb, due_queue, schedule, page_size=10)
    assert list(sweeper.iter_due()) == []
    schedule.scrub_time = 300  # SIGHUP
    [[(deletion, due_at)]] = list(sweeper.iter_due())
    assert deletion.image_id == image
    assert due_at == deletion.deleted_at + datetime.timedelta(seconds=300)
