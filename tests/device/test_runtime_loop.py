"""The threaded shell: queues, the reader's protocol object, a live run with
real chip bytes through the real parser, skips under a slow decoder, the
SIGTERM path and the stats JSON.

The chip link here is a thread that hands encoded chip frames
(chip_protocol.encode_data_frame) to the receiver at real-time pace, the
way the serial link's reader thread does; the run through real
pseudo-terminals is in test_runtime_pty.py.
"""
import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from neurohand.decoder.backends import create_backend
from neurohand.decoder.pipeline import FeaturePipeline
from neurohand.deploy.runtime import run_realtime
from neurohand.deploy.runtime.config import RuntimeConfig
from neurohand.deploy.runtime.assemble import build_runtime
from neurohand.deploy.runtime.queues import BatchQueue, LatestSlot
from neurohand.deploy.runtime.realtime import RealtimeRunner, installed_signal_handlers
from neurohand.deploy.runtime.stats import Distribution, RuntimeStats
from neurohand.firmware_bridge.chip import protocol as cp
from neurohand.firmware_bridge.chip.parser import ChipParser, SampleFrame, SampleGap
from neurohand.firmware_bridge.chip.receiver import ChipReceiver
from neurohand.firmware_bridge.hands.base import HandDriver
from neurohand.firmware_bridge.recording.file_format import open_recording

MODEL = os.path.join(os.path.dirname(__file__), "data", "golden_gru.onnx")
RATE = 1000.0
SPF = 10
PIPELINE = {"format": "neurohand-feature-pipeline", "version": 1, "signal_rate": RATE, "n_channels": 3,
            "mode": "envelope", "dtype": "float64", "window_samples": 50, "stride_samples": 10,
            "car": False, "sos": [], "features": ["mean", "std"], "bandpower_bands_hz": [],
            "threshold_uv": 0.0, "log": False, "log_epsilon": 1e-6,
            "normalisation": {"mean": [0.0] * 6, "std": [50.0] * 6}}


class RecordingHand(HandDriver):
    """Refuses anything unsafe (the drivers' own check) and logs every send with its time."""

    keepalive_period_s = 0.3

    def __init__(self, n_outputs=5):
        super(RecordingHand, self).__init__(n_outputs)
        self.sent = []
        self.closed = False
        self._lock = threading.Lock()

    def _write_positions(self, positions):
        assert np.all(np.isfinite(positions)) and np.all((positions >= 0) & (positions <= 1))
        with self._lock:
            self.sent.append((time.perf_counter(), positions.copy()))

    def close(self):
        self.closed = True


class SlowBackend(object):
    """The real backend, sleeping ``delay_s`` per step (a decoder slower than the stride)."""

    def __init__(self, delay_s):
        self.inner = create_backend("numpy", MODEL)
        self.n_features, self.n_outputs = self.inner.n_features, self.inner.n_outputs
        self.delay_s = delay_s

    def initial_state(self):
        return self.inner.initial_state()

    def step(self, features, state):
        time.sleep(self.delay_s)
        return self.inner.step(features, state)

    def close(self):
        self.inner.close()


