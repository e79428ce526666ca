"""Recordings to and from mne.io.RawArray (train/mne_io.py): units, label channels, annotations, round trips."""
import numpy as np
import pytest

mne = pytest.importorskip("mne")

from neurohand.firmware_bridge.recording.file_format import RecordingWriter, open_recording  # noqa: E402
from neurohand.firmware_bridge.shared.errors import UsageError  # noqa: E402
from neurohand.train import mne_io  # noqa: E402


def int16_recording(path, metadata=None):
    rng = np.random.default_rng(2)
    with RecordingWriter(str(path), 2000.0, ["a", "b", "c"], "int16", [0.195, 0.5, 2.0], metadata or {"subject": "S1"},
                         {"fingers": {"rate": 100.0, "names": ["thumb", "index"]},
                          "decoded": {"rate": 40.0, "names": ["thumb", "index"]}}) as w:
        w.append_signals(rng.integers(-32768, 32767, (4000, 3)).astype(np.int16))
        w.append_labels("fingers", rng.random((200, 2)))
        decoded = rng.random((80, 2)).astype(np.float32)
        decoded[:3] = np.nan
        w.append_labels("decoded", decoded)
        for sample, kind, value in [(0, "repetition", 1), (0, "movement", 4), (999, "movement", 0),
                                    (1500, "missing", 12), (3999, "safety_stale", 0)]:
            w.add_event(sample, kind, value)
    return path


def test_to_mne_volts_label_channels_and_annotations(tmp_path):
    path = int16_recording(tmp_path / "r.nhr")
    raw = mne_io.to_mne(path, labels=True)
    with open_recording(path) as rec:
        assert raw.info["sfreq"] == 2000.0 and raw.n_times == 4000
        assert raw.ch_names == ["a", "b", "c", "fingers:thumb", "fingers:index", "decoded:thumb", "decoded:index"]
        assert raw.get_channel_types() == ["bio"] * 3 + ["misc"] * 4
        counts = rec.read_signals()
        np.testing.assert_allclose(raw.get_data(picks=["b"])[0], counts[:, 1] * 0.5e-6, rtol=1e-12)
        fingers = rec.label_streams["fingers"].data
        # Row j of a 100 Hz stream is in force for the 20 signal samples from 20 j on.
        np.testing.assert_array_equal(raw.get_data(picks=["fingers:index"])[0], fingers[np.arange(4000) // 20, 1])
    assert list(raw.annotations.description) == ["repetition:1", "movement:4", "movement:0", "missing:12",
                                                 "safety_stale:0"]
    np.testing.assert_allclose(raw.annotations.onset, [0.0, 0.0, 0.4995, 0.75, 1.9995])
    # MNE's tools run on it (bio channels are not "data" to MNE: filters need picks, docs/interop.md).
    filtered = raw.copy().filter(10.0, 500.0, picks="bio", verbose=False)
    assert not np.allclose(filtered.get_data(picks="bio"), raw.get_data(picks="bio"))


@pytest.mark.parametrize("labels", [True, False])
def test_round_trip_is_identical(tmp_path, labels):
    source = int16_recording(tmp_path / "r.nhr")
    summary = mne_io.from_mne(mne_io.to_mne(source, labels=labels), tmp_path / "back.nhr")
    assert summary["dtype"] == "int16"
    with open_recording(source) as a, open_recording(tmp_path / "back.nhr") as b:
        assert (a.channel_names, a.signal_rate, a.scale_uv.tolist()) == (b.channel_names, b.signal_rate,
                                                                         b.scale_uv.tolist())
        assert np.array_equal(a.read_signals(), b.read_signals())
        assert list(a.events) == list(b.events) and a.metadata == b.metadata
        assert list(a.label_streams) == list(b.label_streams)
        for name, stream in a.label_streams.items():
            other = b.label_streams[name]
            assert (stream.rate, stream.names) == (other.rate, other.names)
            if labels:
                np.testing.assert_array_equal(stream.data, other.data)
            else:
                assert other.data.shape == (0, 2)   # left out of the Raw: the definition comes back, no rows


def test_float32_and_signals_that_are_not_microvolts(tmp_path):
    rng = np.random.default_rng(5)
    with RecordingWriter(str(tmp_path / "env.nhr"), 100.0, ["e1", "e2"], "float32",
                         metadata={"signal_units": "RMS envelope, arbitrary units"}) as w:
        w.append_signals(rng.random((500, 2)).astype(np.float32))
    raw = mne_io.to_mne(tmp_path / "env.nhr")
    assert raw.get_channel_types() == ["misc", "misc"]
    with open_recording(tmp_path / "env.nhr") as rec:
        np.testing.assert_array_equal(raw.get_data()[0], rec.read_signals()[:, 0])   # not scaled to volts
    mne_io.from_mne(raw, tmp_path / "back.nhr")
    with open_recording(tmp_path / "env.nhr") as a, open_recording(tmp_path / "back.nhr") as b:
        assert b.dtype == "float32" and np.array_equal(a.read_signals(), b.read_signals())
        assert a.metadata == b.metadata


def test_from_a_raw_made_in_mne(tmp_path):
    """A Raw an MNE user built: volts, a misc 'glove:grip' channel, annotations in neurohand's and MNE's style."""
    rng = np.random.default_rng(9)
    info = mne.create_info(["EMG1", "EMG2", "glove:grip"], 500.0, ["emg", "emg", "misc"])
    data = np.vstack([rng.standard_normal((2, 1000)) * 1e-4, rng.random((1, 1000))])
    raw = mne.io.RawArray(data, info, verbose=False)
    raw.set_annotations(mne.Annotations([0.5, 1.0], [0.0, 0.2], ["movement:2", "BAD_artefact"]))
    mne_io.from_mne(raw, tmp_path / "m.nhr")
    with open_recording(tmp_path / "m.nhr") as rec:
        assert rec.channel_names == ["EMG1", "EMG2"] and rec.dtype == "float32" and rec.signal_rate == 500.0
        np.testing.assert_allclose(rec.read_signals(), data[:2].T * 1e6, rtol=1e-6)
        stream = rec.label_streams["glove"]
        assert stream.names == ["grip"] and stream.rate == 500.0
        np.testing.assert_array_equal(stream.data[:, 0], data[2].astype(np.float32))
        assert list(rec.events) == [(250, "movement", 2), (500, "BAD_artefact", 0)]
        assert rec.metadata == {"source": "MNE"}
    with pytest.raises(UsageError, match="do not fit int16"):
        mne_io.from_mne(raw, tmp_path / "n.nhr", scale_uv=1e-3)
    with pytest.raises(UsageError, match="already exists"):
        mne_io.from_mne(raw, tmp_path / "m.nhr")
