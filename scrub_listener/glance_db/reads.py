"""Reads of the Glance database that change nothing.

What is due (for the sweep), when images were deleted (for the
notification endpoint), what is pending (for ``list``) and what a
deletion would scrub (for ``--dry-run``).  Every read is keyset-paged on
a primary key, so memory does not grow with the backlog and a page is a
cheap index range scan.
"""

import sqlalchemy as sa

from scrub_listener import model
from scrub_listener.glance_db import tables

IMAGES = tables.IMAGES
LOCATIONS = tables.LOCATIONS


class Reads:
    """The read-only queries; see the module docstring."""

    def __init__(self, engine, decoder, lease, now=model.utcnow):
        self._engine = engine
        self._decoder = decoder
        self._lease = lease
        self._now = now

    def iter_due_images(self, deleted_before, page_size):
        """Yield pages of Deletions of pending_delete images.

        Every visibility, community included, and Glance's half-finished
        deletes (see :func:`scrub_listener.model.deletion_time`).
        """
        query = (
            sa.select(IMAGES.c.id, IMAGES.c.deleted_at, IMAGES.c.updated_at)
            .where(
                IMAGES.c.status == model.PENDING_DELETE,
                sa.or_(
                    sa.and_(
                        IMAGES.c.deleted == sa.true(),  # indexed
                        IMAGES.c.deleted_at <= deleted_before,
                    ),
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
            lambda row: model.Deletion(row.id, None, model.deletion_time(row)),
        )

    def iter_due_removed_locations(self, deleted_before, page_size):
        """Yield pages of Deletions of locations removed from live images.

        A location row in ``pending_delete`` whose image is not
        ``pending_delete`` (PATCH remove, DELETE /v2/stores/...).  Also
        finds ``scrub_interrupted`` rows, and ``scrubbing`` rows whose
        claim went stale (crashed worker).
        """
        stale_before = self._now() - self._lease
        query = (
            sa.select(
                LOCATIONS.c.id, LOCATIONS.c.image_id, LOCATIONS.c.deleted_at
            )
            .select_from(
                LOCATIONS.join(IMAGES, IMAGES.c.id == LOCATIONS.c.image_id)
            )
            .where(
                IMAGES.c.status != model.PENDING_DELETE,
                LOCATIONS.c.deleted == sa.true(),  # indexed
                LOCATIONS.c.deleted_at <= deleted_before,
                sa.or_(
                    LOCATIONS.c.status.in_(
                        [model.PENDING_DELETE, model.INTERRUPTED]
                    ),
                    sa.and_(
                        tables.claimed(), LOCATIONS.c.updated_at < stale_before
                    ),
                ),
            )
            .order_by(LOCATIONS.c.id)
            .limit(page_size)
        )
        yield from self._pages(
            query,
            LOCATIONS.c.id,
            lambda row: model.Deletion(row.image_id, row.id, row.deleted_at),
        )

    def _pages(self, query, key_column, make):
        marker = None
        while True:
            page_query = query
            if marker is not None:
                page_query = query.where(key_column > marker)
            with self._engine.connect() as conn:
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
            IMAGES.c.id.in_(sorted(image_ids)),
            IMAGES.c.status == model.PENDING_DELETE,
        )
        with self._engine.connect() as conn:
            return {
                row.id: model.deletion_time(row) for row in conn.execute(query)
            }

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

        deleted_at = tables.deletion_time_column()
        query = (
            sa.select(
                IMAGES.c.id,
                IMAGES.c.name,
                IMAGES.c.owner,
                IMAGES.c.size,
                IMAGES.c.visibility,
                deleted_at.label('deleted_at'),
                count(tables.unfinished()).label('locations'),
                count(LOCATIONS.c.status == model.INTERRUPTED).label(
                    'interrupted'
                ),
            )
            .where(IMAGES.c.status == model.PENDING_DELETE)
            .order_by(IMAGES.c.id)
            .limit(page_size)
        )
        if owner is not None:
            query = query.where(IMAGES.c.owner == owner)
        if name is not None:
            query = query.where(IMAGES.c.name == name)
        if deleted_since is not None:
            query = query.where(deleted_at >= deleted_since)
        for page in self._pages(
            query, IMAGES.c.id, lambda row: model.PendingImage(**row._mapping)
        ):
            yield from page

    def describe(self, deletion):
        """Locations a Deletion would scrub now, for --dry-run (no writes).

        Returns (list of Location, list of (location id, error)).
        """
        with self._engine.connect() as conn:
            image = conn.execute(
                sa.select(IMAGES.c.size).where(
                    IMAGES.c.id == deletion.image_id
                )
            ).first()
            rows = conn.execute(
                tables.unfinished_locations({deletion.image_id})
            ).all()
        size = image.size if image else None
        wanted = [
            row
            for row in rows
            if deletion.location_id in (None, row.id)
            and row.status in (model.PENDING_DELETE, model.INTERRUPTED)
        ]
        return self._decoder.locations(wanted, size)
