"""The real-time loop's garbage collection: off while it runs, run by the writer between commands."""
import gc
import time
import weakref

import pytest

from neurohand.deploy.runtime.garbage import IdleCollector
from neurohand.deploy.runtime.stats import Distribution

from tests.device.test_runtime_loop import PacedChip, make_runner


@pytest.fixture
def low_thresholds():
    """Small thresholds so a test's few allocations make a collection due; restored afterwards."""
    before, enabled = gc.get_threshold(), gc.isenabled()
    gc.collect()
    gc.set_threshold(20, 2, 2)
    yield
    gc.set_threshold(*before)
    if enabled:
        gc.enable()


def _allocate(n):
    return [[index] for index in range(n)]


def test_start_takes_over_and_stop_gives_collection_back_as_it_was(low_thresholds):
    collector = IdleCollector(None, time.perf_counter)
    gc.enable()
    collector.start()
    assert collector.active and not gc.isenabled()
    collector.stop()
    assert not collector.active and gc.isenabled()
    gc.disable()                      # someone who had it off keeps it off
    collector.start()
    collector.stop()
    assert not gc.isenabled()


def test_nothing_is_collected_until_the_young_generation_is_due(low_thresholds):
    timer = Distribution()
    collector = IdleCollector(timer, time.perf_counter)
    collector.start()
    try:
        assert collector.collect_if_due() is None and timer.count == 0
        kept = _allocate(100)         # live containers count towards the young generation
        assert gc.get_count()[0] >= 20
        assert collector.collect_if_due() == 0
        assert timer.count == 1 and collector.collections == [1, 0, 0]
        assert gc.get_count()[0] < 20 and len(kept) == 100
    finally:
        collector.stop()


def test_older_generations_are_collected_when_python_would_collect_them(low_thresholds):
    collector = IdleCollector(Distribution(), time.perf_counter)
    collector.start()
    try:
        kept = []
        generations = []
        for _ in range(9):
            kept.append(_allocate(50))
            generations.append(collector.collect_if_due())
        # Thresholds (20, 2, 2): every third collection is of generation 1, every ninth of all three.
        assert generations == [0, 0, 1, 0, 0, 1, 0, 0, 2]
        assert collector.collections == [6, 2, 1]
    finally:
        collector.stop()


def test_a_cycle_made_during_the_run_is_reclaimed_by_the_writer():
    class Node(object):
        pass

    before = gc.get_threshold()
    gc.set_threshold(50, 10, 10)
    try:
        runner, hand = make_runner(chip=PacedChip(40))
        original_step = runner.parts.writer.step

        def step(command, now):
            _allocate(200)                # the run's own allocations make collections due
            return original_step(command, now)

        runner.parts.writer.step = step
        gc.enable()
        runner.start()
        probe = Node()                    # made during the run (what start() froze is out of reach)
        probe.self = probe                # reachable only through itself once dropped
        alive = [True]
        weakref.finalize(probe, alive.__setitem__, 0, False)
        del probe
        assert not gc.isenabled()         # off while the threads run
        time.sleep(0.5)
        runner.shutdown("test")
        document = runner.document
    finally:
        gc.set_threshold(*before)
    assert gc.isenabled()                 # back on after the shutdown
    assert alive == [False]               # the writer's collections reclaimed the cycle
    assert document["stage_us"]["gc"]["count"] >= 1
    assert sum(runner.collector.collections) == document["stage_us"]["gc"]["count"]
