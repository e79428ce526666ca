"""Fast replay on two CPUs: the features computed ahead in a second process.

In ``replay --fast`` about two thirds of the time goes to the DSP and
features (filter, FFT band powers, block sums), the rest to the per-window
work (RNN step, post-processing, writer).  Neither depends on the other's
results -- the feature stream never sees the decoder's output -- so a child
process reads the recording and runs the feature stream, one item ahead,
while this process decodes the previous item.

Threads would not do: the per-window work is many small numpy calls that
hold the GIL, and a feature thread waiting for it loses up to a switch
interval (5 ms) each time (tried: no faster than one thread).

The child runs the very objects of the one-process path: a fresh
``pipeline.stream()`` (built here, so its imports are done once, and
inherited by ``fork``) on the items of :func:`~.replay.recording_items`, each frame scaled
to microvolts as :class:`~.decode.DecodeStage` scales it.  It sends each item
with its result; this process hands the items to :func:`~.fast.run_fast` and
the result to the decode stage through :class:`PrefetchedStream`, which
answers ``push`` with the result computed for the item being processed.  So
an item and its features cannot come apart, and the decoded commands are the
same numbers as with one process (tests/device/test_feature_worker.py).

Messages are bytes in a format of this module (a JSON header, then the
arrays' raw bytes), not pickles: nothing in neurohand unpickles
(docs/safety.md), not even from its own child.  Only where ``fork`` exists
(Linux, the Jetson): the child inherits the stream and starts in milliseconds.
Signals: the child ignores SIGINT (Ctrl-C reaches the whole process group:
this process stops and closes the pipe, and the child ends on the broken
pipe, as it does when this process dies), and takes the default action for
SIGTERM (what :meth:`FeatureWorker.close` sends if it has to).
"""
import builtins
import json
import multiprocessing
import os
import struct
import signal
import sys
import time
import warnings

import numpy as np

from neurohand.firmware_bridge.shared import errors
from neurohand.firmware_bridge.chip.parser import SampleFrame, SampleGap


def fork_available():
    """True where a child process can be forked (the worker's only start method)."""
    return "fork" in multiprocessing.get_all_start_methods()


