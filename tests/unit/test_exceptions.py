"""scrub_listener.exceptions survive oslo.messaging's RPC wire format."""

import sys

import oslo_messaging
import pytest
from oslo_messaging._drivers import common as rpc_common

from scrub_listener import exceptions

ALLOWED = ['scrub_listener.exceptions']
IMAGE = '3310c7fe-1111-2222-3333-444455556666'

CASES = [
    exceptions.ImageNotFound(image_id=IMAGE),
    exceptions.NotPendingDelete(image_id=IMAGE, status='active'),
    exceptions.DataGone(image_id=IMAGE, reason='1 of its 2 locations gone'),
    exceptions.ScrubInProgress(image_id=IMAGE),
    exceptions.InvalidImageId(image_id='nope'),
    exceptions.Forbidden(action='restore', who='bob@host'),
    exceptions.ConfigError('[database] connection is not set'),
    exceptions.DatabaseUnavailable('cannot reach the Glance database'),
    exceptions.ServiceUnavailable('no answer'),
    exceptions.StoreError('location 3: store delete failed'),
    exceptions.LocationRefused('location 3: outside'),
    exceptions.CorruptLocation('location 3: bad key'),
    exceptions.ScrubListenerError('plain'),
]


def _round_trip(exc, allowed=ALLOWED):
    try:
        raise exc
    except exceptions.ScrubListenerError:
        wire = rpc_common.serialize_remote_exception(sys.exc_info())
    return rpc_common.deserialize_remote_exception(wire, allowed)


@pytest.mark.parametrize('exc', CASES, ids=lambda e: type(e).__name__)
def test_rpc_round_trip_keeps_type_exit_code_and_message(exc):
    remote = _round_trip(exc)
    assert isinstance(remote, type(exc))
    assert type(remote).__name__ == type(exc).__name__ + '_Remote'
    assert remote.exit_code == exc.exit_code
    assert remote.message == exc.message
    assert remote.kwargs == exc.kwargs
    for key, value in exc.kwargs.items():
        assert getattr(remote, key) == value
    # str() carries the remote traceback after the message
    assert str(remote).splitlines()[0] == exc.message


def test_not_allowed_module_becomes_remote_error():
    remote = _round_trip(exceptions.ImageNotFound(image_id=IMAGE), [])
    assert isinstance(remote, oslo_messaging.RemoteError)
    assert remote.exc_type == 'ImageNotFound'


def test_exit_codes_of_restore_errors_are_distinct():
    codes = {
        cls: cls.exit_code
        for cls in (
            exceptions.ImageNotFound,
            exceptions.NotPendingDelete,
            exceptions.DataGone,
            exceptions.ScrubInProgress,
            exceptions.ServiceUnavailable,
            exceptions.Forbidden,
            exceptions.DatabaseUnavailable,
            exceptions.ConfigError,
        )
    }
    assert len(set(codes.values())) == len(codes), codes
    assert 0 not in codes.values() and 1 not in codes.values()


def test_messages():
    assert str(exceptions.NotPendingDelete(image_id='x', status='active')) == (
        'Image x is active, not pending_delete: only a pending_delete image '
        'can be restored'
    )
    assert 'ID x' in str(exceptions.ImageNotFound(image_id='x'))
    assert exceptions.DataGone(image_id='x', reason='r').reason == 'r'
    with pytest.raises(AttributeError):
        exceptions.ImageNotFound(image_id='x').nonexistent  # noqa: B018


def test_restore_errors_are_not_restorable():
    for cls in (
        exceptions.NotPendingDelete,
        exceptions.DataGone,
        exceptions.ScrubInProgress,
    ):
        assert issubclass(cls, exceptions.NotRestorable)
