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
"this image's data is being scrubbed" versus "this image is being restored"
is settled here, by row locks, in one transaction each:

* **claim** (scrubber): lock the image rows (``SELECT ... FOR UPDATE`` in
  id order), re-check each image is still ``pending_delete`` *for the same
  deletion* (same ``deleted_at``), lock its locations, and move the
  ``pending_delete`` ones to ``scrubbing``.  Commit.  Only then is data
  deleted from the store, outside any transaction.
* **finish** (scrubber): lock the same image rows, move our ``scrubbing``
  locations to ``deleted`` (or back to ``pending_delete`` when the store
  failed), and the image to ``deleted`` when none of its locations is
  left ``pending_delete``/``scrubbing``.
* **restore**: lock the image row, refuse unless it is ``pending_delete``
  and every location of that deletion is still ``pending_delete`` (none
  ``scrubbing``, none ``deleted``), check the data is in the store, then
  flip image, locations, properties, tags and members back.  Commit.

Interleavings: claim and restore both lock the image row first, so one
waits for the other.  Restore first: the image is ``active`` when the
claim re-checks it, nothing is claimed (this is also how a late
``image.delete`` event for a restored image is dropped).  Claim first: the
locations are ``scrubbing``, restore refuses with ScrubInProgress and the
data is deleted; it is never revived while a delete may be in flight.
A new deletion after a restore has a new ``deleted_at``, so a queue entry
for the old deletion never scrubs the new one early.  A worker that
crashes after claiming leaves ``scrubbing`` rows; after ``lease_time``
they are stale and any worker may claim them again (store deletes are
idempotent: NotFound means gone).  A claim is fenced by its stamp (the
``updated_at`` it wrote, whole seconds): a live worker renews it every
``lease_time / 3`` while its batch runs, and ``finish`` moves only rows
still carrying its latest stamp, so a worker whose claim was taken over
can never hand rows back to ``pending_delete`` (and to a restore) while
the new owner deletes their data.  Two images may share one URL: a claim
keeps data a live location still uses, and a restore locks the other
images first and refuses while one of their rows is ``scrubbing``.
``scrubbing`` is not a Glance status; Glance only ever reads non-deleted
locations, so it never sees it.
"""

import base64
import collections
import dataclasses
import datetime
import json
import logging
import re
import threading
import uuid

import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers import modes

from scrub_listener import db
from scrub_listener import exceptions

LOG = logging.getLogger(__name__)

PENDING_DELETE = 'pending_delete'
SCRUBBING = 'scrubbing'
DELETED = 'deleted'
ACTIVE = 'active'

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


def _child_table(name):
    return sa.Table(
        name,
        _META,
        sa.Column('id', sa.Integer, primary_key=True),
        sa.Column('image_id', sa.String(36)),
        sa.Column('deleted', sa.Boolean(create_constraint=False)),
        sa.Column('deleted_at', sa.DateTime),
        sa.Column('updated_at', sa.DateTime),
    )


# Soft-deleted by Glance's image_destroy with the image's deleted_at.
CHILD_TABLES = tuple(
    _child_table(name)
    for name in ('image_properties', 'image_tags', 'image_members')
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
    # (location id, reason) of rows that cannot be read.
    errors: list = dataclasses.field(default_factory=list)
    size: int | None = None
    # The claim's fencing token: the ``updated_at`` our ``scrubbing``
    # rows carry.  Whole seconds, so it compares equal on every backend
    # (MariaDB's DATETIME has no fraction).
    stamp: datetime.datetime | None = None


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


def validate_image_id(image_id):
    """Glance image ids are UUIDs; refuse anything else before any query."""
    try:
        uuid.UUID(str(image_id))
    except (TypeError, ValueError, AttributeError):
        raise exceptions.InvalidImageId(image_id=image_id) from None
    if len(str(image_id)) > 36:
        raise exceptions.InvalidImageId(image_id=image_id)
    return str(image_id)


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


def _stamp(when):
    return when.replace(microsecond=0)


class GlanceDB:
    """Reads and moves Glance's image and location rows."""

    def __init__(self, engine, encryption_key=None, lease_time=600):
        self.engine = engine
        self._key = encryption_key
        self._lease = datetime.timedelta(seconds=lease_time)
        self._live_urls = _LiveUrlIndex(self) if encryption_key else None

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
            sa.select(IMAGES.c.id, IMAGES.c.deleted_at)
            .where(
                IMAGES.c.status == PENDING_DELETE,
                IMAGES.c.deleted == sa.true(),
                IMAGES.c.deleted_at <= deleted_before,
            )
            .order_by(IMAGES.c.id)
            .limit(page_size)
        )
        yield from self._pages(
            query,
            IMAGES.c.id,
            lambda row: Deletion(row.id, None, row.deleted_at),
        )

    def iter_due_removed_locations(self, deleted_before, page_size):
        """Yield pages of Deletions of locations removed from live images.

        A location row in ``pending_delete`` whose image is not
        ``pending_delete`` (PATCH remove, DELETE /v2/stores/...).  Also
        finds ``scrubbing`` rows whose claim went stale (crashed worker).
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
                    LOCATIONS.c.status == PENDING_DELETE,
                    sa.and_(
                        LOCATIONS.c.status == SCRUBBING,
                        LOCATIONS.c.updated_at < stale_before,
                    ),
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
        query = sa.select(IMAGES.c.id, IMAGES.c.deleted_at).where(
            IMAGES.c.id.in_(list(image_ids)),
            IMAGES.c.status == PENDING_DELETE,
        )
        with self.engine.connect() as conn:
            return {row.id: row.deleted_at for row in conn.execute(query)}

    def iter_pending_images(
        self, page_size=500, owner=None, name=None, deleted_since=None
    ):
        """Yield every pending_delete image (due or not), for listings."""
        loc_count = (
            sa.select(sa.func.count())
            .where(
                LOCATIONS.c.image_id == IMAGES.c.id,
                LOCATIONS.c.status.in_([PENDING_DELETE, SCRUBBING]),
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
                IMAGES.c.deleted_at,
                loc_count.label('locations'),
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
            query = query.where(IMAGES.c.deleted_at >= deleted_since)
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
            and row.status == PENDING_DELETE
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

    # -- claim / finish (see the module docstring) -------------------------

    def claim(self, deletions, now=None):
        """Claim the locations of ``deletions``; one transaction.

        Returns one :class:`Claim` per Deletion, in order.
        """
        return db.with_deadlock_retry(lambda: self._claim(deletions, now))

    def _claim(self, deletions, now):
        now = _stamp(now or utcnow())
        stale_before = now - self._lease
        with self.engine.begin() as conn:
            images = self._lock_images(conn, {d.image_id for d in deletions})
            rows = conn.execute(
                self._locations_query(deletions).with_for_update()
            ).all()
            by_image = {}
            for row in rows:
                by_image.setdefault(row.image_id, []).append(row)
            claims = [
                self._decide(d, images.get(d.image_id), by_image, stale_before)
                for d in deletions
            ]
            self._mark_shared(conn, claims)
            for claim in claims:
                claim.stamp = now
            claimed = [loc.id for c in claims for loc in c.locations]
            if claimed:
                conn.execute(
                    LOCATIONS.update()
                    .where(LOCATIONS.c.id.in_(claimed))
                    .values(status=SCRUBBING, updated_at=now)
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
                LOCATIONS.c.status.in_([PENDING_DELETE, SCRUBBING]),
            )
            .order_by(LOCATIONS.c.id)
        )

    def _decide(self, deletion, image, by_image, stale_before):
        claim = Claim(deletion)
        if image is None:
            claim.skip_reason = 'the image row no longer exists'
            return claim
        claim.size = image.size
        rows = by_image.get(deletion.image_id, [])
        if deletion.location_id is None:
            if image.status != PENDING_DELETE:
                claim.skip_reason = f'the image is {image.status} (restored?)'
                return claim
            if image.deleted_at != deletion.deleted_at:
                claim.skip_reason = 'the image was restored and deleted again'
                if image.deleted_at > deletion.deleted_at:
                    claim.superseded_by = image.deleted_at
                return claim
        else:
            rows = [r for r in rows if r.id == deletion.location_id]
            if not rows:
                claim.skip_reason = 'the location is no longer pending_delete'
                return claim
            if rows[0].deleted_at != deletion.deleted_at:
                # Revived by a restore and removed again: that removal has
                # its own due time; the sweep queues it.
                claim.skip_reason = 'the location was removed again since'
                return claim
        if any(
            r.status == SCRUBBING and r.updated_at >= stale_before
            for r in rows
        ):
            claim.busy = True
            return claim
        claim.locations, claim.errors = self._read_locations(rows, image.size)
        return claim

    def _mark_shared(self, conn, claims):
        """Flag claimed locations whose data a live location points at."""
        uris = {loc.uri for c in claims for loc in c.locations}
        if not uris:
            return
        if self._live_urls is not None:
            shared = self._live_urls.shared(conn, uris)
        else:
            query = sa.select(LOCATIONS.c.value).where(
                LOCATIONS.c.deleted == sa.false(),
                LOCATIONS.c.value.in_(sorted(uris)),
            )
            shared = set(conn.execute(query).scalars())
        if not shared:
            return
        for claim in claims:
            claim.locations = [
                dataclasses.replace(loc, shared=loc.uri in shared)
                for loc in claim.locations
            ]

    def renew(self, location_ids, stamp, now=None):
        """Extend our claim on ``scrubbing`` rows; return the new stamp.

        Called while a long batch is still deleting, so that its claim
        never looks stale to another worker.  Rows whose stamp is no
        longer ``stamp`` were taken over and stay with their new owner.
        """
        new = _stamp(now or utcnow())
        if new == stamp or not location_ids:
            return stamp
        with self.engine.begin() as conn:
            conn.execute(
                LOCATIONS.update()
                .where(
                    LOCATIONS.c.id.in_(sorted(location_ids)),
                    LOCATIONS.c.status == SCRUBBING,
                    LOCATIONS.c.updated_at == stamp,
                )
                .values(updated_at=new)
            )
        return new

    def finish(self, done_ids, failed_ids, image_ids, stamp, now=None):
        """Record the store's verdicts; one transaction.

        ``done_ids``: our ``scrubbing`` locations whose data is gone (or
        kept because shared) → ``deleted``.  ``failed_ids`` → back to
        ``pending_delete`` for a later retry.  Only rows still carrying
        our claim's ``stamp`` move: a claim another worker took over
        (after lease_time) is theirs to finish, never handed back by us
        while they may be deleting.  Each of ``image_ids`` still
        ``pending_delete`` with no location left to scrub → ``deleted``.
        Returns the ids of the images marked ``deleted``.
        """
        return db.with_deadlock_retry(
            lambda: self._finish(done_ids, failed_ids, image_ids, stamp, now)
        )

    def _finish(self, done_ids, failed_ids, image_ids, stamp, now):
        now = now or utcnow()
        with self.engine.begin() as conn:
            self._lock_images(conn, image_ids)
            for ids, status in ((done_ids, DELETED), (failed_ids, None)):
                if ids:
                    conn.execute(
                        LOCATIONS.update()
                        .where(
                            LOCATIONS.c.id.in_(sorted(ids)),
                            LOCATIONS.c.status == SCRUBBING,
                            LOCATIONS.c.updated_at == stamp,
                        )
                        .values(
                            status=status or PENDING_DELETE, updated_at=now
                        )
                    )
            if not image_ids:
                return set()
            left = (
                sa.select(LOCATIONS.c.id)
                .where(
                    LOCATIONS.c.image_id == IMAGES.c.id,
                    LOCATIONS.c.status.in_([PENDING_DELETE, SCRUBBING]),
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

    def restore(self, image_id, verify, deletion_window, now=None):
        """Make a pending_delete image fully usable again; one transaction.

        ``verify(locations)`` must raise if any location's data is not in
        its store; it runs while the image row is locked, so no scrub can
        start on the image in between.  Raises ImageNotFound,
        NotPendingDelete, ScrubInProgress or DataGone and then changes
        nothing.
        """
        image_id = validate_image_id(image_id)
        return db.with_deadlock_retry(
            lambda: self._restore(image_id, verify, deletion_window, now)
        )

    def _restore(self, image_id, verify, deletion_window, now):
        now = now or utcnow()
        with self.engine.begin() as conn:
            image = self._lock_images(conn, {image_id}).get(image_id)
            if image is None:
                raise exceptions.ImageNotFound(image_id=image_id)
            if image.status != PENDING_DELETE:
                raise exceptions.NotPendingDelete(
                    image_id=image_id, status=image.status
                )
            rows = [
                r
                for r in self._deletion_locations(conn, image, deletion_window)
                if r.status == PENDING_DELETE
                or r.updated_at >= image.deleted_at
            ]
            # (rows scrubbed or claimed before the image was deleted were
            # removed from the live image, they are not this deletion's)
            if any(r.status == SCRUBBING for r in rows):
                raise exceptions.ScrubInProgress(image_id=image_id)
            gone = [r for r in rows if r.status == DELETED]
            revive = [r for r in rows if r.status == PENDING_DELETE]
            if gone:
                raise exceptions.DataGone(
                    image_id=image_id,
                    reason=f'{len(gone)} of its {len(rows)} locations were '
                    'already scrubbed',
                )
            if not revive:
                raise exceptions.DataGone(
                    image_id=image_id, reason='it has no location left'
                )
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

    def _check_not_claimed_elsewhere(self, conn, image_id, locations):
        """Refuse if another image's scrub holds the same data.

        Two images can point at one URL.  If a scrub of the other image
        claimed its row, the data is being deleted: reviving ours would
        leave an active image without data.  We lock the other images'
        rows, as a claim does: a claim of them in flight finishes first
        (then we see ``scrubbing``), and a claim that comes after waits
        for our commit (then it sees our live row and keeps the data, see
        _mark_shared).  Only image rows are locked (by primary key): a
        FOR UPDATE on the unindexed URL column would lock the whole table.
        """
        uris = {loc.uri for loc in locations}
        sharing = {
            row.image_id for row in self._rows_with_uris(conn, image_id, uris)
        }
        if not sharing:
            return
        self._lock_images(conn, sharing)
        for row in self._rows_with_uris(conn, image_id, uris):
            if row.status == SCRUBBING:
                raise exceptions.ScrubInProgress(image_id=image_id)

    def _rows_with_uris(self, conn, image_id, uris):
        """Other images' location rows with one of ``uris`` (plain read).

        With encryption the same URL never encrypts the same way, so every
        row a scrub could claim (``pending_delete``) or holds
        (``scrubbing``) is decrypted and compared: slower, but a restore
        is rare and must not race a claim still in flight.
        """
        query = sa.select(
            LOCATIONS.c.image_id, LOCATIONS.c.value, LOCATIONS.c.status
        ).where(LOCATIONS.c.image_id != image_id)
        if self._key is None:
            query = query.where(LOCATIONS.c.value.in_(sorted(uris)))
        else:
            query = query.where(
                LOCATIONS.c.status.in_([PENDING_DELETE, SCRUBBING])
            )
        for row in conn.execute(query):
            try:
                if self.location_uri(row.value) not in uris:
                    continue
            except exceptions.CorruptLocation:
                continue
            yield row

    @staticmethod
    def _in_deletion(table, image, deletion_window):
        """Rows soft-deleted as part of the image's deletion.

        One DELETE request of glance-api 33 soft-deletes, each with its own
        timestamp, in this order: the locations (pending_delete), the
        properties (purged by image_update, ~20 ms before the image), then
        the image with its tags and members (the image's deleted_at).
        So "part of this deletion" is "deleted within deletion_window
        before the image".  Rows deleted earlier were removed on purpose
        from the live image and stay removed.
        """
        since = image.deleted_at - datetime.timedelta(seconds=deletion_window)
        return sa.and_(
            table.c.image_id == image.id,
            table.c.deleted == sa.true(),
            table.c.deleted_at >= since,
            table.c.deleted_at <= image.deleted_at,
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
            image.id, len(location_ids), *counts, deleted_at=image.deleted_at
        )


class _LiveUrlIndex:
    """Decrypted URLs of live locations, when URLs are encrypted.

    With ``metadata_encryption_key`` the same URL encrypts differently each
    time (random IV), so "does a live location point at this data?" cannot
    be asked in SQL.  We keep an index of decrypted live URLs, refreshed
    incrementally, and confirm every hit against the current row before
    trusting it.

    Incremental by a watermark (highest id, newest ``updated_at``), but
    rows commit out of order: a row whose id is below one already seen may
    commit later, and ``updated_at`` is stamped before the commit.  So each
    refresh re-reads the last ID_MARGIN ids and the rows updated within
    TIME_MARGIN of the newest seen: far more than glance-api ever has in
    flight at once, and cheap.
    """

    ID_MARGIN = 1000
    TIME_MARGIN = datetime.timedelta(seconds=120)

    def __init__(self, glance_db):
        self._db = glance_db
        self._lock = threading.Lock()
        self._url_by_id = {}
        self._ids_by_url = collections.defaultdict(set)
        self._max_id = None
        self._newest = None

    def shared(self, conn, uris):
        with self._lock:
            self._refresh(conn)
            hits = set()
            for uri in uris:
                hits |= self._ids_by_url.get(uri, set())
        if not hits:
            return set()
        rows = conn.execute(
            sa.select(LOCATIONS.c.id, LOCATIONS.c.value).where(
                LOCATIONS.c.id.in_(sorted(hits)),
                LOCATIONS.c.deleted == sa.false(),
            )
        ).all()
        return {self._decrypt(row.value) for row in rows} & uris

    def _refresh(self, conn):
        query = sa.select(
            LOCATIONS.c.id,
            LOCATIONS.c.value,
            LOCATIONS.c.deleted,
            LOCATIONS.c.updated_at,
        )
        if self._max_id is not None:
            changed = LOCATIONS.c.id > self._max_id - self.ID_MARGIN
            if self._newest is not None:
                changed = sa.or_(
                    changed,
                    LOCATIONS.c.updated_at >= self._newest - self.TIME_MARGIN,
                )
            query = query.where(changed)
        for row in conn.execute(query):
            self._max_id = max(self._max_id or 0, row.id)
            if row.updated_at and (
                self._newest is None or row.updated_at > self._newest
            ):
                self._newest = row.updated_at
            self._forget(row.id)
            if not row.deleted:
                url = self._decrypt(row.value)
                self._url_by_id[row.id] = url
                self._ids_by_url[url].add(row.id)
        if self._max_id is None:
            self._max_id = 0  # empty table: next time, only new rows

    def _forget(self, location_id):
        url = self._url_by_id.pop(location_id, None)
        if url is not None:
            ids = self._ids_by_url[url]
            ids.discard(location_id)
            if not ids:
                del self._ids_by_url[url]

    def _decrypt(self, value):
        try:
            return self._db.location_uri(value)
        except exceptions.CorruptLocation:
            return None
