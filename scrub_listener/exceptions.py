"""The errors scrub-listener reports, each with the exit code of its CLI.

Exit codes are part of the interface: admin scripts branch on them.

==  ==================================================================
0   success
1   a sweep finished but some deletions failed (they stay queued)
2   bad usage or bad configuration
3   a database (Glance or due-queue) cannot be reached
4   restore: no image with that id
5   restore: the image is not pending_delete
6   restore: the image data is already (partly) gone
7   restore: a scrub of that image is in progress
8   restore: the scrub-listener service did not answer
9   restore over RPC: the caller does not have the admin role
==  ==================================================================
"""

from scrub_listener import redaction


class ScrubListenerError(Exception):
    """Base class; ``str(exc)`` is the message shown to the operator.

    Built from keyword arguments (``kwargs`` is kept) so that
    oslo.messaging can carry it over RPC and rebuild the same type on the
    client: it calls ``cls(*exc.args, **exc.kwargs)``.

    The message and the text arguments are redacted when the error is
    built (URL credentials, configured secrets masked): they are logged,
    stored as ``last_error``, printed, and sent over RPC, often quoting a
    location URL or a driver's error text.
    """

    exit_code = 1
    template = '{reason}'

    def __init__(self, message=None, **kwargs):
        self.kwargs = {key: _redacted(value) for key, value in kwargs.items()}
        self.message = redaction.redact(
            message or self.template.format(**self.kwargs)
        )
        super().__init__(self.message)

    def __getattr__(self, name):
        try:
            return self.__dict__['kwargs'][name]
        except KeyError:
            raise AttributeError(name) from None


class ConfigError(ScrubListenerError):
    """Bad usage or configuration; the message names the option."""

    exit_code = 2


class InvalidImageId(ScrubListenerError):
    """Not a canonical image UUID (quoted back cut short)."""

    exit_code = 2
    template = '{image_id!r} is not a valid image id'


class DatabaseUnavailable(ScrubListenerError):
    """The Glance or due-queue database cannot be reached."""

    exit_code = 3


class Forbidden(ScrubListenerError):
    """An RPC caller without the admin role."""

    exit_code = 9
    template = '{action} needs the admin role; {who} does not have it'


class ImageNotFound(ScrubListenerError):
    """Restore: no image with that id."""

    exit_code = 4
    template = 'No image found with ID {image_id}'


class NotRestorable(ScrubListenerError):
    """Base of the reasons a found image cannot be restored."""


class NotPendingDelete(NotRestorable):
    """Restore: the image is not pending_delete (its status is said)."""

    exit_code = 5
    template = (
        'Image {image_id} is {status}, not pending_delete: only a '
        'pending_delete image can be restored'
    )


class DataGone(NotRestorable):
    """Restore: some of the image data is (or may soon be) gone."""

    exit_code = 6
    template = (
        'Image {image_id} cannot be restored, its data is gone: {reason}'
    )


class ScrubInProgress(NotRestorable):
    """Restore: a scrub holds the image rows right now."""

    exit_code = 7
    template = (
        'Image {image_id} is being scrubbed right now: its data may already '
        'be partly deleted, refusing to restore'
    )


class ServiceUnavailable(ScrubListenerError):
    """Restore over RPC: the service did not answer."""

    exit_code = 8


class LocationRefused(ScrubListenerError):
    """A location we must not delete: not inside a configured store."""


class StoreError(ScrubListenerError):
    """The store failed to delete (or stat) a location."""


class CorruptLocation(ScrubListenerError):
    """A location row that cannot be read (bad encryption, bad metadata)."""


def _redacted(value):
    # Only text can quote a secret; ids, counts and statuses pass as they
    # are (the client rebuilds the error from them).
    return redaction.redact(value) if isinstance(value, str) else value
