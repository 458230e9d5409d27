"""scrub_listener.notification.ImageDeleteEndpoint: events → queue rows."""

import datetime
import threading
import uuid

import oslo_messaging
import pytest
from sqlalchemy import exc as sa_exc

from scrub_listener import model
from scrub_listener import notification


def _event(image_id, **extra):
    return {
        'event_type': 'image.delete',
        'publisher_id': 'image.localhost',
        'payload': {'id': image_id, 'status': 'pending_delete', **extra},
        'metadata': {'message_id': str(uuid.uuid4())},
    }


@pytest.fixture
def woken():
    return threading.Event()


@pytest.fixture
def endpoint(gdb, due_queue, woken):
    return notification.ImageDeleteEndpoint(
        gdb, due_queue, model.Schedule(3600), on_enqueued=woken.set
    )


def test_filter_rule_takes_image_delete_only():
    rule = notification.ImageDeleteEndpoint.filter_rule
    assert isinstance(rule, oslo_messaging.NotificationFilter)
    assert rule.match({}, 'image.localhost', 'image.delete', {}, {})
    for other in ('image.update', 'image.delete.end', 'xximage.delete'):
        assert not rule.match({}, 'image.localhost', other, {}, {})


def test_deletion_time_comes_from_the_database(glance, endpoint, due_queue):
    image = glance.make_image()
    # the event's deleted_at is the send time, rounded: never used
    endpoint.info([_event(image, deleted_at='2000-01-01T00:00:00Z')])
    [entry] = due_queue.entries_for({image})[image]
    deleted_at = glance.image(image).deleted_at
    assert entry.deletion.deleted_at == deleted_at
    assert entry.due_at == deleted_at + datetime.timedelta(hours=1)


def test_duplicates_and_redeliveries_add_nothing(
    glance, endpoint, due_queue, woken
):
    image = glance.make_image()
    endpoint.info([_event(image), _event(image)])
    assert woken.is_set()
    woken.clear()
    endpoint.info([_event(image)])
    assert due_queue.count() == 1
    assert not woken.is_set()  # nothing new: the drain is not woken


def test_images_not_pending_delete_are_ignored(glance, endpoint, due_queue):
    active = glance.make_image(status='active')
    scrubbed = glance.make_image(status='deleted')
    endpoint.info(
        [_event(active), _event(scrubbed), _event(str(uuid.uuid4()))]
    )
    assert due_queue.count() == 0


@pytest.mark.parametrize(
    'message',
    [
        {'payload': None},
        {'payload': 'text'},
        {'payload': {}},
        {'payload': {'id': 42}},
        {'payload': {'id': None}},
        {'payload': {'id': 'not-a-uuid'}},
        {'payload': {'id': ['x']}},
        {'payload': {'id': 'x' * 10000}},
        {'metadata': 'not a dict', 'payload': {'id': 'bad'}},
        {},
    ],
)
def test_malformed_events_are_dropped_not_fatal(
    glance, endpoint, due_queue, message
):
    good = glance.make_image()
    assert endpoint.info([message, _event(good)]) is None
    assert set(due_queue.entries_for({good})) == {good}


class FlakyQueue:
    """Fails ``failures`` times, then delegates."""

    def __init__(self, queue, failures):
        self.queue = queue
        self.failures = failures
        self.calls = 0

    def enqueue(self, items):
        self.calls += 1
        if self.calls <= self.failures:
            raise sa_exc.OperationalError('INSERT', {}, Exception('gone'))
        return self.queue.enqueue(items)


def test_database_outage_is_retried_in_place(
    glance, gdb, due_queue, monkeypatch
):
    monkeypatch.setattr(notification, 'RETRY_MIN', 0.001)
    flaky = FlakyQueue(due_queue, failures=3)
    endpoint = notification.ImageDeleteEndpoint(gdb, flaky, model.Schedule(0))
    image = glance.make_image()
    assert endpoint.info([_event(image)]) is None
    assert flaky.calls == 4
    assert due_queue.count() == 1


def test_stopping_during_an_outage_leaves_it_to_the_sweep(
    glance, gdb, due_queue
):
    flaky = FlakyQueue(due_queue, failures=10**6)
    endpoint = notification.ImageDeleteEndpoint(gdb, flaky, model.Schedule(0))
    endpoint.stopping.set()
    image = glance.make_image()
    assert endpoint.info([_event(image)]) is None  # acked, not looping
    assert due_queue.count() == 0
