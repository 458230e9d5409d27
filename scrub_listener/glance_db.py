"""The only code that reads or writes Glance's tables.

Glance (33.0.0) marks a delayed delete like this, in one DELETE request:
each live location row goes to ``status='pending_delete', deleted=1``
(``deleted_at`` = its own now), the properties are soft-deleted (their own
now, a few ms later), then the image row goes to ``status='pending_delete',
deleted=1`` and its tags and members are soft-deleted with the image's
``deleted_at`` (measured on glance-api 33.0.0; see ``_in_deletion``).
Glance never reads a location row that is deleted, and never touches a
``pending_delete`` image again, so the rows below are ours to move on.

Claim protocol (who may delete data, who may restore)
------------------------------------------------------
The Glance database is the one thing every party shares: glance-api, every
scrub-listener on every host, and whoever restores.  So the decision
"this data is being scrubbed" versus "this image is being restored" is
settled here, by row locks, in one transaction each.  docs/safety.md
says the same for operators; tests/model/protocol.py is its model,
explored exhaustively by tests/unit/test_protocol_model.py.

**The invariant.**  No image is ever ``active`` (or revived) while any of
its data may be deleted, is being deleted, or is partly gone; no data is
deleted that a live location points at.  It must hold whatever the
timing: a worker may pause for any time at any step (GC, SIGSTOP, a hung
NFS or Ceph call, a partition) or run with a skewed clock, and its store
delete in flight may complete at any later moment.  So no rule below
depends on a lease having really expired.

**States of a location row** (``image_locations.status``, deleted rows
only: Glance never reads those, so the extra states are invisible to it):

* ``pending_delete`` — no store delete of this data is running or can
  still start from an earlier claim.  Revivable (after the data is
  verified).  Glance's DELETE puts rows here.
* ``scrubbing:<token>`` — claimed by one claim (the token is unique per
  claim and names its process, :mod:`scrub_listener.holders`); a delete
  may be in flight.  ``updated_at`` is the lease heartbeat.  Never
  revivable.
* ``scrub_interrupted`` — a delete of this data may have started and
  nobody knows if it ended (the claim was taken over, or cut short by
  Ctrl-C or a stop).  Never revivable: the data may be partly gone, or go
  later.  Claimable again at once.
* ``deleted`` — the data is gone (or it was kept because a live location
  uses it).  Final.

**Transitions**, each in one transaction that first locks the image rows
(``SELECT ... FOR UPDATE`` in id order; on SQLite ``BEGIN IMMEDIATE``):

* **claim** (scrubber, token t): re-check the image is still
  ``pending_delete`` for the same deletion (``deleted_at`` identifies a
  deletion); then per row: ``pending_delete`` → ``scrubbing:t`` (a *clean*
  claim); ``scrub_interrupted`` → ``scrubbing:t`` (unclean); a
  ``scrubbing`` row whose lease is stale or whose holder is a dead process
  of this host → ``scrubbing:t`` (a takeover: unclean); a live
  ``scrubbing`` row makes the deletion *busy*.  Rows whose data a live
  location names are claimed *shared*: marked deleted, never deleted.
* **renew** (t): re-stamp the rows still ``scrubbing:t``; the worker
  learns exactly which rows are still its own.
* **finish** (t): only rows still ``scrubbing:t`` move.  Delete returned
  ok (or shared) → ``deleted``.  The store refused cleanly (it says the
  data is intact), or the delete never started → ``pending_delete`` if
  the claim was clean, else ``scrub_interrupted``.  Any other outcome —
  an error that does not prove the data intact (a timeout, a delete that
  stopped half-way), or a delete started and never returned (Ctrl-C, a
  stop) → ``scrub_interrupted``.  The image → ``deleted`` once none of its rows
  is ``pending_delete``/``scrubbing``/``scrub_interrupted``.
* **restore**: refuse unless the image is ``pending_delete`` and every
  location row of that deletion is ``pending_delete`` (``scrubbing`` →
  ScrubInProgress; ``scrub_interrupted`` or ``deleted`` → DataGone), and
  no other image's row naming the same data is ``scrubbing`` or
  ``scrub_interrupted``; verify the data is in the store; then revive
  the image, the locations, and the properties, tags and members of
  that deletion.

**Why it holds.**  ``pending_delete`` means "no delete can be running":
Glance puts rows there before any claim, and finish puts a row back only
when the claim was clean (it came from ``pending_delete``, so no earlier
delete can be running) and the worker's own delete was refused with the
data intact, or never started — and the token proves nobody took the row
over meanwhile.  Every
other way out of ``scrubbing`` leads to ``deleted`` or
``scrub_interrupted``, which restore refuses.  So a takeover, however
early (a skewed clock, a paused worker), can make two workers delete the
same data (idempotent) but never revive data one of them may still
delete.  Claim and restore lock the same image rows, so one sees the
other's commit: restore first, the claim finds the image ``active`` and
claims nothing (also how a late ``image.delete`` event is dropped); claim
first, restore refuses.  Two images may name the same data: a claim
keeps data that a live location names, comparing what the store would
touch (``data_key``, not URL strings), and a restore locks the other
images first and refuses while one of their rows may be deleting it.
"""

import base64
import contextlib
import dataclasses
import datetime
import enum
import json
import logging
import re
import socket
import threading
import uuid

