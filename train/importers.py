"""Importers: public data sets into the neurohand recording format.

Two sources, in an explicit registry (``IMPORTERS``):

- ``ninapro``: a NinaPro MAT file (Atzori et al., Sci Data 2014,
  doi:10.1038/sdata.2014.53) with ``emg``, ``glove``, ``restimulus`` and
  ``rerepetition``.  EMG becomes the float32 signals, the CyberGlove the label
  stream "glove" at the same rate, and every change of movement or repetition
  an event.
- ``csv``: any table with a header row; signal and label columns are picked
  by glob patterns (``fnmatch``) over the header names, and integer columns
  become events at every change of value (``--events gesture=movement
  --events rep=repetition`` gives a discrete-label data set the ``movement``
  and ``repetition`` events NinaPro's importer writes).

Both check ``OUT`` before reading anything (not an input, replaced only with
``force``: firmware_bridge/shared/outputs.py), write to ``OUT.partial`` and
rename when complete, so a failed import never leaves a half-written recording
under the requested name.
"""
import csv
import fnmatch
import os

import numpy as np

from neurohand.firmware_bridge.shared import checks
from neurohand.firmware_bridge.shared.atomic import atomic_path
from neurohand.firmware_bridge.shared.errors import RecordingError, UsageError
from neurohand.firmware_bridge.shared.outputs import check_output_path

NINAPRO_CITATION = ("Atzori M. et al., Electromyography data for non-invasive naturally-controlled robotic "
                    "hand prostheses, Scientific Data 1, 140053 (2014), doi:10.1038/sdata.2014.53")
NINAPRO_DOI = "10.1038/sdata.2014.53"

# CyberGlove II sensors in the order of its 22 data columns (CyberGlove
# reference manual; NinaPro stores the raw 8-bit values in this order).
CYBERGLOVE_NAMES = (
    "thumb_rotation", "thumb_mcp", "thumb_ip", "thumb_abduction",
    "index_mcp", "index_pip", "index_dip",
    "middle_mcp", "middle_pip", "middle_dip", "middle_index_abduction",
    "ring_mcp", "ring_pip", "ring_dip", "ring_middle_abduction",
    "little_mcp", "little_pip", "little_dip", "little_ring_abduction",
    "palm_arch", "wrist_pitch", "wrist_yaw",
)

# NinaPro databases recognisable from the file alone: EMG channel count ->
# (database, sample rate in Hz, what the EMG values are).  DB1 was recorded
# with 10 Otto Bock 13E200 electrodes that output an RMS envelope at 100 Hz.
# Other databases share channel counts (DB2, DB3 and DB7 all have 12 Delsys
# channels at 2 kHz) so they need --rate unless the file says.
NINAPRO_DATABASES = {
    10: ("DB1", 100.0, "envelope"),
}
NINAPRO_RATE_VARIABLES = ("frequency", "fs", "samplerate", "sample_rate")
BLOCK_SAMPLES = 10000
# Signals and labels are stored as float32: a larger magnitude would become inf.
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Events hold 64-bit integers; a float beyond 2**53 is no longer a whole number one can trust.
MAX_EVENT_VALUE = 2 ** 53
# Sample rates a recording can sensibly have (the chip's fastest is 30 kHz).
MAX_RATE_HZ = 1e6
# What scipy.io.loadmat makes of MATLAB types that are not numeric matrices.
_MATLAB_KINDS = {"O": "a cell array", "V": "a struct", "U": "a char array (text)", "S": "a char array (text)",
                 "c": "complex", "b": "logical"}


def _display_name(path):
    """The input's file name for the recording's metadata, which is UTF-8: a name in another encoding keeps
    its readable part instead of making the writer refuse the whole import."""
    return os.fsencode(os.path.basename(os.fspath(path))).decode("utf-8", "replace")


def check_output(out_path, inputs, force):
    """Refuse an unwritable ``--out``, an input, or an existing file without ``force`` (before any work).

    A recording is renamed into place, so ``--out`` must be a regular file
    path: ``/dev/null`` would be replaced by a file, not written to."""
    absolute = check_output_path("--out", out_path, inputs=inputs, force=force)
    if os.path.exists(absolute) and not os.path.isfile(absolute):
        raise UsageError("--out {!r} is not a regular file; a recording needs a file path".format(
            os.fspath(out_path)))
    return absolute


