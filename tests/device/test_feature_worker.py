"""The feature worker of ``replay --fast --jobs 2`` (deploy/runtime/feature_worker.py).

A real child process (fork) runs a real feature stream; what the decode
stage gets through PrefetchedStream must be what the stream gives in this
process, failures included.  The whole replay with one and two processes is
compared in test_run_replay.py.
"""
import json
import os

import numpy as np
import pytest

from neurohand.decoder.pipeline import FeaturePipeline
from neurohand.deploy.runtime.feature_worker import (
    FeatureWorker, FeatureWorkerError, default_jobs, fork_available)
from neurohand.firmware_bridge.chip.parser import SampleFrame, SampleGap
from neurohand.firmware_bridge.shared.errors import UsageError

pytestmark = pytest.mark.skipif(not fork_available(), reason="the feature worker needs fork")

CONFIG = os.path.join(os.path.dirname(__file__), "data", "replay_run", "config.json")


@pytest.fixture(scope="module")
def pipeline():
    with open(CONFIG) as handle:
        return FeaturePipeline.from_config(json.load(handle)["pipeline"])


def make_items(pipeline, with_nan=False):
    """Frames of random counts (float32 where a NaN is wanted), a gap, more frames."""
    random = np.random.RandomState(3)
    items, t = [], 0.0
    sizes = [300, 7, 500, None, 260, 1000, 40]
    if with_nan:
        sizes.insert(3, "nan")
    for sequence, size in enumerate(sizes):
        if size is None:
            items.append((SampleGap(sequence, 2, 130), t))
            continue
        if size == "nan":
            samples = random.normal(0, 200, (80, pipeline.n_channels)).astype(np.float32)
            samples[5, 1] = np.nan
        else:
            samples = random.randint(-2000, 2000, (size, pipeline.n_channels)).astype(np.int16)
        t += len(samples) / pipeline.signal_rate
        items.append((SampleFrame(sequence, 0, samples), t))
    return items


def in_this_process(pipeline, items, scale):
    """What the decode stage gets from a stream of its own: per frame (features, ends) or the exception."""
    stream = pipeline.stream()
    results = []
    for event, _ in items:
        if isinstance(event, SampleFrame):
            try:
                results.append(stream.push(np.multiply(event.samples, scale)))
            except UsageError as error:
                results.append(error)
        else:
            stream.push_gap(event.missing_samples)
    return results, dict(stream.counters)


def through_the_worker(pipeline, items, scale):
    results, seen = [], []
    with FeatureWorker(pipeline.stream(), lambda: iter(items), scale) as worker:
        for event, t in worker.items():
            seen.append((type(event).__name__, t))
            if isinstance(event, SampleFrame):
                try:
                    results.append(worker.stream.push(np.multiply(event.samples, scale)))
                except UsageError as error:
                    results.append(error)
            else:
                worker.stream.push_gap(event.missing_samples)
        counters = dict(worker.stream.counters)
    return results, counters, seen, worker.dsp_s


@pytest.mark.parametrize("with_nan", [False, True])
def test_the_worker_gives_what_the_stream_gives_here(pipeline, with_nan):
    items = make_items(pipeline, with_nan)
    scale = np.full(pipeline.n_channels, 0.195)
    expected, expected_counters = in_this_process(pipeline, items, scale)
    got, counters, seen, dsp_s = through_the_worker(pipeline, items, scale)
    assert seen == [(type(event).__name__, t) for event, t in items]      # every item, in order
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected):
        if isinstance(theirs, Exception):
            assert type(mine) is type(theirs) and str(mine) == str(theirs)
        else:
            assert np.array_equal(mine[0], theirs[0]) and np.array_equal(mine[1], theirs[1])
    assert counters == expected_counters and counters["gaps"] == 1
    assert sum(len(r[1]) for r in got if not isinstance(r, Exception)) > 10     # windows were computed
    assert any(isinstance(r, UsageError) for r in got) == with_nan
    assert dsp_s > 0


def test_a_block_that_does_not_match_its_features_is_refused(pipeline):
    items = make_items(pipeline)
    with FeatureWorker(pipeline.stream(), lambda: iter(items), np.ones(pipeline.n_channels)) as worker:
        event, _ = next(worker.items())
        with pytest.raises(FeatureWorkerError, match="computed 300 samples for a block of 299"):
            worker.stream.push(event.samples[:299])
        with pytest.raises(FeatureWorkerError, match="did not compute"):
            worker.stream.push(event.samples)      # the result was taken (and refused) already


def test_a_failure_to_read_the_items_is_raised_here(pipeline):
    def unreadable():
        raise UsageError("recording.nhr: truncated header")

    with FeatureWorker(pipeline.stream(), unreadable, np.ones(pipeline.n_channels)) as worker:
        with pytest.raises(UsageError, match="truncated header"):
            list(worker.items())


