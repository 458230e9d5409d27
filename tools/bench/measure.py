"""Run one child process and measure it: wall, CPU and peak RSS.

The numbers come from the kernel, for the child alone: ``os.wait4`` returns
the child's own ``rusage`` (user + system CPU seconds, ``ru_maxrss`` in KiB
on Linux), so nothing the benchmark itself does in between is counted.
Wall time runs from just before ``fork`` to the moment the child is reaped:
interpreter start-up, imports and teardown are included, as an operator's
cron job would see them.
"""

import dataclasses
import os
import signal
import subprocess
import threading
import time


@dataclasses.dataclass
class ChildResult:
    argv: list
    returncode: int
    wall: float
    user: float
    sys: float
    maxrss_kib: int
    timed_out: bool
    stdout_path: str
    stderr_path: str

    @property
    def cpu(self):
        return self.user + self.sys

    @property
    def rss_mib(self):
        return self.maxrss_kib / 1024.0

    def stdout(self):
        with open(self.stdout_path, errors='replace') as f:
            return f.read()

    def stderr_tail(self, lines=20):
        with open(self.stderr_path, errors='replace') as f:
            return ''.join(f.readlines()[-lines:])


def run_child(
    argv, stdout_path, stderr_path, env=None, timeout=None, cwd=None
):
    """Run ``argv`` to completion; return a :class:`ChildResult`.

    stdout/stderr go to files, never pipes: a chatty child must not block
    on a full pipe while we wait for it.  After ``timeout`` seconds the
    child's whole process group is killed and ``timed_out`` is set.
    """
    with open(stdout_path, 'wb') as out, open(stderr_path, 'wb') as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        killed = threading.Event()

        def kill():
            killed.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = None
        if timeout:
            timer = threading.Timer(timeout, kill)
            timer.daemon = True
            timer.start()
        try:
            # why wait4 and not RUSAGE_CHILDREN deltas: it is this child's
            # own rusage, whatever else the benchmark process reaped.
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            if timer is not None:
                timer.cancel()
        wall = time.perf_counter() - started
    # Tell Popen the child is reaped, so it never waits for it again.
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ChildResult(
        argv=list(argv),
        returncode=proc.returncode,
        wall=wall,
        user=usage.ru_utime,
        sys=usage.ru_stime,
        maxrss_kib=usage.ru_maxrss,
        timed_out=killed.is_set(),
        stdout_path=stdout_path,
        stderr_path=stderr_path,
    )
