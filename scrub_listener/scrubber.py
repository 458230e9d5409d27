"""The scrub pipeline: due-queue lease → Glance claim → store deletes → finish.

One loop, :meth:`Scrubber.drain`, carries every deletion from its due-queue
entry to its data gone, and owns both leases on it on the way: the queue
lease (:mod:`scrub_listener.queue`) and the Glance claim
(:mod:`scrub_listener.glance_db`).  A batch goes through three stages::

    take:    lease due entries, claim their Glance rows  (one transaction each)
    delete:  one store delete per location, on the futurist pool
    settle:  record the verdicts in Glance, settle the queue entries

and batches overlap (up to ``PIPELINE_DEPTH``): while batch k's deletes
run, the next batches are taken and their deletes queue up behind k's,
and batch k-1 is settled — so the store pool has work while work is due,
and the database round trips of one batch hide behind the store I/O of
another.  Database work stays in the loop's thread; only store I/O fans
out to the pool (``scrub_pool_size``).  glance-scrubber instead spends
its time in several ORM round trips per image, one after another.

Overlap changes nothing for safety: each batch is its own claim, with
its own token, fenced and finished exactly as a lone batch would be (the
protocol is per claim); and a batch never takes an image another batch
of this loop has in flight, so two of our claims never meet on one row.
"""

import collections
import contextlib
import dataclasses
import datetime
import logging
import time

from futurist import waiters
from sqlalchemy import exc as sa_exc

from scrub_listener import exceptions
from scrub_listener import model
from scrub_listener import redaction
from scrub_listener import retry

LOG = logging.getLogger(__name__)

# Batches in flight at once: one deleting, the next queued behind it on
# the pool, while the loop settles the one before and takes the one after.
# With 2, a fast pool (64 threads, 20 ms deletes) ran dry while the loop
# settled and took (1,385 against 1,591 deletes/s with 3); more than 3
# only holds more claims.
PIPELINE_DEPTH = 3
# A deletion another worker holds is looked at again when that worker's
# lease runs out (its claim is then stale), and never sooner than this.
BUSY_DELAY = datetime.timedelta(seconds=5)


@dataclasses.dataclass
class _Batch:
    """One claim on its way through the pipeline."""

    claims: list
    # due-queue entries, one per claim, in order (None: no queue)
    entries: list | None = None
    futures: dict = dataclasses.field(default_factory=dict)

    @property
    def token(self):
        return self.claims[0].token if self.claims else None

    @property
    def locations(self):
        return [loc for c in self.claims for loc in c.locations]

    @property
    def image_ids(self):
        return {c.deletion.image_id for c in self.claims}


