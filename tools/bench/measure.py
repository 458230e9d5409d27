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

_TICK = os.sysconf('SC_CLK_TCK')


def machine_busy_seconds():
    """CPU seconds all CPUs spent busy since boot (not idle, not iowait)."""
    with open('/proc/stat') as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    total = sum(fields[:8])  # user..steal; guest is inside user
    idle = fields[3] + fields[4]
    return (total - idle) / _TICK


def process_cpu_seconds(pid):
    """utime + stime of a running process, or None."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def kernel_threads_cpu_seconds():
    """{pid: utime + stime} of all kernel threads (children of kthreadd).

    Work the kernel does outside the process that caused it: writeback,
    the ext4 journal, discards of freed blocks (this machine mounts /
    with ``discard``), so a run's unlinks cost CPU here too.
    """
    cpu = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if fields[1] == '2':  # ppid: kthreadd
            cpu[entry] = (int(fields[11]) + int(fields[12])) / _TICK
    return cpu


def _kernel_delta(before, after):
    # Kernel workers come and go: count what each one that is there at
    # the end did since the start (all of it if it is new).
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def find_pids(names):
    """Pids of running processes whose comm is in ``names``."""
    pids = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/comm') as f:
                if f.read().strip() in names:
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def busy_cores(window=1.0):
    """Average number of busy CPUs over the next ``window`` seconds."""
    before = machine_busy_seconds()
    time.sleep(window)
    return (machine_busy_seconds() - before) / window


def wait_until_quiet(max_busy=0.3, max_wait=300.0, window=1.0):
    """Wait until the machine is nearly idle; return (waited s, busy).

    The machine is shared (other sessions run tests on the same CPUs and
    database servers), so a run started in someone else's burst would
    measure their load.  Gives up after ``max_wait`` seconds and returns
    the last reading so the run can be flagged.
    """
    started = time.monotonic()
    while True:
        busy = busy_cores(window)
        waited = time.monotonic() - started
        if busy <= max_busy or waited >= max_wait:
            return waited, busy


@dataclasses.dataclass
class ChildResult:
    """What one measured child process did: times, CPU, RSS, output."""

    argv: list
    returncode: int
    wall: float
    user: float
    sys: float
    maxrss_kib: int
    timed_out: bool
    stdout_path: str
    stderr_path: str
    machine_busy: float = 0.0  # CPU seconds the whole machine was busy
    db_cpu: float | None = None  # CPU seconds of the database server
    kernel_cpu: float = 0.0  # CPU seconds of kernel threads

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
    argv,
    stdout_path,
    stderr_path,
    env=None,
    timeout=None,
    cwd=None,
    db_pids=(),
):
    """Run ``argv`` to completion; return a :class:`ChildResult`.

    stdout/stderr go to files, never pipes: a chatty child must not block
    on a full pipe while we wait for it.  After ``timeout`` seconds the
    child's whole process group is killed and ``timed_out`` is set.
    ``db_pids``: database server processes whose CPU time during the run
    is recorded too (``db_cpu``; on a shared server it includes other
    clients' queries).
    """
    db_before = [process_cpu_seconds(p) for p in db_pids]
    kernel_before = kernel_threads_cpu_seconds()
    busy_before = machine_busy_seconds()
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
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM): do not leave the child
            # running against databases we are about to drop.
            kill()
            os.waitpid(proc.pid, 0)
            proc.returncode = -9
            raise
        finally:
            if timer is not None:
                timer.cancel()
        wall = time.perf_counter() - started
    busy = machine_busy_seconds() - busy_before
    kernel_cpu = _kernel_delta(kernel_before, kernel_threads_cpu_seconds())
    db_cpu = None
    if db_pids:
        db_after = [process_cpu_seconds(p) for p in db_pids]
        if None not in db_before and None not in db_after:
            db_cpu = sum(db_after) - sum(db_before)
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
        machine_busy=busy,
        db_cpu=db_cpu,
        kernel_cpu=kernel_cpu,
    )
