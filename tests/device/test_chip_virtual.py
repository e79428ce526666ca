"""Virtual chip parts without a terminal: pacing scheduler on an injected clock,
fault injector, command handling, sources, and the CLI's argument checks."""
import subprocess
import sys

import numpy as np
import pytest

from neurohand.firmware_bridge.chip import protocol as cp
from neurohand.firmware_bridge.chip.parser import ChipCommand, ChipParser
from neurohand.firmware_bridge.shared.errors import UsageError
from neurohand.firmware_bridge.virtual.chip import (ArraySource, FaultInjector, PacingScheduler, RecordingSource,
                                                    VirtualChip)


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_scheduler_does_not_drift_over_ten_minutes_of_irregular_wakeups():
    clock = FakeClock()
    period = 20 / 10000.0
    scheduler = PacingScheduler(period, clock)
    scheduler.start()
    rng = np.random.RandomState(1)
    taken = 0
    start = clock.now
    while clock.now - start < 600.0:
        # Wake-ups late by up to 3 periods, with an occasional 0.2 s stall.
        clock.now += scheduler.seconds_until_next() + rng.uniform(0, 3 * period)
        if rng.uniform() < 0.001:
            clock.now += 0.2
        due = scheduler.take_due()
        assert due >= 1
        taken += due
    elapsed = clock.now - start
    expected = int(elapsed / period) + 1          # frame 0 is due at the start
    assert taken == scheduler.released == expected
    assert abs(taken * period / elapsed - 1) < 0.001


def test_scheduler_releases_nothing_early():
    clock = FakeClock()
    scheduler = PacingScheduler(0.5, clock)
    scheduler.start()
    assert scheduler.take_due() == 1
    clock.now += 0.49
    assert scheduler.take_due() == 0
    assert scheduler.seconds_until_next() == pytest.approx(0.01)
    clock.now += 0.02
    assert scheduler.take_due() == 1
    clock.now += 10.0
    assert scheduler.take_due() == 20


def test_scheduler_started_in_the_future_releases_nothing_before_its_start():
    clock = FakeClock()
    scheduler = PacingScheduler(0.5, clock)
    scheduler.start(at=clock.now + 0.3)
    assert scheduler.take_due() == 0                  # int() truncation released frame 0 here, 0.3 s early
    clock.now += 0.29
    assert scheduler.take_due() == 0
    assert scheduler.seconds_until_next() == pytest.approx(0.01)
    clock.now += 0.02
    assert scheduler.take_due() == 1
    scheduler.start(at=clock.now + 10.0)
    assert scheduler.take_due(clock.now + 9.99) == 0 and scheduler.take_due(clock.now + 10.0) == 1


def test_fault_injector_is_reproducible_and_protects_stream_start():
    frame = cp.encode_data_frame(0, 0, np.zeros((20, 16), np.int16))
    runs = []
    for _ in range(2):
        injector = FaultInjector(0.2, 0.2, 0.2, seed=5)
        runs.append([injector.apply(frame, protected=(k % 50 == 0)) for k in range(500)])
    assert runs[0] == runs[1]
    assert all(out.endswith(frame) for out in runs[0][::50])
    c = injector.counters
    assert c["frames_in"] == 500 and c["frames_dropped"] > 50 and c["frames_corrupted"] > 30 and c["garbage_bursts"] > 50
    assert not any(cp.SYNC in out[:-len(frame)] for out in runs[0] if out.endswith(frame))


def test_fault_injector_rejects_bad_rates():
    with pytest.raises(UsageError, match="drop rate must be at most 1"):
        FaultInjector(drop_rate=1.5)
    with pytest.raises(UsageError, match="sync must be"):
        FaultInjector(sync=b"")


def test_fault_injector_for_another_envelope_and_frames_that_bypass_it():
    frame = bytes(bytearray(range(1, 13)))
    injector = FaultInjector(corrupt_rate=1.0, garbage_probability=1.0, garbage_max_bytes=8, seed=3,
                             sync=(b"A", b"\x00"), header_size=5)
    outs = [injector.apply(frame) for _ in range(300)]
    damaged = [out[-len(frame):] for out in outs]
    assert all(d[:5] == frame[:5] and d != frame for d in damaged)          # only after the 5-byte header
    garbage = b"".join(out[:-len(frame)] for out in outs)
    assert len(garbage) > 300 and b"A" not in garbage and b"\x00" not in garbage
    # All of it is one run of discarded bytes, until an intact frame passes outside the injector.
    assert injector.counters["expected_resyncs"] == 1
    injector.intact_frame_passed()
    injector.apply(frame)
    assert injector.counters["expected_resyncs"] == 2


