"""The explorer of the claim-protocol model: the exhaustive search, the
symmetry reduction and the rendering of traces.

Owns ``explore`` (breadth first, each distinct state once, the invariant
checked after every step, a shortest violating trace), ``replay`` (a
scripted interleaving), ``canonical`` (one state per renaming of
interchangeable workers) and ``describe`` (one line per step).
"""

import collections
import dataclasses
import itertools

from tests.model.transitions import successors
from tests.model.world import SCRUBBING
from tests.model.world import WORKER_NAMES
from tests.model.world import Flight
from tests.model.world import Row
from tests.model.world import State
from tests.model.world import Worker
from tests.model.world import _name
from tests.model.world import initial_state
from tests.model.world import violation

# -- exploration -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Result:
    """What an exploration found: states seen, and a violating trace if any."""

    protocol: str
    config: str
    states: int  # distinct states visited
    violation: str | None = None
    trace: tuple = ()  # of step descriptions, shortest first

    def report(self):
        head = f'{self.protocol} protocol, {self.config}: '
        head += f'{self.states} distinct states'
        if self.violation is None:
            return head + ', invariant holds'
        lines = [head + f', VIOLATION after {len(self.trace)} steps:']
        lines += [f'  {n:2}. {step}' for n, step in enumerate(self.trace, 1)]
        lines.append(f'  => {self.violation}')
        return '\n'.join(lines)


def explore(protocol, config, max_states=5_000_000):
    """Breadth-first search of every reachable state; stop at the first
    violation, so the trace returned is a shortest one.

    States are kept up to renaming of interchangeable workers (see
    ``canonical``).
    """
    start = canonical(config, initial_state(config))
    parent = {start: None}
    queue = collections.deque([start])
    bad, last = violation(config, start), start
    while queue and bad is None:
        state = queue.popleft()
        for _, nxt in successors(protocol, config, state):
            if nxt.workers is not state.workers:  # else still in order
                nxt = canonical(config, nxt)
            if nxt in parent:
                continue
            parent[nxt] = state
            bad = violation(config, nxt)
            if bad is not None:
                last = nxt
                break
            queue.append(nxt)
        if len(parent) > max_states:
            raise RuntimeError(f'{config.name}: over {max_states} states')
    trace = ()
    if bad is not None:
        # Told again on the real state: the representative's names differ.
        trace, real = _trace(protocol, config, parent, last)
        bad = violation(config, real)
    return Result(protocol.name, config.name, len(parent), bad, trace)


def _trace(proto, cfg, parent, last):
    """The steps from the start to ``last``, with the workers' real names:
    replay the path of representatives, picking at each step a successor
    that is the next one up to names."""
    path = [last]
    while parent[path[-1]] is not None:
        path.append(parent[path[-1]])
    path.reverse()
    state, steps = initial_state(cfg), []
    for goal in path[1:]:
        step, nxt = next(
            (step, nxt)
            for step, nxt in successors(proto, cfg, state)
            if _alike(cfg, nxt, goal)
        )
        steps.append(describe(proto, cfg, step, state, nxt))
        state = nxt
    return tuple(steps), state


def replay(protocol, config, steps):
    """Run a scripted interleaving: for each prefix in ``steps``, the first
    step whose description starts with it.  Returns (state, descriptions).
    """
    state, done = initial_state(config), []
    for prefix in steps:
        for step, nxt in successors(protocol, config, state):
            text = describe(protocol, config, step, state, nxt)
            if text.startswith(prefix):
                state = nxt
                done.append(text)
                break
        else:
            raise LookupError(f'no step {prefix!r} after {done}')
    return state, done


# -- symmetry ----------------------------------------------------------------
# Workers allowed the same steps are interchangeable: a state, and the same
# state with two such workers' names swapped (in the workers, in the tokens
# on the rows, in the in-flight deletes), have the same futures up to that
# renaming, and the invariant does not look at names.  So the search keeps
# one representative per class: these workers sorted by what they hold.
# This merges states that are the same up to names; it drops no behaviour.


def canonical(cfg, s):
    """The representative of ``s``: interchangeable workers in order."""
    group = cfg.interchangeable
    if len(group) < 2:
        return s
    keys = _worker_keys(s, group)
    if keys == sorted(keys):
        return s  # already in order (the common case: no work)
    return _rename(s, [w for _, w in sorted(zip(keys, group, strict=True))])


