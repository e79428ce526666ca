"""XDF files (Lab Streaming Layer sessions recorded with LabRecorder) into neurohand recordings, with pyxdf.

One stream gives the signals, one the labels, optionally one the events:

- clocks: pyxdf synchronises every stream onto the recorder's clock from the
  file's ClockOffset chunks (``synchronize_clocks``; clock resets handled as
  pyxdf does) and fits a constant rate to regularly sampled streams
  (``dejitter_timestamps``), splitting a stream into segments where its
  timestamps break (pyxdf's ``jitter_break_threshold_*``);
- signals: the recording's sample ``i`` is the signal stream's sample ``i``, at
  its nominal rate.  Where the stream breaks, the lost samples are filled with
  zeros and marked by a ``missing`` event (the recording format's convention),
  up to ``max_gap_s``; a longer gap, a jump back in time, or an effective rate
  off the nominal one by more than 1 % is refused (a clock jump, or a stream
  that is not what it says);
- labels: resampled onto the signal timeline causally: the label at a sample is
  the latest label at or before the sample's time.  Samples before the first
  label (and after the last label plus one label period) have no label and
  are cut off;
- events: each marker of the events stream at the first sample at or after
  it; string markers ``KIND:VALUE`` (``movement:3``, ``repetition:2``) or
  ``KIND`` (value 0), numeric markers as kind ``marker``.

Signals are stored as float32 microvolts, scaled by each channel's ``unit`` in
the stream's description (volts, millivolts, microvolts, nanovolts; any other
unit is kept as it is and named in the metadata).

pyxdf is imported only inside :func:`import_xdf`.
"""
import contextlib
import logging
import math
import os

import numpy as np

from neurohand.firmware_bridge.shared import checks
from neurohand.firmware_bridge.shared.errors import RecordingError, UsageError
from neurohand.train.nwb_io import (check_label_times, check_output_file, causal_rows, one_line, require,
                                    unique_names, write_recording)

#: The effective rate (from the synchronised timestamps) may differ from the nominal one by this much.
RATE_TOLERANCE = 0.01
#: Longest break in the signal stream filled with zeros by default; a longer one is taken for a clock jump.
DEFAULT_MAX_GAP_S = 5.0
#: Channel units -> factor to microvolts (lower case, as LSL apps write them).
UNIT_TO_UV = {"volts": 1e6, "volt": 1e6, "v": 1e6, "millivolts": 1e3, "millivolt": 1e3, "mv": 1e3,
              "microvolts": 1.0, "microvolt": 1.0, "uv": 1.0, "\u00b5v": 1.0, "\u03bcv": 1.0,
              "nanovolts": 1e-3, "nanovolt": 1e-3, "nv": 1e-3}
BLOCK_SAMPLES = 1 << 16


def _describe(infos):
    return "; ".join("{!r} (type {!r}, {} channels, {} Hz, {})".format(
        s.get("name"), s.get("type"), s.get("channel_count"), s.get("nominal_srate"), s.get("channel_format"))
        for s in infos) or "none"


def _find(infos, wanted, option, path):
    """The stream info whose name is ``wanted``, else the one whose type is."""
    for key in ("name", "type"):
        matches = [s for s in infos if s.get(key) == wanted]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise UsageError("{} {!r} matches {} streams by {} in {!r}; the streams are: {}".format(
                option, wanted, len(matches), key, path, _describe(infos)))
    raise UsageError("{} {!r}: no stream of that name or type in {!r}; the streams are: {}".format(
        option, wanted, path, _describe(infos)))


@contextlib.contextmanager
def _pyxdf_messages():
    """Collect what pyxdf logs (corrupt chunks, rate warnings) for the summary instead of letting it print."""
    logger = logging.getLogger("pyxdf")
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(one_line(record.getMessage()))

    handler = Collect(logging.WARNING)
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _first(value, default=None):
    """pyxdf gives XML text as one-element lists."""
    if isinstance(value, list):
        value = value[0] if value else default
    return default if value is None else value


