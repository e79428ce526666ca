"""``neurohand collect`` as a user runs it: a virtual chip and a virtual glove on pseudo-terminals playing
one simulated recording; crash (kill -9), Ctrl-C and --continue; bad input."""
import importlib.util
import os
import signal
import subprocess
import threading
import time
import warnings

import numpy as np
import pytest

from neurohand.firmware_bridge.chip import protocol as chip_protocol
from neurohand.firmware_bridge.recording.file_format import open_recording
from neurohand.firmware_bridge.virtual.glove import VirtualGlove

from test_collect_rig import (ChipThread, GloveThread, collect_command, file_size, moving_labels, run_collect,
                              simulated, wait_for, write_protocol, write_virtual_calibration)

SPF = 10


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("collect")
    return {"recording": simulated(folder / "sim.nh", seconds=14.0),
            "protocol": write_protocol(folder / "short.json"),
            "calibration": write_virtual_calibration(folder / "calibration.json")}


@pytest.fixture
def devices(files):
    # Looping, so that a loaded machine's slow start-ups never run a device out of recording.
    chip = ChipThread.playing(files["recording"], samples_per_frame=SPF, loop=True)
    glove = GloveThread(files["recording"], hello_period_s=0.2, loop=True)
    yield chip, glove
    chip.stop()
    glove.stop()


def collect_args(files, devices, out, *more):
    chip, glove = devices
    return ["--chip", chip.path, "--glove", "virtual:{}:serial".format(glove.path), "--out", out,
            "--protocol", files["protocol"], "--calibration", files["calibration"], "--display", "none",
            "--no-picture"] + list(more)


