"""neurohand recordings to and from MNE-Python's ``RawArray``, to filter, plot and inspect a session with MNE.

``to_mne``: one channel per signal channel, in volts where the recording's
samples are microvolts (the format's unit; importers that know better say so
in ``metadata["signal_units"]``, and those channels stay as stored, type
``misc``); optionally each label stream's columns as ``misc`` channels named
``STREAM:COLUMN``, held causally at the signal rate (the row in force at each
sample); events as ``mne.Annotations`` ``KIND:VALUE`` at ``sample / rate``,
duration 0.  The recording's header (channel scales, label streams, metadata)
goes to ``info["description"]`` as JSON, so that ``from_mne`` can restore it.

``from_mne``: the reverse, writing a recording: data channels become the
signals (volts -> microvolts; int16 counts again when ``scale_uv`` is given or
known from the header), ``STREAM:COLUMN`` misc channels the label streams,
annotations ``KIND:VALUE`` (or ``KIND``, value 0) the events.  A recording
made by ``to_mne`` comes back with the same samples, label rows and events
when its label rates divide the signal rate.

MNE is imported only inside these functions.
"""
import collections
import json
import math
import os

import numpy as np

from neurohand.firmware_bridge.shared import checks
from neurohand.firmware_bridge.shared.errors import UsageError
from neurohand.train.nwb_io import check_output_file, require, write_recording

HEADER_KEY = "neurohand-recording"
LABEL_SEPARATOR = ":"
SIGNAL_TYPES = ("bio", "emg", "eeg", "seeg", "ecog", "misc")
MICROVOLT = 1e-6


def _open(recording):
    """(Recording, whether we opened it) from a Recording or a path."""
    if hasattr(recording, "read_signals"):
        return recording, False
    from neurohand.firmware_bridge.recording.file_format import open_recording
    return open_recording(checks.check_file_exists("recording", recording)), True


def _in_microvolts(metadata):
    """The format stores microvolts; an importer that knows the samples are something else says so."""
    return "signal_units" not in metadata


def to_mne(recording, labels=False, ch_type="bio"):
    """The recording as an ``mne.io.RawArray``.

    recording : an open Recording or a path
    labels : also add every label stream's columns as misc channels ``STREAM:COLUMN`` (rows held causally at
        the signal rate; NaN after a stream's last row)
    ch_type : MNE channel type of the signals (bio, emg, eeg, seeg, ecog, misc)
    """
    mne = require("mne", "converting a recording to MNE")
    ch_type = checks.check_option("ch_type", ch_type, SIGNAL_TYPES)
    rec, opened = _open(recording)
    try:
        volts = _in_microvolts(rec.metadata)
        data = rec.read_signals(microvolts=True).T * (MICROVOLT if volts else 1.0)
        names, types = list(rec.channel_names), [ch_type if volts else "misc"] * rec.n_channels
        rows = [data]
        if labels:
            sample_times = np.arange(rec.n_samples) / rec.signal_rate
            for stream in rec.label_streams.values():
                # The row in force at a sample: floor(t * rate), the causal alignment training uses.
                index = np.floor(sample_times * stream.rate + 1e-9).astype(np.int64)
                held = np.full((rec.n_samples, len(stream.names)), np.nan)
                inside = index < len(stream.data)
                held[inside] = stream.data[index[inside]]
                rows.append(held.T)
                names += ["{}{}{}".format(stream.name, LABEL_SEPARATOR, column) for column in stream.names]
                types += ["misc"] * len(stream.names)
        duplicates = sorted(n for n, c in collections.Counter(names).items() if c > 1)
        if duplicates:
            raise UsageError("channel names {} occur twice (a signal channel named like a label column); MNE needs "
                             "unique names".format(", ".join(repr(d) for d in duplicates)))
        info = mne.create_info(names, float(rec.signal_rate), types, verbose=False)
        info["description"] = json.dumps({HEADER_KEY: {
            "dtype": rec.dtype, "scale_uv": None if rec.dtype == "float32" else rec.scale_uv.tolist(),
            "volts": volts, "metadata": rec.metadata,
            "label_streams": [{"name": s.name, "rate": s.rate, "names": list(s.names), "rows": int(len(s.data))}
                              for s in rec.label_streams.values()]}}, sort_keys=True)
        raw = mne.io.RawArray(np.concatenate(rows, axis=0), info, verbose=False)
        events = list(rec.events)
        if events:
            raw.set_annotations(mne.Annotations(
                onset=[e.sample / rec.signal_rate for e in events], duration=[0.0] * len(events),
                description=["{}{}{}".format(e.kind, LABEL_SEPARATOR, e.value) for e in events]), verbose=False)
        return raw
    finally:
        if opened:
            rec.close()


def _header(raw):
    try:
        header = json.loads(raw.info.get("description") or "")
    except (TypeError, ValueError):
        return None
    return header.get(HEADER_KEY) if isinstance(header, dict) and isinstance(header.get(HEADER_KEY), dict) else None


def _parse_annotation(text):
    kind, _, number = text.rpartition(LABEL_SEPARATOR)
    if kind:
        try:
            return kind, int(number)
        except ValueError:
            pass
    return text, 0


