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
its checks, skips one that does not and goes on after it (after a damaged
chunk header, at the next intact one), and stops at a partial chunk at the
end, with one :class:`RecordingTruncatedWarning` -- so a recording is never
lost, only its damaged parts and its last moments.

Why the reader scans headers only: an hour at 16 channels and 10 kHz is
1.15 GB.  Opening seeks from chunk header to chunk header to build an index of
signal chunks; samples are read on demand per range.  Label and event chunks
are loaded (and CRC-checked) when opening, into packed arrays, so opening
needs at most about twice the file's size in memory whatever its shape.

Numpy and the standard library only (Python 3.6, numpy 1.19).  No pickle.
"""
import array
import collections
import collections.abc
import json
import math
import os
import stat
import struct
import warnings
import zlib

import numpy as np

from neurohand.firmware_bridge.shared import checks
from neurohand.firmware_bridge.shared.atomic import sync_directory
from neurohand.firmware_bridge.shared.errors import RecordingError, UsageError
from neurohand.firmware_bridge.recording.events import (
    INT64_MAX, INT64_MIN, MAX_KIND_CHARS, Event, EventBuilder, EventList, iter_json_array, parse_event, utf8_text,
    valid_unicode)

# Event and EventList are part of this module's API (``Recording.events``).
__all__ = ["Event", "EventList", "LabelStream", "Recording", "RecordingTruncatedWarning", "RecordingWriter",
           "open_recording"]

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
# The header's JSON becomes Python objects, up to ~15 times its size; the cap
# bounds that (65536 channel names and scales take about 2 MB).
MAX_HEAD_BYTES = 16 << 20
KNOWN_CHUNK_TYPES = (HEAD, SIGS, LABL, EVNT, DONE)
# Payloads above this are read (CRC, labels, events) a piece at a time.
PIECE_BYTES = 1 << 16
# Problems listed one by one in Recording.integrity; more are only counted.
MAX_PROBLEMS_KEPT = 100


class RecordingTruncatedWarning(UserWarning):
    """A recording ends early, or has damaged chunks or text that is not
    UTF-8; everything usable was loaded.  The message names the file, the
    problems and what was kept; ``Recording.integrity`` lists the problems."""


LabelStream = collections.namedtuple("LabelStream", ["name", "rate", "names", "data"])
LabelStream.__doc__ = """A label stream with its own sample rate.

