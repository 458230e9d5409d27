"""scrub_listener.pool.StorePool: the store delete pool stops at once."""

import threading

from futurist import _thread

from scrub_listener import pool


def test_shutdown_wakes_idle_workers(monkeypatch):
    """With idle workers polling their queue once an hour, a plain
    futurist pool would hold shutdown (and interpreter exit) for that
    hour; this one wakes them and returns."""
    monkeypatch.setattr(_thread.ThreadWorker, 'MAX_IDLE_FOR', 3600)
    executor = pool.StorePool(max_workers=4)
    futures = [executor.submit(lambda i=i: i * 2) for i in range(8)]
    assert [f.result() for f in futures] == [i * 2 for i in range(8)]
    workers = list(executor._workers)
    assert workers

    stopper = threading.Thread(target=executor.shutdown, daemon=True)
    stopper.start()
    stopper.join(30)

    assert not stopper.is_alive(), 'shutdown waited for idle polls'
    assert not any(w.is_alive() for w in workers)


def test_work_submitted_before_shutdown_still_runs():
    executor = pool.StorePool(max_workers=1)
    gate = threading.Event()
    first = executor.submit(gate.wait, 30)
    second = executor.submit(lambda: 'done')
    gate.set()
    executor.shutdown(wait=True)
    assert first.result() is True
    assert second.result() == 'done'
