"""``neurohand info``, run as a user runs it (a subprocess)."""
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from neurohand.firmware_bridge.recording.file_format import RecordingWriter

FINGERS = ["thumb", "index", "middle", "ring", "little"]


def run_info(*args):
    return subprocess.run([sys.executable, "-m", "neurohand.deploy", "info"] + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)


@pytest.fixture
def recording(tmp_path):
    """A 2.5 s, 4-channel int16 recording at 2 kHz with labels and events."""
    path = str(tmp_path / "s1.nhr")
    with RecordingWriter(path, 2000.0, ["ch0", "ch1", "ch2", "ch3"], "int16", [0.195] * 4,
                         {"subject": "S1", "chip": {"gain": 192}},
                         {"fingers": {"rate": 100.0, "names": FINGERS},
                          "glove": {"rate": 50.0, "names": ["j{}".format(i) for i in range(22)]}}) as writer:
        for second in range(5):
            writer.append_signals(np.full((1000, 4), second, np.int16))
            writer.append_labels("fingers", np.zeros((50, 5)))
            writer.add_event(second * 1000, "movement", second)
        writer.append_labels("glove", np.ones((7, 22)))
        writer.add_event(4000, "repetition", 1)
        writer.add_event(4500, "missing", 20)
    return path


def test_text_summary(recording):
    result = run_info(recording)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert "2.500 s (5000 samples at 2000 Hz)" in out
    assert "4 channels, int16, 0.195 uV per count" in out
    assert "ch0, ch1, ch2, ch3" in out
    assert "fingers: 250 rows at 100 Hz" in out and "glove: 7 rows at 50 Hz" in out
    assert "missing: 1, movement: 5, repetition: 1" in out
    assert '"subject": "S1"' in out
    assert "integrity: complete" in out


def test_json_summary(recording):
    result = run_info(recording, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)          # exactly one JSON document
    assert len(result.stdout.strip().splitlines()) == 1
    assert summary["duration_s"] == 2.5 and summary["n_samples"] == 5000
    assert summary["signal_rate"] == 2000.0 and summary["dtype"] == "int16"
    assert summary["n_channels"] == 4 and summary["channel_names"] == ["ch0", "ch1", "ch2", "ch3"]
    assert summary["scale_uv"] == [0.195] * 4
    assert summary["label_streams"] == {
        "fingers": {"rate": 100.0, "names": FINGERS, "n_samples": 250},
        "glove": {"rate": 50.0, "names": ["j{}".format(i) for i in range(22)], "n_samples": 7}}
    assert summary["events"] == {"missing": 1, "movement": 5, "repetition": 1}
    assert summary["metadata"] == {"subject": "S1", "chip": {"gain": 192}}
    assert summary["integrity"]["complete"] is True and summary["integrity"]["bytes_ignored"] == 0


def test_truncated_recording_is_summarised_with_a_one_line_warning(recording, tmp_path):
    data = open(recording, "rb").read()
    cut = str(tmp_path / "cut.nhr")
    with open(cut, "wb") as handle:
        handle.write(data[:len(data) // 2])
    result = run_info(cut, "--json")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("neurohand info: warning: ")
    summary = json.loads(result.stdout)
    assert summary["integrity"]["complete"] is False
    assert summary["integrity"]["bytes_ignored"] > 0
    assert 0 < summary["n_samples"] < 5000
    text = run_info(cut)
    assert text.returncode == 0 and "TRUNCATED" in text.stdout


def test_verify_finds_a_damaged_signal_chunk(recording):
    data = bytearray(open(recording, "rb").read())
    offset, signal_payloads = 12, []
    while offset < len(data):   # chunk headers per docs/recording-format.md
        kind, length = struct.unpack_from("<4sQ", data, offset)
        if kind == b"SIGS":
            signal_payloads.append(offset + 20)
        offset += 20 + length
    data[signal_payloads[-1] + 5] ^= 0x01
    with open(recording, "wb") as handle:
        handle.write(bytes(data))
    quick = run_info(recording, "--json")
    # Without --verify only chunk headers of signals are read: no complaint.
    assert quick.stderr == ""
    integrity = json.loads(quick.stdout)["integrity"]
    assert integrity["complete"] is True and integrity["verified"] is False
    result = run_info(recording, "--json", "--verify")
    assert result.returncode == 0
    assert "damaged" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    summary = json.loads(result.stdout)
    assert summary["integrity"]["complete"] is False and summary["integrity"]["verified"] is True


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "missing.nhr"), "does not exist"),
    (lambda d: str(d), "is not a file"),
    (lambda d: _write(d / "notes.txt", b"subject S1, session 2\n"), "is not a neurohand recording"),
    (lambda d: _write(d / "head.nhr", b"\x89NHR\r\n\x1a\n\x01\x00\x00\x00HEAD"), "nothing to load"),
])
def test_unusable_paths_give_one_line_and_exit_2(tmp_path, make, message):
    result = run_info(make(tmp_path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("neurohand info: error: ") and message in lines[0]


def _write(path, data):
    with open(str(path), "wb") as handle:
        handle.write(data)
    return str(path)


def test_help_explains_the_options():
    result = subprocess.run([sys.executable, "-m", "neurohand.deploy", "info", "--help"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert result.returncode == 0
    for word in ("FILE", "--json", "--verify", "integrity"):
        assert word in result.stdout