def usable_cpus():
    """CPUs this process may run on (its affinity where the OS tells, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_jobs():
    """2 where a second CPU and ``fork`` are there, else 1."""
    return 2 if fork_available() and usable_cpus() >= 2 else 1


class FeatureWorkerError(errors.NeurohandError):
    """The feature worker process failed outside the feature stream, or died (one line for the CLI)."""


class PrefetchedStream(object):
    """Stands in for the feature stream in the decode stage: ``push`` returns what the worker computed.

    ``counters`` are the worker stream's counters as of the current item.
    """

    def __init__(self):
        self._result = None
        self.counters = {}

    def _set(self, result, counters):
        self._result = result
        self.counters = counters

    def push(self, block):
        result = self._result
        if result is None:
            raise FeatureWorkerError("the decode stage pushed a block the feature worker did not compute")
        self._result = None
        if result[0] == "error":
            raise result[1]
        features, ends, n_samples = result[1], result[2], result[3]
        if n_samples != len(block):
            raise FeatureWorkerError("the feature worker computed {} samples for a block of {}".format(
                n_samples, len(block)))
        return features, ends

    def push_gap(self, n_missing):
        """The worker pushed the gap into its stream; only its failure, if any, is raised here."""
        result = self._result
        self._result = None
        if result is not None and result[0] == "error":
            raise result[1]


class FeatureWorker(object):
    """A child process running ``stream`` over ``make_items()``.

    Parameters
    ----------
    stream : a fresh feature stream (``push``, ``push_gap``, ``counters``); only the child uses it
    make_items : callable () -> iterable of ``(event, t_s)`` (opened in the child)
    scale_uv : array (n_channels,), µV per count, as the decode stage scales frames

    Use as a context manager; :meth:`items` yields the items in order,
    :attr:`stream` is the decode stage's stream.  :attr:`dsp_s` is the time
    the child spent in the stream (real seconds), known once the items end.
    """

    def __init__(self, stream, make_items, scale_uv):
        self._feature_stream = stream
        self._make_items = make_items
        self._scale = np.asarray(scale_uv, dtype=np.float64).reshape(-1)
        self.stream = PrefetchedStream()
        self.dsp_s = None
        self._process = None
        self._connection = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self):
        context = multiprocessing.get_context("fork")
        receiving, sending = context.Pipe(duplex=False)
        # Whatever this process has buffered would otherwise be written twice.
        sys.stdout.flush()
        sys.stderr.flush()
        self._connection = receiving
        self._process = context.Process(target=self._child, args=(sending,), name="neurohand-features",
                                        daemon=True)
        self._process.start()
        sending.close()

    def items(self):
        """Yield the items in order; each one's features are current in :attr:`stream` while it is processed."""
        while True:
            try:
                header, arrays = decode_message(self._connection.recv_bytes())
            except EOFError:
                self._process.join(1.0)
                raise FeatureWorkerError("the feature worker process ended unexpectedly (exit code {}; killed for "
                                         "memory?); --jobs 1 replays in one process".format(
                                             self._process.exitcode)) from None
            kind = header["kind"]
            if kind == "item":
                item, result = _item_from(header, arrays)
                self.stream._set(result, header["counters"])
                yield item
            elif kind == "end":
                self.dsp_s = header["dsp_s"]
                return
            else:           # "fatal": the child could not open or read the items
                raise exception_from(header["error"])

    def close(self):
        """Stop the child (if still running) and release the pipe."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        process = self._process
        if process is not None:
            process.join(0.5)
            if process.is_alive():
                process.terminate()
                process.join(2.0)
            self._process = None

    def _child(self, connection):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # The parent has already warned about the recording (e.g. a truncated end) when it opened it.
        warnings.simplefilter("ignore")
        # The parent's end, inherited: closed, so that once the parent is gone
        # (killed, crashed) a send fails instead of waiting for a reader forever.
        self._connection.close()
        try:
            self._serve(connection)
        except (BrokenPipeError, EOFError):
            pass            # the parent stopped listening: nothing left to do
        except BaseException as exc:   # reported to the parent, which raises it
            try:
                connection.send_bytes(encode_message({"kind": "fatal", "error": describe_exception(exc)}))
            except Exception:
                pass
        finally:
            connection.close()

    def _serve(self, connection):
        stream = self._feature_stream
        scale = self._scale
        block = np.zeros((0, len(scale)), dtype=np.float64)
        dsp_s = 0.0
        for item in self._make_items():
            event = item[0]
            result = None
            if isinstance(event, SampleFrame) and event.samples.ndim == 2 and event.samples.shape[1] == len(scale):
                n = event.samples.shape[0]
                if n > block.shape[0]:
                    block = np.zeros((n, len(scale)), dtype=np.float64)
                scaled = block[:n]
                started = time.perf_counter()
                np.multiply(event.samples, scale, out=scaled)
                try:
                    features, ends = stream.push(scaled)
                    result = ("ok", features, ends, n)
                except Exception as exc:   # the decode stage turns it into a fault, as in one process
                    result = ("error", exc)
                dsp_s += time.perf_counter() - started
            elif isinstance(event, SampleGap) and event.missing_samples > 0:
                try:
                    stream.push_gap(event.missing_samples)
                except Exception as exc:
                    result = ("error", exc)
            connection.send_bytes(_item_message(item, result, getattr(stream, "counters", {})))
        connection.send_bytes(encode_message({"kind": "end", "dsp_s": dsp_s}))


# --- messages: a JSON header, then raw arrays ------------------------------------------
# <u4 header length> <header JSON, UTF-8> <array bytes, in the order of header["arrays"]>

def encode_message(header, arrays=()):
    """``header`` (JSON-able dict) and numpy ``arrays`` as one bytes message; the header lists their layout."""
    arrays = [np.ascontiguousarray(array) for array in arrays]
    header = dict(header, arrays=[[array.dtype.str, list(array.shape)] for array in arrays])
    text = json.dumps(header, allow_nan=False).encode("utf-8")
    return b"".join([struct.pack("<I", len(text)), text] + [array.tobytes() for array in arrays])


def decode_message(data):
    """Inverse of :func:`encode_message`: (header dict, list of read-only arrays)."""
    (length,) = struct.unpack_from("<I", data, 0)
    header = json.loads(data[4:4 + length].decode("utf-8"))
    arrays, offset = [], 4 + length
    for dtype, shape in header.pop("arrays"):
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        arrays.append(np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape))
        offset += count * dtype.itemsize
    if offset != len(data):
        raise FeatureWorkerError("a feature worker message has {} bytes, its header describes {}".format(
            len(data), offset))
    return header, arrays


def _item_message(item, result, counters):
    event, t_s = item
    header = {"kind": "item", "t_s": float(t_s), "counters": {key: int(value) for key, value in counters.items()}}
    arrays = []
    if isinstance(event, SampleFrame):
        header["event"] = {"type": "frame", "sequence": int(event.sequence),
                           "device_time_us": int(event.device_time_us), "stream_start": bool(event.stream_start)}
        arrays.append(event.samples)
    else:
        header["event"] = {"type": "gap", "first_missing_sequence": int(event.first_missing_sequence),
                           "missing_frames": int(event.missing_frames or 0),
                           "missing_samples": int(event.missing_samples)}
    if result is None:
        header["result"] = None
    elif result[0] == "ok":
        header["result"] = {"ok": int(result[3])}
        arrays += [result[1], result[2]]
    else:
        header["result"] = {"error": describe_exception(result[1])}
    return encode_message(header, arrays)


def _item_from(header, arrays):
    """((event, t_s), result for PrefetchedStream) from an item message."""
    event = header["event"]
    if event["type"] == "frame":
        samples, arrays = arrays[0], arrays[1:]
        item = (SampleFrame(event["sequence"], event["device_time_us"], samples, event["stream_start"]),
                header["t_s"])
    else:
        item = (SampleGap(event["first_missing_sequence"], event["missing_frames"], event["missing_samples"]),
                header["t_s"])
    result = header["result"]
    if result is None:
        return item, None
    if "error" in result:
        return item, ("error", exception_from(result["error"]))
    return item, ("ok", arrays[0], arrays[1], result["ok"])


def describe_exception(exc):
    """An exception as JSON: its class name, its arguments where they are plain values, and its text."""
    plain = all(arg is None or isinstance(arg, (str, int, bool))
                or (isinstance(arg, float) and arg - arg == 0.0) for arg in exc.args)   # JSON has no NaN
    return {"type": type(exc).__name__, "args": list(exc.args) if plain else [str(exc)], "message": str(exc)}


def exception_from(description):
    """The exception a child described: the same class where it is neurohand's or a builtin one."""
    name = description["type"]
    kind = getattr(errors, name, None) or getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(*description["args"])
        except Exception:
            pass
    return FeatureWorkerError("{}: {}".format(name, description["message"]))