import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers import modes
from sqlalchemy import exc as sa_exc

from scrub_listener import db
from scrub_listener import exceptions
from scrub_listener import holders

LOG = logging.getLogger(__name__)

PENDING_DELETE = 'pending_delete'
SCRUBBING = 'scrubbing'  # a claim is 'scrubbing:<token>'
INTERRUPTED = 'scrub_interrupted'
DELETED = 'deleted'
ACTIVE = 'active'


class Verdict(enum.Enum):
    """What became of one claimed location's store delete."""

    GONE = 'gone'  # deleted, already gone, or kept because shared
    FAILED = 'failed'  # refused, the data left intact; nothing running
    NOT_STARTED = 'not started'  # cancelled before it began
    UNKNOWN = 'unknown'  # an error or no answer: data may be (going) gone


def claimed_status(token):
    """The status of a row claimed by ``token``."""
    return f'{SCRUBBING}:{token}'


def claim_token(status):
    """The token of a claimed row's status ('' for a legacy claim)."""
    return status.partition(':')[2]


def is_claimed(status):
    return status is not None and status.startswith(SCRUBBING)


def _claimed():
    # 'scrubbing' (legacy, before tokens) and 'scrubbing:<token>'
    return LOCATIONS.c.status.like(SCRUBBING + '%')


def _unfinished():
    """Rows whose data a scrub has still to deal with."""
    return sa.or_(
        LOCATIONS.c.status.in_([PENDING_DELETE, INTERRUPTED]), _claimed()
    )


def target_status(location, verdict):
    """Where finish moves a claimed row, given its store verdict.

    Back to ``pending_delete`` (revivable) only when no delete of this
    data can still be running: ours returned or never began, and the row
    came from ``pending_delete`` (a clean claim) so no earlier claim's
    delete can be in flight either.  See the module docstring.
    """
    if verdict is Verdict.GONE:
        return DELETED
    if verdict in (Verdict.FAILED, Verdict.NOT_STARTED) and not (
        location.taken_over
    ):
        return PENDING_DELETE
    return INTERRUPTED


_URL_START = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')

_META = sa.MetaData()
# Only the columns we use.  Never create or alter these tables: they belong
# to Glance's migrations.
IMAGES = sa.Table(
    'images',
    _META,
    sa.Column('id', sa.String(36), primary_key=True),
    sa.Column('name', sa.String(255)),
    sa.Column('size', sa.BigInteger),
    sa.Column('status', sa.String(30)),
    sa.Column('owner', sa.String(255)),
    sa.Column('visibility', sa.String(9)),
    sa.Column('deleted', sa.Boolean(create_constraint=False)),
    sa.Column('deleted_at', sa.DateTime),
    sa.Column('updated_at', sa.DateTime),
)
LOCATIONS = sa.Table(
    'image_locations',
    _META,
    sa.Column('id', sa.Integer, primary_key=True),
    sa.Column('image_id', sa.String(36)),
    sa.Column('value', sa.Text),
    sa.Column('meta_data', sa.Text),
    sa.Column('status', sa.String(30)),
    sa.Column('deleted', sa.Boolean(create_constraint=False)),
    sa.Column('deleted_at', sa.DateTime),
    sa.Column('updated_at', sa.DateTime),
)


def _child_table(name, *extra):
    return sa.Table(
        name,
        _META,
        sa.Column('id', sa.Integer, primary_key=True),
        sa.Column('image_id', sa.String(36)),
        sa.Column('deleted', sa.Boolean(create_constraint=False)),
        sa.Column('deleted_at', sa.DateTime),
        sa.Column('updated_at', sa.DateTime),
        *extra,
    )


# Soft-deleted by Glance with the image (see GlanceDB._in_deletion).
PROPERTIES = _child_table(
    'image_properties',
    sa.Column('name', sa.String(255)),
    sa.Column('value', sa.Text),
)
CHILD_TABLES = (
    PROPERTIES,
    _child_table('image_tags'),
    _child_table('image_members'),
)


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


@dataclasses.dataclass
class Claim:
    """What :meth:`GlanceDB.claim` decided for one Deletion."""

    deletion: Deletion
    locations: list = dataclasses.field(default_factory=list)
    # Set when there is nothing to do for this deletion (restored, gone).
    skip_reason: str | None = None
    # Another worker holds one of its locations right now: retry later.
    busy: bool = False
    # The image is pending_delete again, for a newer deletion.
    superseded_by: datetime.datetime | None = None
    # When the other worker's lease runs out (None: a claim of ours).
    busy_until: datetime.datetime | None = None
    # (location id, reason) of rows that cannot be read.
    errors: list = dataclasses.field(default_factory=list)
    size: int | None = None
    # The claim's fencing token, in the status of our rows
    # ('scrubbing:<token>'): unique per claim, so finish and renew move
    # exactly the rows still ours.
    token: str | None = None


@dataclasses.dataclass(frozen=True)
class RestoreResult:
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


