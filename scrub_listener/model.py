"""The vocabulary of a deletion, from event to data gone.

Every other module speaks these words; this one imports nothing of the
project but the exceptions.  A deletion flows like this::

    image.delete event ─┐
                        ├─> Deletion ─> due-queue Entry ─> Claim (Glance rows
    sweep of Glance ────┘   (+ due_at)    (queue lease)      scrubbing:<token>)
                                                                 │
          Outcome (Result) <── finish <── Verdict per Location <─┘
             │                               (store delete)
             └─> Tally (a pass, a status report)

* :class:`Deletion` — one unit of scrub work: an image, or one location
  removed from a live image; ``deleted_at`` identifies it.
* :class:`Schedule` — the one rule "due = deleted_at + scrub_time", and
  the one place ``scrub_time`` lives (SIGHUP changes it there, once).
* location states — where a location row of Glance stands in the claim
  protocol (:mod:`scrub_listener.glance_db` explains it).
* :class:`Verdict` — the store's answer for one claimed location.
* :class:`Result` / :class:`Outcome` — what one attempt did to a deletion.
* :class:`QueueState` — where a deletion stands, for listings.
* :func:`utcnow` — the clock; every component takes a ``now`` function
  defaulting to it, so that tests choose the time.
"""

import dataclasses
import datetime
import enum
import re
import uuid

from scrub_listener import exceptions

# -- the clock -------------------------------------------------------------


def utcnow():
    """Naive UTC, like every timestamp Glance writes."""
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


# -- location states (image_locations.status of deleted rows) --------------

PENDING_DELETE = 'pending_delete'
SCRUBBING = 'scrubbing'  # a claim is 'scrubbing:<token>'
INTERRUPTED = 'scrub_interrupted'
DELETED = 'deleted'
ACTIVE = 'active'


def claimed_status(token):
    """The status of a row claimed by ``token``."""
    return f'{SCRUBBING}:{token}'


def claim_token(status):
    """The token of a claimed row's status ('' for a legacy claim)."""
    return status.partition(':')[2]


def is_claimed(status):
    """True for a row some claim holds (``scrubbing`` or ``scrubbing:t``)."""
    return status is not None and status.startswith(SCRUBBING)


class StoreAnswer(enum.StrEnum):
    """What a store delete answered, when it did not fail."""

    REMOVED = 'removed'  # the data was there and is gone now: bytes freed
    ALREADY_GONE = 'already gone'  # not there, and that answer is trusted
    NOT_OURS = 'not deletable by this store'  # a read-only store (http)


class Verdict(enum.Enum):
    """What became of one claimed location's store delete."""

    GONE = 'gone'  # deleted, already gone, or kept because shared
    FAILED = 'failed'  # refused, the data left intact; nothing running
    NOT_STARTED = 'not started'  # cancelled before it began
    UNKNOWN = 'unknown'  # an error or no answer: data may be (going) gone


# -- what is scrubbed ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Deletion:
    """One unit of scrub work, as the due-queue carries it.

    ``location_id`` is None for a deleted image (scrub all its
    ``pending_delete`` locations); else one location removed from an image
    that stayed alive.  ``deleted_at`` identifies the deletion.
    """

    image_id: str
    location_id: int | None
    deleted_at: datetime.datetime

    def describe(self):
        """The image id, and the location for a removed location."""
        if self.location_id is None:
            return self.image_id
        return f'{self.image_id} location {self.location_id}'


@dataclasses.dataclass(frozen=True)
class Location:
    """A location row, URL decrypted, ready for the store."""

    id: int
    image_id: str
    uri: str = dataclasses.field(repr=False)  # may hold credentials
    store: str | None
    size: int | None
    # Another, live, location points at the same data: mark the row, keep
    # the data.
    shared: bool = False
    # Claimed from another claim or from scrub_interrupted: a delete of
    # this data may have started before ours, so it never goes back to
    # pending_delete.
    taken_over: bool = False


@dataclasses.dataclass(frozen=True)
class RestoreResult:
    """What a restore brought back."""

    image_id: str
    locations: int
    properties: int
    tags: int
    members: int
    # the deletion that was undone
    deleted_at: datetime.datetime | None = None


@dataclasses.dataclass(frozen=True)
class PendingImage:
    """A pending_delete image, for listings."""

    id: str
    name: str | None
    owner: str | None
    size: int | None
    visibility: str | None
    deleted_at: datetime.datetime
    locations: int
    # locations whose scrub was cut short: the image can never be restored
    interrupted: int = 0


