"""XDF import (train/xdf_io.py) through the CLI, on files written here in XDF's chunk format
(https://github.com/sccn/xdf/wiki/Specifications) and read by the real pyxdf: clock synchronisation,
de-jittering, causal labels, markers, gaps, and one-line errors for clock jumps, wrong rates, missing streams."""
import argparse
import struct

import numpy as np
import pytest

pytest.importorskip("pyxdf")

from neurohand.deploy.cli import interop  # noqa: E402
from neurohand.deploy.cli import main as cli_main  # noqa: E402
from neurohand.firmware_bridge.recording.file_format import open_recording  # noqa: E402
from neurohand.firmware_bridge.shared.errors import RecordingError  # noqa: E402
from neurohand.train import xdf_io  # noqa: E402

SIGNAL_RATE, GLOVE_RATE = 1000.0, 100.0
GLOVE_CLOCK_OFFSET = 100.0   # the glove's computer clock runs 100 s ahead of the recorder's


# --- a minimal XDF writer (test only; LabRecorder writes these files in practice) -----------------------------

def _varlen(n):
    return b"\x01" + struct.pack("<B", n) if n < 256 else b"\x04" + struct.pack("<I", n)


def _chunk(tag, content):
    body = struct.pack("<H", tag) + content
    return _varlen(len(body)) + body


def _header_xml(name, kind, rate, fmt, channels):
    described = "".join("<channel><label>{}</label><unit>{}</unit></channel>".format(label, unit)
                        for label, unit in channels)
    return ("<?xml version=\"1.0\"?><info><name>{}</name><type>{}</type><channel_count>{}</channel_count>"
            "<nominal_srate>{}</nominal_srate><channel_format>{}</channel_format><source_id>{}-1</source_id>"
            "<created_at>0</created_at><desc><channels>{}</channels></desc></info>".format(
                name, kind, len(channels), rate, fmt, name, described)).encode()


def _samples(stream_id, times, values, fmt):
    """One Samples chunk, each sample with its own timestamp."""
    parts = [struct.pack("<I", stream_id), _varlen(len(times))]
    for t, row in zip(times, values):
        parts.append(b"\x08" + struct.pack("<d", t))
        if fmt == "string":
            for text in row:
                raw = text.encode()
                parts.append(_varlen(len(raw)) + raw)
        else:
            parts.append(np.asarray(row, dtype="<f4").tobytes())
    return _chunk(3, b"".join(parts))


def write_xdf(path, streams):
    """streams: dicts with name, type, rate, fmt ('float32' or 'string'), channels [(label, unit)], times,
    values (rows), offsets [(collection time, offset)] -- as pylsl and LabRecorder produce them."""
    data = [b"XDF:", _chunk(1, b"<?xml version=\"1.0\"?><info><version>1.0</version></info>")]
    for stream_id, s in enumerate(streams, start=1):
        data.append(_chunk(2, struct.pack("<I", stream_id) + _header_xml(s["name"], s["type"], s["rate"], s["fmt"],
                                                                         s["channels"])))
    for stream_id, s in enumerate(streams, start=1):
        for start in range(0, len(s["times"]), 250):
            data.append(_samples(stream_id, s["times"][start:start + 250], s["values"][start:start + 250], s["fmt"]))
        for collected, offset in s.get("offsets", ()):
            data.append(_chunk(4, struct.pack("<Idd", stream_id, collected, offset)))
    for stream_id, s in enumerate(streams, start=1):
        footer = ("<?xml version=\"1.0\"?><info><first_timestamp>{}</first_timestamp><last_timestamp>{}"
                  "</last_timestamp><sample_count>{}</sample_count></info>").format(
                      s["times"][0] if len(s["times"]) else 0, s["times"][-1] if len(s["times"]) else 0, len(s["times"]))
        data.append(_chunk(6, struct.pack("<I", stream_id) + footer.encode()))
    path.write_bytes(b"".join(data))
    return path