def test_a_worker_that_dies_is_reported_with_its_exit_code(pipeline):
    items = make_items(pipeline)

    def dying():
        yield items[0]
        os._exit(7)

    with FeatureWorker(pipeline.stream(), dying, np.ones(pipeline.n_channels)) as worker:
        iterator = worker.items()
        next(iterator)
        with pytest.raises(FeatureWorkerError, match="ended unexpectedly \\(exit code 7; .*--jobs 1"):
            next(iterator)


def test_stopping_early_ends_the_child(pipeline):
    endless = make_items(pipeline)[:1] * 100000
    worker = FeatureWorker(pipeline.stream(), lambda: iter(endless), np.ones(pipeline.n_channels))
    with worker:
        next(worker.items())
        process = worker._process
    # Ended by itself on the broken pipe (exit 0), not by the terminate() that close() keeps for a stuck child.
    assert not process.is_alive() and process.exitcode == 0 and worker._process is None


def test_the_child_ignores_sigint_and_goes_on(pipeline):
    import signal

    items = make_items(pipeline) * 20
    with FeatureWorker(pipeline.stream(), lambda: iter(items), np.ones(pipeline.n_channels)) as worker:
        iterator = worker.items()
        next(iterator)
        os.kill(worker._process.pid, signal.SIGINT)     # Ctrl-C to a group whose leader ignores it
        assert len(list(iterator)) == len(items) - 1


def test_default_jobs_follow_the_cpus():
    assert default_jobs() in (1, 2)
    assert default_jobs() == (2 if len(os.sched_getaffinity(0)) >= 2 else 1)


PARENT = """
import json, sys
import numpy as np
from neurohand.decoder.pipeline import FeaturePipeline
from neurohand.deploy.runtime.feature_worker import FeatureWorker
from neurohand.firmware_bridge.chip.parser import SampleFrame
with open(sys.argv[1]) as handle:
    pipeline = FeaturePipeline.from_config(json.load(handle)["pipeline"])
frame = (SampleFrame(0, 0, np.zeros((400, pipeline.n_channels), dtype=np.int16)), 0.0)
worker = FeatureWorker(pipeline.stream(), lambda: iter([frame] * 1000000), np.ones(pipeline.n_channels))
worker.start()
next(worker.items())
print(worker._process.pid, flush=True)
sys.stdin.read()
"""


def _gone(pid):
    try:
        with open("/proc/{}/stat".format(pid)) as handle:
            return handle.read().split(")")[-1].split()[0] in ("Z", "X")    # a zombie has ended
    except (IOError, OSError):
        return True


def test_the_child_ends_when_its_parent_is_killed():
    import signal
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", PARENT, CONFIG], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              universal_newlines=True)
    try:
        child = int(parent.stdout.readline())
        assert not _gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child), "the feature worker outlived its parent"
    finally:
        parent.kill()
        parent.wait()


def test_messages_carry_header_and_arrays_exactly():
    from neurohand.deploy.runtime.feature_worker import decode_message, encode_message

    arrays = [np.arange(12, dtype=np.int16).reshape(3, 4), np.array([[0.1, -2.5e-300]]), np.zeros((0, 5)),
              np.arange(3, dtype=np.int64)[::-1]]
    header, back = decode_message(encode_message({"kind": "item", "t_s": 0.1 + 0.2, "nested": {"a": [1]}}, arrays))
    assert header == {"kind": "item", "t_s": 0.1 + 0.2, "nested": {"a": [1]}}
    assert len(back) == 4
    for mine, theirs in zip(back, arrays):
        assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs)
    data = encode_message({"kind": "end"}, arrays[:1])
    with pytest.raises(FeatureWorkerError, match="header describes"):
        decode_message(data + b"x")


def test_exceptions_come_back_as_their_own_class_where_known():
    from neurohand.deploy.runtime.feature_worker import describe_exception, exception_from
    from neurohand.firmware_bridge.shared.errors import ConfigError

    for original in (UsageError("block contains NaN"), ConfigError("bad"), ValueError("shape"), KeyError("k")):
        again = exception_from(describe_exception(original))
        assert type(again) is type(original) and str(again) == str(original)

    class Unknown(Exception):
        pass

    again = exception_from(describe_exception(Unknown("odd")))
    assert isinstance(again, FeatureWorkerError) and str(again) == "Unknown: odd"
    # JSON has no NaN: such an argument travels as the exception's text.
    again = exception_from(describe_exception(ValueError("value", float("nan"))))
    assert type(again) is ValueError and str(again) == "('value', nan)"


def test_a_dead_worker_is_a_one_line_error_for_the_cli():
    from neurohand.firmware_bridge.shared.errors import NeurohandError

    assert issubclass(FeatureWorkerError, NeurohandError)