def _rename(s, order):
    """``s`` with worker ``order[i]`` renamed ``i`` (in its slot, its
    tokens on the rows, its in-flight deletes)."""
    rename = {old: new for new, old in enumerate(order)}

    def token(t):
        return (rename.get(t[0], t[0]), t[1]) if type(t) is tuple else t

    workers = list(s.workers)
    for new, old in enumerate(order):
        claims, image, tok, claimed_with, held = s.workers[old]
        workers[new] = Worker(
            claims, image, token(tok), token(claimed_with), held
        )
    rows = tuple(
        Row(SCRUBBING, token(r.holder)) if r.status == SCRUBBING else r
        for r in s.rows
    )
    flights = tuple(
        sorted(Flight(rename.get(f[0], f[0]), f[1], f[2]) for f in s.flights)
    )
    return State(s.data, s.images, rows, tuple(workers), flights, s.clock)


def _alike(cfg, a, b):
    """Are ``a`` and ``b`` the same state up to worker names?"""
    return any(
        _rename(a, order) == b
        for order in itertools.permutations(cfg.interchangeable)
    )


def _worker_keys(s, group):
    """Per worker of ``group``, a sort key without its name.

    Cheap, so not quite canonical: workers alike in these but differing in
    the dead tokens or orphan deletes they left keep two representatives.
    That costs states, never soundness: any renaming is a symmetry.
    """
    return [
        (worker.claims, -1 if worker.image is None else worker.image)
        + worker.held
        for worker in map(s.workers.__getitem__, group)
    ]


# -- rendering ---------------------------------------------------------------


def _token(token):
    if isinstance(token, tuple) and token[1] == 0:
        return f'{WORKER_NAMES[token[0]]}, dead'
    if isinstance(token, tuple):
        return f'{WORKER_NAMES[token[0]]}{token[1]}'
    return f'stamp {token}'


def _row(row):
    if row.status == SCRUBBING:
        return f'scrubbing[{_token(row.holder)}]'
    return row.status


def describe(proto, cfg, step, before, after):
    """One line: what the step is, then what it changed."""
    action, w, arg = step
    who = _name(cfg, w) if w is not None else ''
    if action == 'claim':
        text = f'{who}: claim (image{arg[0] + 1}, gen {arg[1]})'
    elif action in ('start', 'ok', 'fail', 'error'):
        where = f'loc{arg + 1} (d{cfg.data_of[arg] + 1})'
        text = {
            'start': f'{who}: start store delete of {where}',
            'ok': f"{who}'s store delete of {where} returns OK",
            'fail': f"{who}'s store delete of {where} FAILS",
            'error': f"{who}'s store delete of {where} times out "
            '(an error, but the store goes on deleting)',
        }[action]
    elif action == 'restore':
        text = f'restore image{arg + 1}'
    elif action == 'redelete':
        text = f'glance-api DELETE image{arg + 1}'
    else:
        text = f'{who}: ' + {'interrupt': 'Ctrl-C'}.get(action, action)
    changes = _changes(proto, cfg, step, before, after)
    return f'{text}: {"; ".join(changes)}' if changes else text


def _changes(proto, cfg, step, before, after):
    action, w, _ = step
    claimed = {}
    if action == 'claim':
        claimed = {h.row: h for h in after.workers[w].held}
    out = []
    for i, (a, b) in enumerate(zip(before.images, after.images, strict=True)):
        if a != b:
            out.append(
                f'image{i + 1} {a.status} -> {b.status} (gen {b.generation})'
            )
    for r, (a, b) in enumerate(zip(before.rows, after.rows, strict=True)):
        if r in claimed:
            out.append(
                f'loc{r + 1} {_row(a)} -> {_row(b)}'
                + _how(proto, a, claimed[r])
            )
        elif a != b:
            out.append(f'loc{r + 1} {_row(a)} -> {_row(b)}')
    for d, (a, b) in enumerate(zip(before.data, after.data, strict=True)):
        if a and not b:
            out.append(f'd{d + 1} GONE')
    if w is None:
        return out
    was, now = before.workers[w], after.workers[w]
    if action == 'renew' and was.token != now.token:
        out.append(f'{WORKER_NAMES[w]} now fences with {_token(now.token)}')
    if action == 'renew' and len(now.held) < len(was.held):
        dropped = {h.row for h in was.held} - {h.row for h in now.held}
        out.append(
            f'{WORKER_NAMES[w]} learns it lost '
            + ', '.join(f'loc{r + 1}' for r in sorted(dropped))
        )
    if action in ('finish', 'interrupt', 'crash'):
        running = [f for f in after.flights if f.worker == w]
        if running:
            out.append(
                'still running: '
                + ', '.join(f'delete of loc{f.row + 1}' for f in running)
            )
    return out


def _how(proto, row, held):
    """How a claim took a row: (clean|unclean, taken over, shared)."""
    how = []
    if proto.tracks_clean:
        how.append('clean' if held.clean else 'unclean')
    if row.status == SCRUBBING:
        how.append('judged stale, taken over')
    if held.shared:
        how.append('shared: keep the data')
    return f' ({", ".join(how)})' if how else ''