def _write_recording(out_path, signal_rate, channel_names, signals, label_name, label_names, labels,
                     events, metadata):
    """Write one whole recording atomically (``signals`` and ``labels`` are in-memory arrays)."""
    from neurohand.firmware_bridge.recording.file_format import RecordingWriter

    with atomic_path(out_path, suffix=".partial") as partial:
        # One-second chunks: imported files are read back in long ranges, and
        # the default 0.1 s would mean 10 chunks per second of 100 Hz data.
        with RecordingWriter(partial, signal_rate, channel_names, dtype="float32", metadata=metadata,
                             label_streams={label_name: {"rate": signal_rate, "names": list(label_names)}},
                             flush_interval_s=1.0) as w:
            for start in range(0, len(signals), BLOCK_SAMPLES):
                w.append_signals(np.ascontiguousarray(signals[start:start + BLOCK_SAMPLES], dtype=np.float32))
                w.append_labels(label_name, labels[start:start + BLOCK_SAMPLES].astype(np.float32))
            for sample, kind, value in events:
                w.add_event(sample, kind, value)


def change_events(values, kind):
    """Events ``(sample, kind, value)`` at sample 0 and wherever ``values`` changes.

    values : ndarray, shape (n_samples,), integers (e.g. NinaPro restimulus)."""
    values = np.asarray(values).reshape(-1)
    if values.size == 0:
        return []
    changes = np.flatnonzero(values[1:] != values[:-1]) + 1
    return [(0, kind, int(values[0]))] + [(int(i), kind, int(values[i])) for i in changes]


# --- NinaPro ----------------------------------------------------------------------

def _load_mat(path):
    import scipy.io

    with open(path, "rb") as handle:
        head = handle.read(128)
    if head.startswith(b"\x89HDF") or b"MATLAB 7.3" in head:
        raise RecordingError("{!r} is a MATLAB v7.3 (HDF5) file, which scipy.io.loadmat cannot read; re-save it "
                             "with save('-v7') in MATLAB, or read it with h5py".format(path))
    try:
        return scipy.io.loadmat(path)
    except NotImplementedError as exc:
        # scipy's own message for v7.3 files ("Please use HDF reader ...").
        raise RecordingError("{!r} is a MATLAB v7.3 (HDF5) file, which scipy.io.loadmat cannot read; "
                             "re-save it with save('-v7') in MATLAB, or read it with h5py".format(path)) from exc
    except Exception as exc:  # scipy raises MatReadError, ValueError, IndexError ... on garbage
        raise RecordingError("cannot read {!r} as a MATLAB file: {}".format(path, exc)) from exc


def _scalar(value):
    """The one finite real number in ``value``, or None (text, cells, NaN, several values)."""
    if not isinstance(value, np.ndarray) or value.size != 1 or value.dtype.kind not in "fiu":
        return None
    number = value.reshape(-1)[0].item()
    return number if np.isfinite(number) else None


def _numeric(path, name, value):
    """``value`` as loaded by scipy as a float64 array, refusing anything that is not a real numeric matrix.

    Cells, structs, text, complex and sparse matrices would otherwise fail in
    numpy with a traceback or be converted with a warning (imaginary parts dropped)."""
    if not isinstance(value, np.ndarray):
        raise RecordingError("{!r}: {} must be a numeric matrix, but is {} (a sparse matrix or another MATLAB "
                             "type)".format(path, name, type(value).__name__))
    if value.dtype.kind not in "fiu":
        what = _MATLAB_KINDS.get(value.dtype.kind, "of type {}".format(value.dtype))
        raise RecordingError("{!r}: {} must be a real numeric matrix, but is {}".format(path, name, what))
    return value.astype(np.float64)


def _first_bad_row(array, good):
    """Index of the first row (sample) of ``array`` where ``good`` (same shape) is False."""
    return int(np.flatnonzero(~good.reshape(len(array), -1).all(axis=1))[0])


