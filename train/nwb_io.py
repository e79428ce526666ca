"""Neurodata Without Borders (NWB 2) files to and from neurohand recordings, with pynwb.

``export_nwb`` maps a recording onto NWB's own types (docs/interop.md has the
table):

- signals: one ``ElectricalSeries`` in ``acquisition``, the stored samples as
  they are (int16 counts or float32 microvolts) with ``conversion`` 1e-6 and,
  for int16, ``channel_conversion`` = the recording's microvolts per count
  (float64, so the scales come back bit for bit); an electrodes table (one
  device, one electrode group, a ``channel_name`` column);
- label streams: a ``TimeSeries`` each in a ``BehavioralTimeSeries`` of the
  processing module ``behavior`` ("labels"; the run recorder's ``decoded`` and
  ``command`` streams go to a second one, "decoded");
- events: ``movement`` events as the ``trials`` table, ``repetition`` events as
  the time intervals "repetitions", every other event in the ``EventsTable``
  "events"; each row keeps the exact sample, value and the event's position in
  the recording (``event_index``, so events at the same sample keep their order);
  ``missing`` events are also ``invalid_times``;
- the recording's header (channel names, scales, label streams, metadata with
  the protocol and settings) as one JSON object in ``notes``; the protocol also
  in ``stimulus_notes``; ``subject``, ``session``, ``start_time``,
  ``experimenter``, ``institution`` metadata go to the NWB fields of the same meaning.

``import_nwb`` reads such a file back into an identical recording (samples,
label rows, events, metadata), and reads NWB files written by other software:
one ElectricalSeries (or the one named) as the signals, the behavioural time
series (or those named) as label streams, and a ``trials`` table's
``movement``/``repetition`` columns as events.

The module also holds what the lab-format importers share (``require``,
``write_recording``, ``causal_rows``): train/xdf_io.py and train/mne_io.py use them.

pynwb and h5py are imported only inside the functions that need them.
"""
import bisect
import collections
import datetime
import importlib
import json
import math
import os
import uuid

import numpy as np

from neurohand.firmware_bridge.shared import checks
from neurohand.firmware_bridge.shared.atomic import atomic_path
from neurohand.firmware_bridge.shared.errors import RecordingError, UsageError
from neurohand.firmware_bridge.shared.outputs import check_output_path

LAB_EXTRA = "pip install 'neurohand[lab]'"
#: Version of the mapping below, stored with the header in ``notes``; a reader refuses a newer one.
NWB_MAPPING_VERSION = 1
MICROVOLT = 1e-6                      # NWB stores volts: data * conversion * channel_conversion
SIGNALS_NAME = "ElectricalSeries"
BEHAVIOR_MODULE = "behavior"
LABELS_CONTAINER = "labels"
DECODED_CONTAINER = "decoded"
#: Label streams the run recorder writes (deploy/runtime/recorder.py): decoder outputs, not ground truth.
DECODED_STREAMS = ("decoded", "command")
REPETITIONS_TABLE = "repetitions"
EVENTS_TABLE = "events"
#: Stand-in for an unknown session start (NWB requires one; neurohand writes no clock time by itself).
UNKNOWN_START = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
#: Signal samples read, converted and written at a time (bounded memory for hour-long files).
BLOCK_SAMPLES = 1 << 16
#: HDF5 chunk of the signal dataset, in bytes (HDF5 advises 1-16 MB).
CHUNK_BYTES = 1 << 20
#: A label series from another program covering less or more than this share of the signals'
#: duration has, in all likelihood, a wrong rate or starting time.
MIN_COVERAGE, MAX_COVERAGE = 0.5, 2.0
#: Largest relative spread of the intervals of "regular" timestamps.
REGULAR_TOLERANCE = 0.01


# --- Shared by the lab-format importers (NWB, XDF, MNE) ------------------------------