def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("neurohand collect: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_collect_records_the_chip_and_the_glove_on_one_timeline(files, devices, tmp_path):
    out = str(tmp_path / "session.nh")
    result = run_collect(*collect_args(files, devices, out)[:-1])
    assert result.returncode == 0, result.stderr
    assert "verdict: usable" in result.stdout and "trials completed: 4 in this file, 4 of 4" in result.stdout
    assert os.path.isfile(str(tmp_path / "session.quality.txt"))
    if importlib.util.find_spec("matplotlib") is None:
        assert "no quality picture: matplotlib is not installed" in result.stderr
    else:
        with open(str(tmp_path / "session.quality.png"), "rb") as png:
            assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    chip, glove = devices
    with open_recording(out) as rec, open_recording(files["recording"]) as source:
        assert rec.integrity["complete"]
        s0 = rec.metadata["collect"]["chip_sample_at_start"]
        # The chip's samples are the source's, from the sample it was at when the recording started.
        assert np.array_equal(rec.read_signals(), source.read_signals(s0, s0 + rec.n_samples))
        # The glove's labels line up with them: row j (recording time j / 100 s) is session sample
        # s0 + 20 j, which the chip sent at t0 + (s0 + 20 j - SPF) / rate (a frame goes out when its
        # last sample is in); the glove played the label due then.
        collected = rec.label_streams["glove"].data.astype(np.float64)
        labels = source.label_streams["fingers"].data.astype(np.float64)
        rate = rec.signal_rate
        scheduler = chip.chip._scheduler
        t0, start = getattr(scheduler, "t0", getattr(scheduler, "_t0", None)), glove.glove.start_at
        times = t0 + (s0 + np.arange(len(collected)) * rate / 100.0 - SPF) / rate - start
        rows = times * 100.0
        inside = (rows >= 0) & (rows < len(labels) - 1)
        low = np.floor(rows[inside]).astype(int)
        w = (rows[inside] - low)[:, None]
        truth = labels[low] * (1 - w) + labels[low + 1] * w
        error = np.abs(collected[inside] - truth)
        assert inside.sum() > 300
        # 600 counts over the range quantise to 0.0017; 1 ms of misalignment costs at most ~0.004.
        assert np.percentile(error, 99) < 0.02 and error.mean() < 0.004, (error.mean(), error.max())
        assert [e.value for e in rec.events if e.kind == "repetition"] == [1, 2]


def frame_samples_waiting(chip):
    """Samples the virtual chip sent or queued that nobody has read: still in the terminal."""
    frame_bytes = len(chip_protocol.encode_data_frame(0, 0, np.zeros((SPF, 4), np.int16)))
    return (chip.unread_bytes() + len(chip._out)) // frame_bytes * SPF


def test_kill_9_leaves_a_readable_file_short_of_at_most_a_tenth_of_a_second(files, devices, tmp_path):
    out = str(tmp_path / "killed.nh")
    process = subprocess.Popen(collect_command(*collect_args(files, devices, out)), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True)
    try:
        # Recording for about a second: the file holds its header and a few hundred chunks by then.
        assert wait_for(lambda: file_size(out) > 16000, 20.0), process.stderr.read() if process.poll() else ""
        time.sleep(0.7)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(5.0)
        time.sleep(0.05)
        chip = devices[0].chip
        received = chip.counters["samples_sent"] - frame_samples_waiting(chip)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    with pytest.warns(Warning):
        rec = open_recording(out)
    with rec:
        assert not rec.integrity["complete"]
        s0 = rec.metadata["collect"]["chip_sample_at_start"]
        lost = received - s0 - rec.n_samples
        print("kill -9 lost {} samples ({:.1f} ms)".format(lost, 1000.0 * lost / rec.signal_rate))
        assert 0 <= lost <= 0.1 * rec.signal_rate, lost
        assert rec.duration_s > 0.5
        # The label rows reach the end of the signal: the file trains as it is.
        rows = len(rec.label_streams["glove"].data)
        assert rows * 20 >= rec.n_samples - 20


def trials_done(path):
    """Trials a recording (perhaps still being written) marks done."""
    if not os.path.exists(path):
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with open_recording(path) as rec:
                return [e.value for e in rec.events if e.kind == "trial_done"]
        except Exception:
            return []


def test_ctrl_c_keeps_the_session_and_continue_records_the_rest(files, tmp_path):
    # A glove whose fingers always move: whatever moment the session stops, its labels are usable.
    chip = ChipThread.playing(files["recording"], samples_per_frame=SPF, loop=True)
    glove = GloveThread(labels=moving_labels(), hello_period_s=0.2, loop=True)
    try:
        ctrl_c_then_continue(files, (chip, glove), tmp_path)
    finally:
        chip.stop()
        glove.stop()


def ctrl_c_then_continue(files, devices, tmp_path):
    first = str(tmp_path / "first.nh")
    # Three repetitions (six trials): time enough to stop it after the first, even on a loaded machine.
    longer = dict(files, protocol=write_protocol(tmp_path / "longer.json", repetitions=3))
    process = subprocess.Popen(collect_command(*collect_args(longer, devices, first)), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True)
    try:
        assert wait_for(lambda: len(trials_done(first)) >= 1, 20.0)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "stopped: SIGINT" in stderr and "--continue {}".format(first) in stderr, stderr
    with open_recording(first) as rec:
        assert rec.integrity["complete"]
        done_first = [e.value for e in rec.events if e.kind == "trial_done"]
    assert 1 <= len(done_first) < 6
    second = str(tmp_path / "second.nh")
    chip, glove = devices
    result = run_collect("--chip", chip.path, "--glove", "virtual:{}:serial".format(glove.path), "--out", second,
                         "--continue", first, "--display", "none", "--no-picture")
    assert result.returncode == 0, result.stderr
    with open_recording(second) as rec:
        done_second = [e.value for e in rec.events if e.kind == "trial_done"]
        assert rec.metadata["collect"]["done_before"] == done_first
    assert sorted(done_first + done_second) == list(range(6))


def garbage_port():
    """A terminal that sends random bytes forever; returns (path, stop)."""
    import tty
    master, slave = os.openpty()
    tty.setraw(slave)
    stop = threading.Event()

    def spew():
        rng = np.random.RandomState(5)
        while not stop.is_set():
            try:
                os.write(master, rng.randint(0, 256, 64).astype(np.uint8).tobytes())
            except OSError:
                pass
            time.sleep(0.005)
    threading.Thread(target=spew, daemon=True).start()

    def close():
        stop.set()
        time.sleep(0.02)
        os.close(master)
        os.close(slave)
    return os.ttyname(slave), close


def test_bad_input_is_one_line_and_exit_2_with_nothing_recorded_lost(files, devices, tmp_path):
    chip, glove = devices
    existing = tmp_path / "existing.nh"
    existing.write_bytes(b"precious")
    bad_protocol = write_protocol(tmp_path / "bad.json", hold_s=-1)
    cyberglove = VirtualGlove(np.zeros((400, 5)), 100.0, protocol="cyberglove")
    cyber_path = cyberglove.open()
    garbage, stop_garbage = garbage_port()
    stalling = GloveThread(files["recording"], hello_period_s=0.2)
    stalled_out = str(tmp_path / "stalled.nh")
    more_chips = [ChipThread.playing(files["recording"], loop=True) for _ in range(2)]
    runs = {
        "exists": collect_args(files, devices, str(existing)),
        "protocol": collect_args(files, devices, str(tmp_path / "a.nh")) + ["--protocol", bad_protocol],
        "recalibrate": collect_args(files, devices, str(tmp_path / "b.nh")) + ["--recalibrate"],
        # Each run that opens a chip has its own (two hosts on one terminal would steal each other's replies).
        "wrong kind": ["--chip", chip.path, "--glove", "serial:" + cyber_path, "--out", str(tmp_path / "c.nh"),
                       "--display", "none", "--no-picture"],
        "garbage": ["--chip", more_chips[0].path, "--glove", "serial:" + garbage, "--out", str(tmp_path / "d.nh"),
                    "--display", "none", "--no-picture"],
        "stops": ["--chip", more_chips[1].path, "--glove",
                  "virtual:{}:serial".format(stalling.path), "--out", stalled_out, "--protocol", files["protocol"],
                  "--calibration", files["calibration"], "--display", "none", "--no-picture"],
    }
    try:
        processes = {name: subprocess.Popen(collect_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            universal_newlines=True) for name, args in runs.items()}
        # Half a second into the recording the glove hangs (its port stays open).
        assert wait_for(lambda: file_size(stalled_out) > 8000, 30.0)
        stalling.freeze()
        results = {}
        for name, process in processes.items():
            stdout, stderr = process.communicate(timeout=60)
            results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    finally:
        stop_garbage()
        stalling.stop()
        cyberglove.close()
        for extra in more_chips:
            extra.stop()
    assert "already exists; pass --force" in one_error_line(results["exists"])
    assert existing.read_bytes() == b"precious"
    assert "hold_s: must be at least 0.2" in one_error_line(results["protocol"])
    assert "--recalibrate goes with --continue" in one_error_line(results["recalibrate"])
    for name in ("wrong kind", "garbage"):
        line = one_error_line(results[name])
        assert "glove" in line, line
        assert not os.path.exists(str(tmp_path / ("c.nh" if name == "wrong kind" else "d.nh")))
    stopped = results["stops"]
    assert stopped.returncode == 2
    assert "sent nothing for" in stopped.stderr and "saved in {}".format(stalled_out) in stopped.stderr
    assert "Traceback" not in stopped.stderr
    with open_recording(stalled_out) as rec:
        assert rec.integrity["complete"] and rec.duration_s > 0.5