def deletion_time(image):
    """When ``image`` (a row with deleted_at, updated_at) was deleted.

    ``deleted_at``, or for Glance's half-finished delete (a crash between
    its two transactions: ``pending_delete``, ``deleted = 0``,
    ``deleted_at`` NULL) the ``updated_at`` its first transaction wrote.
    """
    return image.deleted_at or image.updated_at


_CANONICAL_UUID = re.compile(
    r'[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-'
    r'[0-9a-fA-F]{12}'
)
_SHOWN = 40  # characters of a refused id quoted back


def validate_image_id(image_id):
    """Glance image ids are canonical UUIDs; refuse anything else.

    Checked before any query or log line: ``uuid.UUID`` alone also takes
    braces, a ``urn:`` prefix, no dashes and surrounding whitespace
    (a newline that would forge a log line).  A refused id is quoted
    back cut to a few characters, whatever its length.
    """
    text = str(image_id) if isinstance(image_id, (str, uuid.UUID)) else None
    if text is None or not _CANONICAL_UUID.fullmatch(text):
        shown = image_id if isinstance(image_id, str) else repr(image_id)
        if len(shown) > _SHOWN:
            shown = f'{shown[:_SHOWN]}... ({len(shown)} characters)'
        raise exceptions.InvalidImageId(image_id=shown)
    return text


# -- when ------------------------------------------------------------------


class Schedule:
    """When a deletion is due: ``deleted_at + scrub_time``, written once.

    One instance is shared by the notification endpoint, the sweep, the
    scrubber and the listings, so that a SIGHUP that changes
    ``scrub_time`` changes it for all of them at once.  A due time is
    fixed when a deletion is queued: deletions already queued keep theirs.
    """

    def __init__(self, scrub_time):
        self.scrub_time = scrub_time  # seconds

    @property
    def delay(self):
        return datetime.timedelta(seconds=self.scrub_time)

    def due_at(self, deleted_at):
        """When a deletion made at ``deleted_at`` may be scrubbed."""
        return deleted_at + self.delay

    def deleted_before(self, now):
        """Deletions made before this are due at ``now``."""
        return now - self.delay

    def queued(self, deletion):
        """The ``(Deletion, due_at)`` pair the due-queue takes."""
        return deletion, self.due_at(deletion.deleted_at)


# -- outcomes --------------------------------------------------------------


class Result(enum.StrEnum):
    """What one attempt did to a deletion."""

    SCRUBBED = 'scrubbed'  # its data is gone (or kept as shared); rows done
    FAILED = 'failed'  # a store error: retried later with backoff
    SKIPPED = 'skipped'  # nothing to do: restored, already gone, superseded
    BUSY = 'busy'  # another worker holds it; looked at again later


@dataclasses.dataclass(frozen=True)
class LocationResult:
    """The store's answer for one claimed location."""

    verdict: Verdict
    bytes_freed: int = 0
    reason: str | None = None


@dataclasses.dataclass
class Outcome:
    """What happened to one Deletion in one attempt."""

    deletion: Deletion
    status: Result
    reason: str | None = None
    locations: int = 0
    bytes_freed: int = 0
    image_deleted: bool = False
    # SKIPPED: the image is pending_delete again, for this newer deletion
    superseded_by: datetime.datetime | None = None
    # BUSY: when the other worker's lease runs out (None: unknown)
    busy_until: datetime.datetime | None = None


@dataclasses.dataclass
class Tally:
    """Counts of outcomes: a ``--sweep-once`` pass, a drain."""

    images: int = 0
    locations: int = 0
    failed: int = 0
    skipped: int = 0
    busy: int = 0
    bytes_freed: int = 0
    # queued deletions that failed before and wait for their backoff
    waiting_retry: int = 0

    def add(self, outcome):
        if outcome.status is Result.SCRUBBED:
            self.images += 1
        elif outcome.status is Result.FAILED:
            self.failed += 1
        elif outcome.status is Result.BUSY:
            self.busy += 1
        else:
            self.skipped += 1
        self.locations += outcome.locations
        self.bytes_freed += outcome.bytes_freed

    @property
    def handled(self):
        return self.images + self.failed + self.skipped + self.busy


class QueueState(enum.StrEnum):
    """Where a pending_delete image stands, as ``list`` shows it."""

    WAITING = 'waiting'  # not due yet
    DUE = 'due'  # due, queued, not taken yet
    IN_PROGRESS = 'in progress'  # a worker holds its lease
    FAILED = 'failed'  # failed at least once, waits for its retry
    NOT_QUEUED = 'not queued'  # due, but no sweep or event queued it yet
    # a scrub of it was cut short: restore refuses it (docs/safety.md)
    INTERRUPTED = 'interrupted'