class Scrubber:
    """Scrubs deletions: queue lease → Glance claim → deletes → finish.

    ``queue``, ``owner`` (the lease owner), ``batch_size`` and
    ``schedule`` are needed to drain the due-queue; :meth:`scrub` alone
    scrubs given deletions without one.  The protocol (and why a claim
    cut short never makes data revivable) is in
    :mod:`scrub_listener.glance_db`.
    """

    def __init__(
        self,
        glance_db,
        stores,
        executor,
        lease_time=600,
        queue=None,
        owner=None,
        batch_size=500,
        schedule=None,
        depth=PIPELINE_DEPTH,
        sleep=time.sleep,
        clock=time.monotonic,
        now=model.utcnow,
    ):
        self._db = glance_db
        self._stores = stores
        self._executor = executor
        self._lease_time = lease_time
        self._queue = queue
        self.owner = owner
        self._batch_size = batch_size
        self.schedule = schedule or model.Schedule(0)
        self._depth = depth
        # Renew both leases well before they could look stale to others.
        self._renew_every = lease_time / 3.0
        self._sleep = sleep  # for the finish retries; all injectable
        self._clock = clock
        self._now = now

    # -- entry points ------------------------------------------------------

    def drain(self, due_before=None, report=None, stop=None):
        """Scrub due entries until none is left; return the Tally.

        ``due_before``: only entries due by then (default: due when
        taken).  ``report(outcomes)`` is called after each batch;
        ``stop()`` true ends the run after the batches in flight.
        """
        tally = model.Tally()
        in_flight = collections.deque()
        with self._cleaning_up(in_flight):
            while True:
                if len(in_flight) < self._depth and not (stop and stop()):
                    batch = self._take(due_before, _images_of(in_flight))
                    if batch is not None:
                        in_flight.append(batch)
                        self._start(batch)
                        continue
                if not in_flight:
                    return tally
                self._wait(in_flight)
                outcomes = self._settle(in_flight.popleft())
                for outcome in outcomes:
                    tally.add(outcome)
                if report is not None:
                    report(outcomes)

    def scrub_batch(self, due_before=None):
        """Scrub one batch of due entries; return their Outcomes.

        An empty list means nothing was due.
        """
        batch = self._take(due_before, set())
        if batch is None:
            return []
        return self._run_alone(batch)

    def scrub(self, deletions):
        """Scrub ``deletions`` (no due-queue); one Outcome each, in order."""
        batch = _Batch(self._db.claim(deletions))
        return self._run_alone(batch)

    def _run_alone(self, batch):
        in_flight = collections.deque([batch])
        with self._cleaning_up(in_flight):
            self._start(batch)
            self._wait(in_flight)
        return self._settle(batch)

    @contextlib.contextmanager
    def _cleaning_up(self, in_flight):
        """Leave no batch of ``in_flight`` behind when a run ends early."""
        try:
            yield
        except Exception:
            # A stage failed (the database went away, the pool broke):
            # what is in flight is still settled, as far as it can be,
            # before the error goes up.
            self._settle_quietly(in_flight)
            raise
        except BaseException:
            # Ctrl-C, a stop: see _interrupt.
            self._interrupt(in_flight)
            raise

    # -- take ----------------------------------------------------------------

    def _take(self, due_before, busy_images):
        """Lease due entries and claim their Glance rows; None if none."""
        entries = self._queue.claim(
            self.owner,
            self._batch_size,
            due_before=due_before,
            exclude_images=busy_images,
        )
        if not entries:
            return None
        try:
            claims = self._db.claim([e.deletion for e in entries])
        except Exception as exc:
            self._give_back(entries, exc)
            raise
        except BaseException:
            self._give_back(entries)
            raise
        return _Batch(claims, entries)

    def _give_back(self, entries, failure=None):
        """Hand back leases a stage could not use.

        After a ``failure`` (Glance DB or store layer down) the entries
        are backed off rather than sit on the leases until they expire;
        after an interruption (Ctrl-C, a stop) they are released at once,
        so that another host need not wait out our leases.
        """
        try:
            if failure is None:
                self._queue.release(entries, self.owner, self._now())
                return
            reason = redaction.redact(f'{type(failure).__name__}: {failure}')
            self._queue.retry_later([(e, reason) for e in entries], self.owner)
        except Exception:
            LOG.warning(
                'Could not give back %d due-queue leases', len(entries)
            )

    # -- delete --------------------------------------------------------------

    def _start(self, batch):
        for location in batch.locations:
            future = self._executor.submit(self._delete_one, location)
            batch.futures[future] = location

    def _wait(self, in_flight):
        """Wait for the oldest batch's deletes; renew every lease meanwhile.

        A batch may take longer than lease_time (slow store, one thread):
        while it runs, the claims and queue leases of every batch in
        flight are renewed, so that no other worker takes them over and
        deletes the same data again.
        """
        pending = set(in_flight[0].futures)
        while pending:
            _, pending = waiters.wait_for_all(pending, self._renew_every)
            if pending:
                for batch in in_flight:
                    self._renew(batch)

    def _renew(self, batch):
        # A renewal that fails (database blip) must not end the wait: the
        # deletes are still running.  At worst the claim goes stale and is
        # taken over, which is safe (see glance_db).
        locations = batch.locations
        try:
            mine = self._db.renew(batch.token, [loc.id for loc in locations])
            if batch.entries:
                self._queue.renew(batch.entries, self.owner)
        except Exception:
            LOG.exception('Could not renew the leases of a running batch')
            return
        lost = len(locations) - len(mine)
        if lost:
            LOG.warning(
                '%d location(s) of a running batch were taken over by '
                'another worker (this one was paused longer than '
                'lease_time?); they are left to it',
                lost,
            )

    def _delete_one(self, location):
        if location.shared:
            LOG.info(
                'Image %s location %s: a live location points at the same '
                'data; marking it deleted, keeping the data',
                location.image_id,
                location.id,
            )
            return model.LocationResult(model.Verdict.GONE)
        try:
            answer = self._stores.delete(location)
        except exceptions.LocationRefused as exc:
            # refused before the store was called: nothing was touched
            LOG.error('Image %s: %s', location.image_id, exc)
            return model.LocationResult(model.Verdict.FAILED, reason=str(exc))
        except exceptions.StoreError as exc:
            LOG.error('Image %s: %s', location.image_id, exc)
            return model.LocationResult(_failure_verdict(exc), reason=str(exc))
        except Exception as exc:
            # Never the batch: one location fails, with what went wrong.
            reason = redaction.redact(
                f'location {location.id}: unexpected error: '
                f'{type(exc).__name__}: {exc}'
            )
            LOG.exception('Image %s: %s', location.image_id, reason)
            return model.LocationResult(model.Verdict.UNKNOWN, reason=reason)
        LOG.debug(
            'Image %s location %s: %s', location.image_id, location.id, answer
        )
        freed = (
            location.size or 0 if answer is model.StoreAnswer.REMOVED else 0
        )
        return model.LocationResult(model.Verdict.GONE, bytes_freed=freed)

    # -- settle --------------------------------------------------------------

    def _settle(self, batch):
        """Record a finished batch in Glance and the queue; its Outcomes."""
        results = {loc.id: f.result() for f, loc in batch.futures.items()}
        for location in batch.locations:
            # never submitted (the pool broke while the batch started)
            results.setdefault(
                location.id, model.LocationResult(model.Verdict.NOT_STARTED)
            )
        images = {c.deletion.image_id for c in batch.claims if c.closes_image}
        try:
            closed = self._finish(
                batch.token, batch.locations, results, images
            )
        except Exception as exc:
            if batch.entries:
                self._give_back(batch.entries, exc)
            raise
        finally:
            self._db.process.drop(batch.token)
        outcomes = [_outcome(c, results, closed) for c in batch.claims]
        for outcome in outcomes:
            _log(outcome)
        if batch.entries:
            self._settle_entries(batch.entries, outcomes)
        return outcomes

    def _finish(self, token, locations, results, images):
        """Record the verdicts; keep trying while the database is away.

        The store has answered and the claim is still ours: giving up
        would strand the rows as ``scrubbing`` for lease_time and the
        deletions would be redone.  Retried with backoff for up to
        lease_time (after that another worker may have taken them over,
        and our finish would move nothing anyway).
        """
        pairs = _pairs(locations, results)
        return retry.call(
            lambda: self._db.finish(token, pairs, images),
            retry_on=(sa_exc.OperationalError, sa_exc.InterfaceError),
            within=self._lease_time,
            what='record a finished batch in the Glance database',
            sleep=self._sleep,
            clock=self._clock,
        )

    def _settle_entries(self, entries, outcomes):
        done, failures, busy, renewed = [], [], {}, []
        now = self._now()
        for entry, outcome in zip(entries, outcomes, strict=True):
            if outcome.status is model.Result.FAILED:
                failures.append((entry, outcome.reason))
            elif outcome.status is model.Result.BUSY:
                busy.setdefault(_look_again_at(outcome, now), []).append(entry)
            else:
                done.append(entry)
            if outcome.superseded_by is not None:
                # Restored, then deleted again: queue the new deletion with
                # its own due time (the notification may be lost).
                new = model.Deletion(
                    entry.deletion.image_id, None, outcome.superseded_by
                )
                renewed.append(self.schedule.queued(new))
        self._queue.enqueue(renewed)
        self._queue.retry_later(failures, self.owner)
        for at, group in sorted(busy.items()):
            self._queue.release(group, self.owner, at)
        self._queue.complete(done, self.owner)

    def _settle_quietly(self, in_flight):
        while in_flight:
            batch = in_flight.popleft()
            try:
                self._wait(collections.deque([batch]))
                self._settle(batch)
            except Exception:
                LOG.exception('Could not settle a batch in flight')

    # -- interruption --------------------------------------------------------

    def _interrupt(self, in_flight):
        """Record what is known of batches cut short, and let go of them.

        What started may still be deleting (``scrub_interrupted``, never
        revivable); what never started goes back (if it was clean).  The
        queue entries are released at once.
        """
        for batch in in_flight:
            results = _cut_short(batch.futures)
            for location in batch.locations:
                results.setdefault(
                    location.id,
                    model.LocationResult(model.Verdict.NOT_STARTED),
                )
            try:
                self._db.finish(
                    batch.token, _pairs(batch.locations, results), set()
                )
            except Exception:
                # Rows stay claimed; they are taken over after lease_time
                # (a takeover never makes them revivable).
                LOG.exception('Could not record an interrupted batch')
            self._db.process.drop(batch.token)
            if batch.entries:
                self._give_back(batch.entries)
        in_flight.clear()