def make_chip(n_samples=1000, n_channels=4, rate=1000.0, **kwargs):
    samples = (np.arange(n_samples * n_channels, dtype=np.int64).reshape(n_samples, n_channels) % 30000)
    return VirtualChip(ArraySource(samples.astype(np.int16), rate, scale_uv=0.25), **kwargs)


def reply_to(chip, command, args=b""):
    frame = chip.handle_command(ChipCommand(command, 9, args))
    (reply,) = ChipParser().feed(frame)
    assert reply.token == 9 and reply.command == command
    return reply


def test_commands_like_the_chip():
    chip = make_chip()
    identity = cp.decode_identity(reply_to(chip, cp.CMD_GET_IDENTITY).data)
    assert identity.model == "NH-VIRTUAL"
    assert cp.decode_version(reply_to(chip, cp.CMD_GET_VERSION).data).protocol_version == cp.PROTOCOL_VERSION
    config = cp.decode_config(reply_to(chip, cp.CMD_GET_CONFIG).data)
    assert config == cp.ChipConfig(4, 20, 1000, False, 0.25)
    assert reply_to(chip, cp.CMD_CONFIGURE, cp.encode_configure_args(2, 10, 1000)).kind == "ack"
    assert cp.decode_config(reply_to(chip, cp.CMD_GET_CONFIG).data)[:2] == (2, 10)
    for args in (cp.encode_configure_args(5, 10, 1000), cp.encode_configure_args(2, 0, 1000),
                 cp.encode_configure_args(2, 10, 2000), b"\x01"):
        assert reply_to(chip, cp.CMD_CONFIGURE, args).status == cp.STATUS_BAD_ARGUMENT
    assert reply_to(chip, 0x7F).status == cp.STATUS_UNKNOWN_COMMAND
    assert reply_to(chip, cp.CMD_START).kind == "ack" and chip.streaming
    assert reply_to(chip, cp.CMD_START).kind == "ack"                     # idempotent
    busy = reply_to(chip, cp.CMD_CONFIGURE, cp.encode_configure_args(1, 10, 1000))
    assert (busy.kind, busy.status) == ("nak", cp.STATUS_BUSY)
    assert reply_to(chip, cp.CMD_STOP).kind == "ack" and not chip.streaming
    assert chip.counters["naks"] == 6


def test_frames_follow_the_source_and_the_configuration():
    chip = make_chip(n_samples=105, loop=False)
    chip._master = -1                     # pretend connected: frames go to the output queue
    chip.handle_command(ChipCommand(cp.CMD_CONFIGURE, 1, cp.encode_configure_args(3, 20, 1000)))
    chip.handle_command(ChipCommand(cp.CMD_START, 2, b""))
    while chip.streaming:
        chip._emit_frame()
    chip._master = None
    frames = ChipParser().feed(chip._out)
    assert len(frames) == 5 and chip.finished            # the partial 6th frame is not sent
    np.testing.assert_array_equal(np.concatenate([f.samples for f in frames]), chip.source.samples[:100, :3])
    assert [f.device_time_us for f in frames] == [0, 20000, 40000, 60000, 80000]
    assert frames[0].stream_start and not frames[1].stream_start


def test_loop_wraps_inside_a_frame():
    chip = make_chip(n_samples=50, loop=True, start_sample=10)
    chip._master = -1
    chip.handle_command(ChipCommand(cp.CMD_START, 2, b""))
    for _ in range(6):
        chip._emit_frame()
    chip._master = None
    frames = ChipParser().feed(chip._out)
    got = np.concatenate([f.samples for f in frames])
    source = chip.source.samples
    expected = np.concatenate([source[10:50], source[10:50], source[10:50], source[10:50]])[:120]
    np.testing.assert_array_equal(got, expected)
    assert chip.counters["loops"] == 2


