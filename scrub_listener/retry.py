"""Retry with capped exponential backoff: one helper, used everywhere.

Jittered, so that instances that failed together do not come back
together; bounded by a total time, so that a caller holding something
(a claim, a batch of messages) knows when to let go.
"""

import logging
import random
import time

LOG = logging.getLogger(__name__)


def delays(first=0.5, maximum=30.0, jitter=0.1):
    """Yield the waits between attempts: first, 2 × first, … ≤ maximum."""
    delay = first
    while True:
        yield delay * random.uniform(1 - jitter, 1 + jitter)
        delay = min(delay * 2, maximum)


def call(
    func,
    retry_on,
    within,
    what,
    sleep=time.sleep,
    clock=time.monotonic,
    first=0.5,
    maximum=30.0,
):
    """Return ``func()``, retried on ``retry_on`` for up to ``within`` s.

    Each failure is logged as one WARNING naming ``what``; the last one
    is raised when the next wait would pass the deadline.
    """
    deadline = clock() + within
    for delay in delays(first, maximum):
        try:
            return func()
        except retry_on as exc:
            if clock() + delay > deadline:
                raise
            LOG.warning(
                'Could not %s (%s: %s); retrying in %.1f s',
                what,
                type(exc).__name__,
                exc,
                delay,
            )
            sleep(delay)
    raise AssertionError('unreachable')