def require(module, what):
    """Import ``module`` (an optional extra) or raise one UsageError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError("{} needs the Python package {!r}, which is not installed; install the lab extra: "
                         "{}".format(what, module.split(".")[0], LAB_EXTRA)) from None


def check_output_file(name, out_path, inputs, force):
    """Refuse an output that is an input, exists (without ``force``), or is not a regular file path."""
    absolute = check_output_path(name, out_path, inputs=inputs, force=force)
    if os.path.exists(absolute) and not os.path.isfile(absolute):
        raise UsageError("{} {!r} is not a regular file; give a file path".format(name, os.fspath(out_path)))
    return absolute


def one_line(exc):
    """An exception's message on one line, cut to a readable length (library errors can span pages)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def write_recording(out_path, signal_rate, channel_names, dtype, scale_uv, signal_blocks, label_streams, events,
                    metadata):
    """Write a whole recording atomically (``out_path.partial``, renamed when complete).

    signal_blocks : iterable of ndarray (n, n_channels) in ``dtype`` (int16 counts or float32 µV)
    label_streams : list of (name, rate Hz, column names, rows float32 (n_rows, n_columns))
    events : iterable of (sample, kind, value)
    Returns the number of signal samples written."""
    from neurohand.firmware_bridge.recording.file_format import RecordingWriter

    streams = collections.OrderedDict((name, {"rate": float(rate), "names": list(names)})
                                      for name, rate, names, _ in label_streams)
    with atomic_path(out_path, suffix=".partial") as partial:
        # One-second chunks, as the other importers: imported files are read in long ranges.
        with RecordingWriter(partial, signal_rate, channel_names, dtype=dtype, scale_uv=scale_uv,
                             metadata=metadata, label_streams=streams, flush_interval_s=1.0) as writer:
            for block in signal_blocks:
                writer.append_signals(np.ascontiguousarray(block, dtype=np.dtype(dtype)))
            for name, _, _, rows in label_streams:
                for start in range(0, len(rows), BLOCK_SAMPLES):
                    writer.append_labels(name, rows[start:start + BLOCK_SAMPLES])
            for sample, kind, value in events:
                writer.add_event(sample, kind, value)
            return writer.n_samples


def causal_rows(label_times, sample_times):
    """For each sample time, the index of the latest label at or before it; -1 where none is.

    label_times : ndarray (n_labels,), seconds, non-decreasing
    sample_times : ndarray (n_samples,), seconds, same clock
    Returns int64 ndarray (n_samples,)."""
    return np.searchsorted(np.asarray(label_times, dtype=np.float64), np.asarray(sample_times, dtype=np.float64),
                           side="right").astype(np.int64) - 1


def check_label_times(what, times):
    """Refuse label timestamps that are not finite or go backwards (a causal lookup needs them sorted)."""
    times = np.asarray(times, dtype=np.float64)
    if not np.all(np.isfinite(times)):
        raise RecordingError("{} has timestamps that are NaN or infinite".format(what))
    back = np.flatnonzero(np.diff(times) < 0)
    if len(back):
        i = int(back[0])
        raise RecordingError("{}: timestamps go backwards at row {} ({:.6f} s after {:.6f} s); a clock jump?".format(
            what, i + 1, times[i + 1], times[i]))
    return times


def unique_names(names):
    """``names`` with duplicates and empty names made unique (``x``, ``x_2``, ...), order kept."""
    seen, result = set(), []
    for i, name in enumerate(names):
        base = str(name).strip() or "ch{}".format(i)
        candidate, k = base, 2
        while candidate in seen:
            candidate, k = "{}_{}".format(base, k), k + 1
        seen.add(candidate)
        result.append(candidate)
    return result


# --- Export -------------------------------------------------------------------------

def _nwb_name(name):
    """An NWB object name: no '/' (a path separator in HDF5) and no ':' (nwbinspector flags it)."""
    return name.replace("/", "_").replace(":", "_") or "_"


def _start_time(metadata):
    """The session start from ``metadata["start_time"]`` (ISO 8601; naive = UTC), else None."""
    text = metadata.get("start_time")
    if not isinstance(text, str):
        return None
    try:
        value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=datetime.timezone.utc)


def _neurohand_version():
    # From the installed distribution: importing neurohand.deploy.version would tie train to deploy.
    import importlib.metadata
    try:
        return importlib.metadata.version("neurohand")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _age(metadata):
    """The subject's age as an ISO 8601 duration from ``metadata["age"]``; unknown: the open range 'P0D/'
    (NWB's form for "this age or older"), since DANDI and nwbinspector require an age."""
    age = metadata.get("age")
    return age if isinstance(age, str) and age.startswith("P") else "P0D/"


def _sex(metadata):
    sex = metadata.get("sex")
    return sex if sex in ("F", "M", "O", "U") else "U"