def _channels(stream):
    """[(label, unit)] from the stream's desc/channels/channel, if it has them."""
    try:
        desc = _first(stream["info"].get("desc"))
        channels = _first(desc.get("channels")).get("channel", [])
        return [(_first(c.get("label"), ""), _first(c.get("unit"), "")) for c in channels]
    except (AttributeError, TypeError, KeyError):
        return []


def _names_units(stream, count, prefix):
    described = _channels(stream)
    if len(described) != count:
        described = [("", "")] * count
    names = unique_names([label or "{}{}".format(prefix, i) for i, (label, _) in enumerate(described)])
    return names, [unit for _, unit in described]


def _numeric(stream, what):
    values = stream["time_series"]
    if not isinstance(values, np.ndarray) or values.dtype.kind not in "fiu":
        raise UsageError("{} stream {!r} holds {} values; it must be numeric".format(
            what, _first(stream["info"]["name"]), _first(stream["info"]["channel_format"])))
    return values


def _signal_timeline(stream, rate, max_gap_s, name):
    """(sample times of the recording (n_total,), [(start, stop)] of the stream's samples on the recording's
    axis, [(sample, n_missing)] gaps).  Raises RecordingError for a jump back or a gap over ``max_gap_s``."""
    times = np.asarray(stream["time_stamps"], dtype=np.float64)
    segments = stream["info"].get("segments") or [(0, len(times) - 1)]
    pieces, gaps, placed, position = [], [], [], 0
    for k, (start, end) in enumerate(segments):
        if k:
            previous_end = segments[k - 1][1]
            jump = times[start] - times[previous_end]
            missing = int(round(jump * rate)) - 1
            if jump <= 0 or missing < 0:
                raise RecordingError("signal stream {!r}: its clock jumps back by {:.3f} s at sample {} (a clock "
                                     "reset pyxdf could not repair); cannot place the samples after it in "
                                     "time".format(name, -jump, start))
            if jump > max_gap_s:
                raise RecordingError("signal stream {!r}: its timestamps jump forward by {:.3f} s at sample {} (a "
                                     "clock jump, or a gap longer than --max-gap-s {:g} s)".format(
                                         name, jump, start, max_gap_s))
            if missing:
                pieces.append(times[previous_end] + np.arange(1, missing + 1) / rate)
                gaps.append((position, missing))
                position += missing
        pieces.append(times[start:end + 1])
        placed.append((position, start, end + 1))
        position += end + 1 - start
    return np.concatenate(pieces), placed, gaps


def _parse_marker(value, stream_name):
    """(kind, value) of one marker: 'KIND:VALUE', 'KIND' (value 0) or a number (kind 'marker')."""
    if not isinstance(value, str):
        number = float(value)
        if not math.isfinite(number) or number != round(number):
            raise RecordingError("events stream {!r}: marker {!r} is not a whole number".format(stream_name, value))
        return "marker", int(number)
    text = value.strip()
    kind, _, number = text.rpartition(":")
    if kind:
        try:
            return kind.strip(), int(number)
        except ValueError:
            pass
    return text, 0