def _check_float32(path, name, array):
    """Refuse NaN, inf and values a float32 recording cannot hold (they would become inf)."""
    finite = np.isfinite(array)
    if not finite.all():
        raise RecordingError("{!r}: {} has non-finite values (first at sample {})".format(
            path, name, _first_bad_row(array, finite)))
    small = np.abs(array) <= FLOAT32_MAX
    if not small.all():
        raise RecordingError("{!r}: {} has values beyond the float32 range +-{:.3g} (first at sample {})".format(
            path, name, FLOAT32_MAX, _first_bad_row(array, small)))


def _integer_vector(path, name, array, n):
    """A (n,), (n, 1) or (1, n) array of whole numbers as int64 (n,)."""
    if array.ndim > 2 or (array.ndim == 2 and 1 not in array.shape):
        raise RecordingError("{!r}: {} must be a vector with one value per sample, but has shape {}".format(
            path, name, array.shape))
    vector = array.reshape(-1)
    if vector.shape[0] != n:
        raise RecordingError("{!r}: {} has {} samples but emg has {}".format(path, name, vector.shape[0], n))
    finite = np.isfinite(vector)
    if not finite.all():
        raise RecordingError("{!r}: {} must hold whole numbers, but has NaN or inf (first at sample {})".format(
            path, name, int(np.flatnonzero(~finite)[0])))
    whole = (vector == np.round(vector)) & (np.abs(vector) <= MAX_EVENT_VALUE)
    if not whole.all():
        first = int(np.flatnonzero(~whole)[0])
        raise RecordingError("{!r}: {} must hold whole numbers up to 2**53, but has {!r} at sample {}".format(
            path, name, vector[first].item(), first))
    return vector.astype(np.int64)


def read_ninapro(path, rate=None):
    """Read a NinaPro MAT file into plain arrays (nothing written).

    Parameters
    ----------
    path : str, a MATLAB v5 file with variables emg, glove, restimulus, rerepetition
    rate : float or None, sample rate in Hz; None: from the file (a ``frequency``
        variable) or recognised from the database layout (DB1: 100 Hz)

    Returns
    -------
    dict with emg (n, n_emg) float64, glove (n, 22) float64, restimulus (n,) int,
    rerepetition (n,) int, rate (Hz), database, subject, exercise, signal_kind
    """
    path = checks.check_file_exists("NinaPro file", path)
    data = _load_mat(path)
    variables = sorted(k for k in data if not k.startswith("__"))
    required = ("emg", "glove", "restimulus", "rerepetition")
    missing = [name for name in required if name not in data]
    if missing:
        raise RecordingError("{!r} lacks the NinaPro variable(s) {}; it has {}".format(
            path, ", ".join(missing), ", ".join(variables) or "none"))
    emg, glove, restimulus, rerepetition = (_numeric(path, name, data[name]) for name in required)
    if emg.ndim != 2 or emg.shape[0] < 2 or emg.shape[1] < 1:
        raise RecordingError("{!r}: emg must be a (samples, channels) matrix, but has shape {}".format(
            path, emg.shape))
    n = emg.shape[0]
    if glove.ndim != 2 or glove.shape[1] != len(CYBERGLOVE_NAMES):
        raise RecordingError("{!r}: glove must have {} CyberGlove columns, but has shape {}".format(
            path, len(CYBERGLOVE_NAMES), glove.shape))
    if glove.shape[0] != n:
        raise RecordingError("{!r}: glove has {} samples but emg has {}".format(path, glove.shape[0], n))
    _check_float32(path, "emg", emg)
    _check_float32(path, "glove", glove)
    restimulus = _integer_vector(path, "restimulus", restimulus, n)
    rerepetition = _integer_vector(path, "rerepetition", rerepetition, n)
    database, known_rate, signal_kind = NINAPRO_DATABASES.get(emg.shape[1], ("unknown", None, "unknown"))
    file_rate = None
    for name in NINAPRO_RATE_VARIABLES:
        if name in data:
            file_rate = _scalar(data[name])
            if file_rate is None:
                raise RecordingError("{!r}: {} must be one finite number (the sample rate in Hz), but is {}"
                                     .format(path, name, _short(data[name])))
            break
    if rate is not None:
        rate = checks.check_number("--rate", rate, minimum=0.0, exclusive_minimum=True, maximum=MAX_RATE_HZ)
    elif file_rate is not None:
        rate = checks.check_number("sample rate in the file", file_rate, minimum=0.0, exclusive_minimum=True,
                                   maximum=MAX_RATE_HZ)
    elif known_rate is not None:
        rate = known_rate
    else:
        raise UsageError("{!r}: cannot tell the sample rate ({} EMG channels is not a layout neurohand recognises "
                         "and the file has no frequency variable); give it with --rate".format(path, emg.shape[1]))
    if database == "DB1" and rate != known_rate:
        signal_kind = "unknown"
    return {
        "emg": emg, "glove": glove,
        "restimulus": restimulus, "rerepetition": rerepetition,
        "rate": float(rate), "database": database, "signal_kind": signal_kind,
        "subject": _scalar(data["subject"]) if "subject" in data else None,
        "exercise": _scalar(data["exercise"]) if "exercise" in data else None,
    }


