"""The neurohand recording file: write and read nerve recordings crash-safely.

The byte layout is specified in docs/recording-format.md (the one source of
truth; its test vector is checked by tests/device/test_recording.py).  In short:
a 12-byte file header, then self-describing chunks, each with a type, a length,
a CRC-32 of its payload and a CRC-32 of its own header::

    "HEAD" JSON: rate, dtype, channel names, scales, label streams, metadata
    "SIGS" raw samples, shape (n, n_channels), little-endian int16 or float32
    "LABL" uint32 stream index + float32 rows, shape (n, n_label_channels)
    "EVNT" JSON list of [sample, kind, value]
    "DONE" JSON totals, written by close(): its absence means a crash

Why chunks with CRCs: a recorder killed (or powered off) mid-write leaves a
file whose tail is a partial chunk.  The reader keeps every chunk that passes
its checks and stops, with a :class:`RecordingTruncatedWarning`, at the first
one that does not -- so a recording is never lost, only its last moments.

Why the reader scans headers only: an hour at 16 channels and 10 kHz is
1.15 GB.  Opening seeks from chunk header to chunk header to build an index of
signal chunks; samples are read on demand per range.  Label and event chunks
are small and are loaded (and CRC-checked) when opening.

Numpy and the standard library only (Python 3.6, numpy 1.19).  No pickle.
"""
import collections
import collections.abc
import json
import math
import numbers
import os
import struct
import warnings
import zlib

import numpy as np

from neurohand.firmware_bridge.shared import checks
from neurohand.firmware_bridge.shared.atomic import sync_directory
from neurohand.firmware_bridge.shared.errors import RecordingError, UsageError

# --- Format constants (docs/recording-format.md, section "Byte layout") -----

MAGIC = b"\x89NHR\r\n\x1a\n"          # PNG-style: catches text-mode mangling
FORMAT_MAJOR = 1                       # readers refuse other majors
FORMAT_MINOR = 0                       # readers accept any minor
FILE_HEADER = struct.Struct("<8sHH")   # magic, major, minor
CHUNK_HEADER = struct.Struct("<4sQII")  # type, payload length, payload CRC, header CRC
CHUNK_HEADER_CRC_SPAN = 16             # the header CRC covers the first 16 bytes
LABEL_PREFIX = struct.Struct("<I")     # LABL payload: stream index, then rows

HEAD, SIGS, LABL, EVNT, DONE = b"HEAD", b"SIGS", b"LABL", b"EVNT", b"DONE"
FORMAT_NAME = "neurohand-recording"

# Stored dtype name -> little-endian numpy dtype of the samples on disk.
SIGNAL_DTYPES = collections.OrderedDict([("int16", np.dtype("<i2")), ("float32", np.dtype("<f4"))])
LABEL_DTYPE = np.dtype("<f4")

# Pending events beyond this are written even without new signal chunks, so
# the writer's memory stays bounded when a caller only adds events.
MAX_PENDING_EVENTS = 1024
# Most signal channels (and label columns) a recording may have.  Far above any
# electrode array (the chip link carries 64); a header listing more is damage,
# and the cap bounds the per-channel work of opening one.
MAX_CHANNELS = 65536
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1


class RecordingTruncatedWarning(UserWarning):
    """A recording ends early or has a damaged chunk; it was loaded up to the
    last chunk that passed every check (see ``Recording.integrity``)."""


Event = collections.namedtuple("Event", ["sample", "kind", "value"])
Event.__doc__ = """A marker on the signal time axis.

sample : int, index of the signal sample it refers to (0-based)
kind : str, e.g. "movement", "repetition", "missing"
value : int, meaning depends on ``kind`` (docs/recording-format.md, "Events")
"""

LabelStream = collections.namedtuple("LabelStream", ["name", "rate", "names", "data"])
LabelStream.__doc__ = """A label stream with its own sample rate.

name : str
rate : float, Hz; row j is at time j / rate seconds from signal sample 0
names : list of str, one per column
data : ndarray, shape (n_rows, len(names)), float32
"""


