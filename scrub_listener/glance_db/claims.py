"""Claim, renew, finish: who may delete which data, under row locks.

The protocol, its invariant and why it holds are in the package
docstring (:mod:`scrub_listener.glance_db`).  Each operation is one
transaction that first locks the image rows in id order
(:func:`~scrub_listener.glance_db.tables.lock_images`).
"""

import dataclasses
import datetime

import sqlalchemy as sa

from scrub_listener import db
from scrub_listener import model
from scrub_listener.glance_db import tables

IMAGES = tables.IMAGES
LOCATIONS = tables.LOCATIONS


@dataclasses.dataclass
class Claim:
    """What :meth:`Claims.claim` decided for one Deletion."""

    deletion: model.Deletion
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

    @property
    def closes_image(self):
        """Finishing this claim may mark its image ``deleted``."""
        return self.deletion.location_id is None and not (
            self.skip_reason or self.busy
        )


def target_status(location, verdict):
    """Where finish moves a claimed row, given its store verdict.

    Back to ``pending_delete`` (revivable) only when no delete of this
    data can still be running: ours returned or never began, and the row
    came from ``pending_delete`` (a clean claim) so no earlier claim's
    delete can be in flight either.  See the package docstring.
    """
    if verdict is model.Verdict.GONE:
        return model.DELETED
    if verdict in (model.Verdict.FAILED, model.Verdict.NOT_STARTED) and not (
        location.taken_over
    ):
        return model.PENDING_DELETE
    return model.INTERRUPTED


class Claims:
    """The claim protocol's three writes: claim, renew, finish."""

    def __init__(self, engine, decoder, live_data, lease, process, now):
        self._engine = engine
        self._decoder = decoder
        self._live_data = live_data
        self._lease = lease
        self._process = process
        self._now = now

    # -- claim ------------------------------------------------------------

    def claim(self, deletions, now=None, token=None):
        """Claim the locations of ``deletions``; one transaction.

        Returns one :class:`Claim` per Deletion, in order, all with the
        same fresh ``token`` (or ``token``, for tests).  The caller owns
        the token: it must :meth:`finish` with it, then drop it
        (``process.drop(token)``).
        """
        token = token or self._process.new_token()
        try:
            # Key the live rows before taking any lock: keying a file
            # resolves its path, which a slow mount makes slow.
            self._live_data.warm(self._engine)
            return db.with_deadlock_retry(
                lambda: self._claim(deletions, now or self._now(), token)
            )
        except BaseException:
            self._process.drop(token)  # nothing was claimed with it
            raise

    def _claim(self, deletions, now, token):
        with self._engine.begin() as conn:
            image_ids = {d.image_id for d in deletions}
            images = tables.lock_images(conn, image_ids)
            rows = conn.execute(
                tables.unfinished_locations(image_ids).with_for_update()
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
                    .values(status=model.claimed_status(token), updated_at=now)
                )
        return claims

    def _decide(self, deletion, image, by_image, now):
        claim = Claim(deletion)
        if image is None:
            claim.skip_reason = 'the image row no longer exists'
            return claim
        claim.size = image.size
        rows = by_image.get(deletion.image_id, [])
        if deletion.location_id is None:
            claim.skip_reason = _image_gone_reason(deletion, image)
            claim.superseded_by = _newer_deletion(deletion, image)
        else:
            rows = [r for r in rows if r.id == deletion.location_id]
            claim.skip_reason = _location_gone_reason(deletion, rows)
        if claim.skip_reason:
            return claim
        held = [r for r in rows if model.is_claimed(r.status)]
        live = [r for r in held if not self._may_take_over(r, now)]
        if live:
            claim.busy = True
            claim.busy_until = max(r.updated_at for r in live) + self._lease
            return claim
        locations, claim.errors = self._decoder.locations(rows, image.size)
        status = {r.id: r.status for r in rows}
        claim.locations = [
            dataclasses.replace(
                loc, taken_over=status[loc.id] != model.PENDING_DELETE
            )
            for loc in locations
        ]
        return claim

    def _may_take_over(self, row, now):
        """A claimed row may be claimed again: its holder is a dead
        process of this host, or its lease is stale.  (A wrong "yes" is
        safe: a takeover never makes data revivable.)"""
        if self._process.holder_is_dead(model.claim_token(row.status)):
            return True
        return row.updated_at is None or row.updated_at < now - self._lease

    def _mark_shared(self, conn, claims):
        """Flag claimed locations whose data a live location points at.

        Compared by ``data_key`` (what the store would touch), not as
        strings: ``file:///d/./x`` and ``file:///d/x`` are one file.
        """
        if not any(c.locations for c in claims):
            return
        live = self._live_data.keys(conn)
        key_of = self._decoder.key_of
        for claim in claims:
            claim.locations = [
                dataclasses.replace(loc, shared=key_of(loc.uri) in live)
                for loc in claim.locations
            ]

    # -- renew ------------------------------------------------------------

    def renew(self, token, location_ids, now=None):
        """Extend our claim; return the ids of the rows still ours.

        Called while a long batch is still deleting, so that its claim
        does not look stale to others.  Rows missing from the answer were
        taken over: they are the new holder's now (our deletes on them may
        still complete, which is why a takeover never revives data).
        """
        if not location_ids:
            return set()
        now = now or self._now()
        mine = sa.and_(
            LOCATIONS.c.id.in_(sorted(location_ids)),
            LOCATIONS.c.status == model.claimed_status(token),
        )
        with self._engine.begin() as conn:
            conn.execute(LOCATIONS.update().where(mine).values(updated_at=now))
            return set(
                conn.execute(sa.select(LOCATIONS.c.id).where(mine)).scalars()
            )

    # -- finish -----------------------------------------------------------

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
            lambda: self._finish(token, moves, image_ids, now or self._now())
        )

    def _finish(self, token, moves, image_ids, now):
        with self._engine.begin() as conn:
            tables.lock_images(conn, image_ids)
            for status, ids in sorted(moves.items()):
                conn.execute(
                    LOCATIONS.update()
                    .where(
                        LOCATIONS.c.id.in_(sorted(ids)),
                        LOCATIONS.c.status == model.claimed_status(token),
                    )
                    .values(status=status, updated_at=now)
                )
            if not image_ids:
                return set()
            return _close_images(conn, image_ids, now)


