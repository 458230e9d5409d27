"""Restore: make a pending_delete image fully usable again, or refuse.

One transaction that locks the image rows as a claim does, so a scrub
and a restore of the same image never interleave (the package docstring
says why that is enough).  The image, the locations of that deletion,
and the properties, tags and members Glance soft-deleted with it come
back; glance-scrubber's restore only flipped the image status.
"""

import contextlib
import datetime

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from scrub_listener import db
from scrub_listener import exceptions
from scrub_listener import model
from scrub_listener.glance_db import tables

IMAGES = tables.IMAGES
LOCATIONS = tables.LOCATIONS
PROPERTIES = tables.PROPERTIES


class Restores:
    """The restore transaction and the checks that guard it."""

    def __init__(self, engine, decoder, now):
        self._engine = engine
        self._decoder = decoder
        self._now = now

    def restore(
        self, image_id, verify, deletion_window, now=None, lock_timeout=None
    ):
        """Revive ``image_id``; see :meth:`GlanceDB.restore`."""
        image_id = model.validate_image_id(image_id)
        return db.with_deadlock_retry(
            lambda: self._restore_bounded(
                image_id, verify, deletion_window, now, lock_timeout
            )
        )

    def _restore_bounded(self, image_id, verify, window, now, lock_timeout):
        try:
            with _lock_wait_bound(self._engine, lock_timeout) as conn:
                with conn.begin():
                    return self._restore(conn, image_id, verify, window, now)
        except sa_exc.OperationalError as exc:
            if _is_lock_timeout(exc):
                raise exceptions.ScrubInProgress(image_id=image_id) from exc
            raise

    def _restore(self, conn, image_id, verify, deletion_window, now):
        now = now or self._now()
        image = tables.lock_images(conn, {image_id}).get(image_id)
        if image is None:
            raise exceptions.ImageNotFound(image_id=image_id)
        if image.status != model.PENDING_DELETE:
            raise exceptions.NotPendingDelete(
                image_id=image_id, status=image.status
            )
        revive = _revivable_locations(conn, image, deletion_window)
        _check_key_kept(conn, image, deletion_window)
        locations, errors = self._decoder.locations(revive, image.size)
        if errors:
            raise exceptions.DataGone(
                image_id=image_id,
                reason=f'location {errors[0][0]}: {errors[0][1]}',
            )
        self._check_not_claimed_elsewhere(conn, image_id, locations)
        verify(locations)
        return _revive(
            conn, image, [r.id for r in revive], deletion_window, now
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
        keys = {self._decoder.key_of(loc.uri) for loc in locations}
        sharing = {
            row.image_id for row in self._rows_naming(conn, image_id, keys)
        }
        if not sharing:
            return
        tables.lock_images(conn, sharing)
        for row in self._rows_naming(conn, image_id, keys):
            if model.is_claimed(row.status):
                raise exceptions.ScrubInProgress(image_id=image_id)
            if row.status == model.INTERRUPTED:
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
            tables.unfinished(),
        )
        for row in conn.execute(query):
            try:
                uri = self._decoder.uri(row.value)
            except exceptions.CorruptLocation:
                continue
            if self._decoder.key_of(uri) in keys:
                yield row


def _revivable_locations(conn, image, deletion_window):
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
    rows = _deletion_locations(conn, image, deletion_window)
    if any(model.is_claimed(r.status) for r in rows):
        raise exceptions.ScrubInProgress(image_id=image.id)
    interrupted = [r for r in rows if r.status == model.INTERRUPTED]
    if interrupted:
        raise exceptions.DataGone(
            image_id=image.id,
            reason=f'a scrub of {len(interrupted)} of its {len(rows)} '
            'locations was interrupted: their data may be partly '
            'deleted, or deleted later',
        )
    gone = [r for r in rows if r.status == model.DELETED]
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


def _check_key_kept(conn, image, deletion_window):
    """Refuse an encrypted image whose key Glance deleted with it.

    With ``cinder_encryption_key_deletion_policy = on_image_deletion``
    Glance deletes the image's encryption key (Barbican) during the
    DELETE: its data can never be read again.
    """
    props = PROPERTIES
    query = sa.select(props.c.name, props.c.value).where(
        in_deletion(props, image, deletion_window),
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


def in_deletion(table, image, deletion_window):
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
        table.c.deleted_at >= model.deletion_time(image) - window,
    )


def _deletion_locations(conn, image, deletion_window):
    query = (
        sa.select(LOCATIONS)
        .where(in_deletion(LOCATIONS, image, deletion_window))
        .order_by(LOCATIONS.c.id)
        .with_for_update()
    )
    return conn.execute(query).all()


def _revive(conn, image, location_ids, deletion_window, now):
    conn.execute(
        LOCATIONS.update()
        .where(
            LOCATIONS.c.id.in_(location_ids),
            LOCATIONS.c.status == model.PENDING_DELETE,
        )
        .values(
            status=model.ACTIVE, deleted=False, deleted_at=None, updated_at=now
        )
    )
    conn.execute(
        IMAGES.update()
        .where(
            IMAGES.c.id == image.id, IMAGES.c.status == model.PENDING_DELETE
        )
        .values(
            status=model.ACTIVE, deleted=False, deleted_at=None, updated_at=now
        )
    )
    counts = [
        conn.execute(
            table.update()
            .where(in_deletion(table, image, deletion_window))
            .values(deleted=False, deleted_at=None, updated_at=now)
        ).rowcount
        for table in tables.CHILD_TABLES
    ]
    return model.RestoreResult(
        image.id,
        len(location_ids),
        *counts,
        deleted_at=model.deletion_time(image),
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
