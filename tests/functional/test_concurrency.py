"""Moved: the race tests are in ``test_concurrency_claims.py``,
``test_concurrency_queue.py`` and ``test_concurrency_processes.py``, their
set-up in ``concurrency_fixtures.py``.

Only kept so that ``from tests.functional.test_concurrency import
RESTORE_REFUSALS`` (tests/functional/protocol_rig.py) goes on working;
import it from ``tests.functional.concurrency_fixtures`` instead, then
delete this file.
"""

from tests.functional.concurrency_fixtures import RESTORE_REFUSALS

__all__ = ['RESTORE_REFUSALS']