class PacedChip(object):
    """Stand-in for the serial link: a thread handing encoded frames to the receiver in real time."""

    def __init__(self, n_frames, stop_after_s=None, seed=0):
        rng = np.random.RandomState(seed)
        self.samples = rng.randint(-200, 200, size=(n_frames * SPF, 3)).astype(np.int16)
        self.n_frames = n_frames
        self.stop_after_s = stop_after_s
        self.sent_times = []
        self._stop = threading.Event()
        self.closed = False

    def __call__(self, receiver):
        self._receiver = receiver
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        start = time.perf_counter()
        index = 0
        while index < self.n_frames:
            due = start + (index + 1) * SPF / RATE
            if self.stop_after_s is not None and due - start > self.stop_after_s:
                return
            if self._stop.wait(max(0.0, due - time.perf_counter())):
                return
            # Every frame due by now in one read, as a serial link's reader gets a backlog after a stall.
            data = b""
            now = time.perf_counter()
            while index < self.n_frames and (not data or start + (index + 1) * SPF / RATE <= now):
                if self.stop_after_s is not None and (index + 1) * SPF / RATE > self.stop_after_s:
                    break
                data += cp.encode_data_frame(index, index * SPF * 1000, self.samples[index * SPF:(index + 1) * SPF],
                                             cp.FLAG_STREAM_START if index == 0 else 0)
                index += 1
            # Split in two reads, as a UART delivers it.
            self._receiver.data_received(data[:20])
            self.sent_times.append(time.perf_counter())
            self._receiver.data_received(data[20:])

    def close(self):
        self._stop.set()
        self._thread.join(2.0)
        self.closed = True


def make_runner(backend=None, config=None, chip=None, stats_path=None, recorder=None, decode_in="reader"):
    hand = RecordingHand()
    parts = build_runtime(FeaturePipeline.from_config(PIPELINE), backend or create_backend("numpy", MODEL), hand,
                          config or RuntimeConfig(status_interval_s=0, decode_in=decode_in), [0.5, 0.5, 0.5],
                          time.perf_counter,
                          recorder=recorder)
    runner = RealtimeRunner(parts, chip or PacedChip(100), stats_path=stats_path)
    return runner, hand


# -- queues and the receiver


def test_batch_queue_is_bounded_and_drains_in_one_batch():
    queue = BatchQueue(3)
    assert all(queue.put(i) for i in range(3))
    assert not queue.put(3)
    out = []
    assert queue.take_all(out, 0.01) is False
    assert out == [0, 1, 2]
    out = []
    started = time.perf_counter()
    queue.take_all(out, 0.05)          # empty: waits the timeout, then returns nothing
    assert out == [] and time.perf_counter() - started >= 0.04
    queue.close()
    assert queue.take_all(out, 1.0) is True and not queue.put(1)


def test_latest_slot_keeps_only_the_newest_and_counts_superseded():
    slot = LatestSlot()
    slot.put("a")
    slot.put("b")
    assert slot.get(0.01) == "b" and slot.superseded == 1
    assert slot.get(0.01) is None
    slot.nudge()
    started = time.perf_counter()
    assert slot.get(5.0) is None and time.perf_counter() - started < 1.0


def test_receiver_turns_a_full_queue_into_a_gap_for_the_decoder():
    frames = BatchQueue(2)
    receiver = ChipReceiver(ChipParser(), frames, RuntimeStats(), time.perf_counter)
    samples = np.zeros((SPF, 3), dtype=np.int16)
    data = b"".join(cp.encode_data_frame(i, 0, samples) for i in range(5))
    receiver.data_received(data)
    assert receiver.counters["frames_dropped_queue_full"] == 3
    got = []
    frames.take_all(got, 0.01)
    receiver.data_received(cp.encode_data_frame(5, 0, samples))
    frames.take_all(got, 0.01)
    kinds = [type(event).__name__ for event, _ in got]
    assert kinds == ["SampleFrame", "SampleFrame", "SampleGap", "SampleFrame"]
    gap = got[2][0]
    assert gap.missing_frames == 3 and gap.missing_samples == 3 * SPF and gap.first_missing_sequence == 2
    assert got[3][0].sequence == 5


def test_receiver_stamps_each_chunk_and_passes_replies_on():
    frames = BatchQueue(10)
    times = iter([1.0, 1.1, 1.2, 2.0, 2.1, 2.2])
    replies = []
    receiver = ChipReceiver(ChipParser(), frames, RuntimeStats(), lambda: next(times), on_reply=replies.append)
    frame = cp.encode_data_frame(0, 0, np.ones((SPF, 3), dtype=np.int16))
    receiver.data_received(frame[:10])
    receiver.data_received(frame[10:] + cp.encode_ack(cp.CMD_START, 1))
    got = []
    frames.take_all(got, 0.01)
    # The frame arrived with the second chunk: its stamp is that chunk's.
    assert len(got) == 1 and got[0][1] == 2.0
    assert len(replies) == 1 and replies[0].kind == "ack"


