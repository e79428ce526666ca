"""`neurohand run` and `neurohand replay` end to end, on the device (no torch).

The model is a small run trained on the workstation (tests/workstation/
make_replay_fixture.py, committed under data/replay_run/); the recording is
the held-out continuation of the same simulated session, made here with the
numpy simulator.  Real pseudo-terminals throughout.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from neurohand.deploy.cli import main as cli
from neurohand.deploy.bundle import make_bundle
from neurohand.deploy.demo import write_session_parts
from neurohand.deploy.replay import (
    LabelTruth, r2_scores, repeated_commands, scale_labels, wire_positions)
from neurohand.firmware_bridge.recording.file_format import open_recording
from neurohand.firmware_bridge.virtual.simulator import SimulatorConfig
from neurohand.firmware_bridge.virtual.chip import ArraySource, RecordingSource, VirtualChip
from neurohand.firmware_bridge.virtual.hand import VirtualHand

RUN_DIR = os.path.join(os.path.dirname(__file__), "data", "replay_run")
HELDOUT_S = 12.0
REALTIME_S = 8.0


def read_fixture_config():
    with open(os.path.join(RUN_DIR, "config.json")) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(bundle path, held-out recording path); the bundle is self-tested on numpy here."""
    folder = tmp_path_factory.mktemp("replay")
    bundle = str(folder / "bundle")
    make_bundle(RUN_DIR, bundle)
    fixture = read_fixture_config()["fixture"]
    recording = str(folder / "heldout.nhr")
    start = fixture["train_s"]
    write_session_parts(SimulatorConfig(**fixture["session"]), [(recording, start, start + HELDOUT_S)])
    assert cli.main(["selftest", bundle, "--backend", "numpy"]) == 0
    return bundle, recording


def replay_json(capsys, *args):
    capsys.readouterr()
    assert cli.main(["replay"] + [str(a) for a in args] + ["--json", "--backend", "numpy", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "neurohand.deploy"] + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, **kwargs)


# --- scoring rules ------------------------------------------------------------------

def test_r2_scores_follow_the_definition():
    rng = np.random.RandomState(0)
    truth = rng.uniform(size=(50, 3))
    prediction = truth + rng.normal(scale=0.1, size=truth.shape)
    expected = 1 - ((truth - prediction) ** 2).sum(0) / ((truth - truth.mean(0)) ** 2).sum(0)
    assert np.allclose(r2_scores(truth, prediction), expected)
    assert np.allclose(r2_scores(truth, truth), 1.0)
    assert np.allclose(r2_scores(truth, np.tile(truth.mean(0), (50, 1))), 0.0)
    constant = truth.copy()
    constant[:, 1] = 0.5
    assert np.isnan(r2_scores(constant, prediction)[1]) and np.isfinite(r2_scores(constant, prediction)[0])


def test_labels_are_scaled_as_in_training_and_looked_up_causally(data):
    scaling = {"kind": "minmax", "minimum": [0.0, -1.0], "maximum": [2.0, 1.0]}
    assert np.allclose(scale_labels([[1.0, 0.0], [2.0, 1.0]], scaling), [[0.5, 0.5], [1.0, 1.0]])
    assert np.array_equal(scale_labels([[0.3, 0.7]], {"kind": "none"}), [[0.3, 0.7]])
    _, recording_path = data
    with open_recording(recording_path) as recording:
        truth = LabelTruth(recording, read_fixture_config()["labels"])
        stream = recording.label_streams["fingers"]
        per_row = int(recording.signal_rate / stream.rate)
        # A window ending at sample e (exclusive) takes the row in force at sample e - 1.
        assert np.array_equal(truth.at([per_row, per_row + 1, 3 * per_row]),
                              stream.data[[0, 1, 2]].astype(np.float64))


def test_keepalive_repeats_are_found_at_the_hand_links_resolution():
    positions = np.array([[0.1, 0.2], [0.1, 0.2], [0.1, 0.2 + 1e-7], [0.3, 0.2], [0.1, 0.2]])
    assert repeated_commands(wire_positions(positions)).tolist() == [False, True, True, False, False]


# --- replay -------------------------------------------------------------------------