def _json_bytes(value):
    """Canonical JSON (sorted keys, no spaces, ASCII) so equal input gives equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _chunk_bytes(kind, payload):
    """Return one chunk (header + payload) as bytes."""
    head = struct.pack("<4sQI", kind, len(payload), zlib.crc32(payload) & 0xFFFFFFFF)
    return head + struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF) + payload


# --- Validation of writer arguments --------------------------------------------

def _check_names(what, names):
    if isinstance(names, (str, bytes)) or not isinstance(names, collections.abc.Sequence):
        raise UsageError("{} must be a list of strings, but got {!r}".format(what, _short(names)))
    if not names:
        raise UsageError("{} must not be empty".format(what))
    if len(names) > MAX_CHANNELS:
        raise UsageError("{} must be at most {} names, but there are {}".format(what, MAX_CHANNELS, len(names)))
    names = list(names)
    for name in names:
        if not isinstance(name, str) or not name:
            raise UsageError("{} must be non-empty strings, but got {!r}".format(what, _short(name)))
    duplicates = sorted(name for name, count in collections.Counter(names).items() if count > 1)
    if duplicates:
        raise UsageError("{} must be unique, but {} appear more than once".format(
            what, ", ".join(repr(d) for d in duplicates)))
    return names


def _check_scales(scale_uv, n_channels, dtype):
    if dtype == "float32":
        if scale_uv is not None:
            raise UsageError("scale_uv must be None for float32 signals (they are stored in "
                             "microvolts already), but got {!r}".format(scale_uv))
        return None
    if scale_uv is None:
        raise UsageError("scale_uv (microvolts per count, one per channel) is required for int16 signals")
    if isinstance(scale_uv, (str, bytes, dict)):
        raise UsageError("scale_uv must be a list of numbers, but got {!r}".format(_short(scale_uv)))
    scales = checks.check_real_array("scale_uv", scale_uv)
    if scales.shape != (n_channels,):
        raise UsageError("scale_uv must have one value per channel ({}), but has shape {}".format(
            n_channels, scales.shape))
    if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
        raise UsageError("scale_uv must be finite and greater than 0, but got {!r}".format(
            scales.tolist()))
    return [float(s) for s in scales]


def _check_label_streams(label_streams):
    """Return [(name, rate, names)] in the given order."""
    if label_streams is None:
        return []
    if not isinstance(label_streams, collections.abc.Mapping):
        raise UsageError("label_streams must be a dict name -> {{'rate': Hz, 'names': [...]}}, "
                         "but got {!r}".format(label_streams))
    streams = []
    for name, spec in label_streams.items():
        if not isinstance(name, str) or not name:
            raise UsageError("label stream names must be non-empty strings, but got {!r}".format(name))
        if not isinstance(spec, collections.abc.Mapping) or set(spec) != {"rate", "names"}:
            raise UsageError("label stream {!r} must be a dict with exactly the keys 'rate' and "
                             "'names', but got {!r}".format(name, spec))
        rate = checks.check_number("label stream {!r} rate".format(name), spec["rate"],
                                   minimum=0.0, exclusive_minimum=True)
        names = _check_names("label stream {!r} names".format(name), spec["names"])
        streams.append((name, rate, names))
    return streams


def _check_metadata(metadata):
    if metadata is None:
        return {}
    if not isinstance(metadata, collections.abc.Mapping):
        raise UsageError("metadata must be a dict, but got {!r}".format(metadata))
    try:
        _json_bytes(dict(metadata))
    except (TypeError, ValueError) as exc:
        raise UsageError("metadata must be JSON-able (str keys; str, int, float, bool, None, "
                         "lists and dicts; no NaN): {}".format(exc)) from exc
    return dict(metadata)


def _short(value, limit=80):
    """repr of ``value`` cut to ``limit`` characters, for messages about damaged input."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _samples_per_interval(interval_s, rate):
    # floor, so a chunk never spans more than the interval; the epsilon keeps
    # 0.1 * 10000 = 1000.0000000000001 from becoming 1000 -> 1000, not 999.
    return max(1, int(math.floor(interval_s * rate + 1e-9)))


# --- Writer ---------------------------------------------------------------------

