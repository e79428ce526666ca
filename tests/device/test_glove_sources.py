"""Glove sources on real pseudo-terminals: the virtual glove (both protocols)
played into open_glove, injected faults counted exactly, stalls, unplugs, the
wrong device on the port; the calibration; the virtual-glove command."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from neurohand.firmware_bridge.gloves import FINGERS, GloveCalibration, open_glove, parse_glove_spec
from neurohand.firmware_bridge.gloves.calibration import default_sensor_fingers
from neurohand.firmware_bridge.shared.errors import ConfigError, LinkError, ProtocolError, UsageError
from neurohand.firmware_bridge.virtual.glove import (
    VirtualGlove, glove_faults, labels_to_raw, virtual_calibration)

RATE = 100.0


def finger_labels(seconds, rate=RATE, hold_s=0.0):
    """Smooth 0..1 movements per finger, after ``hold_s`` of open hand then ``hold_s`` of fist."""
    t = np.arange(int(round(seconds * rate))) / rate
    labels = np.stack([0.5 - 0.5 * np.cos(2 * np.pi * (0.7 + 0.2 * k) * t + k) for k in range(5)], axis=1)
    hold = int(round(hold_s * rate))
    return np.vstack([np.zeros((hold, 5)), np.ones((hold, 5)), labels])


@contextlib.contextmanager
def playing(labels, protocol="serial", **options):
    options.setdefault("hello_period_s", 0.1)
    glove = VirtualGlove(labels, RATE, protocol=protocol, **options)
    path = glove.open()
    stop = threading.Event()
    thread = threading.Thread(target=glove.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        yield glove, path, thread
    finally:
        stop.set()
        thread.join(5)
        glove.close()


def read_for(source, seconds, until=None):
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples += source.read(0.05)
        if until is not None and until(samples):
            break
    return samples


# --- serial protocol --------------------------------------------------------------
def test_serial_glove_detected_timed_and_calibrated_back_to_its_labels():
    labels = finger_labels(0.8, hold_s=0.3)
    with playing(labels, start_at=time.monotonic() + 0.3) as (glove, path, thread):
        with open_glove("virtual:" + path) as source:
            assert source.kind == "serial" and source.rate_hz == RATE and len(source.sensor_names) == 5
            samples = read_for(source, 5.0, until=lambda s: s and s[-1].sequence == len(labels) - 1)
            counters = source.counters
    assert [s.sequence for s in samples] == list(range(len(labels)))
    assert counters["lost"] == counters["crc_errors"] == counters["resyncs"] == counters["timeouts"] == 0
    raw = np.array([s.raw for s in samples])
    # Label time t arrives at start + t (the same clock rule as the virtual chip).
    late = np.array([s.arrival for s in samples]) - (glove.start_at + np.arange(len(samples)) / RATE)
    # Never early; typically under a millisecond late (a loaded CI machine may stall a thread now and then).
    assert late.min() > -0.002 and np.median(late) < 0.005 and late.max() < 0.5
    # collect's calibration from the held poses recovers the labels.
    hold = 30
    calibration = GloveCalibration.fit({"open": raw[5:hold - 5], "fist": raw[hold + 5:2 * hold - 5]},
                                       source.sensor_fingers, source.sensor_names)
    np.testing.assert_allclose(calibration.apply(raw), labels, atol=1.0 / 600 + 1e-9)


def test_serial_faults_are_counted_exactly():
    labels = finger_labels(1.5)
    faults = glove_faults("serial", drop_rate=0.05, corrupt_rate=0.05, garbage_probability=0.1, seed=5)
    with playing(labels, faults=faults, speed=2.0, start_at=time.monotonic() + 0.4) as (glove, path, thread):
        with open_glove("virtual:{}:serial".format(path)) as source:
            thread.join(10)                           # played to the end and drained
            read_for(source, 0.3)
            c = source.counters
    f = faults.counters
    assert f["frames_dropped"] and f["frames_corrupted"] and f["garbage_bursts"]
    assert c["frames"] == glove.counters["frames_sent"] - f["frames_corrupted"]
    assert c["crc_errors"] == f["frames_corrupted"]
    assert c["lost"] == f["expected_frames_missing"]
    assert c["resyncs"] == f["expected_resyncs"]
    assert c["bytes_discarded"] == f["expected_bytes_discarded"]


def test_a_glove_that_stops_counts_one_timeout_and_resumes():
    with playing(finger_labels(3.0), stall_after_s=0.2, stall_for_s=0.5,
                 start_at=time.monotonic() + 0.2) as (glove, path, thread):
        with open_glove("serial:" + path) as source:
            seen = []
            end = time.monotonic() + 1.2
            while time.monotonic() < end:
                got = source.read(0.05)
                seen.append((bool(got), source.stalled))
            c = source.counters
    assert c["timeouts"] == 1 and c["lost"] == 0
    assert (False, True) in seen and seen[-1] == (True, False)
    assert glove.counters["frames_stalled"] >= 40


def test_unplug_and_replug_are_survived_and_counted(tmp_path):
    link = str(tmp_path / "glove")
    with playing(finger_labels(5.0), disconnect_after_s=0.5, reconnect_pause_s=0.2, link_path=link) as (
            glove, path, thread):
        with open_glove("serial:" + link) as source:
            samples = read_for(source, 4.0, until=lambda s: source.counters["reconnects"] and len(s) > 80)
            c = source.counters
    assert c["disconnects"] == 1 and c["reconnects"] == 1 and c["sequence_restarts"] == 1
    assert samples[-1].sequence > 0 and glove.counters["disconnects"] == 1


# --- CyberGlove -------------------------------------------------------------------
def test_cyberglove_detected_polled_and_mapped_back():
    labels = finger_labels(3.0)
    with playing(labels, protocol="cyberglove", loop=True) as (glove, path, thread):
        with open_glove("virtual:" + path, detect_timeout_s=0.3) as source:
            assert source.kind == "cyberglove" and len(source.sensor_names) == 22
            samples = read_for(source, 0.6)
        c = source.counters
    assert len(samples) >= 40 and all(s.sequence is None for s in samples)
    assert c["lost"] == 0 and c["framing_errors"] == 0 and c["frames"] == c["polls"] == len(samples)
    fingers = virtual_calibration("cyberglove").apply([s.raw for s in samples])
    for sample, got in zip(samples, fingers):
        row = int((sample.arrival - glove.start_at) * RATE) % len(labels)
        nearby = labels[[(row + k) % len(labels) for k in (-2, -1, 0)]]
        assert np.min(np.max(np.abs(nearby - got), axis=1)) <= 1.0 / 160 + 1e-9


def test_cyberglove_drops_and_garbage_are_counted_exactly():
    faults = glove_faults("cyberglove", drop_rate=0.1, garbage_probability=0.2, seed=2)
    with playing(finger_labels(3.0), protocol="cyberglove", loop=True, faults=faults) as (glove, path, thread):
        with open_glove("cyberglove:" + path) as source:
            read_for(source, 0.8)
        c = source.counters                           # final after close
    f = faults.counters
    assert f["frames_dropped"] and f["garbage_bursts"]
    assert c["lost"] == f["frames_dropped"] and c["frames"] == c["polls"] - c["lost"]
    assert c["resyncs"] == f["expected_resyncs"] and c["bytes_discarded"] == f["expected_bytes_discarded"]


def test_cyberglove_that_stops_for_good():
    with playing(finger_labels(3.0), protocol="cyberglove", stall_after_s=0.3) as (glove, path, thread):
        with open_glove("cyberglove:" + path) as source:
            read_for(source, 0.9)
            assert source.stalled and source.read(0.05) == []
        c = source.counters
    assert c["timeouts"] == 1 and c["lost"] >= 20 and glove.counters["polls_stalled"] == c["lost"]


# --- the wrong device -------------------------------------------------------------
def test_wrong_kind_of_glove_is_a_clear_error():
    with playing(finger_labels(3.0)) as (glove, path, thread):
        with pytest.raises(ProtocolError, match="serial:PORT"):
            open_glove("cyberglove:" + path)
    with playing(finger_labels(3.0), protocol="cyberglove") as (glove, path, thread):
        with pytest.raises(LinkError, match="sent nothing"):
            open_glove("serial:" + path, hello_timeout_s=0.3)


def test_a_device_sending_garbage_is_neither_glove():
    master, slave = os.openpty()
    stop = threading.Event()

    def chatter():
        rng = np.random.RandomState(0)
        while not stop.wait(0.01):
            try:
                os.write(master, rng.randint(1, 255, 32).astype(np.uint8).tobytes().replace(b"\xc7", b""))
            except OSError:
                pass
    thread = threading.Thread(target=chatter, daemon=True)
    thread.start()
    try:
        path = os.ttyname(slave)
        with pytest.raises(ProtocolError, match="not a neurohand serial glove"):
            open_glove("serial:" + path, hello_timeout_s=0.3)
        with pytest.raises(ProtocolError, match="not a CyberGlove"):
            open_glove("cyberglove:" + path, query_timeout_s=0.3)
    finally:
        stop.set()
        thread.join()
        os.close(master)
        os.close(slave)


def test_a_missing_port_and_bad_specs(tmp_path):
    with pytest.raises(LinkError, match="glove at"):
        open_glove("serial:" + str(tmp_path / "nothing"))
    for spec in ("", "serial", "glove:/dev/x", "serial:", "virtual:", "cyberglove:socket://x:1", None):
        with pytest.raises(UsageError):
            open_glove(spec)
    assert parse_glove_spec("virtual:/tmp/a:b:cyberglove") == ("virtual", "/tmp/a:b", "cyberglove")
    assert parse_glove_spec("serial:/dev/pts/3") == ("serial", "/dev/pts/3", None)


# --- calibration ------------------------------------------------------------------
def poses_from(labels_by_pose, protocol="serial", noise=1.0, seed=0):
    rng = np.random.RandomState(seed)
    return {name: labels_to_raw(np.tile(l, (50, 1)), protocol) + rng.normal(0, noise, (50, 5 if protocol == "serial"
                                                                                       else 22))
            for name, l in labels_by_pose.items()}


def test_calibration_fits_applies_and_round_trips():
    poses = poses_from({"open": [0] * 5, "fist": [1] * 5, "thumb": [1.0, 0.1, 0, 0, 0]})
    poses["fist"][:, 0] -= 200            # the thumb bends less in a fist than alone: its own pose is used
    calibration = GloveCalibration.fit(poses, default_sensor_fingers("serial", 5))
    raw = labels_to_raw([[0.25, 0.5, 0.75, 1.0, 0.0], [1.2, -0.1, 0.5, 0.5, 0.5]], "serial")
    np.testing.assert_allclose(calibration.apply(raw), [[0.25, 0.5, 0.75, 1, 0], [1, 0, 0.5, 0.5, 0.5]], atol=0.01)
    stored = json.loads(json.dumps(calibration.to_config()))
    again = GloveCalibration.from_config(stored)
    np.testing.assert_array_equal(again.apply(raw), calibration.apply(raw))
    assert set(calibration.ranges()) == set(FINGERS) and calibration.ranges()["index"] > 550
    stored["version"] = 99
    with pytest.raises(ConfigError, match="version"):
        GloveCalibration.from_config(stored)


def test_calibration_handles_sensors_that_fall_when_flexed():
    poses = poses_from({"open": [0] * 5, "fist": [1] * 5}, protocol="cyberglove")
    poses["fist"][:, 6] = poses["open"][:, 6] - 60          # a DIP sensor reading less when bent
    calibration = GloveCalibration.fit(poses, default_sensor_fingers("cyberglove", 22))
    half = poses["open"][:1].copy()
    half[0, [4, 5]] += 80
    half[0, 6] -= 30
    assert calibration.apply(half)[0, 1] == pytest.approx(0.5, abs=0.02)


def test_calibration_refuses_a_sensor_that_did_not_move_naming_the_finger():
    poses = poses_from({"open": [0] * 5, "fist": [1, 1, 1, 0, 1]})
    with pytest.raises(UsageError, match="the ring did not move its flex3"):
        GloveCalibration.fit(poses, default_sensor_fingers("serial", 5), ["flex{}".format(i) for i in range(5)])
    with pytest.raises(UsageError, match="'fist' pose"):
        GloveCalibration.fit({"open": poses["open"]}, default_sensor_fingers("serial", 5))
    with pytest.raises(UsageError, match="'wave'"):
        GloveCalibration.fit(dict(poses, wave=poses["open"]), default_sensor_fingers("serial", 5))
    with pytest.raises(UsageError, match="no sensor"):
        GloveCalibration.fit(poses, {"thumb": [0]})


@pytest.mark.parametrize("protocol,step", [("serial", 1.0 / 600), ("cyberglove", 1.0 / 160)])
def test_virtual_calibration_inverts_the_virtual_glove(protocol, step):
    labels = np.random.RandomState(1).uniform(0, 1, (200, 5))
    np.testing.assert_allclose(virtual_calibration(protocol).apply(labels_to_raw(labels, protocol)), labels,
                               atol=step / 2 + 1e-9)


# --- the command ------------------------------------------------------------------
def write_recording(path, seconds, streams=None):
    from neurohand.firmware_bridge.recording.file_format import RecordingWriter
    labels = finger_labels(seconds)
    streams = {"fingers": {"rate": RATE, "names": list(FINGERS)}} if streams is None else streams
    with RecordingWriter(path, 1000.0, ["ch0"], scale_uv=[1.0], label_streams=streams) as writer:
        writer.append_signals(np.zeros((int(seconds * 1000), 1), np.int16))
        for name in streams:
            writer.append_labels(name, labels.astype(np.float32))
    return labels


def test_command_plays_a_recording_and_reports_counters(tmp_path):
    recording = str(tmp_path / "rec.nhr")
    labels = write_recording(recording, 30.0)
    port = str(tmp_path / "glove")
    process = subprocess.Popen([sys.executable, "-m", "neurohand.deploy", "virtual-glove", recording, "--link", port,
                                "--drop-rate", "0.02", "--seed", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    try:
        slave = process.stdout.readline().strip()
        assert slave.startswith("/dev/") and os.path.realpath(port) == slave
        with open_glove("virtual:" + port) as source:
            samples = read_for(source, 3.0, until=lambda s: len(s) >= 30)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    summary = json.loads(stderr.strip().splitlines()[-1])
    assert summary["protocol"] == "serial" and summary["glove"]["frames_sent"] >= 30
    assert summary["faults"]["frames_in"] >= 30 and not os.path.lexists(port)
    calibration = virtual_calibration("serial")
    for sample in samples:
        np.testing.assert_allclose(calibration.apply(sample.raw)[0], labels[sample.sequence], atol=1.0 / 600)


def test_command_refuses_bad_input_in_one_line(tmp_path, capsys):
    from neurohand.deploy.cli.main import main
    recording = str(tmp_path / "rec.nhr")
    write_recording(recording, 1.0)
    other = str(tmp_path / "other.nhr")
    write_recording(other, 1.0, streams={"emg_envelope": {"rate": RATE, "names": ["a", "b", "c", "d", "e"]}})
    cases = [
        ([recording, "--protocol", "cyberglove", "--corrupt-rate", "0.1"], "no checksum"),
        ([recording, "--start-at", "1"], "in the past"),
        ([recording, "--protocol", "cyberglov"], "did you mean"),
        ([str(tmp_path / "missing.nhr")], "does not exist"),
        ([other], "no label stream with the finger columns"),
        ([recording, "--speed", "0"], "--speed"),
    ]
    for argv, message in cases:
        assert main(["virtual-glove"] + argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