name : str
rate : float, Hz; row j is at time j / rate seconds from signal sample 0
names : list of str, one per column
data : ndarray, shape (n_rows, len(names)), float32
"""


def _json_bytes(value):
    """Canonical JSON (sorted keys, no spaces, non-ASCII as \\uXXXX) so equal input
    gives equal bytes; ASCII is also UTF-8, the format's encoding."""
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
        _check_text(what, name)
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
        _check_text("label stream names", name)
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
    try:
        json.dumps(dict(metadata), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError("metadata must hold Unicode text only, but a string holds {!r} (a lone surrogate, "
                         "e.g. from a file name that is not UTF-8; decode it with errors='replace')".format(
                             exc.object[exc.start:exc.end])) from None
    return dict(metadata)


def _check_text(what, text):
    """UTF-8 is the format's encoding: a str that cannot be encoded (lone
    surrogates, e.g. from os.fsdecode of a non-UTF-8 file name) is refused, not
    written as an escape no reader can turn back into text."""
    if valid_unicode(text)[1]:
        raise UsageError("{} must be Unicode text, but {!r} holds a lone surrogate (e.g. from a file name "
                         "that is not UTF-8; decode it with errors='replace')".format(what, _short(text)))


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
        header_bytes = _json_bytes(header)
        if len(header_bytes) > MAX_HEAD_BYTES:
            raise UsageError("the header (names, scales, label streams and metadata) takes {} bytes as JSON, "
                             "more than the {} a header may hold".format(len(header_bytes), MAX_HEAD_BYTES))
        try:
            self._file = open(self.path, "wb")
            self._write(FILE_HEADER.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR))
            self._write(_chunk_bytes(HEAD, header_bytes))
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
            raise UsageError("event kind must be a non-empty string, but got {!r}".format(_short(kind)))
        if len(kind) > MAX_KIND_CHARS:
            raise UsageError("event kind must be at most {} characters, but has {}".format(
                MAX_KIND_CHARS, len(kind)))
        _check_text("event kind", kind)
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
    chunks are loaded.  A damaged chunk is skipped and the scan goes on after
    it (a damaged chunk header: at the next intact one); a file that ends early
    loads up to its last complete chunk.  Either way it warns
    :class:`RecordingTruncatedWarning`, naming the file, each problem and what
    was kept, and fills ``Recording.integrity`` (docs/recording-format.md,
    "Reading rules").

    verify : bool, also read every signal chunk once to check its CRC (reads
        the whole file, in constant memory).  Without it, a damaged signal
        chunk is found when it is read (:meth:`Recording.read_signals` raises
        RecordingError).

    Raises RecordingError for a file that is not a recording, is of an
    unsupported version, has no intact header chunk, or cannot be read (an I/O
    error names the byte); UsageError for a missing path or one that is not a
    regular file (a directory, a FIFO, a device).
    """
    path = checks.check_file_exists("recording", path)
    try:
        handle = _open_file(path)
    except OSError as exc:
        raise RecordingError("cannot open recording {!r}: {}".format(path, _os_error_text(exc))) from exc
    try:
        recording = Recording(path, handle, _Scanner(path, handle, verify).scan())
    except BaseException:
        handle.close()
        raise
    if not recording.integrity["complete"]:
        warnings.warn(RecordingTruncatedWarning(_integrity_text(recording)), stacklevel=2)
    return recording


def _open_file(path):
    """Open ``path`` unbuffered (each header read reads 20 bytes, not 8 kB).

    O_NONBLOCK: a FIFO swapped in after the caller checked the path must not
    block the open forever (it has no effect on regular files).  Tests replace
    this function to inject I/O errors.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def _os_error_text(exc):
    return exc.strerror or str(exc) or type(exc).__name__


def _integrity_text(recording):
    """The one-line warning for an incomplete or damaged recording: file, problems, what was kept."""
    integrity = recording.integrity
    rows = sum(len(s.data) for s in recording.label_streams.values())
    return ("recording {!r}: {}; kept {} chunks: {} signal samples ({:.3f} s), {} label rows, {} events; "
            "{} of {} bytes ignored".format(
                recording.path, integrity["message"], integrity["chunks"], recording.n_samples,
                recording.duration_s, rows, len(recording.events), integrity["bytes_ignored"],
                integrity["file_size"]))


class _Frame(collections.namedtuple("_Frame", ["kind", "offset", "length", "payload_crc", "intact"])):
    """A chunk whose extent is known; ``intact``: its header CRC holds."""
    __slots__ = ()

    @property
    def payload_offset(self):
        return self.offset + CHUNK_HEADER.size

    @property
    def end(self):
        return self.offset + CHUNK_HEADER.size + self.length


_Gap = collections.namedtuple("_Gap", ["end", "message"])      # unframeable bytes up to an intact chunk
_End = collections.namedtuple("_End", ["message"])             # nothing after this can be framed


