"""The due-queue: deletions waiting for their time, leases, retries.

One row per deletion (an image, or one location removed from a live
image), keyed by ``(image_id, location_id, deleted_at)`` so enqueueing is
idempotent: a redelivered notification or a sweep that finds the same
deletion again adds nothing.  The due time is fixed when the row is made.

A worker takes rows with a lease (``lease_owner``, ``lease_expires``) and
removes a row only after the scrub of that deletion is committed in the
Glance database; a worker that dies leaves its lease to expire and the row
is taken over.  On MariaDB/PostgreSQL the claim uses ``FOR UPDATE SKIP
LOCKED`` so instances sharing the queue do not wait on each other; SQLite
serialises writers (see :mod:`scrub_listener.db`).

The queue only schedules.  Whether data may really be deleted is decided
again, under lock, in the Glance database (:mod:`scrub_listener.glance_db`),
so a stale or duplicated row can never delete data it should not.
"""

import dataclasses
import datetime
import logging

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import mysql
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite

from scrub_listener import db
from scrub_listener import model
from scrub_listener import redaction
from scrub_listener import retry

WHOLE_IMAGE = 0  # location_id of an image deletion (NULLs are not unique)

# MariaDB's DATETIME drops microseconds unless told otherwise, and
# deleted_at must round-trip exactly: it identifies a deletion.
_TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), 'mysql')

