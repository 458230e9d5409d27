"""``scrub-listener --sweep-once``: reconcile once, report, exit.

The pass is the service's own machinery run to completion: the sweep
enqueues everything due into the due-queue, then the drain scrubs until
nothing that was due at the start is left.  Going through the queue means
a pass that is killed half-way resumes where it stopped, and a one-shot
pass can run beside a service on the same queue without doing its work
twice.
"""

import time

from scrub_listener import exceptions
from scrub_listener import model

PROGRESS_EVERY = 10  # seconds


def sweep_once(parts, out, progress_interval=PROGRESS_EVERY):
    """Run one pass; return its Tally."""
    start = time.monotonic()
    started_at = model.utcnow()
    parts.release_dead_leases()
    work = _anything_due(parts, started_at)
    if work:
        # Built before the sweep: a bad store configuration stops the
        # pass before it changed anything.
        parts.stores  # noqa: B018
    found, queued = parts.sweeper.sweep(now=started_at)
    print(
        f'Sweep: {found} deletions due, {queued} new in the queue',
        file=out,
        flush=True,
    )
    stats = model.Tally()
    if work:
        progress = _Progress(out, start, progress_interval)
        stats = parts.scrubber.drain(due_before=started_at, report=progress)
    print(
        f'Done: {_line(stats, time.monotonic() - start)}', file=out, flush=True
    )
    # Failures of earlier passes wait for their backoff and were not
    # retried now; a pass that says nothing of them would tell cron all
    # is well.
    stats.waiting_retry = parts.queue.stats(model.utcnow())['failing']
    if stats.waiting_retry:
        print(
            f'{stats.waiting_retry} deletion(s) failed earlier and wait for '
            'their retry (scrub-listener-manage list shows why)',
            file=out,
            flush=True,
        )
    return stats


def _anything_due(parts, started_at):
    """True if the pass may find work: a due deletion in Glance, or a
    claimable entry in the due-queue.

    Only then are the stores and the pool built: a pass with nothing to
    do never loads glance_store.
    """
    next_at = parts.queue.next_wakeup()
    if next_at is not None and next_at <= started_at:
        return True
    return parts.sweeper.anything_due(started_at)


class _Progress:
    """A progress line every ``interval`` seconds of a long pass."""

    def __init__(self, out, start, interval):
        self._out = out
        self._start = start
        self._interval = interval
        self._last = start
        self.stats = model.Tally()

    def __call__(self, outcomes):
        for outcome in outcomes:
            self.stats.add(outcome)
        if time.monotonic() - self._last >= self._interval:
            self._last = time.monotonic()
            elapsed = self._last - self._start
            print(
                f'  ... {_line(self.stats, elapsed)}',
                file=self._out,
                flush=True,
            )


def _line(stats, elapsed):
    rate = stats.handled / elapsed if elapsed > 0 else 0.0
    return (
        f'scrubbed {stats.images}, failed {stats.failed}, skipped '
        f'{stats.skipped}, busy elsewhere {stats.busy}; '
        f'{stats.locations} locations, {stats.bytes_freed} bytes freed; '
        f'{elapsed:.1f} s, {rate:.0f} deletions/s'
    )


def dry_run(parts, out):
    """List what a pass would scrub now; change nothing."""
    print(
        f'{"IMAGE":36}  {"LOCATION":>8}  {"STORE":12}  {"SIZE":>12}  '
        'DUE AT / NOTE',
        file=out,
    )
    count = 0
    for page in parts.sweeper.iter_due():
        for deletion, due_at in page:
            locations, errors = parts.glance_db.describe(deletion)
            for location in locations:
                count += 1
                print(_dry_row(parts, location, due_at), file=out)
            for location_id, reason in errors:
                print(
                    f'{deletion.image_id:36}  {location_id:>8}  '
                    f'{"?":12}  {"?":>12}  UNREADABLE: {reason}',
                    file=out,
                )
            if not locations and not errors:
                print(
                    f'{deletion.image_id:36}  {"-":>8}  {"-":12}  '
                    f'{"-":>12}  {due_at:%Y-%m-%d %H:%M:%S} '
                    '(no data left, image row only)',
                    file=out,
                )
    print(f'{count} location(s) would be scrubbed', file=out)


def _dry_row(parts, location, due_at):
    try:
        backend = parts.stores.resolve(location) or 'default'
        note = f'{due_at:%Y-%m-%d %H:%M:%S}'
        if location.shared:
            note += ' (shared data kept)'
    except exceptions.LocationRefused as exc:
        backend, note = '-', f'REFUSED: {exc}'
    size = location.size if location.size is not None else '?'
    return (
        f'{location.image_id:36}  {location.id:>8}  {backend:12}  '
        f'{size:>12}  {note}'
    )