def test_distribution_is_exact_until_full_then_samples_with_exact_max():
    dist = Distribution(capacity=100, recent=10)
    for value in range(1, 101):
        dist.add(value * 1e-6)
    summary = dist.summary()
    assert summary["count"] == 100 and summary["max"] == 100.0
    assert summary["p50"] == pytest.approx(50.5)
    for value in range(101, 1001):
        dist.add(value * 1e-6)
    summary = dist.summary()
    assert summary["count"] == 1000 and summary["max"] == 1000.0
    assert 350 < summary["p50"] < 650          # a uniform sample of 1..1000
    assert dist.recent_summary()["p50"] == pytest.approx(995.5)


# -- live runs


@pytest.mark.parametrize("decode_in", ["reader", "thread"])
def test_live_run_decodes_every_frame_and_writes_stats(tmp_path, decode_in):
    stats_path = str(tmp_path / "stats.json")
    chip = PacedChip(60)
    runner, hand = make_runner(chip=chip, stats_path=stats_path, decode_in=decode_in)
    document = runner.run(duration_s=0.8)
    assert chip.closed and hand.closed
    with open(stats_path) as handle:
        stats = json.load(handle)
    assert stats == json.loads(json.dumps(document))
    assert set(stats["latency_us"]) == {"p50", "p90", "p99", "max", "count"}
    for stage in ("read", "parse", "dsp_features", "inference", "postprocess", "write"):
        assert stats["stage_us"][stage]["count"] > 0
        assert {"p50", "p99"} <= set(stats["stage_us"][stage])
    assert stats["frames"]["received"] == 60
    assert stats["frames"]["missing"] == 0 and stats["frames"]["corrupt"] == 0
    assert stats["windows"]["decoded"] + stats["skips"] == 60 - 4
    # After each decoded window's command, the next step's recurrent half is computed (Backend.prepare).
    assert stats["stage_us"]["prepare"]["count"] == stats["windows"]["decoded"]
    assert stats["latency_us"]["count"] > 0 and stats["latency_us"]["max"] > 0
    assert stats["commands_sent"] == len(hand.sent)
    assert stats["safety_events"]["count"] >= 1      # data stopped after 0.6 s -> data_timeout
    assert "data_timeout" in [e["kind"] for e in stats["safety_events"]["events"]]
    assert stats["stop_reason"].startswith("duration")
    assert stats["decode_in"] == decode_in
    # Data stopped at ~0.6 s: the hand is open again before the run ends.
    assert np.array_equal(hand.sent[-1][1], np.zeros(5))


def test_the_runs_duration_starts_after_the_start_up_collection():
    """A slow start-up garbage collection (0.1 s in a process holding a test suite's objects) does not eat
    into the run's duration: all 0.4 s of frames arrive within a 0.5-s run."""
    chip = PacedChip(40)
    runner, _ = make_runner(chip=chip)
    collect = runner.collector.start

    def slow_start():
        time.sleep(0.3)
        collect()

    runner.collector.start = slow_start
    document = runner.run(duration_s=0.5)
    assert document["frames"]["received"] == 40


@pytest.mark.parametrize("decode_in", ["reader", "thread"])
def test_slow_decoder_skips_to_the_newest_window_and_counts_it(decode_in):
    chip = PacedChip(50)
    runner, hand = make_runner(backend=SlowBackend(0.025), chip=chip, decode_in=decode_in)   # 25 ms per 10 ms stride
    # The frames end at 0.5 s; the 0.3 s after them let the last window be decoded or skipped even when the
    # machine stalls (0.1 s was too little once in a full suite run).
    document = runner.run(duration_s=0.8)
    assert document["skips"] > 10
    assert document["windows"]["decoded"] + document["skips"] == 50 - 4
    # Jumping ahead keeps latency near one inference, far below the backlog it would build.
    assert document["latency_us"]["p50"] < 200000


