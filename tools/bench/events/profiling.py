"""py-spy on the service during a timed part, and where its CPU went.

``--profile DIR`` of ``python -m tools.bench events`` records the service
(CPU samples, all threads, raw format) during the first ingest run, the
latency run and the RPC restores.  Print the summary of a kept profile
with ``python -c "from tools.bench import events;
print('\\n'.join(events.profile_summary('FILE')))"``.
"""

import gzip
import os
import re
import signal
import subprocess
import time

from tools import service_process


class Profiler:
    """py-spy attached to a running pid (CPU samples, raw format)."""

    def __init__(self, directory, name, pid):
        self.path = None
        self.proc = None
        if not directory:
            return
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f'events-{name}.pyspy.txt')
        self.proc = subprocess.Popen(
            [
                service_process.bin_path('py-spy'),
                'record',
                '--pid',
                str(pid),
                '--rate',
                '100',
                '--threads',
                '--nonblocking',
                '--format',
                'raw',
                '--output',
                self.path,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # attached before the timed part starts

    def stop(self):
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.path


def profile_summary(path, top=12):
    """Lines: CPU samples by thread, by our function and by leaf."""
    if not path or not os.path.exists(path):
        return ['(no profile recorded)']
    by_thread, by_ours, by_leaf = {}, {}, {}
    total = 0
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rt') as f:
        for line in f:
            stack, _, count = line.rstrip('\n').rpartition(' ')
            if not stack or not count.isdigit():
                continue
            count = int(count)
            frames = stack.split(';')
            # "thread (TID): NAME" (no name: the main thread); numbered
            # names (oslo.messaging's executor threads) are pooled.
            name = frames[0].partition('): ')[2] or 'main'
            thread = re.sub(r'\d+', 'N', name)
            frames = frames[1:]
            total += count
            by_thread[thread] = by_thread.get(thread, 0) + count
            ours = [f for f in frames if 'scrub_listener/' in f]
            theirs = [f for f in frames if 'oslo_messaging/' in f]
            if ours:
                key = _short_frame(ours[-1])
            elif theirs:
                key = '(no scrub_listener frame) ' + _short_frame(theirs[-1])
            else:
                key = '(no scrub_listener or oslo_messaging frame)'
            by_ours[key] = by_ours.get(key, 0) + count
            if frames:
                leaf = _short_frame(frames[-1])
                by_leaf[leaf] = by_leaf.get(leaf, 0) + count
    if not total:
        return ['(empty profile)']
    lines = [f'py-spy: {total} CPU samples at 100 Hz ({path})']
    for title, table in (
        ('by thread', by_thread),
        ('by deepest scrub_listener frame (file:function)', by_ours),
        ('by leaf function (self time)', by_leaf),
    ):
        lines.append(f'  {title}:')
        for key, count in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f'    {count / total:6.1%}  {key}')
    return lines


def _short_frame(frame):
    func, _, where = frame.partition(' (')
    where = where.rstrip(')')
    path = where.rsplit(':', 1)[0]
    for marker in ('site-packages/', 'lib/python3', '/work/main/'):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f'{path}:{func}'


def profile_top(path, top=8):
    """[(share, 'file:function')] by deepest scrub_listener frame."""
    lines = profile_summary(path, top)
    out = []
    section = None
    for line in lines:
        if line.startswith('  by '):
            section = line
        elif section and 'scrub_listener frame' in section:
            share, _, key = line.strip().partition('  ')
            out.append((share, key))
    return out