class RecordingWriter(object):
    """Write a recording chunk by chunk; see docs/recording-format.md.

    Opening creates ``path`` (replacing it if ``overwrite``) and writes the
    header at once, so even a recording killed immediately is a valid file.

    Parameters
    ----------
    path : str or os.PathLike
    signal_rate : float, Hz, > 0
    channel_names : list of str, one per channel, unique
    dtype : "int16" or "float32"
    scale_uv : list of float, microvolts per count, one per channel; required
        for int16, must be None for float32 (stored as microvolts)
    metadata : dict, JSON-able (subject, session, chip configuration ...).
        Nothing else identifies the file; no clock time is written, so the
        same calls give byte-identical files.
    label_streams : dict name -> {"rate": Hz, "names": [column names]}
    flush_interval_s : float, seconds of signal time.  Appends are buffered
        and written to the OS in chunks of at most this much signal; a process
        killed at any moment loses at most this much.
    fsync : bool, also force written chunks to the disk (power loss), at the
        cost of a disk sync per chunk.
    overwrite : bool, replace an existing file (default True)
    """

    def __init__(self, path, signal_rate, channel_names, dtype="int16", scale_uv=None,
                 metadata=None, label_streams=None, flush_interval_s=0.1, fsync=False,
                 overwrite=True):
        self.path = os.fspath(path)
        self.signal_rate = checks.check_number("signal_rate", signal_rate, minimum=0.0,
                                               exclusive_minimum=True)
        self.channel_names = _check_names("channel_names", channel_names)
        self.dtype = checks.check_option("dtype", dtype, list(SIGNAL_DTYPES))
        self.scale_uv = _check_scales(scale_uv, len(self.channel_names), self.dtype)
        self.metadata = _check_metadata(metadata)
        self._streams = _check_label_streams(label_streams)
        self.flush_interval_s = checks.check_number("flush_interval_s", flush_interval_s,
                                                    minimum=0.0, exclusive_minimum=True)
        if not isinstance(fsync, bool):
            raise UsageError("fsync must be True or False, but got {!r}".format(fsync))
        self.fsync = fsync
        checks.check_parent_writable("recording", self.path)
        if not overwrite and os.path.exists(self.path):
            raise UsageError("recording {!r} exists already (pass overwrite=True to replace it)".format(
                self.path))

        self._disk_dtype = SIGNAL_DTYPES[self.dtype]
        self._chunk_samples = _samples_per_interval(self.flush_interval_s, self.signal_rate)
        self._stream_index = {name: i for i, (name, _, _) in enumerate(self._streams)}
        self._label_chunk_rows = [_samples_per_interval(self.flush_interval_s, rate)
                                  for _, rate, _ in self._streams]
        self._signal_pending = []     # copies of appended blocks, < one chunk in total
        self._signal_pending_n = 0
        self._label_pending = [[] for _ in self._streams]
        self._label_pending_n = [0 for _ in self._streams]
        self._events_pending = []
        self.n_samples = 0            # signal samples appended so far
        self._label_totals = [0 for _ in self._streams]
        self._n_events = 0
        self._file = None
        header = {
            "format": FORMAT_NAME,
            "signal": {"rate": self.signal_rate, "dtype": self.dtype,
                       "channel_names": self.channel_names, "scale_uv": self.scale_uv},
            "label_streams": [{"name": n, "rate": r, "names": c} for n, r, c in self._streams],
            "metadata": self.metadata,
        }
        try:
            self._file = open(self.path, "wb")
            self._write(FILE_HEADER.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR))
            self._write(_chunk_bytes(HEAD, _json_bytes(header)))
            self._push_to_os()
            if self.fsync:
                self._sync_directory()
        except BaseException:
            if self._file is not None:
                self._file.close()
                self._file = None
            raise

    @property
    def closed(self):
        return self._file is None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

    def __repr__(self):
        return "<RecordingWriter {!r}: {} channels {} at {} Hz, {} samples{}>".format(
            self.path, len(self.channel_names), self.dtype, self.signal_rate, self.n_samples,
            ", closed" if self.closed else "")

    # -- appending

    def append_signals(self, block):
        """Append signal samples.

        block : ndarray, shape (n_samples, n_channels), the recording's dtype
            (int16 counts or float32 microvolts).  It is copied; the caller
            may reuse its buffer.
        """
        self._check_open()
        if not isinstance(block, np.ndarray):
            raise UsageError("signal block must be a numpy array, but got {}".format(type(block).__name__))
        if block.ndim != 2 or block.shape[1] != len(self.channel_names):
            raise UsageError("signal block must have shape (n_samples, {}), but has shape {}".format(
                len(self.channel_names), block.shape))
        if block.dtype != np.dtype(self.dtype):
            raise UsageError("signal block must be {} (the recording's dtype), but is {}".format(
                self.dtype, block.dtype))
        n = block.shape[0]
        if n == 0:
            return
        self.n_samples += n
        wrote = False
        position = 0
        room = self._chunk_samples - self._signal_pending_n
        if n >= room:
            # Complete the pending chunk, then write whole chunks straight from
            # the caller's array, keeping only the remainder in memory.
            self._signal_pending.append(block[:room])
            self._write_chunk(SIGS, np.concatenate(self._signal_pending).astype(self._disk_dtype).tobytes())
            self._signal_pending, self._signal_pending_n = [], 0
            position = room
            while n - position >= self._chunk_samples:
                part = block[position:position + self._chunk_samples]
                self._write_chunk(SIGS, np.ascontiguousarray(part, dtype=self._disk_dtype).tobytes())
                position += self._chunk_samples
            wrote = True
        if position < n:
            self._signal_pending.append(np.array(block[position:], dtype=self._disk_dtype))
            self._signal_pending_n += n - position
        if wrote:
            # Labels and events go out with the signals they belong to.
            self._write_labels()
            self._write_events()
            self._push_to_os()

    def append_labels(self, stream, block):
        """Append rows to a label stream.

        stream : str, a name given in ``label_streams``
        block : array-like, shape (n_rows, n_label_channels); stored as float32
        """
        self._check_open()
        if not self._streams:
            raise UsageError("this recording has no label streams (give label_streams when creating it)")
        checks.check_option("label stream", stream, list(self._stream_index))
        index = self._stream_index[stream]
        names = self._streams[index][2]
        try:
            rows = np.array(block, dtype=LABEL_DTYPE)
        except (TypeError, ValueError) as exc:
            raise UsageError("label block for {!r} must be numeric: {}".format(stream, exc)) from exc
        if rows.ndim != 2 or rows.shape[1] != len(names):
            raise UsageError("label block for {!r} must have shape (n_rows, {}), but has shape {}".format(
                stream, len(names), rows.shape))
        if rows.shape[0] == 0:
            return
        self._label_pending[index].append(rows)
        self._label_pending_n[index] += rows.shape[0]
        self._label_totals[index] += rows.shape[0]
        if self._label_pending_n[index] >= self._label_chunk_rows[index]:
            self._write_labels()
            self._write_events()
            self._push_to_os()

    def add_event(self, sample, kind, value=0):
        """Mark an event at a signal sample index.

        sample : int >= 0, signal sample index
        kind : str, e.g. "movement", "repetition", "missing"
        value : int (64-bit), meaning depends on kind
        """
        self._check_open()
        sample = checks.check_int("event sample", sample, minimum=0, maximum=INT64_MAX)
        if not isinstance(kind, str) or not kind:
            raise UsageError("event kind must be a non-empty string, but got {!r}".format(kind))
        value = checks.check_int("event value", value, minimum=INT64_MIN, maximum=INT64_MAX)
        self._events_pending.append([sample, kind, value])
        self._n_events += 1
        if len(self._events_pending) >= MAX_PENDING_EVENTS:
            self._write_events()
            self._push_to_os()

    def flush(self):
        """Write everything buffered (including a partial signal chunk) to the OS,
        and to the disk if ``fsync``."""
        self._check_open()
        if self._signal_pending_n:
            self._write_chunk(SIGS, np.concatenate(self._signal_pending).tobytes())
            self._signal_pending, self._signal_pending_n = [], 0
        self._write_labels()
        self._write_events()
        self._push_to_os()

    def close(self):
        """Flush, write the end chunk and close.  Safe to call twice."""
        if self._file is None:
            return
        try:
            self.flush()
            totals = {"n_samples": self.n_samples, "n_events": self._n_events,
                      "label_samples": {name: self._label_totals[i]
                                        for i, (name, _, _) in enumerate(self._streams)}}
            self._write_chunk(DONE, _json_bytes(totals))
            self._push_to_os()
        finally:
            handle, self._file = self._file, None
            handle.close()

    # -- internals

    def _check_open(self):
        if self._file is None:
            raise RecordingError("recording {!r} is closed".format(self.path))

    def _write_labels(self):
        for index, pending in enumerate(self._label_pending):
            if pending:
                rows = np.concatenate(pending)
                self._write_chunk(LABL, LABEL_PREFIX.pack(index) + rows.tobytes())
                self._label_pending[index] = []
                self._label_pending_n[index] = 0

    def _write_events(self):
        if self._events_pending:
            self._write_chunk(EVNT, _json_bytes(self._events_pending))
            self._events_pending = []

    def _write_chunk(self, kind, payload):
        self._write(_chunk_bytes(kind, payload))

    def _write(self, data):
        try:
            self._file.write(data)
        except OSError as exc:
            raise RecordingError("cannot write recording {!r}: {}".format(self.path, exc)) from exc

    def _push_to_os(self):
        try:
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
        except OSError as exc:
            raise RecordingError("cannot write recording {!r}: {}".format(self.path, exc)) from exc

    def _sync_directory(self):
        # A new file's directory entry must reach the disk too, or a power cut
        # can lose the whole file even though its data was synced.
        sync_directory(os.path.dirname(os.path.abspath(self.path)))


