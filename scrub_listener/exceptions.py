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
==  ==================================================================
"""


class ScrubListenerError(Exception):
    """Base class; ``str(exc)`` is the message shown to the operator."""

    exit_code = 1


class ConfigError(ScrubListenerError):
    exit_code = 2


class InvalidImageId(ScrubListenerError):
    exit_code = 2

    def __init__(self, image_id):
        super().__init__(f'{image_id!r} is not a valid image id')
        self.image_id = image_id


class DatabaseUnavailable(ScrubListenerError):
    exit_code = 3


class ImageNotFound(ScrubListenerError):
    exit_code = 4

    def __init__(self, image_id):
        super().__init__(f'No image found with ID {image_id}')
        self.image_id = image_id


class NotRestorable(ScrubListenerError):
    """Base of the reasons a found image cannot be restored."""


class NotPendingDelete(NotRestorable):
    exit_code = 5

    def __init__(self, image_id, status):
        super().__init__(
            f'Image {image_id} is {status}, not pending_delete: '
            'only a pending_delete image can be restored'
        )
        self.image_id = image_id
        self.status = status


class DataGone(NotRestorable):
    exit_code = 6

    def __init__(self, image_id, reason):
        super().__init__(
            f'Image {image_id} cannot be restored, its data is gone: {reason}'
        )
        self.image_id = image_id
        self.reason = reason


class ScrubInProgress(NotRestorable):
    exit_code = 7

    def __init__(self, image_id):
        super().__init__(
            f'Image {image_id} is being scrubbed right now: its data may '
            'already be partly deleted, refusing to restore'
        )
        self.image_id = image_id


class ServiceUnavailable(ScrubListenerError):
    exit_code = 8


class LocationRefused(ScrubListenerError):
    """A location we must not delete: not inside a configured store."""


class StoreError(ScrubListenerError):
    """The store failed to delete (or stat) a location."""


class CorruptLocation(ScrubListenerError):
    """A location row that cannot be read (bad encryption, bad metadata)."""