def session(n=6000, jitter=2e-4, drop=None, jump_at=None, jump_s=0.0, signal_rate_true=SIGNAL_RATE, markers=True):
    """A signal stream on the recorder's clock (signal sample i at 10 + i / 1000 s, timestamps jittered),
    a glove at 100 Hz on a clock 100 s ahead (ClockOffset chunks say so) whose row j was measured at
    10.2505 + j / 100 s, and a marker stream on the glove's computer."""
    rng = np.random.default_rng(3)
    index = np.arange(n)
    times = 10.0 + index / signal_rate_true + rng.uniform(-jitter, jitter, n)
    signals = rng.standard_normal((n, 2)) * 50
    if drop is not None:
        keep = (index < drop[0]) | (index >= drop[1])
        index, times, signals = index[keep], times[keep], signals[keep]
    if jump_at is not None:
        times = times + np.where(index >= jump_at, jump_s, 0.0)
    offsets_signals = [(10.0 + k, 0.0) for k in range(0, int(n / SIGNAL_RATE) + 1)]
    glove_true = 10.2505 + np.arange(int(n / SIGNAL_RATE * GLOVE_RATE)) / GLOVE_RATE
    glove = rng.random((len(glove_true), 3))
    offsets_glove = [(10.0 + GLOVE_CLOCK_OFFSET + k, -GLOVE_CLOCK_OFFSET) for k in range(0, int(n / SIGNAL_RATE) + 1)]
    streams = [
        {"name": "Nerve", "type": "EMG", "rate": SIGNAL_RATE, "fmt": "float32",
         "channels": [("n1", "millivolts"), ("n2", "microvolts")], "times": times, "values": signals,
         "offsets": offsets_signals},
        {"name": "Glove", "type": "MoCap", "rate": GLOVE_RATE, "fmt": "float32",
         "channels": [("thumb", "deg"), ("index", "deg"), ("middle", "deg")],
         "times": glove_true + GLOVE_CLOCK_OFFSET, "values": glove, "offsets": offsets_glove},
    ]
    if markers:
        cues = [(10.05, "movement:9"), (11.0005, "repetition:1"), (11.0005, "movement:3"), (13.0005, "movement:0"),
                (13.5005, "rest"), (99.0, "movement:4")]
        streams.append({"name": "Cues", "type": "Markers", "rate": 0, "fmt": "string", "channels": [("cue", "")],
                        "times": np.array([t for t, _ in cues]) + GLOVE_CLOCK_OFFSET, "values": [[m] for _, m in cues],
                        "offsets": offsets_glove})
    return streams, signals, glove