def import_xdf(xdf_path, out_path, signals, labels, events=None, force=False, synchronize_clocks=True,
               dejitter_timestamps=True, max_gap_s=DEFAULT_MAX_GAP_S):
    """Convert streams of an XDF file into a recording at ``out_path``; returns a summary dict.

    signals, labels, events : stream name or type (events optional: a marker stream)
    synchronize_clocks, dejitter_timestamps : pyxdf's options of the same names
    max_gap_s : longest break in the signal stream that is filled (zeros + a ``missing`` event)
    force : replace an existing ``out_path`` (never the input itself)
    """
    xdf_path = checks.check_file_exists("XDF file", xdf_path)
    out = check_output_file("--out", out_path, [xdf_path], force)
    max_gap_s = checks.check_number("--max-gap-s", max_gap_s, minimum=0.0)
    for option, value in (("--signals", signals), ("--labels", labels)):
        if not isinstance(value, str) or not value:
            raise UsageError("{} needs a stream name or type, but got {!r}".format(option, value))
    pyxdf = require("pyxdf", "neurohand import xdf")
    with _pyxdf_messages() as messages:
        try:
            infos = pyxdf.resolve_streams(xdf_path)
        except Exception as exc:  # pyxdf raises IOError, struct.error, ParseError ... on other files
            raise RecordingError("cannot read {!r} as an XDF file: {}".format(xdf_path, one_line(exc))) from exc
        chosen = {"signals": _find(infos, signals, "--signals", xdf_path),
                  "labels": _find(infos, labels, "--labels", xdf_path)}
        if events is not None:
            chosen["events"] = _find(infos, events, "--events", xdf_path)
        ids = sorted({info["stream_id"] for info in chosen.values()})
        if len(ids) < len(chosen):
            raise UsageError("--signals, --labels and --events must name different streams")
        try:
            loaded, header = pyxdf.load_xdf(xdf_path, select_streams=ids, synchronize_clocks=synchronize_clocks,
                                            dejitter_timestamps=dejitter_timestamps)
        except Exception as exc:
            raise RecordingError("pyxdf cannot load {!r}: {}".format(xdf_path, one_line(exc))) from exc
    by_id = {s["info"]["stream_id"]: s for s in loaded}
    streams = {role: by_id[info["stream_id"]] for role, info in chosen.items()}
    return _convert(xdf_path, out, streams, header, messages, synchronize_clocks, dejitter_timestamps, max_gap_s)