def _image_gone_reason(deletion, image):
    if image.status != model.PENDING_DELETE:
        return f'the image is {image.status} (restored?)'
    if model.deletion_time(image) != deletion.deleted_at:
        return 'the image was restored and deleted again'
    return None


def _newer_deletion(deletion, image):
    """The time of a deletion of ``image`` newer than ``deletion``."""
    if image.status != model.PENDING_DELETE:
        return None
    deleted_at = model.deletion_time(image)
    return deleted_at if deleted_at > deletion.deleted_at else None


def _location_gone_reason(deletion, rows):
    if not rows:
        return 'the location is no longer pending_delete'
    if rows[0].deleted_at != deletion.deleted_at:
        # Revived by a restore and removed again: that removal has its
        # own due time; the sweep queues it.
        return 'the location was removed again since'
    return None


def _close_images(conn, image_ids, now):
    """Mark ``deleted`` the images of ``image_ids`` with nothing left."""
    left = (
        sa.select(LOCATIONS.c.id)
        .where(
            LOCATIONS.c.image_id == IMAGES.c.id,
            LOCATIONS.c.deleted == sa.true(),
            tables.unfinished(),
        )
        .exists()
    )
    rows = conn.execute(
        sa.select(IMAGES.c.id, IMAGES.c.deleted).where(
            IMAGES.c.id.in_(sorted(image_ids)),
            IMAGES.c.status == model.PENDING_DELETE,
            ~left,
        )
    ).all()
    closable = {row.id for row in rows}
    if closable:
        _finish_half_deletes(conn, [r.id for r in rows if not r.deleted], now)
        conn.execute(
            IMAGES.update()
            .where(
                IMAGES.c.id.in_(sorted(closable)),
                IMAGES.c.status == model.PENDING_DELETE,
            )
            .values(status=model.DELETED, updated_at=now)
        )
    return closable


def _finish_half_deletes(conn, image_ids, now):
    """Do what Glance's image_destroy never did for a half-finished delete.

    Its image row (of ``image_ids``) is still ``deleted = 0`` (the API
    would list it as a ``deleted`` image) and its tags and members live:
    soft-delete them now, as the second transaction would have.
    """
    half = sorted(image_ids)
    if not half:
        return
    soft_deleted = {'deleted': True, 'deleted_at': now, 'updated_at': now}
    for table in (tables.TAGS, tables.MEMBERS):
        conn.execute(
            table.update()
            .where(table.c.image_id.in_(half), table.c.deleted == sa.false())
            .values(**soft_deleted)
        )
    conn.execute(
        IMAGES.update().where(IMAGES.c.id.in_(half)).values(**soft_deleted)
    )
