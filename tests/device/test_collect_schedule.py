"""The cue timeline (deploy/collect/schedule.py): pure functions, no clock."""
import collections

from neurohand.deploy.collect import schedule as sched
from neurohand.deploy.collect.protocol import Protocol, load_protocol

MOVES = [{"id": i, "name": "m{}".format(i), "posture": {"index": 1.0}} for i in (1, 2, 3)]


def protocol(**settings):
    config = {"movements": MOVES, "repetitions": 4, "hold_s": 2.0, "rest_s": 1.0, "lead_in_s": 3.0}
    config.update(settings)
    return Protocol.from_config(config)


def test_repetition_blocks_shuffle_each_repetition_from_the_seed():
    p = protocol()
    trials = sched.trial_order(p)
    assert [t.index for t in trials] == list(range(12))
    by_repetition = collections.defaultdict(list)
    for t in trials:
        by_repetition[t.repetition].append(t.movement)
    assert sorted(by_repetition) == [1, 2, 3, 4]
    assert all(sorted(m) == [1, 2, 3] for m in by_repetition.values())
    # Blocks are contiguous: the trainer's split keeps a repetition whole.
    assert [t.repetition for t in trials] == sorted(t.repetition for t in trials)
    orders = {tuple(m) for m in by_repetition.values()}
    assert len(orders) > 1                               # shuffled, not the same order each time
    assert sched.trial_order(protocol()) == trials      # same seed, same order
    assert sched.trial_order(protocol(seed=2)) != trials


def test_fixed_movement_blocks_repeat_each_movement_in_a_row():
    trials = sched.trial_order(protocol(order="fixed", blocks="movement"))
    assert [(t.movement, t.repetition) for t in trials[:5]] == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1)]


def test_trial_steps_lay_move_and_rest_end_to_end_and_skip_what_is_done():
    p = protocol()
    plan = sched.Schedule(sched.trial_steps(p))
    assert plan.steps[0].kind == "lead_in" and plan.steps[0].duration_s == 3.0
    assert plan.total_s == 3.0 + 12 * 3.0
    for a, b in zip(plan.steps, plan.steps[1:]):
        assert abs(a.start_s + a.duration_s - b.start_s) < 1e-9
    move = plan.steps[1]
    assert move.kind == "move" and move.trial == 0 and move.posture[1] == 1.0 and move.movement > 0
    assert plan.steps[2].kind == "rest" and plan.steps[2].trial == 0 and plan.steps[2].movement == 0
    left = sched.Schedule(sched.trial_steps(p, done=[0, 1, 5]))
    assert left.trials == [2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert left.total_s == 3.0 + 9 * 3.0


def test_at_answers_what_is_shown_and_for_how_long():
    plan = sched.Schedule(sched.trial_steps(protocol()))
    step, left = plan.at(4.5)
    assert step.kind == "move" and abs(left - 0.5) < 1e-9
    step, left = plan.at(5.0)
    assert step.kind == "rest" and abs(left - 1.0) < 1e-9
    assert plan.at(-1.0)[0].kind == "lead_in"
    assert plan.at(plan.total_s) == (None, 0.0)
    assert plan.index_at(plan.total_s - 1e-6) == len(plan) - 1
    assert plan.trial_end_s(0) == 6.0


def test_calibration_poses_come_first_with_rest_between():
    p = load_protocol("paper")
    steps = sched.calibration_steps(p)
    poses = [s.pose for s in steps if s.kind == "calibrate"]
    assert poses == ["open", "fist", "thumb", "index", "middle", "ring", "little"]
    fist = next(s for s in steps if s.pose == "fist")
    assert fist.posture == (1.0,) * 5 and sched.cue_code(fist) == -2
    ring = next(s for s in steps if s.pose == "ring")
    assert ring.posture == (0.0, 0.0, 0.0, 1.0, 0.0)
    assert all(s.kind == "calibrate_rest" for s in steps[::2])
    assert sched.Schedule(steps).total_s == 7 * (3.0 + 1.5)


def test_cue_codes_and_done_trials():
    plan = sched.Schedule(sched.trial_steps(protocol()))
    codes = [sched.cue_code(s) for s in plan.steps]
    assert codes[0] == 0 and set(codes[1::2]) == {1, 2, 3} and set(codes[2::2]) == {0}
    Event = collections.namedtuple("Event", "sample kind value")
    events = [Event(1, "trial_done", 4), Event(2, "movement", 3), Event(3, "trial_done", 1), Event(4, "trial_done", 4)]
    assert sched.done_trials(events) == [1, 4]