def _images_of(in_flight):
    return {i for batch in in_flight for i in batch.image_ids}


def _cut_short(futures):
    results = {}
    for future, location in futures.items():
        if future.cancel():
            verdict = model.Verdict.NOT_STARTED
        elif future.done() and not future.exception():
            results[location.id] = future.result()
            continue
        else:
            verdict = model.Verdict.UNKNOWN
        results[location.id] = model.LocationResult(verdict)
    return results


def _outcome(claim, results, closed):
    outcome = model.Outcome(claim.deletion, model.Result.SCRUBBED)
    if claim.busy:
        outcome.status = model.Result.BUSY
        outcome.reason = 'another worker is scrubbing it'
        outcome.busy_until = claim.busy_until
        return outcome
    if claim.skip_reason:
        outcome.status = model.Result.SKIPPED
        outcome.reason = claim.skip_reason
        outcome.superseded_by = claim.superseded_by
        return outcome
    reasons = [f'location {i}: {r}' for i, r in claim.errors]
    for location in claim.locations:
        result = results[location.id]
        if result.verdict is model.Verdict.GONE:
            outcome.locations += 1
            outcome.bytes_freed += result.bytes_freed
        else:
            reasons.append(result.reason or result.verdict.value)
    outcome.image_deleted = claim.deletion.image_id in closed
    if reasons:
        outcome.status = model.Result.FAILED
        outcome.reason = '; '.join(reasons)
    return outcome