def test_start_at_skips_the_frames_due_before_start():
    clock = FakeClock()
    chip = make_chip(n_samples=1000, rate=1000.0, clock=clock, start_at=clock.now + 1.0)
    chip._master = -1
    chip.handle_command(ChipCommand(cp.CMD_START, 2, b""))          # before start_at: nothing due yet
    assert chip.streaming and chip.stream_started_at == clock.now + 1.0
    assert chip._scheduler.take_due() == 0
    late = make_chip(n_samples=1000, rate=1000.0, clock=clock, start_at=clock.now - 0.11)
    late._master = -1
    late.handle_command(ChipCommand(cp.CMD_START, 2, b""))          # 0.11 s after start_at: frames 0..5 passed
    assert late.counters["frames_before_start"] == 6
    late._emit_frame()
    late._master = None
    (frame,) = ChipParser().feed(late._out)
    np.testing.assert_array_equal(frame.samples, late.source.samples[120:140])
    assert frame.stream_start and frame.device_time_us == 0


class ContractRecording:
    """Stands in for neurohand.firmware_bridge.recording.file_format (its documented contract)."""

    def __init__(self, raw, rate, scale_uv, dtype):
        self.raw, self.signal_rate, self.scale_uv, self.dtype = raw, rate, np.asarray(scale_uv), dtype
        self.n_samples, self.n_channels = raw.shape
        self.reads = []

    def read_signals(self, start, stop):
        self.reads.append((start, stop))
        return self.raw[start:stop]


def test_recording_source_requantises_float_to_fit_int16():
    rng = np.random.RandomState(3)
    raw = (rng.standard_normal((20000, 3)) * [50.0, 400.0, 5.0]).astype(np.float32)
    source = RecordingSource(ContractRecording(raw, 2000.0, [1.0, 1.0, 2.0], "float32"), block_samples=1000)
    microvolts = raw * np.array([1.0, 1.0, 2.0], np.float32)
    peak = np.max(np.abs(microvolts))
    assert peak / 32767 <= source.scale_uv <= peak / 32767 * 1.0001
    counts = source.read(500, 1700)
    assert counts.dtype == np.int16 and counts.shape == (1200, 3)
    assert np.max(np.abs(counts.astype(int))) <= 32767
    np.testing.assert_allclose(counts * source.scale_uv, microvolts[500:1700], atol=source.scale_uv / 2 + 1e-6)


def test_recording_source_passes_int16_through_and_reads_lazily():
    raw = np.arange(30000, dtype=np.int16).reshape(10000, 3)
    recording = ContractRecording(raw, 1000.0, [0.195] * 3, "int16")
    source = RecordingSource(recording, block_samples=500)
    assert source.scale_uv == pytest.approx(0.195)
    for start in range(0, 2000, 20):
        np.testing.assert_array_equal(source.read(start, start + 20), raw[start:start + 20])
    assert len(recording.reads) == 4 and max(b - a for a, b in recording.reads) <= 500


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "neurohand.deploy", "virtual-chip"] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)


def test_cli_help_explains_every_option():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("--port", "--speed", "--loop", "--start", "--autostart", "--drop-rate", "--corrupt-rate",
                   "--garbage-bursts", "--disconnect-after", "--seed", "START command", "--start-at"):
        assert option in result.stdout


@pytest.mark.parametrize("args,message", [
    (["rec.bin", "--speed", "0"], "--speed must be greater than 0"),
    (["rec.bin", "--drop-rate", "1.5"], "--drop-rate must be at most 1"),
    (["rec.bin", "--samples-per-frame", "0"], "--samples-per-frame must be at least 1"),
    (["/no/such/recording"], "does not exist"),
    (["rec.bin", "--port", "/no/such/dir/chip"], "does not exist"),
    (["rec.bin", "--start-at", "1"], "--start-at 1.000 is"),
])
def test_cli_bad_values_are_one_line_and_exit_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_bad_flag_type_exits_2():
    result = run_cli("rec.bin", "--speed", "fast")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid float value: 'fast'" in lines[0]


def test_recording_source_on_a_real_float32_file(tmp_path):
    from neurohand.firmware_bridge.recording.file_format import RecordingWriter, open_recording
    rng = np.random.RandomState(6)
    microvolts = (rng.standard_normal((3000, 2)) * [30.0, 900.0]).astype(np.float32)
    path = str(tmp_path / "float.nhr")
    with RecordingWriter(path, 2000.0, ["a", "b"], dtype="float32") as writer:
        writer.append_signals(microvolts)
    source = RecordingSource(open_recording(path), start_sample=1000)
    peak = np.max(np.abs(microvolts[1000:]))      # the scale fits the streamed part only
    assert source.scale_uv == pytest.approx(peak / 32767, rel=1e-4)
    counts = source.read(1000, 3000)
    np.testing.assert_allclose(counts * source.scale_uv, microvolts[1000:], atol=source.scale_uv / 2 + 1e-5)