def _short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def import_ninapro(path, out_path, rate=None, force=False):
    """Convert a NinaPro MAT file into a recording at ``out_path``; returns a summary dict.

    force : replace an existing ``out_path`` (never the input itself)"""
    path = checks.check_file_exists("NinaPro file", path)
    check_output(out_path, [path], force)
    content = read_ninapro(path, rate)
    emg = content["emg"]
    metadata = {
        "source": "NinaPro", "database": content["database"], "subject": content["subject"],
        "exercise": content["exercise"], "source_file": _display_name(path),
        "citation": NINAPRO_CITATION, "doi": NINAPRO_DOI,
        "signal_kind": content["signal_kind"],
        "signal_units": ("Otto Bock 13E200 RMS output as stored by NinaPro, not microvolts"
                         if content["database"] == "DB1" else "as stored in the NinaPro file"),
        "label_units": {"glove": "raw CyberGlove II 8-bit sensor values"},
        "events": {"movement": "restimulus (0 = rest)", "repetition": "rerepetition (0 = none)"},
    }
    events = change_events(content["restimulus"], "movement") + change_events(content["rerepetition"], "repetition")
    events.sort(key=lambda e: e[0])
    channel_names = ["emg{}".format(i + 1) for i in range(emg.shape[1])]
    _write_recording(out_path, content["rate"], channel_names, emg, "glove", CYBERGLOVE_NAMES,
                     content["glove"], events, metadata)
    return {
        "out": os.fspath(out_path), "n_samples": int(emg.shape[0]), "n_channels": int(emg.shape[1]),
        "signal_rate": content["rate"], "database": content["database"],
        "n_movements": int(len(set(content["restimulus"].tolist()) - {0})),
        "n_repetitions": int(len(set(content["rerepetition"].tolist()) - {0})),
        "n_events": len(events),
    }


# --- CSV --------------------------------------------------------------------------

