"""scrub_listener.restore.Restorer: verify, restore, clean the queue."""

import os

import pytest
from sqlalchemy import exc as sa_exc

from scrub_listener import exceptions
from scrub_listener import restore


def test_restore_verifies_then_forgets_queue_entries(
    glance, gdb, due_queue, stores
):
    image = glance.make_image()
    deletion = glance.deletion(image)
    due_queue.enqueue([(deletion, deletion.deleted_at)])
    result = restore.Restorer(gdb, stores, due_queue, 60).restore(image)
    assert result.image_id == image and result.locations == 1
    assert due_queue.count() == 0
    assert glance.image(image).status == 'active'


def test_missing_data_refuses(glance, gdb, due_queue, stores):
    image = glance.make_image()
    os.unlink(glance.path(image))
    with pytest.raises(exceptions.DataGone):
        restore.Restorer(gdb, stores, due_queue, 60).restore(image)
    assert glance.image(image).status == 'pending_delete'


def test_queue_trouble_after_the_restore_is_not_an_error(glance, gdb, stores):
    class BrokenQueue:
        def forget_deletion(self, image_id, deleted_at):
            raise sa_exc.OperationalError('DELETE', {}, Exception('down'))

    image = glance.make_image()
    result = restore.Restorer(gdb, stores, BrokenQueue(), 60).restore(image)
    assert result.image_id == image
    assert glance.image(image).status == 'active'