def decrypt_location(key, ciphertext):
    """Decrypt a location URL exactly as glance.common.crypt encrypts it.

    AES-CBC, urlsafe base64 of IV (16 bytes) + ciphertext; the plaintext
    ends at the last NUL byte (the rest is random padding).
    """
    try:
        raw = base64.urlsafe_b64decode(ciphertext.encode('ascii'))
        if len(raw) < 32 or len(raw) % 16:
            raise ValueError('not a multiple of the AES block size')
        decryptor = Cipher(
            algorithms.AES(key.encode('utf-8')), modes.CBC(raw[:16])
        ).decryptor()
        padded = decryptor.update(raw[16:]) + decryptor.finalize()
        end = padded.rfind(b'\0')
        if end < 0:
            raise ValueError('no NUL delimiter (wrong key?)')
        text = padded[:end].decode('utf-8')
        # A wrong key still "decrypts" to junk now and then; a location
        # is a URL, junk almost never looks like one.
        if '\0' in text or not _URL_START.match(text):
            raise ValueError('the result is not a URL (wrong key?)')
        return text
    except (ValueError, UnicodeError) as exc:
        raise exceptions.CorruptLocation(
            f'cannot decrypt location URL with metadata_encryption_key: {exc}'
        ) from exc


def utcnow():
    """Naive UTC, like every timestamp Glance writes."""
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def deletion_time(image):
    """When ``image`` (a row with deleted_at, updated_at) was deleted.

    ``deleted_at``, or for Glance's half-finished delete (a crash between
    its two transactions: ``pending_delete``, ``deleted = 0``,
    ``deleted_at`` NULL) the ``updated_at`` its first transaction wrote.
    """
    return image.deleted_at or image.updated_at


def _deletion_time_column():
    return sa.func.coalesce(IMAGES.c.deleted_at, IMAGES.c.updated_at)