# --- Reader ---------------------------------------------------------------------

def open_recording(path, verify=False):
    """Open a recording for reading; also a context manager.

    Only chunk headers are read to index the signal chunks; label and event
    chunks are loaded.  A file that ends early or has a damaged chunk loads up
    to the last good chunk and warns :class:`RecordingTruncatedWarning`.

    verify : bool, also read every signal chunk once to check its CRC (reads
        the whole file, in constant memory).  Without it, a damaged signal
        chunk is found when it is read (:meth:`Recording.read_signals` raises
        RecordingError).

    Raises RecordingError for a file that is not a recording, is of an
    unsupported version, or is cut off before its header chunk is complete;
    UsageError for a missing path or a directory.
    """
    path = checks.check_file_exists("recording", path)
    try:
        handle = open(path, "rb", buffering=0)  # unbuffered: each header read reads 20 bytes, not 8 kB
    except OSError as exc:
        raise RecordingError("cannot open recording {!r}: {}".format(path, exc)) from exc
    try:
        scan = _Scanner(path, handle, verify).scan()
    except BaseException:
        handle.close()
        raise
    if not scan.integrity["complete"]:
        warnings.warn(RecordingTruncatedWarning("recording {!r}: {}".format(path, scan.integrity["message"])),
                      stacklevel=2)
    return Recording(path, handle, scan)


