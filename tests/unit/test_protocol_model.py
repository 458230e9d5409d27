"""The scrub/restore claim protocol, model-checked (issue 7).

The model and the explorer are in ``tests/model/protocol.py``; its module
docstring states the invariant and the abstractions.  Here:

* the new protocol holds in every configuration of ``CONFIGS``, and the
  search really visited many states;
* the old protocol breaks it, once per finding of issue 7, with the trace
  printed (``pytest -s`` or ``-rP`` shows every report);
* changing any one rule of the new protocol breaks it too: the checker
  can fail;
* outside the issue's spec, a store error that does not prove the delete
  did not happen (a timeout) must be recorded 'outcome unknown', not
  'failed', or the new protocol breaks.
"""

import pytest

from tests.model import protocol as model

# Distinct states each configuration must at least visit: a model or an
# explorer that silently explores nothing fails here.
MIN_STATES = {
    model.CONFIGS[0].name: 50_000,
    model.CONFIGS[1].name: 30_000,
    model.CONFIGS[2].name: 50_000,
    model.CONFIGS[3].name: 40_000,
}

# Small worlds, for the mutants and the symmetry check.
TWO_WORKERS = model.Config('2 workers, 1 image', max_generations=2)
SHARED = model.Config(
    '2 workers, 2 images sharing d1, image1 active',
    locations=((0, 0), (1, 0)),
    active_at_start=frozenset({0}),
)


def _explore(protocol, config):
    result = model.explore(protocol, config)
    print(result.report())
    return result


# -- the new protocol holds ---------------------------------------------------


@pytest.mark.parametrize('config', model.CONFIGS, ids=lambda c: c.name)
def test_new_protocol_holds(config):
    result = _explore(model.NEW, config)

    assert result.violation is None, result.report()
    assert result.states >= MIN_STATES[config.name], result.report()


@pytest.mark.parametrize('finding', sorted(model.FINDINGS))
def test_new_protocol_holds_where_the_old_one_failed(finding):
    result = _explore(model.NEW, model.FINDINGS[finding])

    assert result.violation is None, result.report()


# -- the old protocol fails, once per finding ---------------------------------


def _old_violation(finding):
    result = _explore(model.OLD, model.FINDINGS[finding])
    assert result.violation is not None, result.report()
    assert result.violation.startswith('S1: image1 is active while')
    assert result.trace[-1].startswith('restore image1')
    return result


def test_old_7_1_takeover_does_not_stop_the_old_delete():
    # A's delete runs on; B took over, B's delete failed and its finish
    # handed the row back; the restore revives data A is deleting.
    result = _old_violation('7.1')
    trace = '\n'.join(result.trace)

    assert 'judged stale, taken over' in trace
    assert 'FAILS' in trace
    assert 'store delete of d1 (via loc1) is in flight' in result.violation
    assert 'renew' not in trace


def test_old_7_2_renew_returns_the_takers_stamp():
    # A renews after B's takeover and is told B's stamp; A's failed
    # delete then hands B's row back while B deletes.
    result = _old_violation('7.2')
    trace = '\n'.join(result.trace)

    assert 'A: renew: A now fences with stamp 2' in trace
    assert "A's store delete of loc1 (d1) FAILS" in trace
    assert 'A: finish: loc1 scrubbing[stamp 2] -> pending_delete' in trace
    assert "B's store delete of d1" in result.violation


def test_old_7_3_ctrl_c_hands_rows_back_while_deleting():
    result = _old_violation('7.3')

    assert result.trace[2].startswith(
        'A (one-shot): Ctrl-C: loc1 scrubbing[stamp 0] -> pending_delete'
    )
    assert 'still running' in result.trace[2]
    assert len(result.trace) == 4


def test_old_7_3_ctrl_c_after_a_renewal_leaves_rows_stuck():
    # The old exception path finishes with the claim's first stamp: after
    # a renewal nothing matches and the row stays scrubbing, held by
    # nobody, until lease_time.
    config = model.Config(
        'one-shot', workers=1, oneshot=True, same_second=frozenset()
    )
    state, steps = model.replay(
        model.OLD,
        config,
        ['A (one-shot): claim', 'A (one-shot): renew', 'A (one-shot): Ctrl-C'],
    )
    print('\n'.join(steps))

    assert state.rows == (model.Row(model.SCRUBBING, 2),)
    assert state.workers[0].image is None


def test_new_ctrl_c_leaves_an_in_flight_delete_interrupted():
    config = model.Config('one-shot', workers=1, oneshot=True)
    state, steps = model.replay(
        model.NEW,
        config,
        ['A (one-shot): claim', 'A (one-shot): start', 'A (one-shot): Ctrl-C'],
    )
    print('\n'.join(steps))

    assert state.rows == (model.Row(model.INTERRUPTED),)
    assert state.flights  # the delete still runs, and nothing can revive
    assert model.violation(config, state) is None


def test_old_protocol_with_every_step_fails():
    result = _explore(model.OLD, TWO_WORKERS)

    assert result.violation is not None


# -- the checker can fail: one rule changed at a time ----------------------


