"""Retry with capped exponential backoff: one helper, used everywhere.

Jittered, so that instances that failed together do not come back
together; bounded by a total time, so that a caller holding something
(a claim, a batch of messages) knows when to let go.
"""

import logging
import random
import time

LOG = logging.getLogger(__name__)


def backoff(attempt, first=0.5, maximum=30.0, jitter=0.1):
    """The wait after failed attempt number ``attempt`` (1, 2, …).

    ``first × 2^(attempt-1)``, capped at ``maximum``, times a random
    factor within ``1 ± jitter``.
    """
    delay = min(first * 2 ** min(attempt - 1, 64), maximum)
    return delay * random.uniform(1 - jitter, 1 + jitter)


def delays(first=0.5, maximum=30.0, jitter=0.1):
    """Yield the waits between attempts: first, 2 × first, … ≤ maximum."""
    attempt = 1
    while True:
        yield backoff(attempt, first, maximum, jitter)
        attempt += 1


def call(
    func,
    retry_on,
    within,
    what,
    sleep=time.sleep,
    clock=time.monotonic,
    first=0.5,
    maximum=30.0,
    level=logging.WARNING,
):
    """Return ``func()``, retried on ``retry_on`` for up to ``within`` s.

    Each failure is logged as one line (``level``) naming ``what``; the
    last one is raised when the next wait would pass the deadline.
    """
    deadline = clock() + within
    for delay in delays(first, maximum):
        try:
            return func()
        except retry_on as exc:
            if clock() + delay > deadline:
                raise
            LOG.log(
                level,
                'Could not %s (%s: %s); retrying in %.1f s',
                what,
                type(exc).__name__,
                exc,
                delay,
            )
            sleep(delay)
    raise AssertionError('unreachable')