class GlanceDB:
    """Reads and moves Glance's image and location rows."""

    def __init__(
        self,
        engine,
        encryption_key=None,
        lease_time=600,
        data_key=None,
        process=None,
    ):
        """``data_key(uri)`` names the data a URI points at (two URIs with
        one key are the same data: :func:`scrub_listener.store.data_key`);
        ``process`` (:class:`scrub_listener.holders.Process`) makes claim
        tokens and recognises the claims of dead processes of this host.
        """
        self.engine = engine
        self._key = encryption_key
        self._lease = datetime.timedelta(seconds=lease_time)
        self.data_key = data_key or _plain_key
        self.process = process or holders.this_process(socket.gethostname())
        self._live_data = _LiveDataIndex(self)

    # -- reading ----------------------------------------------------------

    def location_uri(self, value):
        return decrypt_location(self._key, value) if self._key else value

    def _location(self, row, size, shared=False):
        try:
            meta = json.loads(row.meta_data) if row.meta_data else {}
            if not isinstance(meta, dict):
                raise ValueError('meta_data is not a JSON object')
        except ValueError as exc:
            raise exceptions.CorruptLocation(
                f'location {row.id} has unreadable meta_data: {exc}'
            ) from exc
        return Location(
            id=row.id,
            image_id=row.image_id,
            uri=self.location_uri(row.value),
            store=meta.get('store'),
            size=size,
            shared=shared,
        )

    def iter_due_images(self, deleted_before, page_size):
        """Yield pages of Deletions of pending_delete images.

        Keyset-paged on id, so memory does not grow with the backlog and
        a page is a cheap index range scan.  Every visibility, community
        included.
        """
        query = (
            sa.select(IMAGES.c.id, IMAGES.c.deleted_at, IMAGES.c.updated_at)
            .where(
                IMAGES.c.status == PENDING_DELETE,
                sa.or_(
                    sa.and_(
                        IMAGES.c.deleted == sa.true(),  # indexed
                        IMAGES.c.deleted_at <= deleted_before,
                    ),
                    # Glance's half-finished delete (see deletion_time)
                    sa.and_(
                        IMAGES.c.deleted == sa.false(),
                        IMAGES.c.deleted_at.is_(None),
                        IMAGES.c.updated_at <= deleted_before,
                    ),
                ),
            )
            .order_by(IMAGES.c.id)
            .limit(page_size)
        )
        yield from self._pages(
            query,
            IMAGES.c.id,
            lambda row: Deletion(row.id, None, deletion_time(row)),
        )

    def iter_due_removed_locations(self, deleted_before, page_size):
        """Yield pages of Deletions of locations removed from live images.

        A location row in ``pending_delete`` whose image is not
        ``pending_delete`` (PATCH remove, DELETE /v2/stores/...).  Also
        finds ``scrub_interrupted`` rows, and ``scrubbing`` rows whose
        claim went stale (crashed worker).
        """
        stale_before = utcnow() - self._lease
        query = (
            sa.select(
                LOCATIONS.c.id, LOCATIONS.c.image_id, LOCATIONS.c.deleted_at
            )
            .select_from(
                LOCATIONS.join(IMAGES, IMAGES.c.id == LOCATIONS.c.image_id)
            )
            .where(
                IMAGES.c.status != PENDING_DELETE,
                LOCATIONS.c.deleted == sa.true(),  # indexed
                LOCATIONS.c.deleted_at <= deleted_before,
                sa.or_(
                    LOCATIONS.c.status.in_([PENDING_DELETE, INTERRUPTED]),
                    sa.and_(_claimed(), LOCATIONS.c.updated_at < stale_before),
                ),
            )
            .order_by(LOCATIONS.c.id)
            .limit(page_size)
        )
        yield from self._pages(
            query,
            LOCATIONS.c.id,
            lambda row: Deletion(row.image_id, row.id, row.deleted_at),
        )

    def _pages(self, query, key_column, make):
        marker = None
        while True:
            page_query = query
            if marker is not None:
                page_query = query.where(key_column > marker)
            with self.engine.connect() as conn:
                rows = conn.execute(page_query).all()
            if not rows:
                return
            marker = rows[-1][0]
            yield [make(row) for row in rows]

    def get_deletion_times(self, image_ids):
        """{image id: deleted_at} of those images that are pending_delete."""
        query = sa.select(
            IMAGES.c.id, IMAGES.c.deleted_at, IMAGES.c.updated_at
        ).where(
            IMAGES.c.id.in_(list(image_ids)),
            IMAGES.c.status == PENDING_DELETE,
        )
        with self.engine.connect() as conn:
            return {row.id: deletion_time(row) for row in conn.execute(query)}

    def iter_pending_images(
        self, page_size=500, owner=None, name=None, deleted_since=None
    ):
        """Yield every pending_delete image (due or not), for listings."""

        def count(condition):
            return (
                sa.select(sa.func.count())
                .where(
                    LOCATIONS.c.image_id == IMAGES.c.id,
                    LOCATIONS.c.deleted == sa.true(),
                    condition,
                )
                .scalar_subquery()
            )

        query = (
            sa.select(
                IMAGES.c.id,
                IMAGES.c.name,
                IMAGES.c.owner,
                IMAGES.c.size,
                IMAGES.c.visibility,
                _deletion_time_column().label('deleted_at'),
                count(_unfinished()).label('locations'),
                count(LOCATIONS.c.status == INTERRUPTED).label('interrupted'),
            )
            .where(IMAGES.c.status == PENDING_DELETE)
            .order_by(IMAGES.c.id)
            .limit(page_size)
        )
        if owner is not None:
            query = query.where(IMAGES.c.owner == owner)
        if name is not None:
            query = query.where(IMAGES.c.name == name)
        if deleted_since is not None:
            query = query.where(_deletion_time_column() >= deleted_since)
        for page in self._pages(
            query, IMAGES.c.id, lambda row: PendingImage(**row._mapping)
        ):
            yield from page

    def describe(self, deletion):
        """Locations a Deletion would scrub now, for --dry-run (no writes).

        Returns (list of Location, list of (location id, error)).
        """
        with self.engine.connect() as conn:
            image = conn.execute(
                sa.select(IMAGES.c.size).where(
                    IMAGES.c.id == deletion.image_id
                )
            ).first()
            rows = conn.execute(self._locations_query([deletion])).all()
        size = image.size if image else None
        wanted = [
            row
            for row in rows
            if deletion.location_id in (None, row.id)
            and row.status in (PENDING_DELETE, INTERRUPTED)
        ]
        return self._read_locations(wanted, size)

    def _read_locations(self, rows, size):
        locations, errors = [], []
        for row in rows:
            try:
                locations.append(self._location(row, size))
            except exceptions.CorruptLocation as exc:
                errors.append((row.id, str(exc)))
        return locations, errors

    # -- claim / renew / finish (see the module docstring) ----------------

    def claim(self, deletions, now=None, token=None):
        """Claim the locations of ``deletions``; one transaction.

        Returns one :class:`Claim` per Deletion, in order, all with the
        same fresh ``token`` (or ``token``, for tests).  The caller owns
        the token: it must :meth:`finish` with it, then drop it
        (``self.process.drop(token)``).
        """
        token = token or self.process.new_token()
        try:
            # Key the live rows before taking any lock: keying a file
            # resolves its path, which a slow mount makes slow.
            self._live_data.warm(self.engine)
            return db.with_deadlock_retry(
                lambda: self._claim(deletions, now or utcnow(), token)
            )
        except BaseException:
            self.process.drop(token)  # nothing was claimed with it
            raise

    def _claim(self, deletions, now, token):
        with self.engine.begin() as conn:
            images = self._lock_images(conn, {d.image_id for d in deletions})
            rows = conn.execute(
                self._locations_query(deletions).with_for_update()
            ).all()
            by_image = {}
            for row in rows:
                by_image.setdefault(row.image_id, []).append(row)
            claims = [
                self._decide(d, images.get(d.image_id), by_image, now)
                for d in deletions
            ]
            self._mark_shared(conn, claims)
            for claim in claims:
                claim.token = token
            claimed = [loc.id for c in claims for loc in c.locations]
            if claimed:
                conn.execute(
                    LOCATIONS.update()
                    .where(LOCATIONS.c.id.in_(sorted(claimed)))
                    .values(status=claimed_status(token), updated_at=now)
                )
        return claims

    def _lock_images(self, conn, image_ids):
        # Always lock image rows first and in id order: claim, finish and
        # restore all do, so they queue on the same row instead of
        # deadlocking on each other's location rows.
        query = (
            sa.select(
                IMAGES.c.id,
                IMAGES.c.status,
                IMAGES.c.deleted_at,
                IMAGES.c.updated_at,
                IMAGES.c.size,
            )
            .where(IMAGES.c.id.in_(sorted(image_ids)))
            .order_by(IMAGES.c.id)
            .with_for_update()
        )
        return {row.id: row for row in conn.execute(query)}

    @staticmethod
    def _locations_query(deletions):
        return (
            sa.select(LOCATIONS)
            .where(
                LOCATIONS.c.image_id.in_({d.image_id for d in deletions}),
                LOCATIONS.c.deleted == sa.true(),
                _unfinished(),
            )
            .order_by(LOCATIONS.c.id)
        )

    def _decide(self, deletion, image, by_image, now):
        claim = Claim(deletion)
        if image is None:
            claim.skip_reason = 'the image row no longer exists'
            return claim
        claim.size = image.size
        rows = by_image.get(deletion.image_id, [])
        if deletion.location_id is None:
            claim.skip_reason = self._image_gone_reason(deletion, image)
            claim.superseded_by = self._newer_deletion(deletion, image)
        else:
            rows = [r for r in rows if r.id == deletion.location_id]
            claim.skip_reason = self._location_gone_reason(deletion, rows)
        if claim.skip_reason:
            return claim
        held = [r for r in rows if is_claimed(r.status)]
        live = [r for r in held if not self._may_take_over(r, now)]
        if live:
            claim.busy = True
            claim.busy_until = self._lease_end(live)
            return claim
        claim.locations, claim.errors = self._read_locations(rows, image.size)
        status = {r.id: r.status for r in rows}
        claim.locations = [
            dataclasses.replace(
                loc, taken_over=status[loc.id] != PENDING_DELETE
            )
            for loc in claim.locations
        ]
        return claim

    @staticmethod
    def _image_gone_reason(deletion, image):
        if image.status != PENDING_DELETE:
            return f'the image is {image.status} (restored?)'
        if deletion_time(image) != deletion.deleted_at:
            return 'the image was restored and deleted again'
        return None

    @staticmethod
    def _newer_deletion(deletion, image):
        """The time of a deletion of ``image`` newer than ``deletion``."""
        if image.status != PENDING_DELETE:
            return None
        deleted_at = deletion_time(image)
        return deleted_at if deleted_at > deletion.deleted_at else None

    @staticmethod
    def _location_gone_reason(deletion, rows):
        if not rows:
            return 'the location is no longer pending_delete'
        if rows[0].deleted_at != deletion.deleted_at:
            # Revived by a restore and removed again: that removal has its
            # own due time; the sweep queues it.
            return 'the location was removed again since'
        return None

    def _lease_end(self, rows):
        """When the leases of claimed ``rows`` run out."""
        return max(r.updated_at for r in rows) + self._lease

    def _may_take_over(self, row, now):
        """A claimed row may be claimed again: its holder is a dead
        process of this host, or its lease is stale.  (A wrong "yes" is
        safe: a takeover never makes data revivable.)"""
        if self.process.holder_is_dead(claim_token(row.status)):
            return True
        return row.updated_at is None or row.updated_at < now - self._lease

    def _mark_shared(self, conn, claims):
        """Flag claimed locations whose data a live location points at.

        Compared by ``data_key`` (what the store would touch), not as
        strings: ``file:///d/./x`` and ``file:///d/x`` are one file.
        """
        claimed = [loc for c in claims for loc in c.locations]
        if not claimed:
            return
        live = self._live_data.keys(conn)
        for claim in claims:
            claim.locations = [
                dataclasses.replace(loc, shared=self._key_of(loc.uri) in live)
                for loc in claim.locations
            ]

    def _key_of(self, uri):
        try:
            return self.data_key(uri)
        except Exception:  # a key function must never let a delete through
            return ('unreadable', uri)

    def renew(self, token, location_ids, now=None):
        """Extend our claim; return the ids of the rows still ours.

        Called while a long batch is still deleting, so that its claim
        does not look stale to others.  Rows missing from the answer were
        taken over: they are the new holder's now (our deletes on them may
        still complete, which is why a takeover never revives data).
        """
        if not location_ids:
            return set()
        now = now or utcnow()
        ids = sorted(location_ids)
        mine = sa.and_(
            LOCATIONS.c.id.in_(ids),
            LOCATIONS.c.status == claimed_status(token),
        )
        with self.engine.begin() as conn:
            conn.execute(LOCATIONS.update().where(mine).values(updated_at=now))
            return set(
                conn.execute(sa.select(LOCATIONS.c.id).where(mine)).scalars()
            )

    def finish(self, token, results, image_ids, now=None):
        """Record the store's verdicts; one transaction.

        ``results``: ``(Location, Verdict)`` pairs of our claim; each row
        still ``scrubbing:<token>`` moves to :func:`target_status`.  Rows
        another worker took over are theirs and stay untouched.  Each of
        ``image_ids`` still ``pending_delete`` with no location left to
        scrub → ``deleted``.  Returns the ids of the images marked
        ``deleted``.
        """
        moves = {}
        for location, verdict in results:
            moves.setdefault(target_status(location, verdict), []).append(
                location.id
            )
        return db.with_deadlock_retry(
            lambda: self._finish(token, moves, image_ids, now or utcnow())
        )

    def _finish(self, token, moves, image_ids, now):
        with self.engine.begin() as conn:
            self._lock_images(conn, image_ids)
            for status, ids in sorted(moves.items()):
                conn.execute(
                    LOCATIONS.update()
                    .where(
                        LOCATIONS.c.id.in_(sorted(ids)),
                        LOCATIONS.c.status == claimed_status(token),
                    )
                    .values(status=status, updated_at=now)
                )
            if not image_ids:
                return set()
            return self._close_images(conn, image_ids, now)

    @staticmethod
    def _close_images(conn, image_ids, now):
        left = (
            sa.select(LOCATIONS.c.id)
            .where(
                LOCATIONS.c.image_id == IMAGES.c.id,
                LOCATIONS.c.deleted == sa.true(),
                _unfinished(),
            )
            .exists()
        )
        closable = set(
            conn.execute(
                sa.select(IMAGES.c.id).where(
                    IMAGES.c.id.in_(sorted(image_ids)),
                    IMAGES.c.status == PENDING_DELETE,
                    ~left,
                )
            ).scalars()
        )
        if closable:
            _finish_half_deletes(conn, closable, now)
            conn.execute(
                IMAGES.update()
                .where(
                    IMAGES.c.id.in_(sorted(closable)),
                    IMAGES.c.status == PENDING_DELETE,
                )
                .values(status=DELETED, updated_at=now)
            )
        return closable

    # -- restore -----------------------------------------------------------

    def restore(
        self, image_id, verify, deletion_window, now=None, lock_timeout=None
    ):
        """Make a pending_delete image fully usable again; one transaction.

        ``verify(locations)`` must raise if any location's data is not in
        its store; it runs while the image row is locked, so no scrub can
        start on the image in between.  Raises ImageNotFound,
        NotPendingDelete, ScrubInProgress or DataGone and then changes
        nothing.  ``lock_timeout``: seconds to wait for the row locks
        (MariaDB, PostgreSQL) before answering ScrubInProgress; an RPC
        caller gets that answer within its own timeout, instead of
        "unreachable" followed by a restore that succeeds later.
        """
        image_id = validate_image_id(image_id)
        return db.with_deadlock_retry(
            lambda: self._restore_bounded(
                image_id, verify, deletion_window, now, lock_timeout
            )
        )

    def _restore_bounded(self, image_id, verify, window, now, lock_timeout):
        try:
            with _lock_wait_bound(self.engine, lock_timeout) as conn:
                with conn.begin():
                    return self._restore(conn, image_id, verify, window, now)
        except sa_exc.OperationalError as exc:
            if _is_lock_timeout(exc):
                raise exceptions.ScrubInProgress(image_id=image_id) from exc
            raise

    def _restore(self, conn, image_id, verify, deletion_window, now):
        now = now or utcnow()
        image = self._lock_images(conn, {image_id}).get(image_id)
        if image is None:
            raise exceptions.ImageNotFound(image_id=image_id)
        if image.status != PENDING_DELETE:
            raise exceptions.NotPendingDelete(
                image_id=image_id, status=image.status
            )
        revive = self._revivable_locations(conn, image, deletion_window)
        self._check_key_kept(conn, image, deletion_window)
        locations, errors = self._read_locations(revive, image.size)
        if errors:
            raise exceptions.DataGone(
                image_id=image_id,
                reason=f'location {errors[0][0]}: {errors[0][1]}',
            )
        self._check_not_claimed_elsewhere(conn, image_id, locations)
        verify(locations)
        return self._revive(
            conn, image, [r.id for r in revive], deletion_window, now
        )

    def _revivable_locations(self, conn, image, deletion_window):
        """This deletion's location rows, all ``pending_delete``, or raise.

        A row that is ``scrubbing`` may be being deleted right now
        (ScrubInProgress); ``scrub_interrupted`` or ``deleted`` data may
        be partly gone, or go later (DataGone).  Which rows belong to the
        deletion is decided by ``deleted_at`` alone, which only Glance
        writes: a scrubber's ``updated_at`` comes from another clock, and
        trusting it once left out rows still being deleted.  So a location
        removed on purpose and scrubbed within ``deletion_window`` before
        the delete makes the restore refuse: the safe side.
        """
        rows = self._deletion_locations(conn, image, deletion_window)
        if any(is_claimed(r.status) for r in rows):
            raise exceptions.ScrubInProgress(image_id=image.id)
        interrupted = [r for r in rows if r.status == INTERRUPTED]
        if interrupted:
            raise exceptions.DataGone(
                image_id=image.id,
                reason=f'a scrub of {len(interrupted)} of its {len(rows)} '
                'locations was interrupted: their data may be partly '
                'deleted, or deleted later',
            )
        gone = [r for r in rows if r.status == DELETED]
        if gone:
            raise exceptions.DataGone(
                image_id=image.id,
                reason=f'{len(gone)} of its {len(rows)} locations were '
                'already scrubbed',
            )
        if not rows:
            raise exceptions.DataGone(
                image_id=image.id, reason='it has no location left'
            )
        return rows

    def _check_key_kept(self, conn, image, deletion_window):
        """Refuse an encrypted image whose key Glance deleted with it.

        With ``cinder_encryption_key_deletion_policy = on_image_deletion``
        Glance deletes the image's encryption key (Barbican) during the
        DELETE: its data can never be read again.
        """
        props = PROPERTIES
        query = sa.select(props.c.name, props.c.value).where(
            self._in_deletion(props, image, deletion_window),
            props.c.name.in_(
                [
                    'cinder_encryption_key_id',
                    'cinder_encryption_key_deletion_policy',
                ]
            ),
        )
        found = dict(conn.execute(query).all())
        if found.get('cinder_encryption_key_id') and (
            found.get('cinder_encryption_key_deletion_policy')
            == 'on_image_deletion'
        ):
            raise exceptions.DataGone(
                image_id=image.id,
                reason='Glance deleted its encryption key with it '
                '(cinder_encryption_key_deletion_policy = on_image_deletion)',
            )

    def _check_not_claimed_elsewhere(self, conn, image_id, locations):
        """Refuse if another image's scrub may delete the same data.

        Two images can point at one data object (compared by
        ``data_key``).  If a scrub of the other image claimed its row,
        or was interrupted on it, the data may be deleted: reviving ours
        would leave an active image without data.  We lock the other
        images' rows, as a claim does: a claim of them in flight finishes
        first (then we see ``scrubbing``), and a claim that comes after
        waits for our commit (then it sees our live row and keeps the
        data, see _mark_shared).  Only image rows are locked (by primary
        key): a FOR UPDATE on the unindexed URL column would lock the
        whole table.
        """
        keys = {self._key_of(loc.uri) for loc in locations}
        sharing = {
            row.image_id for row in self._rows_naming(conn, image_id, keys)
        }
        if not sharing:
            return
        self._lock_images(conn, sharing)
        for row in self._rows_naming(conn, image_id, keys):
            if is_claimed(row.status):
                raise exceptions.ScrubInProgress(image_id=image_id)
            if row.status == INTERRUPTED:
                raise exceptions.DataGone(
                    image_id=image_id,
                    reason=f'image {row.image_id} names the same data and '
                    'its scrub was interrupted',
                )

    def _rows_naming(self, conn, image_id, keys):
        """Other images' rows that a scrub could hold, naming ``keys``.

        Every such row is read (decrypted where URLs are encrypted) and
        compared by data key: slower than a string match in SQL, but a
        restore is rare and must not miss ``file:///d/./x`` for
        ``file:///d/x``.
        """
        query = sa.select(
            LOCATIONS.c.image_id, LOCATIONS.c.value, LOCATIONS.c.status
        ).where(
            LOCATIONS.c.image_id != image_id,
            LOCATIONS.c.deleted == sa.true(),
            _unfinished(),
        )
        for row in conn.execute(query):
            try:
                uri = self.location_uri(row.value)
            except exceptions.CorruptLocation:
                continue
            if self._key_of(uri) in keys:
                yield row

    @staticmethod
    def _in_deletion(table, image, deletion_window):
        """Rows soft-deleted as part of the image's deletion.

        One DELETE request of glance-api 33 soft-deletes, each with its own
        timestamp, in this order: the locations (pending_delete, each in
        its own transaction), the properties (purged by image_update, ~20
        ms before the image), then the image with its tags and members
        (the image's deleted_at, exactly).  So tags and members are this
        deletion's when their deleted_at is the image's; locations and
        properties when deleted within ``deletion_window`` before the
        image.  Rows deleted earlier were removed on purpose from the
        live image and stay removed.  Nothing soft-deletes rows of a
        ``pending_delete`` image afterwards, so there is no upper bound
        (a half-finished delete's properties may carry a time a few ms
        after the image's ``updated_at``).
        """
        if table.name in ('image_tags', 'image_members'):
            return sa.and_(
                table.c.image_id == image.id,
                table.c.deleted == sa.true(),
                table.c.deleted_at == image.deleted_at,
            )
        window = datetime.timedelta(seconds=deletion_window)
        return sa.and_(
            table.c.image_id == image.id,
            table.c.deleted == sa.true(),
            table.c.deleted_at >= deletion_time(image) - window,
        )

    def _deletion_locations(self, conn, image, deletion_window):
        query = (
            sa.select(LOCATIONS)
            .where(self._in_deletion(LOCATIONS, image, deletion_window))
            .order_by(LOCATIONS.c.id)
            .with_for_update()
        )
        return conn.execute(query).all()

    def _revive(self, conn, image, location_ids, deletion_window, now):
        conn.execute(
            LOCATIONS.update()
            .where(
                LOCATIONS.c.id.in_(location_ids),
                LOCATIONS.c.status == PENDING_DELETE,
            )
            .values(
                status=ACTIVE, deleted=False, deleted_at=None, updated_at=now
            )
        )
        conn.execute(
            IMAGES.update()
            .where(IMAGES.c.id == image.id, IMAGES.c.status == PENDING_DELETE)
            .values(
                status=ACTIVE, deleted=False, deleted_at=None, updated_at=now
            )
        )
        counts = [
            conn.execute(
                table.update()
                .where(self._in_deletion(table, image, deletion_window))
                .values(deleted=False, deleted_at=None, updated_at=now)
            ).rowcount
            for table in CHILD_TABLES
        ]
        return RestoreResult(
            image.id,
            len(location_ids),
            *counts,
            deleted_at=deletion_time(image),
        )