def test_sigterm_puts_the_hand_in_its_safe_posture_and_closes_files(tmp_path):
    from neurohand.deploy.runtime.recorder import ThreadedRecorder, open_run_recording
    record = str(tmp_path / "run.nhr")
    stats_path = str(tmp_path / "stats.json")
    sink = open_run_recording(record, RATE, ["a", "b", "c"], [0.5] * 3, 10,
                              ["thumb", "index", "middle", "ring", "little"])
    recorder = ThreadedRecorder(sink, 100)
    chip = PacedChip(1000)
    runner, hand = make_runner(config=RuntimeConfig(status_interval_s=0, safe_posture="open",
                                                    max_slew_per_s=None),
                               chip=chip, stats_path=stats_path, recorder=recorder)
    # 0.7 s of 1 kHz data before the signal, for the 400 samples asked below (0.5 s fell short once, 390,
    # when a full suite run stalled).
    timer = threading.Timer(0.7, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with installed_signal_handlers(runner):
            document = runner.run(duration_s=10.0)
    finally:
        timer.cancel()
    assert runner.stop_reason == "SIGTERM"
    assert any(np.any(p > 0) for _, p in hand.sent)          # it was following the decoder
    assert np.array_equal(hand.sent[-1][1], np.zeros(5))     # ... and ended open
    assert hand.closed and chip.closed
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with open_recording(record) as recording:
        assert recording.integrity["complete"]                # DONE chunk: closed cleanly
        assert recording.n_samples >= 400
        assert np.array_equal(recording.read_signals(), chip.samples[:recording.n_samples])
        assert any(e.kind == "safety_shutdown" for e in recording.events)
    assert json.load(open(stats_path))["stop_reason"] == "SIGTERM"
    assert document["recording"]["samples_dropped"] == 0


@pytest.mark.parametrize("decode_in,thread", [("reader", "reader"), ("thread", "decoder")])
def test_shutdown_twice_is_harmless_and_a_crashed_thread_is_reported(decode_in, thread):
    runner, hand = make_runner(decode_in=decode_in)

    def broken(items, emit):
        raise ValueError("bug in the decoding")

    runner.parts.decode.process = broken
    with pytest.raises(RuntimeError, match="{} thread crashed".format(thread)):
        runner.run(duration_s=5.0)
    assert np.array_equal(hand.sent[-1][1], np.zeros(5)) and hand.closed
    assert runner.shutdown() is runner.document


def test_run_realtime_entry_point_closes_everything(tmp_path):
    hand = RecordingHand()
    backend = create_backend("numpy", MODEL)
    chip = PacedChip(40)
    document = run_realtime(FeaturePipeline.from_config(PIPELINE), backend, hand, chip, [0.5] * 3,
                            ["a", "b", "c"], RuntimeConfig(status_interval_s=0), duration_s=0.3, quiet=True,
                            install_signals=False, stats_path=str(tmp_path / "s.json"))
    assert document["mode"] == "realtime" and hand.closed and chip.closed
    assert os.path.exists(str(tmp_path / "s.json"))


class FullDisk(object):
    """A recording file that takes ``room`` bytes, then fails as a full disk does (ENOSPC)."""

    def __init__(self, inner, room):
        self._inner = inner
        self.room = room

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def write(self, data):
        import errno
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self._inner.write(data)


@pytest.mark.parametrize("quiet", [True, False])
def test_a_full_disk_stops_the_recording_says_so_and_the_hand_is_still_driven(tmp_path, monkeypatch, capsys,
                                                                               quiet):
    from neurohand.deploy.runtime import recorder as recorder_module
    opened = recorder_module.open_run_recording

    def open_on_a_small_disk(*args, **kwargs):
        sink = opened(*args, **kwargs)
        sink.writer._file = FullDisk(sink.writer._file, 3000)
        return sink

    monkeypatch.setattr(recorder_module, "open_run_recording", open_on_a_small_disk)
    hand = RecordingHand()
    document = run_realtime(FeaturePipeline.from_config(PIPELINE), create_backend("numpy", MODEL), hand,
                            PacedChip(1200), [0.5] * 3, ["a", "b", "c"],
                            RuntimeConfig(status_interval_s=0 if quiet else 0.2, max_slew_per_s=None),
                            record_path=str(tmp_path / "run.nhr"), duration_s=1.0, quiet=quiet,
                            install_signals=False)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning: recording stopped" in line]
    assert len(warnings) == 1, err                              # said once, also when --quiet
    assert warnings[0].startswith("neurohand run: warning: recording stopped: ")
    assert "no space left on the device" in warnings[0] and "run.nhr" in warnings[0]
    assert "Traceback" not in err
    if not quiet:
        assert "RECORDING STOPPED: no space left on the device" in err   # and in the status line
    assert "No space" in document["recording"]["error"]
    # The hand was driven to the end, long after the disk filled up.
    assert document["stop_reason"].startswith("duration")
    assert document["commands_sent"] > 40 and any(np.any(p > 0) for _, p in hand.sent[-20:-1])


def test_nothing_the_reader_decodes_is_written_after_the_final_safe_posture():
    from neurohand.deploy.runtime.decode import DecodedCommand

    runner, hand = make_runner(decode_in="reader")
    command = DecodedCommand(10, time.perf_counter(), time.perf_counter(), np.full(5, 0.7), np.full(5, 0.7), None)
    runner._write_now(command)              # before: written (the supervisor decides what exactly)
    assert len(hand.sent) == 1
    runner._final_safe_posture()
    assert len(hand.sent) == 2 and np.array_equal(hand.sent[-1][1], np.zeros(5))
    runner._write_now(command)              # a window the reader finished during the shutdown
    assert len(hand.sent) == 2


def test_after_a_reader_write_the_writer_wakes_half_a_period_later_than_the_next_command():
    from neurohand.deploy.runtime.decode import DecodedCommand
    from neurohand.deploy.runtime.realtime import reader_write_grace_s

    runner, hand = make_runner(decode_in="reader")
    period = runner.parts.writer_period_s
    command = DecodedCommand(10, time.perf_counter(), time.perf_counter(), np.full(5, 0.7), np.full(5, 0.7), None)
    before = time.perf_counter()
    runner._write_now(command)
    after = time.perf_counter()
    # Not one period after the write: that is when the reader's next decode runs.
    assert before + 1.5 * period <= runner._next_write_due <= after + 1.5 * period
    # The grace never lets the writer's first wake after a command fall later than the data timeout.
    assert reader_write_grace_s(0.02, 0.1) == pytest.approx(0.01)
    assert reader_write_grace_s(0.02, 0.025) == pytest.approx(0.005)
    assert reader_write_grace_s(0.1, 0.1) == 0.0


def test_the_main_thread_sleeps_until_it_has_something_to_do():
    # Each of its wakes takes the interpreter lock, maybe in the middle of a window's decode.
    runner, hand = make_runner(chip=PacedChip(200))
    waits = []
    wait = runner._stop.wait
    runner._stop.wait = lambda timeout=None: waits.append(timeout) or wait(timeout)
    started = time.perf_counter()
    document = runner.run(duration_s=1.2)
    assert document["stop_reason"].startswith("duration")
    assert 1.2 <= time.perf_counter() - started < 3.0
    assert len(waits) <= 4        # 0.5 s, 0.5 s, the 0.2 s left, and the return (was one per 0.1 s)
    assert all(timeout <= 0.5 for timeout in waits)
