"""Product processes for tests and benchmarks: start, watch, signal, stop.

Each process runs in its own process group (``start_new_session``), its
stdout and stderr going to one log file, so that ``kill()`` takes its
children down with it and nothing outlives the test or the benchmark.

``ChildProcess(argv, log_path, env=None, name=..., cwd=None)``
    Any command: ``start()``, ``pid``, ``poll()``, ``returncode``,
    ``alive()``, ``log()`` / ``log_tail()`` / ``count(re)`` /
    ``wait_for_log(re)``, ``send(sig)``, ``wait(timeout) -> (rc, s)``,
    ``terminate()`` (SIGTERM, must exit), ``stop()`` (SIGTERM, else
    SIGKILL), ``kill()`` (SIGKILL of the group), ``close()``.
``ServiceProcess(config_file, log_path, env=None, name=..., cwd=None)``
    ``scrub-listener --config-file F``: ``start(wait=True)`` waits for
    its ``scrub-listener started on`` line; ``problems_in_log()``.
``run_cli(args, config_file, ...) -> (rc, stdout, stderr, seconds)``
    One ``scrub-listener-manage`` (or ``binary``) run.
``wait_until(predicate, timeout, message=...) -> (value, seconds)``
    Bounded polling; raises :class:`WaitTimeout` (an AssertionError, so
    pytest reports a failure) after ``timeout``.

``env`` is added to ``os.environ`` (with ``PYTHONWARNINGS=ignore``); for
the import hooks give it ``tools.hooks.hook_env(...)``.
"""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

BIN_DIR = os.path.dirname(sys.executable)


def bin_path(name):
    """The console script ``name`` of this venv (else found on PATH)."""
    path = os.path.join(BIN_DIR, name)
    return path if os.path.exists(path) else shutil.which(name) or name


SERVICE = bin_path('scrub-listener')
MANAGE = bin_path('scrub-listener-manage')

STARTED_RE = re.compile(r'scrub-listener started on ')


class WaitTimeout(AssertionError):
    """A condition waited for did not come true in time."""


def wait_until(predicate, timeout, interval=0.05, message=None):
    """Poll ``predicate()`` until truthy; return (value, elapsed seconds).

    Raises :class:`WaitTimeout` with ``message`` (a string, or a callable
    giving one, evaluated only then) after ``timeout`` seconds.
    """
    started = time.monotonic()
    deadline = started + timeout
    while True:
        value = predicate()
        if value:
            return value, time.monotonic() - started
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise WaitTimeout(
                f'not true within {timeout} s: {text or predicate}'
            )
        time.sleep(interval)


def child_env(env=None):
    """``os.environ`` + ``env``, warnings off (they would fill the log)."""
    return dict(
        os.environ,
        PYTHONWARNINGS='ignore',
        **{k: str(v) for k, v in (env or {}).items()},
    )