class _ScanResult(object):
    """What one pass over the chunk headers found."""

    def __init__(self):
        self.header = None
        self.signal_offsets = []      # payload offset of each SIGS chunk
        self.signal_lengths = []      # samples in each SIGS chunk
        self.signal_crcs = []
        self.labels = []              # per stream: list of float32 arrays
        self.events = []
        self.chunks = 0
        self.integrity = None


class _Scanner(object):
    """One pass over a recording file: validate, index signals, load the rest."""

    def __init__(self, path, handle, verify):
        self.path = path
        self.handle = handle
        self.verify = verify
        self.size = os.fstat(handle.fileno()).st_size
        self.result = _ScanResult()

    def scan(self):
        self._read_file_header()
        offset = FILE_HEADER.size
        problem = None
        complete = False
        while True:
            if offset == self.size:
                if self.result.chunks == 0:
                    raise RecordingError("recording {!r} ends after its file header, before the header "
                                         "chunk; there is nothing to load".format(self.path))
                problem = ("ends at byte {} without an end chunk: the writer did not close it "
                           "(crashed or still recording)".format(offset))
                break
            try:
                kind, payload_offset, length, payload, crc = self._read_chunk(offset)
                if self.result.chunks == 0:
                    self._take_header(kind, payload)
                else:
                    self._take_chunk(kind, payload_offset, length, payload, crc)
            except _BadChunk as bad:
                if self.result.chunks == 0:
                    raise RecordingError("recording {!r}: header chunk is incomplete or damaged ({}); "
                                         "there is nothing to load".format(self.path, bad)) from None
                problem = "{}; loaded up to byte {}".format(bad, offset)
                break
            self.result.chunks += 1
            offset = payload_offset + length
            if kind == DONE:
                if offset != self.size:
                    problem = "{} unexpected bytes after the end chunk".format(self.size - offset)
                else:
                    complete = True
                break
        self.result.integrity = {
            "complete": complete, "chunks": self.result.chunks,
            "bytes_ignored": self.size - offset,
            "message": "complete" if complete else problem,
            "verified": self.verify, "file_size": self.size,
        }
        return self.result

    def _read_exact(self, offset, count):
        self.handle.seek(offset)
        parts = []
        while count:
            part = self.handle.read(count)
            if not part:
                break
            parts.append(part)
            count -= len(part)
        return b"".join(parts)

    def _read_file_header(self):
        data = self._read_exact(0, FILE_HEADER.size)
        if len(data) < len(MAGIC) and MAGIC.startswith(data) and data:
            raise RecordingError("recording {!r} is cut off inside its {}-byte file header; "
                                 "there is nothing to load".format(self.path, FILE_HEADER.size))
        if data[:len(MAGIC)] != MAGIC:
            raise RecordingError("{!r} is not a neurohand recording (it starts with {!r}, not {!r})".format(
                self.path, data[:len(MAGIC)], MAGIC))
        if len(data) < FILE_HEADER.size:
            raise RecordingError("recording {!r} is cut off inside its {}-byte file header; "
                                 "there is nothing to load".format(self.path, FILE_HEADER.size))
        _, major, minor = FILE_HEADER.unpack(data)
        if major != FORMAT_MAJOR:
            raise RecordingError("recording {!r} has format version {}.{}; this neurohand reads "
                                 "version {}.x".format(self.path, major, minor, FORMAT_MAJOR))

    def _read_chunk(self, offset):
        """Return (kind, payload offset, payload length, payload bytes or None for
        unread signals, payload CRC) of the chunk at ``offset``."""
        if self.size - offset < CHUNK_HEADER.size:
            raise _BadChunk("incomplete chunk header at byte {} ({} of {} bytes)".format(
                offset, self.size - offset, CHUNK_HEADER.size))
        raw = self._read_exact(offset, CHUNK_HEADER.size)
        kind, length, payload_crc, header_crc = CHUNK_HEADER.unpack(raw)
        if zlib.crc32(raw[:CHUNK_HEADER_CRC_SPAN]) & 0xFFFFFFFF != header_crc:
            raise _BadChunk("damaged chunk header at byte {} (CRC mismatch)".format(offset))
        payload_offset = offset + CHUNK_HEADER.size
        if length > self.size - payload_offset:
            raise _BadChunk("incomplete {} chunk at byte {} ({} of {} payload bytes)".format(
                _kind_text(kind), offset, self.size - payload_offset, length))
        if kind == SIGS and not self.verify:
            return kind, payload_offset, length, None, payload_crc
        payload = self._read_exact(payload_offset, length)
        if zlib.crc32(payload) & 0xFFFFFFFF != payload_crc:
            raise _BadChunk("damaged {} chunk at byte {} (payload CRC mismatch)".format(
                _kind_text(kind), offset))
        return kind, payload_offset, length, payload, payload_crc

    def _take_header(self, kind, payload):
        if kind != HEAD:
            raise _BadChunk("first chunk is {}, not HEAD".format(_kind_text(kind)))
        try:
            header = checks.parse_json(payload.decode("ascii"))
            self.result.header = _parse_header(header)
        except (ValueError, UsageError) as exc:
            raise _BadChunk("invalid header: {}".format(exc)) from None
        self.result.labels = [[] for _ in self.result.header["label_streams"]]

    def _take_chunk(self, kind, payload_offset, length, payload, crc):
        header = self.result.header
        if kind == SIGS:
            frame = len(header["channel_names"]) * SIGNAL_DTYPES[header["dtype"]].itemsize
            if length % frame:
                raise _BadChunk("SIGS chunk at byte {} holds {} bytes, not a whole number of "
                                "{}-byte samples".format(payload_offset - CHUNK_HEADER.size, length, frame))
            self.result.signal_offsets.append(payload_offset)
            self.result.signal_lengths.append(length // frame)
            self.result.signal_crcs.append(crc)
        elif kind == LABL:
            self._take_labels(payload_offset, payload)
        elif kind == EVNT:
            self._take_events(payload_offset, payload)
        elif kind == DONE:
            self._check_totals(payload_offset, payload)
        elif kind == HEAD:
            raise _BadChunk("second HEAD chunk at byte {}".format(payload_offset - CHUNK_HEADER.size))
        # Any other type passed its CRCs: a chunk from a newer minor version, skipped.

    def _take_labels(self, payload_offset, payload):
        streams = self.result.header["label_streams"]
        where = payload_offset - CHUNK_HEADER.size
        if len(payload) < LABEL_PREFIX.size:
            raise _BadChunk("LABL chunk at byte {} is too short".format(where))
        (index,) = LABEL_PREFIX.unpack_from(payload)
        if index >= len(streams):
            raise _BadChunk("LABL chunk at byte {} names stream {} of {}".format(where, index, len(streams)))
        width = len(streams[index]["names"])
        body = payload[LABEL_PREFIX.size:]
        if len(body) % (width * LABEL_DTYPE.itemsize):
            raise _BadChunk("LABL chunk at byte {} is not a whole number of rows".format(where))
        self.result.labels[index].append(np.frombuffer(body, dtype=LABEL_DTYPE).reshape(-1, width))

    def _take_events(self, payload_offset, payload):
        where = payload_offset - CHUNK_HEADER.size
        try:
            events = checks.parse_json(payload.decode("ascii"))
            if not isinstance(events, list):
                raise ValueError("expected a list of events, but got {}".format(type(events).__name__))
            parsed = [_parse_event(e) for e in events]
        except ValueError as exc:
            raise _BadChunk("EVNT chunk at byte {} is invalid: {}".format(where, exc)) from None
        self.result.events.extend(parsed)

    def _check_totals(self, payload_offset, payload):
        where = payload_offset - CHUNK_HEADER.size
        found = {"n_samples": int(sum(self.result.signal_lengths)), "n_events": len(self.result.events),
                 "label_samples": {s["name"]: int(sum(len(a) for a in self.result.labels[i]))
                                   for i, s in enumerate(self.result.header["label_streams"])}}
        try:
            totals = checks.parse_json(payload.decode("ascii"))
        except ValueError as exc:
            raise _BadChunk("DONE chunk at byte {} is invalid: {}".format(where, exc)) from None
        if totals != found:
            raise _BadChunk("DONE chunk at byte {} promises {} but the file holds {}".format(
                where, totals, found))


class _BadChunk(Exception):
    """Internal: the chunk at the scan position fails a check (ends the scan)."""


def _kind_text(kind):
    return kind.decode("ascii", "backslashreplace")


def _field(container, key, where):
    """``container[key]`` of the HEAD JSON; ValueError naming the field if absent.

    where : str, the JSON path of ``container`` ("" for the top level), e.g. "signal"
    """
    name = "{}.{}".format(where, key) if where else key
    if not isinstance(container, dict):
        raise ValueError("{} must be an object, but got {}".format(where or "the header", _short(container)))
    if key not in container:
        raise ValueError("field {!r} is missing".format(name))
    return container[key]


def _parse_header(header):
    """Validate the HEAD JSON; return it with normalised types.

    Raises ValueError or UsageError whose message names the field.
    """
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise ValueError("not a {} header".format(FORMAT_NAME))
    signal = _field(header, "signal", "")
    rate = checks.check_number("signal rate", _field(signal, "rate", "signal"), minimum=0.0,
                               exclusive_minimum=True)
    dtype = checks.check_option("dtype", _field(signal, "dtype", "signal"), list(SIGNAL_DTYPES))
    names = _check_names("channel names", _field(signal, "channel_names", "signal"))
    scales = _check_scales(_field(signal, "scale_uv", "signal"), len(names), dtype)
    stored_streams = _field(header, "label_streams", "")
    if not isinstance(stored_streams, list):
        raise ValueError("label_streams must be a list, but got {}".format(_short(stored_streams)))
    specs = collections.OrderedDict()
    for index, stream in enumerate(stored_streams):
        where = "label_streams[{}]".format(index)
        name = _field(stream, "name", where)
        if not isinstance(name, str):
            raise ValueError("{}.name must be a string, but got {}".format(where, _short(name)))
        if name in specs:
            raise ValueError("label stream names are not unique ({!r} repeats)".format(name))
        specs[name] = {"rate": _field(stream, "rate", where), "names": _field(stream, "names", where)}
    streams = _check_label_streams(specs)
    metadata = _field(header, "metadata", "")
    if not isinstance(metadata, dict):
        raise ValueError("metadata is not an object")
    return {"rate": rate, "dtype": dtype, "channel_names": names, "scale_uv": scales,
            "label_streams": [{"name": n, "rate": r, "names": c} for n, r, c in streams],
            "metadata": metadata}


def _parse_event(event):
    if (not isinstance(event, list) or len(event) != 3 or not _is_int(event[0]) or event[0] < 0
            or not isinstance(event[1], str) or not _is_int(event[2])):
        raise ValueError("event {!r} is not [sample, kind, value]".format(event))
    return Event(event[0], event[1], event[2])


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class Recording(object):
    """An open recording (from :func:`open_recording`).

    Attributes
    ----------
    path : str
    signal_rate : float, Hz
    channel_names : list of str
    n_channels, n_samples : int
    duration_s : float, n_samples / signal_rate
    dtype : "int16" or "float32" (the stored sample type)
    scale_uv : ndarray, shape (n_channels,), float64, microvolts per count (ones for float32)
    metadata : dict
    label_streams : dict name -> LabelStream, data loaded
    events : list of Event, sorted by sample (stable)
    integrity : dict with complete (bool), chunks (int, good chunks), bytes_ignored
        (int), message (str), verified (bool, signal CRCs checked on open), file_size
    """

    def __init__(self, path, handle, scan):
        header = scan.header
        self.path = path
        self._handle = handle
        self.signal_rate = header["rate"]
        self.channel_names = list(header["channel_names"])
        self.n_channels = len(self.channel_names)
        self.dtype = header["dtype"]
        self._disk_dtype = SIGNAL_DTYPES[self.dtype]
        scales = header["scale_uv"]
        self.scale_uv = (np.ones(self.n_channels) if scales is None
                         else np.array(scales, dtype=np.float64))
        self.metadata = header["metadata"]
        self.label_streams = collections.OrderedDict()
        for index, stream in enumerate(header["label_streams"]):
            parts = scan.labels[index]
            data = (np.concatenate(parts) if parts
                    else np.zeros((0, len(stream["names"])), dtype=LABEL_DTYPE))
            # concatenate/zeros give a new writable array: no further copy.
            self.label_streams[stream["name"]] = LabelStream(
                stream["name"], stream["rate"], list(stream["names"]), data.astype(np.float32, copy=False))
        del scan.labels[:]   # the per-chunk pieces are not needed any more
        self.events = sorted(scan.events, key=lambda e: e.sample)
        self.integrity = dict(scan.integrity)
        self._offsets = np.array(scan.signal_offsets, dtype=np.int64)
        self._lengths = np.array(scan.signal_lengths, dtype=np.int64)
        self._crcs = np.array(scan.signal_crcs, dtype=np.uint32)
        # _starts[i] is the first sample of chunk i; _starts[-1] == n_samples.
        self._starts = np.concatenate([[0], np.cumsum(self._lengths)]).astype(np.int64)
        self.n_samples = int(self._starts[-1])
        self.duration_s = self.n_samples / self.signal_rate
        # The last chunk read: reading in blocks smaller than a chunk (replay)
        # then reads and CRC-checks each chunk once, not once per block.
        self._cached_chunk = (None, None)

    @property
    def n_signal_chunks(self):
        return len(self._lengths)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

    def __repr__(self):
        return "<Recording {!r}: {} channels {} at {} Hz, {:.3f} s{}>".format(
            self.path, self.n_channels, self.dtype, self.signal_rate, self.duration_s,
            "" if self.integrity["complete"] else ", truncated")

    def close(self):
        self._cached_chunk = (None, None)
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def read_signals(self, start=0, stop=None, microvolts=False):
        """Read samples [start, stop) from the file.

        Returns ndarray, shape (stop - start, n_channels): the stored dtype
        (int16 counts or float32 microvolts), or float64 microvolts when
        ``microvolts`` (int16 counts times scale_uv; float32 as is).
        Raises RecordingError if a chunk read fails its CRC.
        """
        if self._handle is None:
            raise RecordingError("recording {!r} is closed".format(self.path))
        start = checks.check_int("start", start, minimum=0, maximum=self.n_samples)
        stop = self.n_samples if stop is None else checks.check_int(
            "stop", stop, minimum=start, maximum=self.n_samples)
        out = np.empty((stop - start, self.n_channels), dtype=np.dtype(self.dtype))
        chunk = max(int(np.searchsorted(self._starts, start, side="right")) - 1, 0)
        while chunk < len(self._lengths) and self._starts[chunk] < stop:
            first, last = int(self._starts[chunk]), int(self._starts[chunk + 1])
            if last > start:
                samples = self._read_chunk(chunk)
                lo, hi = max(start, first), min(stop, last)
                out[lo - start:hi - start] = samples[lo - first:hi - first]
            chunk += 1
        if microvolts:
            return out.astype(np.float64) * self.scale_uv
        return out

    def iter_signal_blocks(self, block_samples, start=0, stop=None, microvolts=False):
        """Yield consecutive blocks of ``block_samples`` samples (the last may be
        shorter) from [start, stop); each as :meth:`read_signals` returns."""
        block_samples = checks.check_int("block_samples", block_samples, minimum=1)
        start = checks.check_int("start", start, minimum=0, maximum=self.n_samples)
        stop = self.n_samples if stop is None else checks.check_int(
            "stop", stop, minimum=start, maximum=self.n_samples)
        for first in range(start, stop, block_samples):
            yield self.read_signals(first, min(first + block_samples, stop), microvolts=microvolts)

    def _read_chunk(self, chunk):
        """Return chunk ``chunk``'s samples, shape (n, n_channels), after checking its CRC."""
        if self._cached_chunk[0] == chunk:
            return self._cached_chunk[1]
        length = int(self._lengths[chunk]) * self.n_channels * self._disk_dtype.itemsize
        offset = int(self._offsets[chunk])
        try:
            self._handle.seek(offset)
            data = self._handle.read(length)
            while len(data) < length:
                more = self._handle.read(length - len(data))
                if not more:
                    break
                data += more
        except OSError as exc:
            raise RecordingError("cannot read recording {!r}: {}".format(self.path, exc)) from exc
        if len(data) != length or zlib.crc32(data) & 0xFFFFFFFF != int(self._crcs[chunk]):
            raise RecordingError("recording {!r}: signal chunk at byte {} (samples {}..{}) is damaged "
                                 "(CRC mismatch or changed since opening)".format(
                                     self.path, offset - CHUNK_HEADER.size, int(self._starts[chunk]),
                                     int(self._starts[chunk + 1])))
        samples = np.frombuffer(data, dtype=self._disk_dtype).reshape(-1, self.n_channels)
        samples = samples.astype(np.dtype(self.dtype), copy=False)
        self._cached_chunk = (chunk, samples)
        return samples