class _Scanner(object):
    """One pass over a recording file: validate, index signals, load the rest.

    Memory stays within a small multiple of the file's size whatever its
    shape: the signal index is three packed arrays (24 bytes per signal chunk),
    label rows go straight into one bytearray per stream, events into packed
    columns (``events.EventBuilder``), and payloads larger than
    PIECE_BYTES are read piece by piece.
    """

    def __init__(self, path, handle, verify):
        self.path = path
        self.handle = handle
        self.verify = verify
        try:
            status = os.fstat(handle.fileno())
        except OSError as exc:
            raise RecordingError("cannot read recording {!r}: {}".format(path, _os_error_text(exc))) from exc
        if not stat.S_ISREG(status.st_mode):
            raise RecordingError("recording {!r} is not a regular file".format(path))
        self.size = status.st_size
        self.proof_budget = 2 * self.size + PIECE_BYTES   # payload bytes _provable may CRC
        self.header = None
        self.sample_bytes = None                 # of one sample of all channels, once the header is read
        self.signal_offsets = array.array("q")   # payload offset of each non-empty SIGS chunk
        self.signal_lengths = array.array("q")   # its samples
        self.signal_crcs = array.array("q")
        self.n_samples = 0
        self.labels = []                         # per stream: bytearray of little-endian float32 rows
        self.events = EventBuilder()
        self.chunks = 0
        self.problems = []                       # the first MAX_PROBLEMS_KEPT
        self.n_problems = 0
        self.bytes_ignored = 0
        self.integrity = None

    # -- the scan

    def scan(self):
        self._read_file_header()
        offset = FILE_HEADER.size
        complete = False
        while True:
            if offset == self.size:
                if self.header is None:
                    raise RecordingError("recording {!r} ends after its file header, before the header "
                                         "chunk; there is nothing to load".format(self.path))
                self._problem(offset, 0, "ends at byte {} without an end chunk: the writer did not close it "
                                         "(crashed or still recording)".format(offset))
                break
            frame = self._frame(offset)
            if self.header is None and not isinstance(frame, _Frame):
                raise RecordingError("recording {!r}: header chunk is incomplete or damaged ({}); there is "
                                     "nothing to load".format(self.path, frame.message))
            if isinstance(frame, _End):
                self._problem(offset, self.size - offset, "{}: ignored the last {} bytes".format(
                    frame.message, self.size - offset))
                break
            if isinstance(frame, _Gap):
                self._problem(offset, frame.end - offset, frame.message)
                offset = frame.end
                continue
            if not frame.intact:
                self._problem(offset, 0, "chunk header at byte {} is damaged (CRC mismatch), but its type, "
                                         "length and payload check out: kept".format(offset))
            if self.header is None:
                self._take_header(frame)
            elif self._take_chunk(frame):
                self.chunks += 1
            offset = frame.end
            if frame.kind == DONE:
                if offset != self.size:
                    self._problem(offset, self.size - offset, "{} unexpected bytes after the end chunk".format(
                        self.size - offset))
                complete = not self.n_problems
                break
        message = "complete" if complete else "; ".join(p["message"] for p in self.problems[:3])
        if self.n_problems > 3:
            message += "; and {} more problems (integrity['problems'] lists up to {})".format(
                self.n_problems - 3, MAX_PROBLEMS_KEPT)
        self.integrity = {
            "complete": complete, "chunks": self.chunks, "bytes_ignored": self.bytes_ignored,
            "message": message, "verified": self.verify, "file_size": self.size,
            "n_problems": self.n_problems, "problems": list(self.problems),
        }
        return self

    def _problem(self, offset, bytes_ignored, message):
        """Record a problem at byte ``offset`` that made ``bytes_ignored`` bytes unusable."""
        self.n_problems += 1
        self.bytes_ignored += bytes_ignored
        if len(self.problems) < MAX_PROBLEMS_KEPT:
            self.problems.append({"offset": offset, "bytes_ignored": bytes_ignored,
                                  "sample": self.n_samples, "message": message})

    # -- framing: where chunks start and end

    def _frame(self, offset):
        """The chunk at ``offset`` as a _Frame; or a _Gap up to the next intact chunk
        header after a damaged one; or _End if nothing further can be framed."""
        remaining = self.size - offset
        if remaining < CHUNK_HEADER.size:
            return _End("incomplete chunk header at byte {} ({} of {} bytes)".format(
                offset, remaining, CHUNK_HEADER.size))
        raw = self._read_exact(offset, CHUNK_HEADER.size)
        kind, length, payload_crc, _ = CHUNK_HEADER.unpack(raw)
        end = offset + CHUNK_HEADER.size + length
        if _intact_header(raw):
            if end > self.size:
                return _End("incomplete {} chunk at byte {} ({} of {} payload bytes)".format(
                    _kind_text(kind), offset, remaining - CHUNK_HEADER.size, length))
            return _Frame(kind, offset, length, payload_crc, True)
        # A header CRC mismatch: no field of this header can be trusted unless
        # the chunk proves itself (_provable); otherwise resynchronise.
        if self._provable(offset, raw):
            return _Frame(kind, offset, length, payload_crc, False)
        found = self._find_header(offset + 1)
        if found is None:
            return _End("damaged chunk header at byte {} (CRC mismatch), and no intact chunk header "
                        "after it".format(offset))
        return _Gap(found, "damaged chunk header at byte {} (CRC mismatch): skipped {} bytes to the next intact "
                           "chunk at byte {}; any signal samples or label rows in them are lost, and those after "
                           "them follow directly the ones before".format(offset, found - offset, found))

    def _intact_header_at(self, offset):
        return self.size - offset >= CHUNK_HEADER.size and _intact_header(
            self._read_exact(offset, CHUNK_HEADER.size))

    def _provable(self, offset, raw):
        """True if the chunk header ``raw`` at ``offset``, whose CRC fails, is
        right all the same: a known type, and a length leading to an intact
        header (or the end of the file) over a payload whose CRC matches -- as
        when only the header CRC field itself is damaged."""
        kind, length, payload_crc, _ = CHUNK_HEADER.unpack(raw)
        end = offset + CHUNK_HEADER.size + length
        if not (kind in KNOWN_CHUNK_TYPES and end <= self.size
                and (end == self.size or self._intact_header_at(end))):
            return False
        # Crafted headers could all point far ahead at one intact header and
        # make every candidate CRC the same megabytes: a budget keeps the
        # scan linear in the file's size (an honest file spends at most its size).
        if length > self.proof_budget:
            return False
        self.proof_budget -= length
        return self._crc(offset + CHUNK_HEADER.size, length) == payload_crc

    def _find_header(self, start):
        """Offset of the first intact (or _provable) chunk header of a known
        type at or after ``start``, or None.

        Only known types: a 4-byte tag narrows the candidates to a few, found
        by bytes.find, where checking a CRC at every byte would take minutes
        per gigabyte.  A random match also needs a matching CRC-32 (2**-32).
        """
        position = start
        while self.size - position >= CHUNK_HEADER.size:
            block = self._read_exact(position, min(PIECE_BYTES, self.size - position))
            last = len(block) - CHUNK_HEADER.size          # last start with a whole header in this block
            best = None
            for tag in KNOWN_CHUNK_TYPES:
                at = block.find(tag, 0, last + len(tag))
                while at != -1 and (best is None or at < best):
                    raw = block[at:at + CHUNK_HEADER.size]
                    if _intact_header(raw) or self._provable(position + at, raw):
                        best = at
                        break
                    at = block.find(tag, at + 1, last + len(tag))
            if best is not None:
                return position + best
            position += last + 1
        return None

    # -- reading

    def _read_exact(self, offset, count):
        """``count`` bytes at ``offset`` (fewer only at the end of the file)."""
        parts = []
        try:
            self.handle.seek(offset)
            data = self.handle.read(count)   # nearly always all of it at once
            if len(data) == count or not data:
                return data
            parts.append(data)
            offset += len(data)
            count -= len(data)
            while count:
                part = self.handle.read(count)
                if not part:
                    break
                parts.append(part)
                offset += len(part)
                count -= len(part)
        except OSError as exc:
            raise RecordingError("cannot read recording {!r} at byte {}: {}".format(
                self.path, offset, _os_error_text(exc))) from exc
        return b"".join(parts)

    def _pieces(self, offset, length):
        """The ``length`` bytes at ``offset``, PIECE_BYTES at a time (fewer if the file shrank)."""
        while length > 0:
            piece = self._read_exact(offset, min(PIECE_BYTES, length))
            if not piece:
                return
            yield piece
            offset += len(piece)
            length -= len(piece)

    def _crc(self, offset, length):
        crc = 0
        for piece in self._pieces(offset, length):
            crc = zlib.crc32(piece, crc)
        return crc & 0xFFFFFFFF

    def _payload(self, frame):
        """The payload of a small chunk, or None if its CRC does not match."""
        payload = self._read_exact(frame.payload_offset, frame.length)
        return payload if zlib.crc32(payload) & 0xFFFFFFFF == frame.payload_crc else None

    def _checked(self, frame):
        """(CRC matches, payload): a small chunk's payload is read once and kept; a large
        one's is only checked, in pieces (None), so memory stays bounded."""
        if frame.length <= PIECE_BYTES:
            payload = self._payload(frame)
            return payload is not None, payload
        return self._crc(frame.payload_offset, frame.length) == frame.payload_crc, None

    def _read_file_header(self):
        data = self._read_exact(0, FILE_HEADER.size)
        if not data:
            raise RecordingError("{!r} is not a neurohand recording: it is empty".format(self.path))
        if len(data) < len(MAGIC) and MAGIC.startswith(data):
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

    # -- what each chunk type holds

    def _take_header(self, frame):
        def refuse(problem):
            raise RecordingError("recording {!r}: header chunk is incomplete or damaged ({}); there is "
                                 "nothing to load".format(self.path, problem))
        if frame.kind != HEAD:
            refuse("first chunk is {}, not HEAD".format(_kind_text(frame.kind)))
        if frame.length > MAX_HEAD_BYTES:
            refuse("it is {} bytes; a header holds at most {}".format(frame.length, MAX_HEAD_BYTES))
        payload = self._payload(frame)
        if payload is None:
            refuse("damaged HEAD chunk (payload CRC mismatch)")
        text, not_utf8 = _utf8(payload)
        try:
            header, replaced = _valid_unicode_json(checks.parse_json(text))
            self.header = _parse_header(header)
        except (ValueError, UsageError) as exc:
            refuse("invalid header: {}".format(exc))
        self.labels = [bytearray() for _ in self.header["label_streams"]]
        self.sample_bytes = len(self.header["channel_names"]) * SIGNAL_DTYPES[self.header["dtype"]].itemsize
        self.chunks += 1
        if not_utf8:
            self._problem(frame.offset, 0, "the header holds bytes that are not UTF-8: they read as U+FFFD")
        if replaced:
            self._problem(frame.offset, 0, "the header holds \\u escapes of lone surrogates (not Unicode "
                                           "text): they read as U+FFFD")

    def _take_chunk(self, frame):
        """Load one chunk after the header; False (with a problem recorded) if it is not usable."""
        kind = frame.kind
        if kind == SIGS:
            return self._take_signals(frame)
        if kind == LABL:
            return self._take_labels(frame)
        if kind == EVNT:
            return self._take_events(frame)
        if kind == DONE:
            return self._check_totals(frame)
        if kind == HEAD:
            return self._skip(frame, "second HEAD chunk at byte {}: skipped".format(frame.offset))
        # Any other type is from a newer minor version: skipped if its CRC holds.
        if self._crc(frame.payload_offset, frame.length) != frame.payload_crc:
            return self._skip(frame, "damaged chunk of unknown type {} at byte {} (payload CRC mismatch): "
                                     "skipped".format(_kind_text(kind), frame.offset))
        return True

    def _skip(self, frame, message):
        self._problem(frame.offset, frame.end - frame.offset, message)
        return False

    def _take_signals(self, frame):
        sample_bytes = self.sample_bytes
        if frame.length % sample_bytes:
            return self._skip(frame, "SIGS chunk at byte {} holds {} bytes, not a whole number of {}-byte "
                                     "samples: skipped; the samples after it follow directly the ones before "
                                     "(if it held any, they are shifted earlier)".format(
                                         frame.offset, frame.length, sample_bytes))
        n = frame.length // sample_bytes
        good = True
        payload_offset = frame.offset + CHUNK_HEADER.size
        if self.verify and self._crc(payload_offset, frame.length) != frame.payload_crc:
            # Its length is trusted (the header CRC holds), so it keeps its
            # place on the time axis; reading its samples raises RecordingError.
            self._problem(frame.offset, frame.end - frame.offset,
                          "damaged SIGS chunk at byte {} (payload CRC mismatch): its samples {}..{} cannot "
                          "be read; the samples after it keep their place".format(
                              frame.offset, self.n_samples, self.n_samples + n))
            good = False
        if n:
            self.signal_offsets.append(payload_offset)
            self.signal_lengths.append(n)
            self.signal_crcs.append(frame.payload_crc)
            self.n_samples += n
        return good

    def _take_labels(self, frame):
        streams = self.header["label_streams"]
        shifted = "; the rows of its stream after it follow directly the ones before (shifted earlier)"
        if frame.length < LABEL_PREFIX.size:
            return self._skip(frame, "LABL chunk at byte {} is too short ({} bytes): skipped{}".format(
                frame.offset, frame.length, shifted))
        good, payload = self._checked(frame)
        if not good:
            return self._skip(frame, "damaged LABL chunk at byte {} (payload CRC mismatch): skipped{}".format(
                frame.offset, shifted))
        prefix = payload[:LABEL_PREFIX.size] if payload is not None else self._read_exact(
            frame.payload_offset, LABEL_PREFIX.size)
        (index,) = LABEL_PREFIX.unpack(prefix)
        if index >= len(streams):
            return self._skip(frame, "LABL chunk at byte {} names stream {} of {}: skipped".format(
                frame.offset, index, len(streams)))
        row_bytes = len(streams[index]["names"]) * LABEL_DTYPE.itemsize
        if (frame.length - LABEL_PREFIX.size) % row_bytes:
            return self._skip(frame, "LABL chunk at byte {} is not a whole number of rows of stream {!r}: "
                                     "skipped{}".format(frame.offset, streams[index]["name"], shifted))
        rows = self.labels[index]
        if payload is not None:
            rows += memoryview(payload)[LABEL_PREFIX.size:]
        else:
            for piece in self._pieces(frame.payload_offset + LABEL_PREFIX.size, frame.length - LABEL_PREFIX.size):
                rows += piece
        return True

    def _take_events(self, frame):
        good, payload = self._checked(frame)
        if not good:
            return self._skip(frame, "damaged EVNT chunk at byte {} (payload CRC mismatch): skipped its events "
                                     "(the events of other chunks are kept)".format(frame.offset))
        events = self.events
        mark = events.mark()
        events.replaced_text = False
        for errors in ("strict", "replace"):
            pieces = [payload] if payload is not None else self._pieces(frame.payload_offset, frame.length)
            dropped, first_bad = 0, None
            try:
                for item in iter_json_array(utf8_text(pieces, errors)):
                    try:
                        events.add(*parse_event(item))
                    except ValueError as exc:
                        dropped += 1
                        first_bad = first_bad or exc
                break
            except UnicodeDecodeError:
                events.roll_back(mark)     # read it again, invalid bytes as U+FFFD
            except ValueError as exc:
                events.roll_back(mark)
                return self._skip(frame, "EVNT chunk at byte {} is not a JSON array of events ({}): skipped "
                                         "its events".format(frame.offset, exc))
        # Kept, in part where noted: the problems are recorded, the chunk counts.
        if errors == "replace":
            self._problem(frame.offset, 0, "EVNT chunk at byte {} holds bytes that are not UTF-8: they read "
                                           "as U+FFFD in its event kinds".format(frame.offset))
        if events.replaced_text:
            self._problem(frame.offset, 0, "EVNT chunk at byte {} holds \\u escapes of lone surrogates (not "
                                           "Unicode text): they read as U+FFFD".format(frame.offset))
        if dropped:
            self._problem(frame.offset, 0, "EVNT chunk at byte {}: dropped {} events that are not "
                                           "[sample, kind, value] ({}); kept its other {}".format(
                                               frame.offset, dropped, first_bad, len(events) - mark[0]))
        return True

    def _check_totals(self, frame):
        if frame.length > MAX_HEAD_BYTES:
            return self._skip(frame, "DONE chunk at byte {} is {} bytes, too large for totals".format(
                frame.offset, frame.length))
        payload = self._payload(frame)
        if payload is None:
            return self._skip(frame, "damaged DONE chunk at byte {} (payload CRC mismatch)".format(frame.offset))
        streams = self.header["label_streams"]
        found = {"n_samples": self.n_samples, "n_events": len(self.events),
                 "label_samples": {s["name"]: len(self.labels[i]) // (len(s["names"]) * LABEL_DTYPE.itemsize)
                                   for i, s in enumerate(streams)}}
        try:
            totals = checks.parse_json(_utf8(payload)[0])
        except ValueError as exc:
            return self._skip(frame, "DONE chunk at byte {} is invalid: {}".format(frame.offset, exc))
        if totals != found:
            # The chunk itself is sound; what it counts was damaged or lost.
            self._problem(frame.offset, 0, "DONE chunk at byte {} promises {} but {} were loaded".format(
                frame.offset, _short(totals), _short(found)))
        return True