class FailedIsAlwaysPending(model.NewProtocol):
    """finish: a failed delete -> pending_delete even after a takeover."""

    name = 'mutant: failed after takeover -> pending_delete'

    def finish_row(self, held):
        if held.delete == model.RETURNED_FAILED:
            return model.PENDING
        return super().finish_row(held)


class TakeoverIsClean(model.NewProtocol):
    """claim: a stale claim taken over counts as clean."""

    name = 'mutant: takeover is clean'

    def take(self, status):
        return True if status == model.SCRUBBING else super().take(status)


class InFlightIsPending(model.NewProtocol):
    """finish: a delete started but not returned -> pending_delete."""

    name = 'mutant: in flight -> pending_delete'

    def finish_row(self, held):
        if held.delete == model.IN_FLIGHT:
            return model.PENDING
        return super().finish_row(held)


class RestoreIgnoresInterrupted(model.NewProtocol):
    """restore: scrub_interrupted rows count as pending_delete."""

    name = 'mutant: restore ignores scrub_interrupted'
    revivable = frozenset({model.PENDING, model.INTERRUPTED})


class FinishNotFenced(model.NewProtocol):
    """finish/renew: any scrubbing row counts as ours (no token)."""

    name = 'mutant: no fencing token'

    def holds(self, row, token):
        return row.status == model.SCRUBBING


class NoSharedCheck(model.NewProtocol):
    """claim: data a live row names is not kept."""

    name = 'mutant: no shared-data check at claim'

    def shared(self, cfg, s, row):
        return False


class RestoreIgnoresSharing(model.NewProtocol):
    """restore: other images' claims on the same data are ignored."""

    name = "mutant: restore ignores other images' claims"
    blocks_sharing_restore = frozenset()


@pytest.mark.parametrize(
    'mutant, config',
    [
        (FailedIsAlwaysPending(), TWO_WORKERS),
        (TakeoverIsClean(), TWO_WORKERS),
        (InFlightIsPending(), TWO_WORKERS),
        (RestoreIgnoresInterrupted(), TWO_WORKERS),
        (FinishNotFenced(), TWO_WORKERS),
        (NoSharedCheck(), SHARED),
        (RestoreIgnoresSharing(), SHARED),
    ],
    ids=lambda x: getattr(x, 'name', ''),
)
def test_one_rule_changed_breaks_the_invariant(mutant, config):
    # (The unchanged protocol holds in these worlds: they are within
    # CONFIGS[1] and CONFIGS[2].)
    result = _explore(mutant, config)

    assert result.violation is not None, result.report()


# -- outside the spec: errors of unknown outcome ----------------------


def test_spec_gap_an_error_that_may_still_delete_must_not_hand_back():
    # The spec has one 'failed' for every store error, and a clean claim
    # hands a failed row back to pending_delete.  A timeout or a lost
    # connection is an error while the store may go on deleting: recorded
    # 'failed', the row is revivable and the invariant breaks.
    config = model.Config(
        '2 workers, 1 image, errors of unknown outcome',
        ambiguous_errors=True,
    )
    result = _explore(model.NEW, config)

    assert result.violation is not None
    assert 'times out' in '\n'.join(result.trace)


@pytest.mark.parametrize(
    'config',
    [
        model.Config(
            '2 workers, 1 image, deleted again, errors of unknown outcome',
            max_generations=2,
            ambiguous_errors=True,
        ),
        model.Config(
            '2 workers, 2 images sharing d1, errors of unknown outcome',
            locations=((0, 0), (1, 0)),
            active_at_start=frozenset({0}),
            ambiguous_errors=True,
        ),
    ],
    ids=lambda c: c.name,
)
def test_errors_of_unknown_outcome_recorded_unknown_hold(config):
    result = _explore(model.NEW_UNKNOWN_ERRORS, config)

    assert result.violation is None, result.report()
    assert result.states > 3000


# -- the explorer itself ------------------------------------------------------


def test_symmetry_reduction_merges_states_and_loses_no_violation():
    plain = model.Config(TWO_WORKERS.name, symmetry=False, max_generations=2)
    for protocol in (model.NEW, model.OLD, FailedIsAlwaysPending()):
        reduced = model.explore(protocol, TWO_WORKERS)
        full = model.explore(protocol, plain)

        assert (reduced.violation is None) == (full.violation is None)
        assert len(reduced.trace) == len(full.trace)  # both shortest
        assert reduced.states < full.states


def test_invariant_sees_an_active_image_with_a_delete_in_flight():
    config = model.Config('1 worker', workers=1)
    state, _ = model.replay(model.NEW, config, ['A: claim', 'A: start'])
    revived = state._replace(
        images=(model.Image(model.ACTIVE, 1),), rows=(model.Row(model.LIVE),)
    )

    assert model.violation(config, state) is None
    assert model.violation(config, revived).startswith('S1: image1 is active')
    gone = revived._replace(flights=(), data=(False,))
    assert (
        model.violation(config, gone)
        == 'S1: image1 is active while d1 is gone'
    )