def select_columns(header, patterns, what):
    """Indices of the header names matched by any of ``patterns`` (fnmatch), in header order.

    Raises UsageError naming the pattern that matches nothing."""
    selected = []
    for pattern in patterns:
        matches = [i for i, name in enumerate(header) if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            shown = ", ".join(header[:12]) + (", ..." if len(header) > 12 else "")
            raise UsageError("{} pattern {!r} matches no column; the columns are {}".format(what, pattern, shown))
        selected.extend(i for i in matches if i not in selected)
    return sorted(selected)


# Event kinds the rest of neurohand reads (train/dataset.py's class head, train/splits.py's repetition
# split): kind -> what their values are.  Both count up from 0, which means rest / no repetition.
KNOWN_EVENT_KINDS = {
    "movement": "movement classes 0 = rest, 1, 2, ...",
    "repetition": "repetition numbers 0 = none, 1, 2, ...",
}


def parse_event_spec(spec):
    """'COLUMN' or 'COLUMN=KIND' -> (column, kind); the kind defaults to the column name."""
    column, _, kind = spec.partition("=")
    column, kind = column.strip(), (kind.strip() or column.strip())
    if not column:
        raise UsageError("--events needs a column name (COLUMN or COLUMN=KIND), but got {!r}".format(spec))
    return column, kind


def read_csv_table(path, signal_patterns, label_patterns, event_specs=(), delimiter=","):
    """Read the selected columns of a CSV file.

    Returns dict with signal_names, signals (n, n_signals) float64, label_names,
    labels (n, n_labels) float64, events [(sample, kind, value)].
    Raises UsageError (one line, naming the row and column) for empty or
    non-numeric cells, missing columns, or ragged rows."""
    path = checks.check_file_exists("CSV file", path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            try:
                header = [name.strip() for name in next(reader)]
            except StopIteration:
                raise UsageError("{!r} is empty (no header row)".format(path)) from None
            signal_columns = select_columns(header, signal_patterns, "--signals")
            label_columns = select_columns(header, label_patterns, "--labels")
            both = sorted(set(signal_columns) & set(label_columns))
            if both:
                raise UsageError("column(s) {} are matched by both --signals and --labels".format(
                    ", ".join(header[i] for i in both)))
            event_columns = _event_columns(header, event_specs, signal_columns)
            wanted = signal_columns + label_columns + [i for i, _ in event_columns]
            # Class columns often hold names ("fist"); say what an event column needs instead.
            event_hint = {i: "; --events columns hold integer codes{}".format(
                " ({})".format(KNOWN_EVENT_KINDS[kind]) if kind in KNOWN_EVENT_KINDS else "")
                for i, kind in event_columns}
            rows, line_numbers = [], []
            for line_number, row in enumerate(reader, start=2):
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise UsageError("{!r} line {}: {} cells, but the header has {}".format(
                        path, line_number, len(row), len(header)))
                values = []
                for i in wanted:
                    cell = row[i].strip()
                    try:
                        value = float(cell)
                    except ValueError:
                        raise UsageError("{!r} line {}, column {!r}: {!r} is not a number{}".format(
                            path, line_number, header[i], cell, event_hint.get(i, ""))) from None
                    if value != value or value in (float("inf"), float("-inf")):
                        raise UsageError("{!r} line {}, column {!r}: {!r} is not a finite number".format(
                            path, line_number, header[i], cell))
                    values.append(value)
                rows.append(values)
                line_numbers.append(line_number)
    except UnicodeDecodeError as exc:
        raise UsageError("{!r} is not a UTF-8 text file: {}".format(path, exc)) from exc
    except csv.Error as exc:
        raise UsageError("{!r} is not a valid CSV file: {}".format(path, exc)) from exc
    if len(rows) < 2:
        raise UsageError("{!r} has {} data row(s); a recording needs at least 2".format(path, len(rows)))
    table = np.array(rows, dtype=np.float64)
    n_signals, n_labels = len(signal_columns), len(label_columns)
    events = []
    for offset, (column, kind) in enumerate(event_columns):
        values = _event_values(path, header[column], kind, table[:, n_signals + n_labels + offset], line_numbers)
        events.extend(change_events(values, kind))
    events.sort(key=lambda e: e[0])
    return {
        "signal_names": [header[i] for i in signal_columns], "signals": table[:, :n_signals],
        "label_names": [header[i] for i in label_columns], "labels": table[:, n_signals:n_signals + n_labels],
        "events": events, "event_columns": [(header[column], kind) for column, kind in event_columns],
    }


def _event_columns(header, event_specs, signal_columns):
    """``[(column index, kind)]`` of the ``--events`` specs, refusing unknown columns and ambiguous kinds."""
    event_columns = []
    for spec in event_specs:
        column, kind = parse_event_spec(spec)
        if column not in header:
            raise UsageError("--events column {!r} is not in the header; the columns are {}".format(
                column, ", ".join(header)))
        index = header.index(column)
        earlier = [header[i] for i, k in event_columns if k == kind]
        if earlier:
            # Two columns' changes interleaved in one kind would make a value sequence neither column has.
            raise UsageError("--events: kind {!r} is given by column {!r} and again by {!r}; one column per "
                             "kind".format(kind, earlier[0], column))
        if kind in KNOWN_EVENT_KINDS and index in signal_columns:
            # The class or repetition number as a decoder input would leak the answer into the features.
            raise UsageError("--events column {!r} ({}) is also matched by --signals; narrow the --signals "
                             "patterns so the model does not see its own labels".format(column, kind))
        event_columns.append((index, kind))
    return event_columns


def _event_values(path, column, kind, values, line_numbers):
    """An event column as int64, refusing (with the line) what is not a whole number, or negative for a
    movement or repetition column (classes and repetitions count up from 0)."""
    meaning = KNOWN_EVENT_KINDS.get(kind)
    whole = (values == np.round(values)) & (np.abs(values) <= MAX_EVENT_VALUE)
    if not whole.all():
        first = int(np.flatnonzero(~whole)[0])
        raise UsageError("{!r} line {}: --events column {!r} must hold whole numbers up to 2**53, but has {!r}{}"
                         .format(path, line_numbers[first], column, values[first].item(),
                                 "; {} events are {}".format(kind, meaning) if meaning else ""))
    values = values.astype(np.int64)
    if meaning and (values < 0).any():
        first = int(np.flatnonzero(values < 0)[0])
        raise UsageError("{!r} line {}: --events column {!r} has {}, but {} events are {}; none is negative"
                         .format(path, line_numbers[first], column, int(values[first]), kind, meaning))
    return values


def import_csv(path, out_path, rate, signal_patterns, label_patterns, event_specs=(), label_stream="labels",
               scale_uv=1.0, signal_kind=None, delimiter=",", force=False):
    """Convert a CSV table into a recording at ``out_path``; returns a summary dict.

    rate : float, Hz, the rate of the rows (signals and labels alike)
    scale_uv : float, microvolts per unit of the signal columns
    signal_kind : None, "raw" or "envelope": stored in the metadata to guide training
    force : replace an existing ``out_path`` (never the input itself)
    """
    path = checks.check_file_exists("CSV file", path)
    check_output(out_path, [path], force)
    rate = checks.check_number("--rate", rate, minimum=0.0, exclusive_minimum=True, maximum=MAX_RATE_HZ)
    scale_uv = checks.check_number("--scale-uv", scale_uv, minimum=0.0, exclusive_minimum=True)
    if not label_stream or not isinstance(label_stream, str):
        raise UsageError("--label-stream must be a non-empty name, but got {!r}".format(label_stream))
    if signal_kind is not None:
        checks.check_option("--signal-kind", signal_kind, ["raw", "envelope"])
    table = read_csv_table(path, signal_patterns, label_patterns, event_specs, delimiter)
    metadata = {"source": "csv", "source_file": _display_name(path),
                "signal_columns": table["signal_names"], "label_columns": table["label_names"]}
    if table["event_columns"]:
        metadata["events"] = {kind: "column {!r}{}".format(column, ": " + KNOWN_EVENT_KINDS[kind]
                                                          if kind in KNOWN_EVENT_KINDS else "")
                              for column, kind in table["event_columns"]}
    if signal_kind is not None:
        metadata["signal_kind"] = signal_kind
    signals = table["signals"] * scale_uv
    for what, array, names in (("signal", signals, table["signal_names"]),
                               ("label", table["labels"], table["label_names"])):
        fits = np.abs(array) <= FLOAT32_MAX
        if not fits.all():
            row, column = (int(i[0]) for i in np.nonzero(~fits))
            raise UsageError("{!r}: {} column {!r} is {!r}{} at data row {}, beyond the float32 range +-{:.3g} "
                             "of a recording".format(path, what, names[column], array[row, column].item(),
                                                     " after --scale-uv" if what == "signal" else "", row + 1,
                                                     FLOAT32_MAX))
    _write_recording(out_path, rate, table["signal_names"], signals, label_stream,
                     table["label_names"], table["labels"], table["events"], metadata)
    summary = {"out": os.fspath(out_path), "n_samples": int(table["signals"].shape[0]),
               "n_channels": len(table["signal_names"]), "signal_rate": rate,
               "n_labels": len(table["label_names"]), "n_events": len(table["events"])}
    # As import_ninapro counts them: the distinct non-zero values (rest and "no repetition" left out).
    for kind, key in (("movement", "n_movements"), ("repetition", "n_repetitions")):
        if any(k == kind for _, k in table["event_columns"]):
            summary[key] = len({value for _, k, value in table["events"] if k == kind} - {0})
    return summary


# Explicit registry: source name -> import function.
IMPORTERS = {"ninapro": import_ninapro, "csv": import_csv}