def _finish_half_deletes(conn, image_ids, now):
    """Do what Glance's image_destroy never did for a half-finished delete.

    Its image row is still ``deleted = 0`` (the API would list it as a
    ``deleted`` image) and its tags and members live: soft-delete them
    now, as the second transaction would have.
    """
    half = sorted(
        conn.execute(
            sa.select(IMAGES.c.id).where(
                IMAGES.c.id.in_(sorted(image_ids)),
                IMAGES.c.deleted == sa.false(),
            )
        ).scalars()
    )
    if not half:
        return
    soft_deleted = {'deleted': True, 'deleted_at': now, 'updated_at': now}
    for table in CHILD_TABLES[1:]:  # tags, members
        conn.execute(
            table.update()
            .where(table.c.image_id.in_(half), table.c.deleted == sa.false())
            .values(**soft_deleted)
        )
    conn.execute(
        IMAGES.update().where(IMAGES.c.id.in_(half)).values(**soft_deleted)
    )


@contextlib.contextmanager
def _lock_wait_bound(engine, seconds):
    """A connection whose row-lock waits give up after ``seconds``.

    MariaDB: the session's innodb_lock_wait_timeout (whole seconds), put
    back before the connection returns to the pool.  PostgreSQL:
    lock_timeout, set per transaction by the caller's first statement.
    SQLite waits for its write lock at BEGIN, bounded by the busy timeout
    (:data:`scrub_listener.db.SQLITE_BUSY_TIMEOUT`).
    """
    with engine.connect() as conn:
        dialect = engine.dialect.name
        if seconds is None or dialect == 'sqlite':
            yield conn
            return
        if dialect == 'postgresql':
            ms = max(1, int(seconds * 1000))
            conn.exec_driver_sql(f"SET lock_timeout = '{ms}ms'")
            conn.commit()
            try:
                yield conn
            finally:
                conn.exec_driver_sql('SET lock_timeout = DEFAULT')
                conn.commit()
            return
        conn.exec_driver_sql(
            f'SET SESSION innodb_lock_wait_timeout = {max(1, round(seconds))}'
        )
        conn.commit()
        try:
            yield conn
        finally:
            conn.exec_driver_sql(
                'SET SESSION innodb_lock_wait_timeout = DEFAULT'
            )
            conn.commit()