def _convert(xdf_path, out, streams, header, messages, synchronize_clocks, dejitter_timestamps, max_gap_s):
    signal = streams["signals"]
    name = _first(signal["info"]["name"], "signals")
    values = _numeric(signal, "signal")
    rate = float(_first(signal["info"]["nominal_srate"], 0))
    if not rate > 0:
        raise UsageError("signal stream {!r} has no regular rate (nominal_srate {}); neurohand needs one".format(
            name, rate))
    if values.shape[0] < 2:
        raise RecordingError("signal stream {!r} holds {} samples".format(name, values.shape[0]))
    effective = float(signal["info"].get("effective_srate") or 0.0)
    if effective and abs(effective - rate) > RATE_TOLERANCE * rate:
        raise RecordingError("signal stream {!r} says {:g} Hz but its timestamps give {:.6g} Hz (more than {:g} % "
                             "apart): a wrong nominal rate, or lost samples".format(
                                 name, rate, effective, 100 * RATE_TOLERANCE))
    times, placed, gaps = _signal_timeline(signal, rate, max_gap_s, name)
    channel_names, units = _names_units(signal, values.shape[1], "ch")
    factors = np.array([UNIT_TO_UV.get(u.strip().lower(), 1.0) for u in units], dtype=np.float64)
    unknown = sorted({u for u in units if u.strip().lower() not in UNIT_TO_UV})

    label = streams["labels"]
    label_name = _first(label["info"]["name"], "") or "labels"
    label_values = _numeric(label, "label")
    if label_values.shape[0] == 0:
        raise RecordingError("label stream {!r} holds no samples".format(label_name))
    label_times = check_label_times("label stream {!r}".format(label_name), label["time_stamps"])
    label_rate = float(_first(label["info"]["nominal_srate"], 0))
    period = (1.0 / label_rate if label_rate > 0
              else float(np.median(np.diff(label_times))) if len(label_times) > 1 else 0.0)
    index = causal_rows(label_times, times)
    valid = np.flatnonzero((index >= 0) & (times < label_times[-1] + period))
    if len(valid) < 2:
        raise RecordingError("label stream {!r} ({:.3f} to {:.3f} s) does not overlap the signal stream {!r} "
                             "({:.3f} to {:.3f} s) on the synchronised clock".format(
                                 label_name, label_times[0], label_times[-1], name, times[0], times[-1]))
    first, stop = int(valid[0]), int(valid[-1]) + 1
    label_columns, label_units = _names_units(label, label_values.shape[1], label_name + "_")
    rows = label_values[index[first:stop]].astype(np.float32)

    event_list, marker_counts = [], {"before_start": 0, "after_end": 0, "empty": 0}
    if "events" in streams:
        marker = streams["events"]
        marker_name = _first(marker["info"]["name"], "events")
        marker_times = np.asarray(marker["time_stamps"], dtype=np.float64)
        marker_values = marker["time_series"]
        samples = np.searchsorted(times, marker_times, side="left") - first
        for sample, row in zip(samples.tolist(), marker_values):
            value = row[0] if len(row) else ""
            if isinstance(value, str) and not value.strip():
                marker_counts["empty"] += 1
                continue
            if sample >= stop - first:
                marker_counts["after_end"] += 1
                continue
            if sample < 0:
                # A cue given before the first labelled sample is still in force there.
                marker_counts["before_start"] += 1
                sample = 0
            kind, number = _parse_marker(value, marker_name)
            event_list.append((sample, kind, number))
    kept_gaps = [(max(s, first) - first, min(s + m, stop) - max(s, first)) for s, m in gaps
                 if min(s + m, stop) > max(s, first)]
    event_list.extend((sample, "missing", missing) for sample, missing in kept_gaps)
    event_list.sort(key=lambda e: e[0])

    def blocks():
        for position, start, end in placed:
            for gap_start, missing in gaps:
                if gap_start + missing == position:
                    zeros_from, zeros_to = max(gap_start, first), min(position, stop)
                    if zeros_to > zeros_from:
                        yield np.zeros((zeros_to - zeros_from, values.shape[1]), dtype=np.float32)
            lo, hi = max(position, first), min(position + end - start, stop)
            for block_start in range(lo, hi, BLOCK_SAMPLES):
                block_stop = min(hi, block_start + BLOCK_SAMPLES)
                part = values[start + block_start - position:start + block_stop - position]
                yield (part.astype(np.float64) * factors).astype(np.float32)

    metadata = {
        "source": "XDF", "source_file": os.fsencode(os.path.basename(xdf_path)).decode("utf-8", "replace"),
        "xdf": {
            "streams": {role: _stream_summary(s) for role, s in streams.items()},
            "synchronize_clocks": synchronize_clocks, "dejitter_timestamps": dejitter_timestamps,
            "clock_resets": {role: max(len(s["info"].get("clock_segments") or [()]) - 1, 0)
                             for role, s in streams.items()},
            "gaps_filled": [{"sample": s, "samples": m} for s, m in kept_gaps][:100],
            "trimmed_to_labels": {"first_signal_sample": first, "stop_signal_sample": stop,
                                  "why": "signal samples before the first label or after the last label (plus "
                                         "one label period) have no label"},
            "markers": marker_counts, "pyxdf_messages": messages[:20],
        },
        "label_units": {label_name: ", ".join(sorted(set(u for u in label_units if u))) or "as in the stream"},
        "events": {"movement": "markers 'movement:ID'", "repetition": "markers 'repetition:N'",
                   "missing": "samples lost in a break of the signal stream, filled with zeros"},
    }
    start_time = _first((header or {}).get("info", {}).get("datetime"))
    if isinstance(start_time, str):
        metadata["xdf"]["file_datetime"] = start_time
    if unknown:
        metadata["signal_units"] = "as in the XDF stream, not converted (units {})".format(
            ", ".join(repr(u) for u in unknown))
    written = write_recording(out, rate, channel_names, "float32", None, blocks(),
                              [(label_name, rate, label_columns, rows)], event_list, metadata)
    return {"out": os.fspath(out), "signals": name, "labels": label_name, "n_samples": int(written),
            "n_channels": len(channel_names), "signal_rate": rate, "effective_rate": effective,
            "n_labels": len(label_columns), "n_events": len(event_list), "gaps_filled": len(kept_gaps),
            "clock_resets": sum(metadata["xdf"]["clock_resets"].values()),
            "trimmed_s": round((first + len(times) - stop) / rate, 6), "pyxdf_messages": len(messages)}


def _stream_summary(stream):
    info = stream["info"]
    summary = {key: _first(info.get(key)) for key in ("name", "type", "source_id", "hostname", "channel_count",
                                                      "channel_format", "nominal_srate")}
    summary.update(effective_srate=float(info.get("effective_srate") or 0.0), samples=int(len(stream["time_stamps"])))
    return summary