def _log(outcome):
    what = outcome.deletion.describe()
    if outcome.status is model.Result.SCRUBBED:
        LOG.info(
            'Scrubbed image %s: %d location(s), %d bytes freed',
            what,
            outcome.locations,
            outcome.bytes_freed,
        )
    elif outcome.status is model.Result.FAILED:
        LOG.warning('Failed to scrub image %s: %s', what, outcome.reason)
    elif outcome.status is model.Result.BUSY:
        # Normal while another worker runs it; looked at again only
        # when that worker's lease runs out, so this stays quiet.
        LOG.debug('Image %s is being scrubbed by another worker', what)
    else:
        LOG.info(
            'Not scrubbing image %s (%s): %s',
            what,
            outcome.status,
            outcome.reason,
        )


def _look_again_at(outcome, now):
    """When to look at a deletion another worker holds again."""
    at = now + BUSY_DELAY
    if outcome.busy_until is not None:
        # A second past the lease, whole seconds so that a batch's busy
        # entries share a few release statements.
        at = max(at, outcome.busy_until + datetime.timedelta(seconds=1))
    if at.microsecond:  # rounded up: never sooner than BUSY_DELAY
        at = at.replace(microsecond=0) + datetime.timedelta(seconds=1)
    return at


def _failure_verdict(exc):
    """FAILED only when the store says the data was left intact.

    A timeout, a lost connection or a multi-step delete that stopped
    half-way (RBD unprotects and removes the snapshot before it fails on a
    busy image) is an error while the data may be partly gone, or still
    going: UNKNOWN, which is never revived.  The store adapter knows which
    errors are clean refusals (``StoreError(..., data_intact=True)``).
    """
    if getattr(exc, 'data_intact', False):
        return model.Verdict.FAILED
    return model.Verdict.UNKNOWN


def _pairs(locations, results):
    """(Location, Verdict) pairs for GlanceDB.finish."""
    return [(loc, results[loc.id].verdict) for loc in locations]