def _text(value):
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _signal_iterator(recording):
    """The recording's samples as an hdmf chunk iterator: written to HDF5 a buffer at a time, never all in memory."""
    from hdmf.data_utils import GenericDataChunkIterator

    n, width = recording.n_samples, recording.n_channels
    dtype = np.dtype(recording.dtype)
    chunk_rows = max(1, min(n, CHUNK_BYTES // (width * dtype.itemsize)))
    buffer_rows = chunk_rows * max(1, min(16, n // chunk_rows))

    class RecordingSignals(GenericDataChunkIterator):
        def _get_data(self, selection):
            rows, columns = selection
            return recording.read_signals(rows.start or 0, rows.stop)[:, columns]

        def _get_maxshape(self):
            return (n, width)

        def _get_dtype(self):
            return dtype

    return RecordingSignals(chunk_shape=(chunk_rows, width), buffer_shape=(buffer_rows, width))


def _interval_rows(events, kind, n_samples, rate):
    """Rows (start_time, stop_time, value, sample, event_index) of the events of ``kind``: each lasts
    until the next one of its kind, the last until the end of the signals."""
    picked = [(index, e) for index, e in enumerate(events) if e.kind == kind]
    rows = []
    for k, (index, event) in enumerate(picked):
        stop = picked[k + 1][1].sample if k + 1 < len(picked) else n_samples
        stop = max(stop, event.sample)
        rows.append((event.sample / rate, stop / rate, event.value, event.sample, index))
    return rows


def _add_events(nwb, recording):
    """Trials (movement), intervals "repetitions", the events table (the rest) and invalid_times (missing)."""
    from pynwb.epoch import TimeIntervals

    rate, n = recording.signal_rate, recording.n_samples
    events = list(recording.events)
    index_doc = "position of the event in the neurohand recording's event list (orders events at one sample)"
    sample_doc = "signal sample index of the event in the neurohand recording (exact; start_time = sample / rate)"
    movements = _interval_rows(events, "movement", n, rate)
    repetition_rows = _interval_rows(events, "repetition", n, rate)
    if movements:
        nwb.add_trial_column("movement", "movement cue id in force from start_time (0 = rest); the ids are "
                                         "described in the recording's metadata (notes, stimulus_notes)")
        nwb.add_trial_column("repetition", "repetition number in force at start_time (0 = none)")
        nwb.add_trial_column("sample", sample_doc)
        nwb.add_trial_column("event_index", index_doc)
        repetition_samples = [row[3] for row in repetition_rows]
        for start, stop, value, sample, index in movements:
            # The repetition in force: the last repetition event at or before the movement's sample.
            at = bisect.bisect_right(repetition_samples, sample) - 1
            current = repetition_rows[at][2] if at >= 0 else 0
            nwb.add_trial(start_time=start, stop_time=stop, movement=value, repetition=current, sample=sample,
                          event_index=index)
    if repetition_rows:
        table = TimeIntervals(name=REPETITIONS_TABLE, description="repetitions of the movement protocol: each "
                              "row lasts until the next repetition event (repetition 0 = between repetitions)")
        table.add_column("repetition", "repetition number from start_time (0 = none)")
        table.add_column("sample", sample_doc)
        table.add_column("event_index", index_doc)
        for start, stop, value, sample, index in repetition_rows:
            table.add_row(start_time=start, stop_time=stop, repetition=value, sample=sample, event_index=index)
        nwb.add_time_intervals(table)
    others = [(index, e) for index, e in enumerate(events) if e.kind not in ("movement", "repetition")]
    if others:
        table = nwb.create_events_table(
            name=EVENTS_TABLE, description="neurohand recording events other than movement and repetition "
            "(rest cues, missing samples, safety events, ...); timestamp = sample / signal rate",
            source_description="neurohand recording events")
        table.add_column("kind", "event kind (docs/recording-format.md, EVNT)")
        table.add_column("value", "event value (meaning depends on the kind; for missing: samples lost)")
        table.add_column("sample", sample_doc)
        table.add_column("event_index", index_doc)
        for index, event in others:
            table.add_row(timestamp=event.sample / rate, kind=event.kind, value=event.value, sample=event.sample,
                          event_index=index)
        for index, event in others:
            if event.kind == "missing" and event.value > 0:
                # NWB tools skip invalid_times; the samples there are zeros a recorder filled in.
                nwb.add_invalid_time_interval(start_time=event.sample / rate,
                                              stop_time=(event.sample + event.value) / rate)


def _header(recording):
    label_paths = {stream.name: path for stream, _, _, path in _label_layout(recording)}
    return {
        "format": "neurohand-recording", "nwb_mapping": NWB_MAPPING_VERSION,
        "signal": {"rate": recording.signal_rate, "dtype": recording.dtype,
                   "channel_names": list(recording.channel_names),
                   "scale_uv": None if recording.dtype == "float32" else recording.scale_uv.tolist()},
        "label_streams": [{"name": s.name, "rate": s.rate, "names": list(s.names), "rows": int(len(s.data)),
                           "nwb": label_paths.get(s.name)} for s in recording.label_streams.values()],
        "signals_nwb": "acquisition/" + SIGNALS_NAME,
        "metadata": recording.metadata,
        "integrity": {"complete": bool(recording.integrity["complete"]), "message": recording.integrity["message"]},
    }


def export_nwb(recording_path, out_path, force=False):
    """Write the recording at ``recording_path`` as the NWB file ``out_path``; returns a summary dict.

    force : replace an existing ``out_path`` (never the input itself).
    Raises UsageError (pynwb missing, bad paths, an empty recording), RecordingError (unreadable recording)."""
    recording_path = checks.check_file_exists("recording", recording_path)
    out = check_output_file("OUT.nwb", out_path, [recording_path], force)
    pynwb = require("pynwb", "neurohand export nwb")
    from hdmf.backends.hdf5.h5_utils import H5DataIO
    from pynwb.ecephys import ElectricalSeries
    from pynwb.file import Subject
    from neurohand.firmware_bridge.recording.file_format import open_recording

    with open_recording(recording_path) as recording:
        if recording.n_samples == 0:
            raise UsageError("recording {!r} holds no signal samples; there is nothing to export".format(
                recording_path))
        metadata = recording.metadata
        start = _start_time(metadata)
        subject = metadata.get("subject", metadata.get("patient"))
        protocol = metadata.get("protocol")
        nwb = pynwb.NWBFile(
            session_description="neurohand recording {}: {} channels at {:g} Hz ({}), {:.3f} s, label streams {}"
                                .format(_display_name(recording_path), recording.n_channels, recording.signal_rate,
                                        recording.dtype, recording.duration_s,
                                        ", ".join(recording.label_streams) or "none"),
            identifier=str(uuid.uuid4()),
            session_start_time=start or UNKNOWN_START,
            session_id=_text(metadata.get("session")),
            experimenter=_text(metadata.get("experimenter")),
            institution=_text(metadata.get("institution")),
            experiment_description=_text(metadata.get("experiment_description")) or (
                "Recording for decoding finger movements (neurohand); the movement protocol and the settings "
                "are in notes (the recording's header as JSON) and stimulus_notes"),
            keywords=["neurohand", "finger movement decoding", "prosthetic hand"],
            source_script="neurohand export nwb (neurohand {})".format(_neurohand_version()),
            source_script_file_name="neurohand/train/nwb_io.py",
            stimulus_notes=("movement cue protocol (neurohand metadata 'protocol'): " + _text(protocol)
                            if protocol is not None else None),
            notes=json.dumps(_header(recording), sort_keys=True),
            subject=Subject(subject_id=_text(subject) or "unknown", species="Homo sapiens", sex=_sex(metadata),
                            age=_age(metadata),
                            description="the person whose nerve or muscle signals were recorded (neurohand "
                                        "targets people using a prosthetic hand); age 'P0D/' and sex 'U' mean "
                                        "not recorded"),
        )
        source = metadata.get("source") if isinstance(metadata.get("source"), str) else "recording"
        device = nwb.create_device(name="recorder", description="the amplifier or chip that recorded the signals "
                                   "(neurohand metadata 'source': {})".format(source))
        group = nwb.create_electrode_group(name="electrodes", description="the recording's signal channels",
                                           location="unknown", device=device)
        nwb.add_electrode_column(name="channel_name", description="the channel's name in the neurohand recording")
        for name in recording.channel_names:
            nwb.add_electrode(group=group, location="unknown", channel_name=name)
        region = nwb.create_electrode_table_region(list(range(recording.n_channels)), "every signal channel")
        int16 = recording.dtype == "int16"
        nwb.add_acquisition(ElectricalSeries(
            name=SIGNALS_NAME, data=H5DataIO(_signal_iterator(recording), compression="gzip", compression_opts=4),
            electrodes=region, rate=float(recording.signal_rate), starting_time=0.0, conversion=MICROVOLT,
            channel_conversion=recording.scale_uv.astype(np.float64) if int16 else None,
            description=("the recording's signals as stored: int16 ADC counts; volts = data x conversion (1e-6) x "
                         "channel_conversion (microvolts per count)" if int16 else
                         "the recording's signals as stored: float32 microvolts; volts = data x conversion (1e-6)")
                        + (" (the recording's metadata says of the units: {})".format(_text(metadata["signal_units"]))
                           if "signal_units" in metadata else "")))
        _add_label_streams(nwb, recording)
        _add_events(nwb, recording)
        # The temporary name ends in .nwb too: pynwb warns about any other extension.
        try:
            with atomic_path(out, suffix=".partial.nwb") as partial:
                with pynwb.NWBHDF5IO(partial, "w") as io:
                    io.write(nwb)
        except OSError as exc:   # h5py: disk full, permissions
            raise RecordingError("cannot write {!r}: {}".format(os.fspath(out_path), one_line(exc))) from exc
        return {"out": os.fspath(out_path), "n_samples": recording.n_samples, "n_channels": recording.n_channels,
                "signal_rate": recording.signal_rate, "dtype": recording.dtype,
                "label_streams": ", ".join(recording.label_streams) or "none", "n_events": len(recording.events),
                "session_start_time": (start or UNKNOWN_START).isoformat() + ("" if start else " (unknown)")}


def _display_name(path):
    return os.fsencode(os.path.basename(os.fspath(path))).decode("utf-8", "replace")


def _label_layout(recording):
    """[(stream, container name, series name, path in the file)] of the non-empty label streams.

    Empty streams are described in the header only: nwbinspector flags an empty TimeSeries."""
    layout, taken = [], set()
    for stream in recording.label_streams.values():
        if len(stream.data):
            container = DECODED_CONTAINER if stream.name in DECODED_STREAMS else LABELS_CONTAINER
            # Distinct after the '/' and ':' replacement too ("a/b" and "a_b"); the header keeps the real names.
            series_name = unique_names(sorted(taken) + [_nwb_name(stream.name)])[-1]
            taken.add(series_name)
            layout.append((stream, container, series_name,
                           "processing/{}/{}/{}".format(BEHAVIOR_MODULE, container, series_name)))
    return layout


def _add_label_streams(nwb, recording):
    """Each non-empty label stream as a TimeSeries in a BehavioralTimeSeries of the module "behavior"."""
    from pynwb import TimeSeries
    from pynwb.behavior import BehavioralTimeSeries

    units = recording.metadata.get("label_units")
    units = units if isinstance(units, dict) else {}
    containers = collections.OrderedDict()
    for stream, container, series_name, _ in _label_layout(recording):
        if container not in containers:
            containers[container] = BehavioralTimeSeries(name=container)
        unit = units.get(stream.name)
        containers[container].add_timeseries(TimeSeries(
            name=series_name, data=stream.data, rate=float(stream.rate), starting_time=0.0,
            unit=unit if isinstance(unit, str) and unit else "n.a.",
            description="neurohand label stream {!r}{}; columns: {}".format(
                stream.name, " (decoder output)" if container == DECODED_CONTAINER else "",
                ", ".join(stream.names))))
    if containers:
        module = nwb.create_processing_module(name=BEHAVIOR_MODULE, description="finger labels (data glove, "
                                              "cues) and, if recorded, the decoder's outputs")
        for container in containers.values():
            module.add(container)


# --- Import -------------------------------------------------------------------------

def _walk_series(nwbfile):
    """[(path, TimeSeries)] in acquisition and processing, one container level deep (the NWB layout)."""
    from pynwb import TimeSeries

    found = []

    def visit(prefix, obj):
        if isinstance(obj, TimeSeries):
            found.append((prefix, obj))
            return
        for child in getattr(obj, "children", ()):
            if isinstance(child, TimeSeries):
                found.append((prefix + "/" + child.name, child))

    for name, obj in nwbfile.acquisition.items():
        visit("acquisition/" + name, obj)
    for module_name, module in nwbfile.processing.items():
        for name, obj in module.data_interfaces.items():
            visit("processing/{}/{}".format(module_name, name), obj)
    return found


def _describe(found):
    return ", ".join("{} ({})".format(path, type(obj).__name__) for path, obj in found) or "no time series at all"


def _pick(found, wanted, what, path, everything=None):
    """The series of ``found`` whose name or path is ``wanted``; the error lists ``everything`` in the file."""
    matches = [(p, s) for p, s in found if wanted in (p, s.name)]
    if not matches:
        raise UsageError("{!r} has no {} named {!r}; it has: {}".format(
            path, what, wanted, _describe(found if everything is None else everything)))
    if len(matches) > 1:
        raise UsageError("{!r} has several {} named {!r} ({}); give the path instead".format(
            path, what, wanted, ", ".join(p for p, _ in matches)))
    return matches[0]


def _neurohand_header(nwbfile):
    """The header ``export_nwb`` stored in ``notes``, or None for files from other software."""
    try:
        header = json.loads(nwbfile.notes or "")
    except (TypeError, ValueError):
        return None
    if not isinstance(header, dict) or header.get("format") != "neurohand-recording":
        return None
    if not isinstance(header.get("nwb_mapping"), int) or header["nwb_mapping"] > NWB_MAPPING_VERSION:
        raise RecordingError("the NWB file was written by a newer neurohand (mapping version {!r}, this one reads "
                             "up to {}); update neurohand".format(header.get("nwb_mapping"), NWB_MAPPING_VERSION))
    return header


def _series_timing(series, what):
    """(start time s, rate Hz) of a regularly sampled series; RecordingError for irregular or bad timing."""
    n = series.data.shape[0]
    if series.rate is not None:
        rate = float(series.rate)
        if not (math.isfinite(rate) and rate > 0):
            raise RecordingError("{} has the rate {!r} Hz; it must be a finite number above 0".format(what, rate))
        start = float(series.starting_time or 0.0)
        return start, rate
    times = np.asarray(series.timestamps[:], dtype=np.float64)
    if n < 2 or len(times) != n:
        raise RecordingError("{} has {} timestamps for {} samples; neurohand needs a constant rate".format(
            what, len(times), n))
    intervals = np.diff(times)
    period = (times[-1] - times[0]) / (n - 1)
    if not (np.all(np.isfinite(times)) and period > 0) or np.max(np.abs(intervals - period)) > REGULAR_TOLERANCE * period:
        raise RecordingError("{} has irregular timestamps (intervals from {:.6g} to {:.6g} s, mean {:.6g} s): "
                             "neurohand needs a constant sample rate".format(
                                 what, float(np.min(intervals)), float(np.max(intervals)), period))
    return float(times[0]), 1.0 / period


def _signal_scaling(series, n_channels, what):
    """(dtype, scale_uv or None, factor per channel to float µV, offset µV) of an ElectricalSeries."""
    conversion = float(series.conversion if series.conversion is not None else 1.0)
    offset = float(getattr(series, "offset", 0.0) or 0.0)
    per_channel = (np.ones(n_channels) if series.channel_conversion is None
                   else np.asarray(series.channel_conversion[:], dtype=np.float64).reshape(-1))
    if per_channel.shape != (n_channels,):
        raise RecordingError("{} has {} channel_conversion values for {} channels".format(
            what, per_channel.size, n_channels))
    # conversion * 1e6 is exactly 1.0 for neurohand's 1e-6, so its scales come back bit for bit.
    scale_uv = per_channel * (conversion / MICROVOLT)
    if not (np.all(np.isfinite(scale_uv)) and np.all(scale_uv > 0)):
        raise RecordingError("{} has conversion factors that are not finite and positive: conversion {!r}, "
                             "channel_conversion {}".format(what, conversion, per_channel.tolist()[:8]))
    if series.data.dtype == np.int16 and offset == 0.0:
        return "int16", scale_uv, None, 0.0
    return "float32", None, scale_uv, offset / MICROVOLT


def _channel_names(series, n_channels, header):
    table = series.electrodes.table
    rows = np.asarray(series.electrodes.data[:], dtype=np.int64).reshape(-1)
    if len(rows) != n_channels:
        raise RecordingError("ElectricalSeries {!r} has {} data columns but {} electrodes".format(
            series.name, n_channels, len(rows)))
    if header is not None:
        names = header["signal"]["channel_names"]
        if len(names) != n_channels:
            raise RecordingError("ElectricalSeries {!r} has {} channels but the neurohand header lists {}".format(
                series.name, n_channels, len(names)))
        return list(names)
    for column in ("channel_name", "label", "channel_names"):
        if column in table.colnames:
            return unique_names([str(table[column][int(r)]) for r in rows])
    ids = table.id[:]
    return ["e{}".format(int(ids[r])) for r in rows]


def _label_rows(series, what):
    data = np.asarray(series.data[:])
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2 or data.shape[1] < 1:
        raise RecordingError("{} has data of shape {}; a label stream needs (time, columns)".format(what, data.shape))
    if data.dtype.kind not in "fiub":
        raise RecordingError("{} holds {} values, not numbers".format(what, data.dtype))
    values = data.astype(np.float64) * float(series.conversion or 1.0) + float(getattr(series, "offset", 0.0) or 0.0)
    return values.astype(np.float32)


def import_nwb(nwb_path, out_path, signals=None, labels=None, force=False):
    """Convert an NWB file into a recording at ``out_path``; returns a summary dict.

    signals : name or path of the ElectricalSeries (None: the only one, or neurohand's)
    labels : list of names or paths of TimeSeries to take as label streams (None: neurohand's, or every time
        series in the processing module "behavior")
    force : replace an existing ``out_path`` (never the input itself)
    """
    nwb_path = checks.check_file_exists("NWB file", nwb_path)
    out = check_output_file("--out", out_path, [nwb_path], force)
    if isinstance(labels, str):
        labels = [labels]
    pynwb = require("pynwb", "neurohand import nwb")
    from pynwb.ecephys import ElectricalSeries

    try:
        io = pynwb.NWBHDF5IO(nwb_path, "r")
        nwbfile = io.read()
    except Exception as exc:  # h5py, hdmf and pynwb raise OSError, KeyError, ValueError ... on non-NWB files
        raise RecordingError("cannot read {!r} as an NWB file: {}".format(nwb_path, one_line(exc))) from exc
    try:
        header = _neurohand_header(nwbfile)
        found = _walk_series(nwbfile)
        electrical = [(p, s) for p, s in found if isinstance(s, ElectricalSeries)]
        if signals is not None:
            signal_path, series = _pick(electrical, signals, "ElectricalSeries", nwb_path, found)
        elif header is not None and any(p == header.get("signals_nwb") for p, _ in electrical):
            signal_path, series = _pick(electrical, header["signals_nwb"], "ElectricalSeries", nwb_path)
        elif len(electrical) == 1:
            signal_path, series = electrical[0]
        elif not electrical:
            raise RecordingError("{!r} has no ElectricalSeries to take as the signals; it has: {}".format(
                nwb_path, _describe(found)))
        else:
            raise UsageError("{!r} has several ElectricalSeries ({}); choose one with --signals".format(
                nwb_path, ", ".join(p for p, _ in electrical)))
        return _import(nwb_path, out, nwbfile, header, found, signal_path, series, labels)
    except OSError as exc:   # h5py meeting a damaged dataset, or the disk
        raise RecordingError("importing {!r} failed: {}".format(nwb_path, one_line(exc))) from exc
    finally:
        io.close()


def _import(nwb_path, out, nwbfile, header, found, signal_path, series, labels):
    from pynwb.ecephys import ElectricalSeries

    what = "ElectricalSeries {!r}".format(signal_path)
    data = series.data
    if data.ndim not in (1, 2) or data.shape[0] < 1:
        raise RecordingError("{} has data of shape {}; signals need (time, channels)".format(what, data.shape))
    n, width = data.shape[0], (data.shape[1] if data.ndim == 2 else 1)
    if data.dtype.kind not in "fiu":
        raise RecordingError("{} holds {} values, not numbers".format(what, data.dtype))
    t0, rate = _series_timing(series, what)
    if header is not None and signal_path == header.get("signals_nwb"):
        stated = header["signal"]["rate"]
        if abs(stated - rate) > 1e-9 * stated:
            raise RecordingError("{} has the rate {:g} Hz but the neurohand header says {:g} Hz; the file was "
                                 "changed after export".format(what, rate, stated))
        rate = float(stated)
    channel_names = _channel_names(series, width, header)
    dtype, scale_uv, factor, offset_uv = _signal_scaling(series, width, what)

    own = header is not None and labels is None
    streams, label_paths, first, stop = [], {}, 0, n
    candidates = [(p, s) for p, s in found if not isinstance(s, ElectricalSeries)]
    if own:
        for spec in header["label_streams"]:
            rows = np.zeros((0, len(spec["names"])), dtype=np.float32)
            if spec.get("rows"):
                path, label_series = _pick(candidates, spec["nwb"], "label series", nwb_path, found)
                rows = _label_rows(label_series, "label series {!r}".format(path))
                if rows.shape[1] != len(spec["names"]):
                    raise RecordingError("label series {!r} has {} columns but the neurohand header lists {}".format(
                        path, rows.shape[1], len(spec["names"])))
                label_paths[spec["name"]] = path
            streams.append((spec["name"], float(spec["rate"]), list(spec["names"]), rows))
    else:
        if labels:
            chosen = [_pick(candidates, name, "time series", nwb_path, found) for name in labels]
        else:
            chosen = [(p, s) for p, s in candidates if p.split("/")[:2] == ["processing", BEHAVIOR_MODULE]]
            if not chosen:
                raise RecordingError("{!r} has no behavioural time series in processing/{} to take as labels; it "
                                     "has: {}; name one with --labels".format(nwb_path, BEHAVIOR_MODULE,
                                                                             _describe(found)))
        taken = unique_names([s.name for _, s in chosen])
        timed = [_foreign_labels(name, path, label_series, t0, rate, n)
                 for name, (path, label_series) in zip(taken, chosen)]
        label_paths = {t["name"]: path for t, (path, _) in zip(timed, chosen)}
        if all(t["aligned"] for t in timed):
            streams = [(t["name"], t["rate"], t["names"], t["rows"]) for t in timed]
        else:
            # One series off the signal clock: all go onto the signal timeline, so that cutting the
            # unlabelled start leaves every stream aligned with the signals.
            sample_times = t0 + np.arange(n) / rate
            first, stop, indices = 0, n, []
            for t in timed:
                index = causal_rows(t["times"], sample_times)
                valid = np.flatnonzero((index >= 0) & (sample_times < t["times"][-1] + t["period"]))
                if len(valid) < 2:
                    raise RecordingError("label series {!r} ({:.3f} to {:.3f} s) does not overlap the signals "
                                         "({:.3f} to {:.3f} s)".format(label_paths[t["name"]], t["times"][0],
                                                                      t["times"][-1], t0, t0 + n / rate))
                first, stop = max(first, int(valid[0])), min(stop, int(valid[-1]) + 1)
                indices.append(index)
            if stop - first < 2:
                raise RecordingError("the label series of {!r} overlap the signals and each other in fewer than "
                                     "2 samples".format(nwb_path))
            streams = [(t["name"], rate, t["names"], t["rows"][index[first:stop]])
                       for t, index in zip(timed, indices)]

    events = _events(nwbfile, header if own else None, t0, rate, first, stop)
    if own:
        metadata = header["metadata"]
    else:
        metadata = _foreign_metadata(nwb_path, nwbfile, signal_path, label_paths, found)
        if first or stop < n:
            metadata["trimmed_to_labels"] = {"first_sample": int(first), "stop_sample": int(stop),
                                             "why": "signal samples before the first label or after the last "
                                                    "label have no label"}

    def blocks():
        for start in range(first, stop, BLOCK_SAMPLES):
            block = np.asarray(data[start:min(stop, start + BLOCK_SAMPLES)])
            block = block.reshape(len(block), width)
            if dtype == "int16":
                yield block.astype(np.int16, copy=False)
            else:
                yield (block.astype(np.float64) * factor + offset_uv).astype(np.float32)

    written = write_recording(out, rate, channel_names, dtype, None if scale_uv is None else scale_uv.tolist(),
                              blocks(), streams, events, metadata)
    return {"out": os.fspath(out), "signals": signal_path, "n_samples": int(written), "n_channels": width,
            "signal_rate": rate, "dtype": dtype,
            "label_streams": ", ".join("{} ({} rows at {:g} Hz, from {})".format(
                name, len(rows), r, label_paths.get(name, "header")) for name, r, _, rows in streams),
            "n_events": len(events), "neurohand_file": own}


def _foreign_labels(name, path, series, t0, signal_rate, n):
    """A label series from another program: its rows, column names, rate and row times; ``aligned`` when it is
    regularly sampled from the signals' first sample on (then it is kept as it is, at its own rate)."""
    what = "label series {!r}".format(path)
    rows = _label_rows(series, what)
    if len(rows) == 0:
        raise RecordingError("{} is empty".format(what))
    width = rows.shape[1]
    names = [name] if width == 1 else ["{}{}".format(name, k) for k in range(width)]
    if series.rate is not None:
        start, rate = _series_timing(series, what)
        covered, duration = len(rows) / rate, n / signal_rate
        if not MIN_COVERAGE <= covered / duration <= MAX_COVERAGE:
            raise RecordingError("{}: {} rows at {:g} Hz cover {:.3f} s but the signals cover {:.3f} s; is its rate "
                                 "right?".format(what, len(rows), rate, covered, duration))
        times, period = start + np.arange(len(rows)) / rate, 1.0 / rate
        aligned = abs(start - t0) <= 1e-6 / max(rate, signal_rate)
    else:
        times = check_label_times(what, series.timestamps[:])
        if len(times) != len(rows):
            raise RecordingError("{} has {} timestamps for {} rows".format(what, len(times), len(rows)))
        period = float(np.median(np.diff(times))) if len(times) > 1 else 0.0
        rate, aligned = None, False
    return {"name": name, "names": names, "rate": rate, "rows": rows, "times": times, "period": period,
            "aligned": aligned}


def _column(table, name):
    return table[name].data[:] if name in table.colnames else None


def _events(nwbfile, header, t0, rate, first, stop):
    """Events (sample, kind, value): neurohand's exactly, in their order; a foreign trials table's movement and
    repetition columns as events at each trial's start (and 0 at its stop when no trial starts there)."""
    if header is not None:
        collected = []
        tables = [(nwbfile.trials, "movement", "movement"),
                  (nwbfile.intervals.get(REPETITIONS_TABLE) if nwbfile.intervals else None, "repetition", "repetition")]
        for table, column, kind in tables:
            if table is not None:
                for index, sample, value in zip(_column(table, "event_index"), _column(table, "sample"),
                                                _column(table, column)):
                    collected.append((int(index), int(sample), kind, int(value)))
        events_table = (nwbfile.events or {}).get(EVENTS_TABLE) if hasattr(nwbfile, "events") else None
        if events_table is not None:
            for index, sample, kind, value in zip(_column(events_table, "event_index"), _column(events_table, "sample"),
                                                  _column(events_table, "kind"), _column(events_table, "value")):
                collected.append((int(index), int(sample), str(kind), int(value)))
        collected.sort(key=lambda e: e[0])
        return [(sample, kind, value) for _, sample, kind, value in collected]
    trials = nwbfile.trials
    if trials is None or not len(trials):
        return []
    starts = np.asarray(trials["start_time"].data[:], dtype=np.float64)
    stops = np.asarray(trials["stop_time"].data[:], dtype=np.float64)

    def sample_of(t):
        return min(max(int(round((t - t0) * rate)) - first, 0), stop - first)

    events = []
    for kind in ("movement", "repetition"):
        values = _column(trials, kind)
        if values is None:
            continue
        start_samples = {sample_of(t) for t in starts}
        for t_start, t_stop, value in zip(starts, stops, values):
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise RecordingError("trials column {!r} must hold whole numbers, but has {!r}".format(
                    kind, value)) from None
            events.append((sample_of(t_start), kind, value))
            if sample_of(t_stop) not in start_samples:
                events.append((sample_of(t_stop), kind, 0))
    events.sort(key=lambda e: e[0])
    return events


def _foreign_metadata(nwb_path, nwbfile, signal_path, label_paths, found):
    subject = getattr(nwbfile.subject, "subject_id", None) if nwbfile.subject is not None else None
    start = nwbfile.session_start_time
    metadata = {
        "source": "NWB", "source_file": _display_name(nwb_path),
        "nwb": {"identifier": str(nwbfile.identifier), "session_description": str(nwbfile.session_description),
                "signals": signal_path, "labels": label_paths},
        "label_units": {name: str(dict(found)[path].unit) for name, path in label_paths.items()},
    }
    if start is not None:
        metadata["start_time"] = start.isoformat()
    if subject:
        metadata["subject"] = str(subject)
    if nwbfile.session_id:
        metadata["session"] = str(nwbfile.session_id)
    return metadata