def test_fast_replay_reports_scores_and_counts(data, capsys):
    bundle, recording = data
    result = replay_json(capsys, bundle, recording, "--fast")
    for key in ("mean_r2", "r2", "latency_us", "frames", "safety_events", "skips", "commands", "seconds", "mode"):
        assert key in result, key
    assert result["mode"] == "fast" and result["seconds"] == HELDOUT_S
    assert len(result["r2"]) == 5 and all(r is not None for r in result["r2"])
    assert result["mean_r2"] > 0.2                               # the fixture model decodes something
    assert result["frames"]["missing"] == 0 and result["safety_events"] == 0 and result["skips"] == 0
    stride_s = 0.02
    assert result["commands"] == pytest.approx((HELDOUT_S - 0.1) / stride_s + 1, abs=1)   # every window
    assert result["scored_from_s"] == 1.0 and result["speed_x"] > 1
    later = replay_json(capsys, bundle, recording, "--fast", "--start", 2, "--seconds", 5)
    assert later["start_s"] == 2.0 and later["seconds"] == 5.0
    assert later["commands"] == pytest.approx((5 - 0.1) / stride_s + 1, abs=1)
    assert later["mean_r2"] != result["mean_r2"]


def copy_with_gaps(source, target, gaps):
    """``source`` with samples [first, first + n) marked missing (zeroed, "missing" events), as the recorder does."""
    from neurohand.firmware_bridge.recording.file_format import RecordingWriter

    with open_recording(source) as recording:
        streams = {name: {"rate": s.rate, "names": s.names} for name, s in recording.label_streams.items()}
        scale = list(recording.scale_uv) if recording.dtype == "int16" else None
        with RecordingWriter(target, recording.signal_rate, recording.channel_names, recording.dtype, scale,
                             metadata=recording.metadata, label_streams=streams) as writer:
            signals = recording.read_signals(0, recording.n_samples).copy()
            for first, n in gaps:
                signals[first:first + n] = 0
            writer.append_signals(signals)
            for name, stream in recording.label_streams.items():
                writer.append_labels(name, stream.data)
            for first, n in gaps:
                writer.add_event(first, "missing", n)


@pytest.mark.parametrize("gaps", [[], [(5000, 1), (9000, 700), (9650, 200), (15000, 3)]])
def test_fast_replay_in_two_processes_decodes_the_same_numbers(data, tmp_path, gaps):
    from neurohand.deploy.replay import ReplayRange, replay_fast
    from neurohand.deploy.runtime.config import RuntimeConfig
    from neurohand.deploy.runtime.feature_worker import fork_available
    from neurohand.deploy.session import load_decoder

    if not fork_available():
        pytest.skip("the feature worker needs fork")
    bundle, recording_path = data
    if gaps:
        recording_path, original = str(tmp_path / "gaps.nhr"), recording_path
        copy_with_gaps(original, recording_path, gaps)
    outcomes = {}
    for jobs in (1, 2):
        with open_recording(recording_path) as recording:
            decoder = load_decoder(bundle, "numpy")
            try:
                outcomes[jobs] = replay_fast(decoder, recording, ReplayRange(recording, 1.0, 9.0, "fast"),
                                             RuntimeConfig(), jobs=jobs)
            finally:
                decoder.close()
    one, two = outcomes[1], outcomes[2]
    assert len(two.positions) > 400
    assert np.array_equal(one.samples, two.samples) and np.array_equal(one.positions, two.positions)
    for key in ("mean_r2", "r2", "commands", "scored_commands", "frames", "safety_events", "skips"):
        assert one.summary[key] == two.summary[key], key
    assert one.document["feature_stream"] == two.document["feature_stream"]
    assert (one.document["feature_stream"]["windows_dropped_for_gaps"] > 0) == bool(gaps)
    assert (one.summary["jobs"], two.summary["jobs"]) == (1, 2)
    assert one.summary["feature_worker_dsp_s"] is None and two.summary["feature_worker_dsp_s"] > 0


