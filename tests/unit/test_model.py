"""scrub_listener.model: the due-time rule and the small value types."""

import datetime
import json
import types

import pytest

from scrub_listener import exceptions
from scrub_listener import model

T0 = datetime.datetime(2026, 12, 1, 12, 0, 0)


def test_schedule_is_the_one_due_time_rule():
    schedule = model.Schedule(3600)
    deletion = model.Deletion('img', None, T0)
    assert schedule.due_at(T0) == T0 + datetime.timedelta(hours=1)
    assert schedule.deleted_before(T0) == T0 - datetime.timedelta(hours=1)
    assert schedule.queued(deletion) == (deletion, T0 + schedule.delay)


def test_a_changed_scrub_time_applies_from_then_on():
    schedule = model.Schedule(3600)
    queued_before = schedule.due_at(T0)
    schedule.scrub_time = 60  # SIGHUP
    assert schedule.due_at(T0) == T0 + datetime.timedelta(seconds=60)
    assert queued_before == T0 + datetime.timedelta(hours=1)  # kept


def test_deletion_time_falls_back_for_a_half_finished_delete():
    done = types.SimpleNamespace(deleted_at=T0, updated_at=T0 + T0.resolution)
    half = types.SimpleNamespace(deleted_at=None, updated_at=T0)
    assert model.deletion_time(done) == T0
    assert model.deletion_time(half) == T0


def test_deletion_describes_itself():
    assert model.Deletion('img', None, T0).describe() == 'img'
    assert model.Deletion('img', 7, T0).describe() == 'img location 7'


@pytest.mark.parametrize(
    'image_id',
    [
        '{3310c7fe-1111-4111-8111-111111111111}',
        '3310c7fe111141118111111111111111',
        ' x',
        7,
    ],
)
def test_only_canonical_image_ids_pass(image_id):
    with pytest.raises(exceptions.InvalidImageId):
        model.validate_image_id(image_id)
    ok = '3310c7fe-1111-4111-8111-111111111111'
    assert model.validate_image_id(ok) == ok


def test_claimed_status_round_trip():
    status = model.claimed_status('tok')
    assert model.is_claimed(status) and model.claim_token(status) == 'tok'
    assert not model.is_claimed(model.PENDING_DELETE)
    assert not model.is_claimed(None)


def test_outcome_and_queue_state_print_as_their_words():
    outcome = model.Outcome(model.Deletion('img', None, T0), model.Result.BUSY)
    assert f'{outcome.status}' == 'busy'
    assert json.dumps({'state': model.QueueState.IN_PROGRESS}) == (
        '{"state": "in progress"}'
    )
