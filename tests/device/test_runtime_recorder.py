"""--record: the run's recording read back, the bounded backlog, kill -9, and
fast replay of a recording (gaps become SampleGaps again)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from neurohand.decoder.backends import create_backend
from neurohand.decoder.pipeline import FeaturePipeline
from neurohand.deploy.runtime import run_fast_replay
from neurohand.deploy.runtime.config import RuntimeConfig
from neurohand.deploy.runtime.recorder import ThreadedRecorder, open_run_recording
from neurohand.deploy.runtime.replay_source import recording_gaps, recording_items
from neurohand.firmware_bridge.chip.parser import SampleFrame, SampleGap
from neurohand.firmware_bridge.recording.file_format import open_recording

MODEL = os.path.join(os.path.dirname(__file__), "data", "golden_gru.onnx")
RATE = 1000.0
SPF = 10
FINGERS = ["thumb", "index", "middle", "ring", "little"]
PIPELINE = {"format": "neurohand-feature-pipeline", "version": 1, "signal_rate": RATE, "n_channels": 3,
            "mode": "envelope", "dtype": "float64", "window_samples": 50, "stride_samples": 10,
            "car": False, "sos": [], "features": ["mean", "std"], "bandpower_bands_hz": [],
            "threshold_uv": 0.0, "log": False, "log_epsilon": 1e-6,
            "normalisation": {"mean": [0.0] * 6, "std": [50.0] * 6}}


def chip_items(n_frames, gap_at=None, gap_frames=0, seed=0):
    """Frames (and one gap) as the parser would give them; times on the sample axis."""
    rng = np.random.RandomState(seed)
    items, sample, sequence = [], 0, 0
    for index in range(n_frames):
        if index == gap_at:
            items.append((SampleGap(sequence, gap_frames, gap_frames * SPF), (sample + gap_frames * SPF) / RATE))
            sample += gap_frames * SPF
            sequence += gap_frames
        samples = rng.randint(-300, 300, size=(SPF, 3)).astype(np.int16)
        sample += SPF
        items.append((SampleFrame(sequence, 0, samples), sample / RATE))
        sequence += 1
    return items


def run_and_record(path, items, **config):
    commands = []
    run_fast_replay(FeaturePipeline.from_config(PIPELINE), create_backend("numpy", MODEL), items, [0.5] * 3,
                channel_names=["a", "b", "c"], config=RuntimeConfig(**config), record_path=path,
                on_command=commands.append)
    return commands


def test_recording_round_trip_signals_gaps_labels_and_events(tmp_path):
    path = str(tmp_path / "run.nhr")
    items = chip_items(60, gap_at=30, gap_frames=15)      # 150 samples lost: > 100 ms -> data timeout
    commands = run_and_record(path, items, max_slew_per_s=None)
    with open_recording(path) as recording:
        assert recording.integrity["complete"]
        assert recording.dtype == "int16" and recording.scale_uv.tolist() == [0.5] * 3
        assert recording.n_samples == 60 * SPF + 150
        signals = recording.read_signals()
        frames = [event.samples for event, _ in items if isinstance(event, SampleFrame)]
        assert np.array_equal(signals[:300], np.concatenate(frames[:30]))
        assert np.all(signals[300:450] == 0)                      # filler for the lost samples
        assert np.array_equal(signals[450:], np.concatenate(frames[30:]))
        missing = [e for e in recording.events if e.kind == "missing"]
        assert [(e.sample, e.value) for e in missing] == [(300, 150)]
        kinds = [e.kind for e in recording.events]
        assert "safety_data_timeout" in kinds and "safety_recovered" in kinds
        decoded = recording.label_streams["decoded"]
        command = recording.label_streams["command"]
        assert decoded.rate == pytest.approx(100.0) and decoded.names == FINGERS
        # Row j is the value known at sample 10 j: the first window ends at sample 50.
        assert np.all(np.isnan(decoded.data[:5]))
        by_row = {c.sample // 10: c for c in commands}
        for row, cmd in by_row.items():
            assert np.allclose(decoded.data[row], cmd.outputs, atol=1e-6)
        # No window touches the lost samples: those rows stay NaN.
        assert np.all(np.isnan(decoded.data[31:50]))
        # Safe posture (open) recorded as the command while not ok, decoded positions after.
        assert np.all(command.data[5:9] == 0)
        ok_rows = [row for row in by_row if row >= 9 and row < 30]
        assert np.allclose(command.data[ok_rows], [by_row[r].positions for r in ok_rows], atol=1e-6)


def test_replayed_recording_gives_the_same_events_back(tmp_path):
    path = str(tmp_path / "run.nhr")
    items = chip_items(40, gap_at=20, gap_frames=3)
    first = run_and_record(path, items)
    with open_recording(path) as recording:
        assert recording_gaps(recording) == [(200, 30)]
        replayed = list(recording_items(recording, block_samples=SPF))
    kinds = [type(event).__name__ for event, _ in replayed]
    assert kinds.count("SampleGap") == 1 and kinds.count("SampleFrame") == 40
    original = [(type(e).__name__, round(t, 6)) for e, t in items]
    assert [(type(e).__name__, round(t, 6)) for e, t in replayed] == original
    second = run_and_record(str(tmp_path / "again.nhr"), replayed)
    assert [c.sample for c in second] == [c.sample for c in first]
    assert np.array_equal(np.array([c.outputs for c in second]), np.array([c.outputs for c in first]))


def test_block_size_does_not_change_the_decoded_windows(tmp_path):
    path = str(tmp_path / "run.nhr")
    first = run_and_record(path, chip_items(50))
    with open_recording(path) as recording:
        big = list(recording_items(recording, block_samples=137))
    second = run_and_record(str(tmp_path / "b.nhr"), big)
    assert [c.sample for c in second] == [c.sample for c in first]
    assert np.allclose([c.outputs for c in second], [c.outputs for c in first], atol=1e-6)


def test_threaded_recorder_bounds_its_backlog_and_marks_what_it_dropped(tmp_path):
    path = str(tmp_path / "slow.nhr")
    sink = open_run_recording(path, RATE, ["a", "b", "c"], [0.5] * 3, 10, FINGERS)
    recorder = ThreadedRecorder(sink, max_backlog_samples=50)     # thread not started: nothing drains
    frames = [np.full((SPF, 3), i, dtype=np.int16) for i in range(8)]
    for frame in frames:
        recorder.on_frame(frame)
    assert recorder.counters["samples_dropped"] == 30 and recorder.counters["overflows"] == 1
    recorder.close()                                              # writes the backlog synchronously
    with open_recording(path) as recording:
        assert recording.integrity["complete"]
        assert recording.n_samples == 80
        signals = recording.read_signals()
        assert np.array_equal(signals[:50], np.concatenate(frames[:5]))
        assert np.all(signals[50:] == 0)
        assert [(e.sample, e.kind, e.value) for e in recording.events] == [(50, "record_overflow", 30)]


CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from neurohand.deploy.runtime.recorder import ThreadedRecorder, open_run_recording
    sink = open_run_recording(sys.argv[1], 1000.0, ["a", "b", "c"], [0.5] * 3, 10,
                              ["thumb", "index", "middle", "ring", "little"])
    recorder = ThreadedRecorder(sink, 100).start()
    start = time.perf_counter()
    for i in range(100000):
        time.sleep(max(0.0, start + (i + 1) * 0.01 - time.perf_counter()))
        recorder.on_frame(np.full((10, 3), i % 30000, dtype=np.int16))
        recorder.on_window((i + 1) * 10, np.zeros(5), np.zeros(5))
        sys.stdout.write("%d\\n" % ((i + 1) * 10))
        sys.stdout.flush()
""")


def test_kill_9_loses_at_most_about_100_ms(tmp_path):
    path = str(tmp_path / "killed.nhr")
    child = subprocess.Popen([sys.executable, "-c", CHILD, path], stdout=subprocess.PIPE,
                             universal_newlines=True)
    produced = 0
    try:
        deadline = time.time() + 20
        while produced < 800 and time.time() < deadline:     # 0.8 s of data handed to the recorder
            produced = int(child.stdout.readline())
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    # The child may have handed over one more frame after the line we read.
    produced += SPF
    with pytest.warns(Warning):                  # no DONE chunk: reported as truncated
        recording = open_recording(path)
    with recording:
        assert not recording.integrity["complete"]
        lost_s = (produced - recording.n_samples) / RATE
        # 80 ms chunks + a 20 ms drain period; one frame of slack for scheduling.
        assert -0.02 <= lost_s <= 0.1 + 0.01 + 1e-9, lost_s
        values = recording.read_signals()[::SPF, 0]
        assert np.array_equal(values, np.arange(len(values)))
