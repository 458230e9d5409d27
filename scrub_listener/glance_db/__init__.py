"""The only code that reads or writes Glance's tables: :class:`GlanceDB`.

Glance (33.0.0) marks a delayed delete like this, in one DELETE request:
each live location row goes to ``status='pending_delete', deleted=1``
(``deleted_at`` = its own now), the properties are soft-deleted (their own
now, a few ms later), then the image row goes to ``status='pending_delete',
deleted=1`` and its tags and members are soft-deleted with the image's
``deleted_at`` (measured on glance-api 33.0.0; see
:func:`restore.in_deletion`).
Glance never reads a location row that is deleted, and never touches a
``pending_delete`` image again, so the rows below are ours to move on.

The package, by concern (:class:`GlanceDB` is the one facade the rest of
scrub-listener uses):

* :mod:`.tables` — the table declarations and the image row lock;
* :mod:`.locations` — URL decryption, location decoding, the live-data
  index;
* :mod:`.reads` — due images and removed locations, pages, listings;
* :mod:`.claims` — claim, renew, finish (the protocol below);
* :mod:`.restore` — restore and revive.

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

import datetime
import socket

from scrub_listener import holders
from scrub_listener import model
from scrub_listener.glance_db import claims
from scrub_listener.glance_db import locations
from scrub_listener.glance_db import reads
from scrub_listener.glance_db import restore as restore_mod
from scrub_listener.glance_db import tables

# The package's vocabulary, for callers that import it from here.
Claim = claims.Claim
target_status = claims.target_status
decrypt_location = locations.decrypt_location
IMAGES = tables.IMAGES
LOCATIONS = tables.LOCATIONS
# from the model, where they are defined
ACTIVE = model.ACTIVE
DELETED = model.DELETED
INTERRUPTED = model.INTERRUPTED
PENDING_DELETE = model.PENDING_DELETE
SCRUBBING = model.SCRUBBING
Deletion = model.Deletion
Location = model.Location
PendingImage = model.PendingImage
RestoreResult = model.RestoreResult
Verdict = model.Verdict
claimed_status = model.claimed_status
utcnow = model.utcnow
validate_image_id = model.validate_image_id


class GlanceDB:
    """Reads and moves Glance's image and location rows.

    The facade over the package's parts; every method is one read or one
    transaction of :mod:`.reads`, :mod:`.claims` or :mod:`.restore`.
    """

    def __init__(
        self,
        engine,
        encryption_key=None,
        lease_time=600,
        data_key=None,
        process=None,
        now=model.utcnow,
    ):
        """``data_key(uri)`` names the data a URI points at (two URIs with
        one key are the same data: :func:`scrub_listener.store.data_key`);
        ``process`` (:class:`scrub_listener.holders.Process`) makes claim
        tokens and recognises the claims of dead processes of this host;
        ``now`` is the clock.
        """
        self.engine = engine
        self.process = process or holders.this_process(socket.gethostname())
        self.decoder = locations.Decoder(encryption_key, data_key)
        lease = datetime.timedelta(seconds=lease_time)
        self._reads = reads.Reads(engine, self.decoder, lease, now)
        self._claims = claims.Claims(
            engine,
            self.decoder,
            locations.LiveDataIndex(self.decoder),
            lease,
            self.process,
            now,
        )
        self._restores = restore_mod.Restores(engine, self.decoder, now)

    def location_uri(self, value):
        """The plain URL of a stored location ``value``."""
        return self.decoder.uri(value)

    # -- reads (scrub_listener.glance_db.reads) -------------------------

    def iter_due_images(self, deleted_before, page_size):
        return self._reads.iter_due_images(deleted_before, page_size)

    def iter_due_removed_locations(self, deleted_before, page_size):
        return self._reads.iter_due_removed_locations(
            deleted_before, page_size
        )

    def get_deletion_times(self, image_ids):
        return self._reads.get_deletion_times(image_ids)

    def iter_pending_images(self, page_size=500, **filters):
        return self._reads.iter_pending_images(page_size, **filters)

    def describe(self, deletion):
        return self._reads.describe(deletion)

    # -- the claim protocol (scrub_listener.glance_db.claims) -----------

    def claim(self, deletions, now=None, token=None):
        return self._claims.claim(deletions, now, token)

    def renew(self, token, location_ids, now=None):
        return self._claims.renew(token, location_ids, now)

    def finish(self, token, results, image_ids, now=None):
        return self._claims.finish(token, results, image_ids, now)

    # -- restore (scrub_listener.glance_db.restore) ----------------------

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
        return self._restores.restore(
            image_id, verify, deletion_window, now, lock_timeout
        )