def from_mne(raw, out_path, scale_uv=None, metadata=None, force=False):
    """Write ``raw`` (an mne Raw) as a recording at ``out_path``; returns a summary dict.

    scale_uv : None, or microvolts per count (one number or one per signal channel): store int16 counts
        (refused where a value does not fit); None: float32 microvolts, or the header's int16 scales when
        ``raw`` came from :func:`to_mne`
    metadata : dict for the recording (default: the header's, else {"source": "MNE"})
    """
    mne = require("mne", "converting MNE data to a recording")
    if not isinstance(raw, mne.io.BaseRaw):
        raise UsageError("from_mne needs an mne Raw object, but got {}".format(type(raw).__name__))
    out = check_output_file("out_path", out_path, [], force)
    header = _header(raw) or {}
    rate = float(raw.info["sfreq"])
    names = list(raw.ch_names)
    types = raw.get_channel_types()
    stream_specs = collections.OrderedDict((s["name"], s) for s in header.get("label_streams", []))
    label_columns = collections.OrderedDict()
    signal_picks = []
    for i, (name, kind) in enumerate(zip(names, types)):
        stream, separator, column = name.partition(LABEL_SEPARATOR)
        if kind == "misc" and separator and stream and column and (not stream_specs or stream in stream_specs):
            label_columns.setdefault(stream, []).append((column, i))
        else:
            signal_picks.append(i)
    if not signal_picks:
        raise UsageError("the MNE data has no signal channels (only label channels {})".format(", ".join(names)))
    data = raw.get_data()
    if not np.all(np.isfinite(data[signal_picks])):
        raise UsageError("the MNE data's signal channels hold NaN or infinite values")
    volts = [raw.info["chs"][i]["unit"] == mne.io.constants.FIFF.FIFF_UNIT_V for i in signal_picks]
    signals = data[signal_picks].T / np.where(volts, MICROVOLT, 1.0)
    if scale_uv is None and header.get("dtype") == "int16" and header.get("scale_uv"):
        scale_uv = header["scale_uv"]
    dtype = "float32"
    if scale_uv is not None:
        scales = np.broadcast_to(np.asarray(scale_uv, dtype=np.float64), (len(signal_picks),))
        counts = np.round(signals / scales)
        if np.any(np.abs(counts) > 32767):
            raise UsageError("the signals do not fit int16 counts at scale_uv {} (largest {:.6g} counts)".format(
                scales.tolist()[:4], float(np.max(np.abs(counts)))))
        signals, scale_uv, dtype = counts.astype(np.int16), scales.tolist(), "int16"
    else:
        signals = signals.astype(np.float32)
    streams = []
    for stream, columns in label_columns.items():
        spec = stream_specs.get(stream)
        values = data[[i for _, i in columns]].T.astype(np.float32)
        if spec and spec["rate"] > 0 and _divides(spec["rate"], rate):
            # Back to the stream's own rate: row j was held from sample round(j * rate / stream rate) on.
            rows = int(spec["rows"])
            at = np.round(np.arange(rows) * rate / spec["rate"]).astype(np.int64)
            kept = at < len(values)
            values = np.concatenate([values[at[kept]],
                                     np.full((rows - int(kept.sum()), values.shape[1]), np.nan, np.float32)])
            streams.append((stream, float(spec["rate"]), [c for c, _ in columns], values))
        else:
            streams.append((stream, rate, [c for c, _ in columns], values))
    for name, spec in stream_specs.items():
        if name not in label_columns:
            # Streams left out of the MNE data (to_mne without labels) come back empty, with their definition.
            streams.append((name, float(spec["rate"]), list(spec["names"]),
                            np.zeros((0, len(spec["names"])), dtype=np.float32)))
    annotations = raw.annotations
    samples = (raw.time_as_index(annotations.onset, use_rounding=True, origin=annotations.orig_time)
               if len(annotations) else [])
    events = [(int(sample), *_parse_annotation(text)) for sample, text in zip(samples, annotations.description)]
    if any(sample < 0 for sample, _, _ in events):
        raise UsageError("the MNE data has annotations before its first sample")
    if metadata is None:
        metadata = header.get("metadata") if isinstance(header.get("metadata"), dict) else {"source": "MNE"}
    if not all(volts) and "signal_units" not in metadata:
        metadata = dict(metadata, signal_units="as in the MNE channels {} (not volts), not converted".format(
            ", ".join(names[i] for i, v in zip(signal_picks, volts) if not v)))
    written = write_recording(out, rate, [names[i] for i in signal_picks], dtype, scale_uv if dtype == "int16"
                              else None, [signals], streams, events, metadata)
    return {"out": os.fspath(out), "n_samples": int(written), "n_channels": len(signal_picks), "signal_rate": rate,
            "dtype": dtype, "label_streams": ", ".join(s[0] for s in streams) or "none", "n_events": len(events)}


def _divides(stream_rate, signal_rate):
    ratio = signal_rate / stream_rate
    return math.isclose(ratio, round(ratio), rel_tol=0, abs_tol=1e-9) and round(ratio) >= 1

