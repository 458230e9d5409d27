"""Helpers shared by the tests of the running service's listener.

(test_service_listener.py, test_service_listener_scrubbing.py,
test_service_listener_resilience.py; the fixtures are in
service_fixtures.py.)
"""

from tests.functional import service_fixtures as sf


def barrier(world, svc, timeout=20):
    """Publish one more good event, wait for its scrub and an empty queue.

    The broker delivers in order, but oslo.messaging's threading executor
    runs batches concurrently: once this one is scrubbed and the pool
    queue is empty, every earlier message was delivered; its batch may
    still be finishing, so callers wait for counts, not just read them.
    """
    image_id = world.pending()
    world.publisher.image_delete(image_id)
    world.wait_scrubbed([image_id], timeout, svc)
    sf.wait_until(
        lambda: world.pool_depth() == (0, 1),
        10,
        message=lambda: f'pool queue {world.pool_depth()}',
    )
    return image_id


def queue_url(world):
    """The world's due-queue (SQLite under its workdir)."""
    return sf.sqlite_queue_url(world.workdir)