def _intact_header(raw):
    """True if the 20 bytes ``raw`` are a chunk header whose CRC holds."""
    return zlib.crc32(raw[:CHUNK_HEADER_CRC_SPAN]) & 0xFFFFFFFF == CHUNK_HEADER.unpack(raw)[3]


def _utf8(payload):
    """(text, True if some bytes were not UTF-8 and now read as U+FFFD)."""
    try:
        return payload.decode("utf-8"), False
    except UnicodeDecodeError:
        return payload.decode("utf-8", "replace"), True


def _valid_unicode_json(value):
    """(``value`` with lone surrogates in its strings replaced, True if any was)."""
    if isinstance(value, str):
        return valid_unicode(value)
    if isinstance(value, list):
        pairs = [_valid_unicode_json(v) for v in value]
        return [v for v, _ in pairs], any(r for _, r in pairs)
    if isinstance(value, dict):
        result, replaced = {}, False
        for key, item in value.items():
            key, key_replaced = valid_unicode(key)
            result[key], item_replaced = _valid_unicode_json(item)
            replaced = replaced or key_replaced or item_replaced
        return result, replaced
    return value, False


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
    events : EventList (a read-only list) of Event, sorted by sample (stable)
    integrity : dict with complete (bool: closed cleanly, nothing damaged),
        chunks (int, chunks kept), bytes_ignored (int, in skipped chunks, gaps
        and the incomplete end), message (str, "complete" or the problems),
        verified (bool, signal CRCs checked on open), file_size (int),
        n_problems (int) and problems (list of dicts: offset, bytes_ignored,
        sample -- signal samples before it --, message; the first 100)
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
            rows, width = scan.labels[index], len(stream["names"])
            # frombuffer over the bytearray: a writable array without a copy.
            data = (np.frombuffer(rows, dtype=LABEL_DTYPE).reshape(-1, width) if rows
                    else np.zeros((0, width), dtype=LABEL_DTYPE))
            self.label_streams[stream["name"]] = LabelStream(
                stream["name"], stream["rate"], list(stream["names"]), data.astype(np.float32, copy=False))
        scan.labels = None
        self.events = scan.events.finish()
        scan.events = None
        self.integrity = dict(scan.integrity)
        self._offsets = _int64_array(scan.signal_offsets)
        self._lengths = _int64_array(scan.signal_lengths)
        self._crcs = _int64_array(scan.signal_crcs)
        # _starts[i] is the first sample of chunk i; _starts[-1] == n_samples.
        self._starts = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(self._lengths, out=self._starts[1:])
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
        parts, got = [], 0
        try:
            self._handle.seek(offset)
            while got < length:
                part = self._handle.read(length - got)
                if not part:
                    break
                parts.append(part)
                got += len(part)
        except OSError as exc:
            raise RecordingError("cannot read recording {!r} at byte {}: {}".format(
                self.path, offset + got, _os_error_text(exc))) from exc
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if len(data) != length or zlib.crc32(data) & 0xFFFFFFFF != int(self._crcs[chunk]):
            raise RecordingError("recording {!r}: signal chunk at byte {} (samples {}..{}) is damaged "
                                 "(CRC mismatch or changed since opening)".format(
                                     self.path, offset - CHUNK_HEADER.size, int(self._starts[chunk]),
                                     int(self._starts[chunk + 1])))
        samples = np.frombuffer(data, dtype=self._disk_dtype).reshape(-1, self.n_channels)
        samples = samples.astype(np.dtype(self.dtype), copy=False)
        self._cached_chunk = (chunk, samples)
        return samples


def _int64_array(values):
    """A packed array('q') as an int64 ndarray, sharing its memory."""
    return np.frombuffer(values, dtype=np.int64) if len(values) else np.zeros(0, dtype=np.int64)