@pytest.fixture
def cli(monkeypatch, capsys):
    """``neurohand ARGS`` in this process through main(), with the xdf source registered (as in test_nwb)."""
    build = cli_main.build_parser

    def build_with_sources():
        parser = build()
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sources = next(a for a in commands.choices["import"]._actions if isinstance(a, argparse._SubParsersAction))
        if "xdf" not in sources.choices:
            interop.register_import_sources(sources)
        return parser

    monkeypatch.setattr(cli_main, "build_parser", build_with_sources)

    def run(*args):
        code = cli_main.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_clocks_synchronised_labels_causal_markers_as_events(tmp_path, cli):
    streams, signals, glove = session()
    write_xdf(tmp_path / "s.xdf", streams)
    code, out, err = cli("import", "xdf", tmp_path / "s.xdf", "--out", tmp_path / "s.nhr", "--signals", "Nerve",
                         "--labels", "MoCap", "--events", "Cues")
    assert code == 0, err
    with open_recording(tmp_path / "s.nhr") as rec:
        # Glove row 0 was measured at 10.2505 s (after clock sync), so signal samples 0..250 have no label
        # and are cut; row j is in force for the 10 signal samples from 251 + 10 j on.
        first = 251
        assert rec.signal_rate == SIGNAL_RATE and rec.channel_names == ["n1", "n2"]
        assert rec.n_samples == 6000 - first
        np.testing.assert_allclose(rec.read_signals(), signals[first:] * [1000.0, 1.0], rtol=1e-6)   # mV, µV
        stream = rec.label_streams["Glove"]
        assert stream.names == ["thumb", "index", "middle"] and stream.rate == SIGNAL_RATE
        np.testing.assert_array_equal(stream.data, glove[np.arange(rec.n_samples) // 10].astype(np.float32))
        # Markers at the first sample at or after them; the cue before the first labelled sample holds from 0;
        # the one after the end is dropped.
        assert list(rec.events) == [(0, "movement", 9), (1001 - first, "repetition", 1),
                                    (1001 - first, "movement", 3), (3001 - first, "movement", 0),
                                    (3501 - first, "rest", 0)]
        xdf = rec.metadata["xdf"]
        assert xdf["markers"] == {"before_start": 1, "after_end": 1, "empty": 0}
        assert xdf["synchronize_clocks"] and xdf["dejitter_timestamps"]
        assert "label_units" in rec.metadata and "signal_units" not in rec.metadata


def test_without_clock_sync_the_glove_misses_the_signals(tmp_path):
    streams, _, _ = session(markers=False)
    write_xdf(tmp_path / "s.xdf", streams)
    with pytest.raises(RecordingError, match="does not overlap the signal stream 'Nerve'"):
        xdf_io.import_xdf(tmp_path / "s.xdf", tmp_path / "s.nhr", "Nerve", "Glove", synchronize_clocks=False)


def test_a_short_break_is_filled_and_marked_missing(tmp_path):
    streams, signals, glove = session(n=8000, drop=(3000, 4500), markers=False)
    write_xdf(tmp_path / "gap.xdf", streams)
    summary = xdf_io.import_xdf(tmp_path / "gap.xdf", tmp_path / "gap.nhr", "Nerve", "Glove")
    assert summary["gaps_filled"] == 1
    with open_recording(tmp_path / "gap.nhr") as rec:
        first = 251
        assert rec.n_samples == 8000 - first
        assert list(rec.events) == [(3000 - first, "missing", 1500)]
        data = rec.read_signals()
        assert not data[3000 - first:4500 - first].any()
        np.testing.assert_allclose(data[4500 - first:, 1], signals[3000:, 1], rtol=1e-6)
        np.testing.assert_array_equal(rec.label_streams["Glove"].data,
                                      glove[np.arange(rec.n_samples) // 10].astype(np.float32))


def test_bad_input_is_one_line(tmp_path, cli):
    forward, _, _ = session(jump_at=3000, jump_s=30.0, markers=False)
    backward, _, _ = session(jump_at=3000, jump_s=-2.5, markers=False)
    wrong_rate, _, _ = session(signal_rate_true=900.0, markers=False)
    good, _, _ = session(markers=False)
    for name, streams in (("forward", forward), ("backward", backward), ("rate", wrong_rate), ("good", good)):
        write_xdf(tmp_path / (name + ".xdf"), streams)
    (tmp_path / "junk.xdf").write_bytes(b"this is not XDF")
    (tmp_path / "exists.nhr").write_bytes(b"x")
    base = ["--signals", "Nerve", "--labels", "Glove"]
    cases = [
        (["forward.xdf", "--out", "a.nhr"] + base, "jump forward by 30.0"),
        (["backward.xdf", "--out", "a.nhr"] + base, "clock jumps back by"),
        (["rate.xdf", "--out", "a.nhr"] + base, "says 1000 Hz but its timestamps give 900"),
        (["good.xdf", "--out", "a.nhr", "--signals", "Nerve", "--labels", "Kinect"],
         "--labels 'Kinect': no stream of that name or type in"),
        (["good.xdf", "--out", "a.nhr", "--signals", "Nerve", "--labels", "Kinect"],
         "'Glove' (type 'MoCap', 3 channels, 100.0 Hz, float32)"),
        (["good.xdf", "--out", "a.nhr", "--signals", "Nerve", "--labels", "Nerve"], "must name different streams"),
        (["junk.xdf", "--out", "a.nhr"] + base, "cannot read"),
        (["good.xdf", "--out", "exists.nhr"] + base, "already exists; pass --force"),
        (["good.xdf", "--out", "good.xdf", "--force"] + base, "is an input of this command"),
    ]
    for args, message in cases:
        code, out, err = cli("import", "xdf", *[tmp_path / a if a.endswith((".xdf", ".nhr")) else a for a in args])
        assert code == 2, (args, err)
        assert message in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "a.nhr").exists() and (tmp_path / "exists.nhr").read_bytes() == b"x"
    # The forward jump is accepted as a gap when the user allows one that long.
    summary = xdf_io.import_xdf(tmp_path / "forward.xdf", tmp_path / "f.nhr", "Nerve", "Glove", max_gap_s=60)
    assert summary["gaps_filled"] == 1


def test_label_at_a_sample_is_the_latest_at_or_before_it():
    from neurohand.train.nwb_io import causal_rows
    rows = causal_rows([0.0, 1.0, 2.0], [-0.5, 0.0, 0.5, 0.999, 1.0, 2.5])
    assert rows.tolist() == [-1, 0, 0, 0, 1, 2]