_META = sa.MetaData()
ENTRIES = sa.Table(
    'scrub_queue',
    _META,
    sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
    sa.Column('image_id', sa.String(36), nullable=False),
    sa.Column('location_id', sa.Integer, nullable=False),
    sa.Column('deleted_at', _TIMESTAMP, nullable=False),
    sa.Column('due_at', _TIMESTAMP, nullable=False),
    sa.Column('next_attempt_at', _TIMESTAMP, nullable=False),
    sa.Column('attempts', sa.Integer, nullable=False, default=0),
    sa.Column('last_error', sa.Text),
    sa.Column('lease_owner', sa.String(255)),
    sa.Column('lease_expires', _TIMESTAMP),
    sa.Column('created_at', _TIMESTAMP, nullable=False),
    sa.UniqueConstraint(
        'image_id', 'location_id', 'deleted_at', name='uniq_deletion'
    ),
    sa.Index('ix_scrub_queue_next_attempt_at', 'next_attempt_at'),
    sa.Index('ix_scrub_queue_lease_due', 'lease_expires', 'next_attempt_at'),
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """A due-queue row: a Deletion, when it is due, its lease and retries."""

    id: int
    deletion: model.Deletion
    due_at: datetime.datetime
    next_attempt_at: datetime.datetime
    attempts: int
    last_error: str | None
    lease_owner: str | None
    lease_expires: datetime.datetime | None


def _entry(row):
    location_id = None if row.location_id == WHOLE_IMAGE else row.location_id
    return Entry(
        id=row.id,
        deletion=model.Deletion(row.image_id, location_id, row.deleted_at),
        due_at=row.due_at,
        next_attempt_at=row.next_attempt_at,
        attempts=row.attempts,
        last_error=row.last_error,
        lease_owner=row.lease_owner,
        lease_expires=row.lease_expires,
    )


class DueQueue:
    """The due-queue table and its operations."""

    def __init__(
        self,
        engine,
        lease_time=600,
        retry_backoff=30,
        retry_backoff_max=3600,
        now=model.utcnow,
    ):
        self.engine = engine
        self._now = now
        self.lease = datetime.timedelta(seconds=lease_time)
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max

    def create_schema(self):
        """Create the queue table if missing (it is ours, unlike Glance's).

        Instances started together on a fresh shared database race here
        (create_all looks, then creates): the losers see "already exists"
        in one form or another, and the table being there is all we need.
        """
        # Lost the race: look again (the winner may still be creating the
        # index).  A real error repeats itself and is raised.
        retry.call(
            lambda: _META.create_all(self.engine),
            retry_on=sa_exc.DatabaseError,
            within=1.0,
            what='create the due-queue table',
            first=0.2,
            level=logging.DEBUG,
        )

    # -- producers ---------------------------------------------------------

    def enqueue(self, items, now=None):
        """Add ``(Deletion, due_at)`` pairs; return how many were new.

        Idempotent: a deletion already queued (leased or not) is left as
        it is.
        """
        now = now or self._now()
        values = [
            {
                'image_id': deletion.image_id,
                'location_id': deletion.location_id or WHOLE_IMAGE,
                'deleted_at': deletion.deleted_at,
                'due_at': due_at,
                'next_attempt_at': due_at,
                'attempts': 0,
                'created_at': now,
            }
            for deletion, due_at in items
        ]
        if not values:
            return 0
        # Sorted: two enqueues of overlapping rows (a sweep page and a
        # notification batch) then lock them in the same order.
        values.sort(
            key=lambda v: (v['image_id'], v['location_id'], v['deleted_at'])
        )

        stmt = self._insert_ignoring_duplicates()
        return self._write(lambda conn: conn.execute(stmt, values).rowcount)

    def _write(self, work):
        """Run ``work(conn)`` in a transaction; again after a deadlock.

        Instances sharing a MariaDB/PostgreSQL queue write overlapping rows
        (sweeps enqueue, drains settle); rows are touched in id/key order
        to make deadlocks rare, and the database's victim is rerun.
        """

        def attempt():
            with self.engine.begin() as conn:
                return work(conn)

        return db.with_deadlock_retry(attempt)

    def _insert_ignoring_duplicates(self):
        dialect = self.engine.dialect.name
        if dialect == 'mysql':
            # INSERT IGNORE, not ON DUPLICATE KEY UPDATE: with the
            # FOUND_ROWS flag SQLAlchemy sets, the latter counts duplicates
            # as rows, and the count tells the listener whether to wake
            # the drain.  Our values are well-formed, so IGNORE only ever
            # skips the duplicates.
            return mysql.insert(ENTRIES).prefix_with('IGNORE')
        if dialect == 'postgresql':
            return postgresql.insert(ENTRIES).on_conflict_do_nothing()
        if dialect == 'sqlite':
            return sqlite.insert(ENTRIES).on_conflict_do_nothing()
        raise NotImplementedError(f'due-queue on {dialect} is not supported')

    # -- consumers ---------------------------------------------------------

    def claim(
        self, owner, limit, now=None, due_before=None, exclude_images=()
    ):
        """Lease up to ``limit`` due entries to ``owner``; return them.

        An entry is due when ``next_attempt_at <= due_before`` (default:
        now) and nobody holds an unexpired lease on it.  Entries of
        ``exclude_images`` (the images a pipeline has in flight) are left.
        """
        now = now or self._now()
        due_before = due_before or now
        return db.with_deadlock_retry(
            lambda: self._claim(owner, limit, now, due_before, exclude_images)
        )

    def _claim(self, owner, limit, now, due_before, exclude_images):
        free = sa.or_(
            ENTRIES.c.lease_expires.is_(None), ENTRIES.c.lease_expires < now
        )
        pick = (
            sa.select(ENTRIES.c.id)
            .where(ENTRIES.c.next_attempt_at <= due_before, free)
            .order_by(ENTRIES.c.next_attempt_at, ENTRIES.c.id)
            .limit(limit)
        )
        if exclude_images:
            pick = pick.where(
                ENTRIES.c.image_id.not_in(sorted(exclude_images))
            )
        if not db.is_sqlite(self.engine):
            # Rows another instance is claiming right now are skipped,
            # not waited for.
            pick = pick.with_for_update(skip_locked=True)
        with self.engine.begin() as conn:
            ids = list(conn.execute(pick).scalars())
            if not ids:
                return []
            # ``free`` again: without SKIP LOCKED (SQLite) this is the
            # compare-and-set that makes a double claim impossible.
            conn.execute(
                ENTRIES.update()
                .where(ENTRIES.c.id.in_(ids), free)
                .values(lease_owner=owner, lease_expires=now + self.lease)
            )
            rows = conn.execute(
                sa.select(ENTRIES)
                .where(ENTRIES.c.id.in_(ids), ENTRIES.c.lease_owner == owner)
                .order_by(ENTRIES.c.next_attempt_at, ENTRIES.c.id)
            ).all()
        return [_entry(row) for row in rows]

    def renew(self, entries, owner, now=None):
        """Extend our leases on ``entries`` (a batch still running)."""
        now = now or self._now()
        ids = sorted(e.id for e in entries)
        self._write(
            lambda conn: conn.execute(
                ENTRIES.update()
                .where(ENTRIES.c.id.in_(ids), ENTRIES.c.lease_owner == owner)
                .values(lease_expires=now + self.lease)
            )
        )

    def complete(self, entries, owner):
        """Remove finished entries we still hold the lease of."""
        ids = [e.id for e in entries]
        if not ids:
            return
        self._write(
            lambda conn: conn.execute(
                ENTRIES.delete().where(
                    ENTRIES.c.id.in_(sorted(ids)),
                    ENTRIES.c.lease_owner == owner,
                )
            )
        )

    def retry_later(self, failures, owner, now=None):
        """Back off failed entries: ``failures`` is [(Entry, reason)].

        The delay doubles with each attempt (with jitter, so a burst of
        failures does not come back as a burst), capped at
        ``retry_backoff_max``.  Attempts and reason stay visible.
        """
        now = now or self._now()
        failures = sorted(failures, key=lambda failure: failure[0].id)
        if failures:
            self._write(
                lambda conn: self._back_off(conn, failures, owner, now)
            )

    def _back_off(self, conn, failures, owner, now):
        for entry, reason in failures:
            attempts = entry.attempts + 1
            conn.execute(
                ENTRIES.update()
                .where(
                    ENTRIES.c.id == entry.id,
                    ENTRIES.c.lease_owner == owner,
                )
                .values(
                    attempts=attempts,
                    # masked before the cut: a URL cut before its '@'
                    # could not be masked afterwards
                    last_error=redaction.redact(reason)[:4000],
                    next_attempt_at=now + self.backoff(attempts),
                    lease_owner=None,
                    lease_expires=None,
                )
            )

    def backoff(self, attempts):
        """How long a deletion that failed ``attempts`` times waits."""
        delay = retry.backoff(
            attempts, self.retry_backoff, self.retry_backoff_max
        )
        return datetime.timedelta(seconds=delay)

    def release(self, entries, owner, at):
        """Give entries back untouched, due again at ``at`` (busy ones)."""
        ids = [e.id for e in entries]
        if not ids:
            return
        self._write(
            lambda conn: conn.execute(
                ENTRIES.update()
                .where(
                    ENTRIES.c.id.in_(sorted(ids)),
                    ENTRIES.c.lease_owner == owner,
                )
                .values(
                    next_attempt_at=at, lease_owner=None, lease_expires=None
                )
            )
        )

    def release_dead_leases(self, is_dead):
        """Free the leases of processes ``is_dead(owner)`` says are gone.

        A service restarted after SIGKILL frees its predecessor's leases
        at once instead of waiting out their (absolute) expiry; leases of
        live workers elsewhere keep theirs.  Returns how many were freed.
        """
        with self.engine.connect() as conn:
            owners = conn.execute(
                sa.select(ENTRIES.c.lease_owner)
                .where(ENTRIES.c.lease_owner.is_not(None))
                .distinct()
            ).scalars()
            dead = sorted(owner for owner in owners if is_dead(owner))
        if not dead:
            return 0
        return self._write(
            lambda conn: (
                conn.execute(
                    ENTRIES.update()
                    .where(ENTRIES.c.lease_owner.in_(dead))
                    .values(lease_owner=None, lease_expires=None)
                ).rowcount
            )
        )

    # -- looking -----------------------------------------------------------

    def next_wakeup(self):
        """When the earliest entry becomes claimable, or None if empty.

        Called after every committed notification batch, so it must not
        scan the table: two MIN()s that the (lease_expires,
        next_attempt_at) index answers from its ends.
        """
        free = sa.select(sa.func.min(ENTRIES.c.next_attempt_at)).where(
            ENTRIES.c.lease_expires.is_(None)
        )
        leased = sa.select(sa.func.min(ENTRIES.c.lease_expires)).where(
            ENTRIES.c.lease_expires.is_not(None)
        )
        with self.engine.connect() as conn:
            times = [conn.execute(q).scalar() for q in (free, leased)]
        times = [t for t in times if t is not None]
        return min(times) if times else None

    def stats(self, now):
        """Counts for status(): queued, due, in progress, failed."""
        leased = sa.and_(
            ENTRIES.c.lease_expires.is_not(None), ENTRIES.c.lease_expires > now
        )
        due = sa.and_(ENTRIES.c.next_attempt_at <= now, ~leased)

        def count(condition):
            return sa.func.sum(sa.case((condition, 1), else_=0))

        query = sa.select(
            sa.func.count(),
            count(due),
            count(leased),
            count(ENTRIES.c.attempts > 0),
            sa.func.min(ENTRIES.c.due_at),
        )
        with self.engine.connect() as conn:
            total, due_n, leased_n, failed_n, oldest = conn.execute(
                query
            ).one()
        return {
            'queued': total,
            'due': int(due_n or 0),
            'in_progress': int(leased_n or 0),
            'failing': int(failed_n or 0),
            'oldest_due_at': oldest.isoformat() + 'Z' if oldest else None,
        }

    def entries_for(self, image_ids):
        """{image id: [Entry]} for listings."""
        result = {}
        if not image_ids:
            return result
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(ENTRIES).where(
                    ENTRIES.c.image_id.in_(sorted(image_ids))
                )
            ).all()
        for row in rows:
            result.setdefault(row.image_id, []).append(_entry(row))
        return result

    def forget_deletion(self, image_id, deleted_at):
        """Drop the entry of one image deletion (it was restored).

        Only that deletion's: a new deletion of the same image, queued
        since, keeps its entry and its due time.
        """
        self._write(
            lambda conn: conn.execute(
                ENTRIES.delete().where(
                    ENTRIES.c.image_id == image_id,
                    ENTRIES.c.location_id == WHOLE_IMAGE,
                    ENTRIES.c.deleted_at == deleted_at,
                )
            )
        )

    def count(self):
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(sa.func.count()).select_from(ENTRIES)
            ).scalar()