def _is_lock_timeout(exc):
    text = str(getattr(exc, 'orig', exc)).lower()
    return any(
        marker in text
        for marker in (
            'lock wait timeout',
            'lock timeout',
            'database is locked',
        )
    )


_LIVE_FINGERPRINT = sa.select(
    sa.func.count(),
    sa.func.coalesce(sa.func.sum(LOCATIONS.c.id), 0),
    sa.func.max(LOCATIONS.c.id),
    sa.func.max(LOCATIONS.c.updated_at),
    sa.func.coalesce(sa.func.sum(sa.func.length(LOCATIONS.c.value)), 0),
).where(LOCATIONS.c.deleted == sa.false())


def _plain_key(uri):
    """The default data key: the URI itself (tests without stores)."""
    return uri


class _LiveDataIndex:
    """The data keys of every live location, for the shared-data check.

    "Does a live location point at this data?" cannot be asked in SQL:
    URLs are compared by what they name (``data_key``), and with
    ``metadata_encryption_key`` the same URL never encrypts the same way.
    So the ``(id, value)`` of every live row is read and keyed (decrypting,
    resolving paths), each ``(id, value)`` once per process, from a cache.

    Reading 100,000 live rows for every claimed batch is what made a
    sweep 3× slower, so each claim first asks the database for a
    fingerprint of the live rows (count, sum and max of the ids, newest
    ``updated_at``, total URL length; one aggregate, computed by the
    server) and reads the rows again only when it changed.  No watermark,
    no time margin: a row inserted out of order or revived by a restore
    changes the count or the id sum, whatever its timestamps.
    """

    def __init__(self, glance_db):
        self._db = glance_db
        self._lock = threading.Lock()
        self._cache = {}  # location id -> (value, key)
        self._fingerprint = None
        self._keys = frozenset()

    def warm(self, engine):
        """Fill an empty cache outside any transaction.

        The first fill keys every live row (a realpath each for files);
        later claims key only the few rows added since, under the locks.
        """
        if self._cache:
            return
        with engine.connect() as conn:
            self.keys(conn)

    def keys(self, conn):
        """The set of data keys live locations name, read in ``conn``."""
        fingerprint = tuple(conn.execute(_LIVE_FINGERPRINT).one())
        with self._lock:
            if fingerprint == self._fingerprint:
                return self._keys
        rows = conn.execute(
            sa.select(LOCATIONS.c.id, LOCATIONS.c.value).where(
                LOCATIONS.c.deleted == sa.false()
            )
        ).all()
        with self._lock:
            fresh = {}
            for row in rows:
                cached = self._cache.get(row.id)
                if cached is None or cached[0] != row.value:
                    cached = (row.value, self._key(row.value))
                fresh[row.id] = cached
            self._cache = fresh
            self._keys = frozenset(key for _, key in fresh.values())
            self._fingerprint = fingerprint
            return self._keys

    def _key(self, value):
        try:
            uri = self._db.location_uri(value)
        except exceptions.CorruptLocation:
            # Unreadable live row: it cannot match, and cannot be scrubbed.
            return ('corrupt', value)
        return self._db._key_of(uri)