def test_realtime_replay_matches_fast_replay(data, capsys, tmp_path):
    bundle, recording = data
    stats = tmp_path / "stats.json"
    realtime = replay_json(capsys, bundle, recording, "--realtime", "--seconds", REALTIME_S, "--stats-json", stats)
    fast = replay_json(capsys, bundle, recording, "--fast", "--seconds", REALTIME_S)
    assert realtime["mode"] == "realtime" and realtime["devices"] == "process"
    assert realtime["frames"]["missing"] == 0 and realtime["frames"]["corrupt"] == 0
    assert realtime["frames"]["received"] >= 0.95 * REALTIME_S * 2000 / 20
    assert realtime["safety_events"] == 0
    assert realtime["hand"]["bad_checksums"] == 0 and realtime["hand"]["timeouts"] == 0
    assert realtime["hand_received"] == realtime["commands_sent"]
    latency = realtime["latency_us"]
    assert latency["count"] > 0 and 0 < latency["p50"] <= latency["p99"] <= latency["max"]
    # The same decoding through the serial path: the scores agree.
    assert abs(realtime["mean_r2"] - fast["mean_r2"]) < 0.01, (realtime["r2"], fast["r2"])
    assert realtime["scored_commands"] >= 0.9 * fast["scored_commands"]
    with open(str(stats)) as handle:
        assert json.load(handle)["mode"] == "realtime"


def test_replay_faults_reach_the_counters(data, capsys):
    bundle, recording = data
    result = replay_json(capsys, bundle, recording, "--realtime", "--devices", "thread", "--seconds", 3,
                         "--drop-rate", 0.02, "--seed", 4)
    assert result["devices"] == "thread"
    dropped = result["chip"]["faults"]["frames_dropped"]
    assert dropped > 0 and result["frames"]["missing"] > 0
    assert result["frames"]["missing"] <= dropped


# --- run ----------------------------------------------------------------------------

@pytest.fixture
def bench(data):
    """A streaming virtual chip (held-out recording, looping) and a virtual hand."""
    _, recording_path = data
    recording = open_recording(recording_path)
    chip = VirtualChip(RecordingSource(recording), loop=True)
    chip_path = chip.open()
    stop = threading.Event()
    serving = threading.Thread(target=chip.serve, args=(stop,), daemon=True)
    serving.start()
    hand = VirtualHand("neurohand").start()
    try:
        yield chip_path, hand
    finally:
        stop.set()
        serving.join(5.0)
        chip.close()
        hand.stop()
        recording.close()


