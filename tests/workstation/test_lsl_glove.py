"""A glove on Lab Streaming Layer (``--glove lsl:NAME``) and ``collect --lsl-outlet``, with the real pylsl.

liblsl resolves on this machine only (test_lsl's configuration and fixture),
and each test's streams have names of their own.  Skipped without pylsl.
"""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from neurohand.firmware_bridge.gloves.registry import open_glove, parse_glove_spec
from neurohand.firmware_bridge.shared.errors import ConfigError, LinkError, UsageError
from neurohand.firmware_bridge.virtual.glove import SERIAL_FLEXED_COUNTS, SERIAL_OPEN_COUNTS

import test_lsl
from test_lsl import needs_lsl, pylsl, stream_name

machine_only_lsl = test_lsl.machine_only_lsl     # its fixture: liblsl resolves on this machine only

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "device"))
from test_collect_rig import (ChipThread, collect_command, moving_labels, noise_source,  # noqa: E402
                              write_protocol, write_virtual_calibration)

pytestmark = [needs_lsl, pytest.mark.usefixtures("machine_only_lsl")]
SENSORS = ["flex{}".format(i) for i in range(5)]


def glove_outlet(name, rate=100.0, channel_format=None, labels=SENSORS):
    info = pylsl.StreamInfo(name, "Glove", len(labels), rate,
                            pylsl.cf_float32 if channel_format is None else channel_format, name + "-id")
    channels = info.desc().append_child("channels")
    for label in labels:
        channels.append_child("channel").append_child_value("label", label)
    return pylsl.StreamOutlet(info)


def counts(labels):
    return SERIAL_OPEN_COUNTS + (SERIAL_FLEXED_COUNTS - SERIAL_OPEN_COUNTS) * np.asarray(labels)


def wait_for_consumer(outlet, timeout_s=5.0):
    assert outlet.wait_for_consumers(timeout_s)


def test_parse_checks_the_lsl_query_without_pylsl_use():
    assert parse_glove_spec("lsl:MyGlove") == ("lsl", "MyGlove", None)
    assert parse_glove_spec("lsl:type=Glove") == ("lsl", "type=Glove", None)
    for bad in ("lsl:colour=red", "lsl:na'me", "lsl:type="):
        with pytest.raises(UsageError) as error:
            parse_glove_spec(bad)
        assert "\n" not in str(error.value)


def test_an_lsl_glove_gives_its_samples_dated_when_they_were_pushed():
    name = stream_name("glove")
    outlet = glove_outlet(name)
    glove = open_glove("lsl:" + name, resolve_timeout_s=5.0)
    try:
        assert glove.kind == "lsl" and glove.sensor_names == SENSORS and glove.rate_hz == 100.0
        wait_for_consumer(outlet)
        values = counts(moving_labels(seconds=0.5))
        pushed = []
        for i, row in enumerate(values):
            if not 20 <= i < 30:       # ten samples the glove never sent: a gap in the timestamps
                pushed.append(time.monotonic())
                outlet.push_sample(row.tolist(), pylsl.local_clock())
            time.sleep(0.01)
        samples = []
        deadline = time.monotonic() + 3.0
        while len(samples) < len(pushed) and time.monotonic() < deadline:
            samples += glove.read(0.2)
        kept = np.delete(values, range(20, 30), axis=0)
        assert len(samples) == len(pushed)
        assert np.allclose([s.raw for s in samples], kept.astype(np.float32), atol=1e-3)
        assert all(s.sequence is None for s in samples)
        # Dated by the LSL timestamp, on the monotonic clock: not when read() took them (0.2 s batches).
        lateness = np.array([s.arrival for s in samples]) - np.array(pushed)
        assert np.all(np.abs(lateness) < 0.005), lateness
        counters = glove.counters
        assert counters["frames"] == len(pushed) and 8 <= counters["lost"] <= 12, counters
    finally:
        glove.close()


def test_a_missing_or_wrong_stream_is_one_line_naming_what_is_there():
    other = stream_name("other")
    outlet = glove_outlet(other)
    with pytest.raises(LinkError) as error:
        open_glove("lsl:" + stream_name("absent"), resolve_timeout_s=0.3)
    message = str(error.value)
    assert "\n" not in message and "no LSL stream" in message and other in message
    markers = stream_name("markers")
    text = glove_outlet(markers, rate=0.0, channel_format=pylsl.cf_string, labels=["cue"])
    with pytest.raises(ConfigError) as error:
        open_glove("lsl:" + markers, resolve_timeout_s=5.0)
    assert "\n" not in str(error.value) and "string" in str(error.value)
    del outlet, text


