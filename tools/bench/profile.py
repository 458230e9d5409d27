"""Where the time goes: summarize a py-spy ``--format raw`` profile.

``sweep --profile FILE`` records scrub-listener with ``py-spy record
--idle --threads --format raw``: one line per distinct stack, ``thread
(TID);frame;frame;... COUNT``, each frame ``function (file:line)``.  With
``--idle`` a sample is taken whether or not the thread runs, so for the
main thread the shares are shares of *wall* time (waiting for the database
included); py-spy samples at a fixed rate, so samples are time.

The report attributes each main-thread sample three ways:

* by the deepest ``scrub_listener`` frame (``file:function``): which of
  our functions the time is spent in or under;
* by phase (imports, the sweep, the due-queue claim, the Glance claim,
  waiting for the store deletes, the Glance finish, settling the queue);
* by leaf function (self time: which library code actually runs).
"""

import collections
import gzip
import re

_FRAME = re.compile(r'^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$')

#: (phase, function names in the stack that put a sample in it), checked
#: deepest-first; the first phase whose marker is in the stack wins.
PHASES = (
    ('imports', ('_find_and_load',)),
    ('glance claim (lock images+locations, mark scrubbing)', ('_claim@gdb',)),
    ('glance finish (locations+images -> deleted)', ('_finish@gdb',)),
    ('store deletes (waiting for the pool)', ('_delete_all',)),
    ('due-queue claim', ('_claim@queue',)),
    ('due-queue complete/retry', ('complete', 'retry_later', 'release')),
    ('logging per image (Drain._log)', ('_log',)),
    ('sweep (page Glance DB, enqueue)', ('sweep',)),
    ('build (config, engines, stores, schema)', ('build', 'load_config')),
    ('close (pool shutdown, engine dispose)', ('close',)),
)


def parse_frame(text):
    """('file', 'function') of one raw frame."""
    match = _FRAME.match(text)
    if not match:
        return ('?', text)
    path = match.group('file')
    for marker in ('site-packages/', 'lib/python3'):
        if marker in path:
            path = path.split(marker, 1)[1]
    return (path, match.group('func'))


def read_raw(path):
    """[(thread, [(file, function), ...], count)], root frame first."""
    samples = []
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rt') as f:
        for line in f:
            line = line.rstrip('\n')
            if not line:
                continue
            stack, _, count = line.rpartition(' ')
            frames = stack.split(';')
            thread = '?'
            if frames[0].startswith('thread'):
                # "thread (TID)" before threading is imported, "thread
                # (TID): NAME" after: the TID is the thread.
                thread = frames[0].split(':', 1)[0]
                frames = frames[1:]
            samples.append(
                (thread, [parse_frame(f) for f in frames], int(count))
            )
    return samples


def _main_thread(samples):
    # The main thread is the one whose stacks start at the console script.
    for thread, frames, _ in samples:
        if frames and frames[0][1] == '<module>':
            return thread
    return None


def _marker(frame):
    path, func = frame
    # py-spy names methods Class.method
    func = func.rsplit('.', 1)[-1]
    if path.endswith('scrub_listener/glance_db.py'):
        return f'{func}@gdb'
    if path.endswith('scrub_listener/queue.py'):
        return f'{func}@queue'
    return func


def phase_of(frames):
    names = {_marker(f) for f in frames}
    names |= {f[1].rsplit('.', 1)[-1] for f in frames}
    for phase, markers in PHASES:
        if any(m in names for m in markers):
            return phase
    return 'other'


def _ours(frames):
    for path, func in reversed(frames):
        if 'scrub_listener/' in path:
            return f'{path.split("scrub_listener/", 1)[1]}:{func}'
    return '(outside scrub_listener)'


def _table(title, counter, total, top):
    lines = [title]
    for name, count in counter.most_common(top):
        lines.append(f'  {100.0 * count / total:5.1f}%  {name}')
    return lines


def report(path, top=25, rate=250):
    """Lines of text: the main thread's wall time, three ways; threads."""
    samples = read_raw(path)
    if not samples:
        return [f'{path}: no samples']
    main = _main_thread(samples)
    main_samples = [(fr, n) for t, fr, n in samples if t == main]
    total = sum(n for _, n in main_samples) or 1
    lines = [
        f'Profile {path}: main thread {total} samples '
        f'(~{total / rate:.2f} s wall at {rate} Hz, idle included)'
    ]
    phases = collections.Counter()
    ours = collections.Counter()
    leaves = collections.Counter()
    inclusive = collections.Counter()
    for frames, n in main_samples:
        phases[phase_of(frames)] += n
        ours[_ours(frames)] += n
        if frames:
            leaves[f'{frames[-1][0]}:{frames[-1][1]}'] += n
        for name in {f'{p}:{fn}' for p, fn in frames}:
            inclusive[name] += n
    lines += _table('Main thread by phase:', phases, total, top)
    lines += _table(
        'Main thread by deepest scrub_listener function (inclusive):',
        ours,
        total,
        top,
    )
    lines += _table('Main thread by leaf function (self):', leaves, total, top)
    libs = collections.Counter(
        {
            k: v
            for k, v in inclusive.items()
            if not k.startswith(('<frozen', 'importlib', 'threading'))
            and v < total
        }
    )
    lines += _table('Main thread, inclusive (any depth):', libs, total, top)
    others = collections.Counter()
    other_total = 0
    for thread, frames, n in samples:
        if thread == main or not frames:
            continue
        other_total += n
        others[f'{frames[-1][0]}:{frames[-1][1]}'] += n
    if other_total:
        lines += _table(
            f'Other threads ({other_total} samples, store delete pool), '
            'by leaf:',
            others,
            other_total,
            10,
        )
    return lines