def test_run_drives_the_hand_until_sigterm_then_leaves_it_open(data, bench, tmp_path):
    bundle, _ = data
    chip_path, hand = bench
    stats = str(tmp_path / "stats.json")
    record = str(tmp_path / "run.nhr")
    process = subprocess.Popen([sys.executable, "-m", "neurohand.deploy", "run", "--bundle", bundle,
                                "--chip", chip_path, "--hand", "neurohand:" + hand.slave_path, "--backend",
                                "numpy", "--stats-json", stats, "--status-interval", "0", "--record", record],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    try:
        assert hand.wait_for(1, 30.0), "the run never sent a command"
        time.sleep(2.0)
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert "Traceback" not in err
    with open(stats) as handle:
        document = json.load(handle)
    assert document["stop_reason"] == "SIGTERM"
    assert document["frames"]["received"] > 100 and document["frames"]["missing"] == 0
    assert document["safety_events"]["count"] == 0
    assert hand.wait_for(document["commands_sent"], 2.0)
    received = hand.received()
    assert len(received) == document["commands_sent"] > 50
    assert any(max(c.positions) > 0 for c in received)             # it followed the decoder
    assert all(p == 0 for p in received[-1].positions)             # and ended in the safe posture (open)
    assert hand.counters["bad_checksums"] == 0 and hand.counters["timeouts"] == 0
    assert "<- chip {} (4 channels, 2000 Hz, 0.195 uV per count)".format(chip_path) in err
    with open_recording(record) as recording:
        assert recording.integrity["complete"]
        assert recording.n_samples == 20 * document["frames"]["received"]
        assert recording.metadata["chip_scale_uv"] == pytest.approx(0.195)
        assert "command" in recording.label_streams


# What ``neurohand run`` may load: the device path, nothing of the workstation or the bench.
NOT_ON_THE_DEVICE_PATH = ("neurohand.train", "neurohand.deploy.bench", "neurohand.deploy.demo",
                          "neurohand.deploy.replay", "neurohand.firmware_bridge.virtual", "torch", "scipy",
                          "matplotlib", "onnx", "tqdm")


def test_run_loads_no_training_bench_virtual_device_or_torch_module(data, bench):
    bundle, _ = data
    chip_path, hand = bench
    # The run itself in a fresh interpreter, then the names of every module it loaded.
    code = ("import json, sys\n"
            "from neurohand.deploy.cli import main\n"
            "status = main.main(sys.argv[1:])\n"
            "print(json.dumps({'status': status, 'modules': sorted(sys.modules)}))\n")
    result = subprocess.run([sys.executable, "-c", code, "run", "--bundle", bundle, "--chip", chip_path,
                             "--hand", "neurohand:" + hand.slave_path, "--backend", "numpy", "--duration", "2",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["status"] == 0
    assert hand.wait_for(10, 5.0), "the run drove the hand"
    modules = report["modules"]
    assert "neurohand.deploy.runtime.realtime" in modules and "neurohand.firmware_bridge.chip.receiver" in modules
    loaded = [name for name in modules
              if any(name == banned or name.startswith(banned + ".") for banned in NOT_ON_THE_DEVICE_PATH)]
    assert loaded == []


def test_run_refuses_a_bundle_not_self_tested_here(data, tmp_path):
    bundle, _ = data
    fresh = str(tmp_path / "fresh")
    shutil.copytree(bundle, fresh, ignore=shutil.ignore_patterns("selftest"))
    result = run_cli("run", "--bundle", fresh, "--chip", "/dev/nonexistent-chip", "--hand", "none",
                     "--backend", "numpy")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "has not been self-tested on this device" in result.stderr
    assert "neurohand selftest" in result.stderr


def test_run_skip_selftest_check_warns_loudly(data, tmp_path):
    bundle, _ = data
    fresh = str(tmp_path / "fresh")
    shutil.copytree(bundle, fresh, ignore=shutil.ignore_patterns("selftest"))
    result = run_cli("run", "--bundle", fresh, "--chip", "/dev/nonexistent-chip", "--hand", "none",
                     "--backend", "numpy", "--skip-selftest-check")
    assert result.returncode == 2                     # it got past the check, to the missing port
    assert "WARNING" in result.stderr and "NOT been proven" in result.stderr
    assert "cannot open serial port /dev/nonexistent-chip" in result.stderr


def test_run_refuses_a_chip_configured_differently(data, tmp_path, capsys):
    bundle, _ = data
    samples = np.zeros((20000, 3), dtype=np.int16)
    chip = VirtualChip(ArraySource(samples, 2000.0, 0.195))
    chip_path = chip.open()
    stop = threading.Event()
    serving = threading.Thread(target=chip.serve, args=(stop,), daemon=True)
    serving.start()
    try:
        capsys.readouterr()
        status = cli.main(["run", "--bundle", bundle, "--chip", chip_path, "--hand", "none", "--backend", "numpy",
                           "--duration", "1", "--quiet"])
    finally:
        stop.set()
        serving.join(5.0)
        chip.close()
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "configured for 3 channels, the decoder needs 4" in err
    assert not chip.streaming


@pytest.mark.parametrize("args, message", [
    (["replay", "{missing}", "{recording}"], "is not a directory"),
    (["replay", "{bundle}", "{missing}.nhr"], "does not exist"),
    (["replay", "{bundle}", "{recording}", "--seconds", "500"], "has only 12.0 s"),
    (["replay", "{bundle}", "{recording}", "--realtime", "--seconds", "12"], "kept in reserve"),
    (["replay", "{bundle}", "{recording}", "--fast", "--drop-rate", "0.1"], "use them with --realtime"),
    (["replay", "{bundle}", "{recording}", "--drop-rate", "2", "--realtime"], "--drop-rate must be at most 1"),
    (["replay", "{bundle}", "{recording}", "--jobs", "3"], "--jobs must be at most 2"),
    (["replay", "{bundle}", "{recording}", "--realtime", "--jobs", "2"], "--jobs sets how --fast computes"),
    (["replay", "{bundle}", "{recording}", "--devices", "thread"], "use it with --realtime"),
    (["replay", "{bundle}", "{other}"], "4 channels at 2000 Hz"),
    (["run", "--bundle", "{bundle}", "--chip", "/dev/nonexistent-chip", "--hand", "none", "--backend", "numpy"],
     "cannot open serial port"),
    (["run", "--bundle", "{bundle}", "--chip", "x", "--hand", "psyonc:/dev/x"], "did you mean"),
    (["run", "--bundle", "{bundle}", "--chip", "x", "--hand", "none", "--duration", "0"], "--duration"),
])
def test_user_errors_are_one_line_with_exit_2(data, tmp_path, capsys, args, message):
    bundle, recording = data
    other = str(tmp_path / "other.nhr")
    write_session_parts(SimulatorConfig(5.0, n_channels=2, rate=2000.0, seed=1), [(other, 0.0, 5.0)])
    names = {"bundle": bundle, "recording": recording, "missing": str(tmp_path / "missing"), "other": other}
    capsys.readouterr()
    status = cli.main([a.format(**names) for a in args])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and message in err, err


def test_run_names_a_port_where_no_chip_answers(data, capsys):
    bundle, _ = data
    master, slave = os.openpty()
    port = os.ttyname(slave)
    try:
        capsys.readouterr()
        status = cli.main(["run", "--bundle", bundle, "--chip", port, "--hand", "none", "--backend", "numpy"])
    finally:
        os.close(master)
        os.close(slave)
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "chip at {}: chip did not answer the get-config command".format(port) in err


def write_signals_copy(source, target, signals):
    """``source`` with its signals replaced by float32 ``signals`` (µV), its label stream kept."""
    from neurohand.firmware_bridge.recording.file_format import RecordingWriter
    with open_recording(source) as recording:
        stream = recording.label_streams["fingers"]
        with RecordingWriter(target, recording.signal_rate, recording.channel_names, dtype="float32",
                             label_streams={"fingers": {"rate": stream.rate, "names": list(stream.names)}}) as out:
            out.append_signals(signals(recording.read_signals(microvolts=True)).astype(np.float32))
            out.append_labels("fingers", stream.data)


@pytest.mark.parametrize("jobs", ["1", "2"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_replay_that_decodes_no_command_says_so_in_one_line(data, tmp_path, capsys, jobs, value):
    bundle, recording = data
    broken = str(tmp_path / "broken.nhr")
    write_signals_copy(recording, broken, lambda signals: np.full_like(signals, value))
    capsys.readouterr()
    status = cli.main(["replay", bundle, broken, "--backend", "numpy", "--jobs", jobs, "--seconds", "3"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert "no command was decoded" in err and "nothing to score" in err


def test_an_io_error_reading_the_recording_is_one_line(data, tmp_path, capsys, monkeypatch):
    import errno
    from neurohand.firmware_bridge.recording import file_format
    bundle, recording = data

    def failing(self, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(file_format.Recording, "read_signals", failing)
    capsys.readouterr()
    status = cli.main(["replay", bundle, recording, "--backend", "numpy", "--jobs", "1"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith("neurohand replay: error: cannot read recording") and "Input/output error" in err


def test_an_io_error_while_the_virtual_chip_streams_is_one_line(data, capsys, monkeypatch):
    # replay --realtime: the recording is read by the virtual chip's thread, as it streams.
    import errno
    from neurohand.firmware_bridge.recording import file_format
    from neurohand.firmware_bridge.virtual import chip as virtual_chip
    bundle, recording = data
    reads = []
    real_read = virtual_chip.RecordingSource.read

    def failing_later(self, start, stop):
        reads.append(start)
        if start >= 4000:         # after about 2 s of streaming at 2 kHz
            raise file_format.RecordingError("cannot read recording {!r} at byte 123: {}".format(
                recording, os.strerror(errno.EIO)))
        return real_read(self, start, stop)

    monkeypatch.setattr(virtual_chip.RecordingSource, "read", failing_later)
    capsys.readouterr()
    # --devices thread: the virtual chip must run in this process to see the patched read.
    status = cli.main(["replay", bundle, recording, "--backend", "numpy", "--realtime", "--devices", "thread",
                       "--seconds", "3", "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert "cannot read recording" in err and "Input/output error" in err


def test_labels_out_of_range_are_refused_in_one_line(data, tmp_path, capsys):
    from neurohand.firmware_bridge.recording.file_format import RecordingWriter
    bundle, recording = data
    huge = str(tmp_path / "huge-labels.nhr")
    with open_recording(recording) as source:
        stream = source.label_streams["fingers"]
        with RecordingWriter(huge, source.signal_rate, source.channel_names, dtype="int16",
                             scale_uv=list(source.scale_uv),
                             label_streams={"fingers": {"rate": stream.rate, "names": list(stream.names)}}) as out:
            out.append_signals(source.read_signals())
            labels = np.array(stream.data, dtype=np.float32)
            labels[10:20] = 3e38
            out.append_labels("fingers", labels)
    capsys.readouterr()
    status = cli.main(["replay", bundle, huge, "--backend", "numpy", "--jobs", "1"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert "not finite or out of range" in err and "first at row 10" in err


# --- the virtual devices in processes of their own (replay_realtime devices="process") -------------

def realtime_api(bundle, recording_path, seconds, **options):
    from neurohand.deploy import replay
    from neurohand.deploy.runtime.config import RuntimeConfig
    from neurohand.deploy.session import load_decoder
    decoder = load_decoder(bundle, "numpy")
    with open_recording(recording_path) as source:
        replay_range = replay.ReplayRange(source, 0.0, seconds, "realtime")
        return replay.replay_realtime(decoder, source, replay_range, RuntimeConfig(status_interval_s=0),
                                      install_signals=False, **options)


def test_realtime_replay_with_the_devices_in_processes_of_their_own(data):
    from neurohand.firmware_bridge.virtual.chip import FaultInjector
    bundle, recording = data
    faults = FaultInjector(drop_rate=0.02, seed=4)
    outcome = realtime_api(bundle, recording, 4.0, faults=faults, devices="process")
    summary = outcome.summary
    assert summary["devices"] == "process"
    assert summary["hand_received"] == summary["commands_sent"] > 100
    assert summary["latency_us"]["count"] > 0 and summary["hand"]["bad_checksums"] == 0
    # Counted in the chip's process, the faults come back in the summary and in the caller's injector.
    assert faults.counters == summary["chip"]["faults"] and faults.counters["frames_dropped"] > 0
    assert 0 < summary["frames"]["missing"] <= faults.counters["frames_dropped"]
    # The hand's receive times and the chip's stream start share one clock across the processes: every
    # command lands within the run; only the open posture sent as the hand opens (and, on a loaded
    # machine, its keep-alives every writer period until the chip starts) comes before START.
    samples = outcome.samples
    early = samples < 0
    assert np.all(np.diff(samples) >= 0) and not outcome.positions[early].any()
    assert early.sum() <= 10 and (not early.any() or samples[0] >= -1.0 * 2000)
    assert samples[-1] <= (4.0 + 1.0) * 2000


def test_a_device_process_that_cannot_start_is_a_one_line_error(data, tmp_path):
    from neurohand.firmware_bridge.shared.errors import NeurohandError, UsageError
    bundle, recording = data
    gone = str(tmp_path / "gone.nhr")
    shutil.copy(recording, gone)
    from neurohand.deploy import replay
    from neurohand.deploy.runtime.config import RuntimeConfig
    from neurohand.deploy.session import load_decoder
    decoder = load_decoder(bundle, "numpy")
    with open_recording(gone) as source:
        os.remove(gone)                 # this process holds it open; the chip's process finds nothing
        replay_range = replay.ReplayRange(source, 0.0, 3.0, "realtime")
        with pytest.raises(NeurohandError, match="gone.nhr"):
            replay.replay_realtime(decoder, source, replay_range, RuntimeConfig(status_interval_s=0),
                                   install_signals=False, devices="process")
        with pytest.raises(UsageError, match="devices must be one of"):
            replay.replay_realtime(decoder, source, replay_range, RuntimeConfig(), devices="fork")