class ChildProcess:
    """A command in its own process group, its output in one log file."""

    def __init__(self, argv, log_path, env=None, name='process', cwd=None):
        self.argv = [str(a) for a in argv]
        self.log_path = str(log_path)
        self.env = dict(env or {})
        self.name = name
        self.cwd = cwd
        self.proc = None
        self._log = None
        self.spawned_at = None

    def start(self):
        self._log = open(self.log_path, 'ab')
        self.spawned_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=child_env(self.env),
            cwd=self.cwd,
            start_new_session=True,
        )
        return self

    @property
    def pid(self):
        return self.proc.pid

    @property
    def returncode(self):
        return self.proc.returncode

    def poll(self):
        return self.proc.poll()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self):
        try:
            with open(self.log_path, 'rb') as f:
                return f.read().decode('utf-8', 'replace')
        except FileNotFoundError:
            return ''

    def log_tail(self, lines=40):
        return '\n'.join(self.log().splitlines()[-lines:])

    def count(self, pattern):
        return len(re.findall(pattern, self.log()))

    def wait_for_log(self, pattern, timeout=30, count=1):
        """Wait until ``pattern`` occurs ``count`` times in the log."""
        wait_until(
            lambda: self.count(pattern) >= count,
            timeout,
            message=lambda: (
                f'{pattern!r} x{count} in the log of '
                f'{self.name}:\n{self.log_tail()}'
            ),
        )

    def send(self, signum):
        self.proc.send_signal(signum)

    def wait(self, timeout):
        """Wait for the exit; return (returncode, seconds).

        Raises :class:`WaitTimeout` if it is still running then.
        """
        return self._wait(timeout)

    def _wait(self, timeout):
        started = time.monotonic()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise WaitTimeout(
                f'{self.name} still running after {timeout} s:\n'
                f'{self.log_tail()}'
            ) from None
        return rc, time.monotonic() - started

    def terminate(self, timeout=30):
        """SIGTERM; return (returncode, seconds to exit), or raise."""
        self.send(signal.SIGTERM)
        return self._wait(timeout)

    def stop(self, timeout=60):
        """SIGTERM and wait; SIGKILL after ``timeout``.

        Returns (returncode, seconds); returncode None when it had to be
        killed.
        """
        if not self.alive():
            return (self.proc.returncode if self.proc else None), 0.0
        started = time.monotonic()
        self.send(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = None
        self._close_log()
        return rc, time.monotonic() - started

    def kill(self):
        """SIGKILL the whole process group, at once."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def close(self):
        """Kill whatever is left, close the log (teardown)."""
        self.kill()
        self._close_log()

    def _close_log(self):
        if self._log is not None:
            self._log.close()
            self._log = None


class ServiceProcess(ChildProcess):
    """``scrub-listener --config-file F`` (the always-on service)."""

    def __init__(
        self, config_file, log_path, env=None, name='service', cwd=None
    ):
        self.config_file = str(config_file)
        super().__init__(
            [SERVICE, '--config-file', self.config_file],
            log_path,
            env=env,
            name=name,
            cwd=cwd,
        )
        self.started_in = None

    def start(self, wait=True, timeout=60):
        super().start()
        if wait:
            self.wait_started(timeout)
        return self

    def wait_started(self, timeout=60):
        """Wait for the start line; return seconds since the spawn.

        Raises :class:`WaitTimeout` if the process exits first or the
        line does not come within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while not STARTED_RE.search(self.log()):
            if self.proc.poll() is not None:
                raise WaitTimeout(
                    f'{self.name} exited with {self.proc.returncode} '
                    f'during start:\n{self.log_tail()}'
                )
            if time.monotonic() > deadline:
                raise WaitTimeout(
                    f'{self.name} did not log "scrub-listener started on" '
                    f'within {timeout} s:\n{self.log_tail()}'
                )
            time.sleep(0.05)
        self.started_in = time.monotonic() - self.spawned_at
        return self.started_in

    def problems_in_log(self, expected=()):
        """Log lines that say something went wrong.

        ``expected``: words of an error record caused on purpose; every
        line of that record (same time, pid, level and logger prefix) is
        left out.
        """
        bad = ('ERROR', 'CRITICAL', 'Traceback', 'Dropping malformed')
        lines = [
            line
            for line in self.log().splitlines()
            if any(word in line for word in bad)
        ]
        prefixes = {
            line.split(' [', 1)[0]
            for line in lines
            if expected and all(word in line for word in expected)
        }
        return [
            line
            for line in lines
            if not any(line.startswith(prefix) for prefix in prefixes)
        ]


def run_cli(args, config_file, timeout=120, env=None, binary=MANAGE):
    """Run a command; return (returncode, stdout, stderr, seconds)."""
    started = time.monotonic()
    proc = subprocess.run(
        [binary, '--config-file', str(config_file), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(env),
    )
    return (
        proc.returncode,
        proc.stdout,
        proc.stderr,
        time.monotonic() - started,
    )