def test_collect_publishes_calibrated_fingers_and_cue_markers(tmp_path):
    glove_name, out_name = stream_name("collect-glove"), stream_name("collect-out")
    outlet = glove_outlet(glove_name)
    chip = ChipThread(noise_source(seconds=30.0), samples_per_frame=10, loop=True)
    command = collect_command(
        "--chip", chip.path, "--glove", "lsl:" + glove_name, "--out", tmp_path / "s.nh",
        "--protocol", write_protocol(tmp_path / "short.json"),
        "--calibration", write_virtual_calibration(tmp_path / "calibration.json"),
        "--display", "none", "--no-picture", "--lsl-outlet", out_name)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    stop = threading.Event()
    labels = moving_labels(seconds=4.0)
    sent = {}          # LSL timestamp -> labels pushed

    def play():
        i = 0
        while not stop.is_set():
            stamp = pylsl.local_clock()
            row = labels[i % len(labels)]
            sent[stamp] = row
            outlet.push_sample(counts(row).tolist(), stamp)
            i += 1
            time.sleep(0.01)

    player = threading.Thread(target=play, daemon=True)
    try:
        # The outlets exist before collect waits for the glove: subscribe, then let the glove play.
        positions_info = pylsl.resolve_byprop("name", out_name, 1, 15.0)
        cues_info = pylsl.resolve_byprop("name", out_name + "-cues", 1, 5.0)
        assert positions_info and cues_info, process.stderr.read() if process.poll() is not None else "no streams"
        positions, cues = pylsl.StreamInlet(positions_info[0]), pylsl.StreamInlet(cues_info[0])
        positions.open_stream(5.0)
        cues.open_stream(5.0)
        assert [positions.info().desc().child("channels").child("channel").child_value("label")] == ["thumb"]
        player.start()
        stdout, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr
        got, stamps = positions.pull_chunk(timeout=1.0, max_samples=10000)
        markers = []
        while True:
            marker, stamp = cues.pull_sample(timeout=0.5)
            if marker is None:
                break
            markers.append((marker[0], stamp))
    finally:
        stop.set()
        if process.poll() is None:
            process.kill()
            process.communicate()
        chip.stop()
    got = np.asarray(got)
    assert got.shape[1] == 5 and len(got) > 150, got.shape
    # Each published position is the glove sample of the same timestamp, calibrated back to its label.
    # (The two clock offsets collect measured differ by microseconds; the glove's period is 10 ms.)
    sent_stamps = np.array(sorted(sent))
    nearest = np.clip(np.searchsorted(sent_stamps, stamps), 1, len(sent_stamps) - 1)
    nearest -= np.abs(sent_stamps[nearest - 1] - stamps) < np.abs(sent_stamps[nearest] - stamps)
    assert np.all(np.abs(sent_stamps[nearest] - stamps) < 0.001)
    expected = np.array([sent[sent_stamps[i]] for i in nearest])
    assert np.allclose(got, expected, atol=0.01)
    kinds = [m.split(":")[0] for m, _ in markers]
    assert kinds.count("move") == 4 and kinds[-1] == "end", markers
    assert [m.split(":")[1] for m, _ in markers if m.startswith("move:")] == ["1", "8", "1", "8"]
    # Stamped when shown, on the glove's clock: the protocol's lead-in, holds and rests, inside the glove data.
    cue_times = np.array([s for _, s in markers])
    assert np.allclose(np.diff(cue_times), [0.3] + [0.5, 0.3] * 4, atol=0.06), np.diff(cue_times)
    assert stamps[0] < cue_times[0] and cue_times[-1] < stamps[-1] + 0.5


def test_a_bad_outlet_name_is_one_line_before_anything_opens(tmp_path):
    result = subprocess.run(collect_command("--chip", "/dev/neurohand-absent", "--glove", "lsl:x", "--out",
                                            tmp_path / "s.nh", "--lsl-outlet", "it's"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "--lsl-outlet" in lines[0], result.stderr
    assert not os.path.exists(str(tmp_path / "s.nh"))
