"""``--lsl-outlet NAME``: the run's decoded finger positions (and, asked for, its raw signals) over LSL.

Two streams, each with the XDF metadata conventions (``desc/channels/channel``
with ``label``, ``unit``, ``type``; ``desc/acquisition``), so LabRecorder,
games and visualisers read them as they are:

* ``NAME`` (type ``Control``): one channel per finger (``thumb`` ... in the
  decoder's order), unit ``normalized`` (0 = open, 1 = flexed), nominal rate
  the decoder's step rate.  One sample per decoded window that reached the
  hand: the positions the hand was told (the decoded command, or the safe
  posture while the safety rules hold the hand there).
* ``NAME-signals`` (type ``ENG``, with ``signals=True``): every sample the run
  decodes, in microvolts, channel labels as in the bundle, at the signal rate;
  nothing is sent for samples that never arrived (LSL consumers see the gap
  in the timestamps).

**Timestamps** are on LSL's clock (``pylsl.local_clock``) and say when the
data arrived: a command's sample is stamped with the arrival of the bytes
that completed its window, a signal chunk's last sample with the arrival of
that chunk (earlier samples back-dated at the nominal rate by liblsl).  The
runtime stamps arrivals with its own monotonic clock; :meth:`LslOutlets.bind`
measures the offset between that clock and LSL's once (the closest of a few
paired reads) and every timestamp is converted with it.  On Linux both are
CLOCK_MONOTONIC, so the offset is ~0 and cannot drift.

Publishing happens after the hand was written (the writer thread) and after
a batch was decoded (the decode thread), never before: it is not in the
decode-to-hand path.  A failing push is counted (``push_errors``) and never
stops the run.  pylsl is imported only in :meth:`LslOutlets.open`.
"""
import numpy as np

from neurohand.firmware_bridge.shared.errors import ConfigError, UsageError

#: Stream types, after the XDF list of content types ("ENG": electroneurogram, the chip's signals).
POSITIONS_TYPE = "Control"
SIGNALS_TYPE = "ENG"
#: Seconds of data an outlet keeps for a consumer that is slow to read.
POSITIONS_BUFFER_S = 60
SIGNALS_BUFFER_S = 10
#: Paired clock reads when the offset is measured.
OFFSET_READS = 20


def check_stream_name(option, name):
    """``name`` if it is a usable LSL stream name (printable, no quotes: resolvers query it); else UsageError."""
    if not isinstance(name, str) or not name.strip() or len(name) > 100 or \
            any(c in name for c in "'\"\\") or any(ord(c) < 32 for c in name):
        raise UsageError("{} must be a stream name of at most 100 printable characters without quotes or "
                         "backslashes, but got {!r}".format(option, name))
    return name


def measure_offset(lsl_clock, clock, reads=OFFSET_READS):
    """``lsl_clock() - clock()`` from the tightest of ``reads`` bracketed reads (seconds)."""
    best = None
    for _ in range(reads):
        before = clock()
        lsl_now = lsl_clock()
        after = clock()
        if best is None or after - before < best[0]:
            best = (after - before, lsl_now - 0.5 * (before + after))
    return best[1]


class LslOutlets(object):
    """The run's LSL outlets; see the module docstring.

    Parameters
    ----------
    name : str, the positions stream's name (``--lsl-outlet``)
    output_names : list of str, one label per decoder output (finger names)
    step_rate_hz : float, decoded windows per second (nominal rate of the positions stream)
    channel_names : list of str or None, the signal channels' labels (needed with ``signals``)
    signal_rate_hz : float or None, samples per second per channel (needed with ``signals``)
    signals : bool, also publish the raw signals as ``NAME-signals``
    source_id : str or None, LSL's source_id (lets consumers pick the stream up again after a restart)

    The constructor stores the configuration; :meth:`open` creates the
    outlets (opens sockets), :meth:`bind` ties them to the run's clock and the
    chip's scale, :meth:`close` destroys them.
    """

    def __init__(self, name, output_names, step_rate_hz, channel_names=None, signal_rate_hz=None, signals=False,
                 source_id=None):
        self.name = name
        self.output_names = [str(n) for n in output_names]
        self.step_rate_hz = float(step_rate_hz)
        self.channel_names = None if channel_names is None else [str(n) for n in channel_names]
        self.signal_rate_hz = None if signal_rate_hz is None else float(signal_rate_hz)
        self.signals = bool(signals)
        self.source_id = source_id or "neurohand:{}".format(name)
        if self.signals and (self.channel_names is None or self.signal_rate_hz is None):
            raise ValueError("publishing the signals needs their channel names and rate")
        self.offset_s = None
        self._pylsl = None
        self._positions = None
        self._signals = None
        self._scale = None
        self.counters = {"positions_pushed": 0, "signal_chunks_pushed": 0, "signal_samples_pushed": 0,
                         "push_errors": 0}

    @property
    def n_outputs(self):
        return len(self.output_names)

    def open(self):
        """Create the outlets; UsageError when pylsl or liblsl is missing.  Returns self."""
        try:
            import pylsl
        except ImportError as exc:
            raise UsageError("--lsl-outlet needs pylsl and liblsl (pip install 'neurohand[lab]'; on a Jetson see "
                             "docs/lab-streams.md): {}".format(exc)) from None
        self._pylsl = pylsl
        self._positions = pylsl.StreamOutlet(
            self._info(self.name, POSITIONS_TYPE, self.output_names, "normalized", "Position", self.step_rate_hz,
                       pylsl.cf_float32, self.source_id),
            0, POSITIONS_BUFFER_S)
        if self.signals:
            self._signals = pylsl.StreamOutlet(
                self._info(self.name + "-signals", SIGNALS_TYPE, self.channel_names, "microvolts", SIGNALS_TYPE,
                           self.signal_rate_hz, pylsl.cf_float32, self.source_id + ":signals"),
                0, SIGNALS_BUFFER_S)
        return self

    def _info(self, name, kind, labels, unit, channel_type, rate, channel_format, source_id):
        info = self._pylsl.StreamInfo(name, kind, len(labels), rate, channel_format, source_id)
        desc = info.desc()
        channels = desc.append_child("channels")
        for label in labels:
            channel = channels.append_child("channel")
            channel.append_child_value("label", label)
            channel.append_child_value("unit", unit)
            channel.append_child_value("type", channel_type)
        acquisition = desc.append_child("acquisition")
        acquisition.append_child_value("manufacturer", "neurohand")
        acquisition.append_child_value("model", "neurohand run")
        return info

    def bind(self, clock, scale_uv, n_outputs):
        """Tie the outlets to the run: its monotonic ``clock`` (arrival stamps), the chip's µV per count
        (one per channel), and its output count (ConfigError if it is not this stream's)."""
        if self._positions is None:
            raise ConfigError("the LSL outlets are not open")
        if int(n_outputs) != self.n_outputs:
            raise ConfigError("the LSL outlet {!r} has {} channels but the decoder has {} outputs".format(
                self.name, self.n_outputs, n_outputs))
        self._scale = np.asarray(scale_uv, dtype=np.float32).reshape(1, -1)
        if self.signals and self._scale.shape[1] != len(self.channel_names):
            raise ConfigError("the LSL outlet {!r} has {} signal channels but the chip has {}".format(
                self.name, len(self.channel_names), self._scale.shape[1]))
        self.offset_s = measure_offset(self._pylsl.local_clock, clock)
        return self

    def publish_positions(self, positions, arrival_s):
        """One sample: ``positions`` (n_outputs,) the hand was told, for data that arrived at ``arrival_s``."""
        try:
            self._positions.push_sample(np.asarray(positions, dtype=np.float64).tolist(), arrival_s + self.offset_s)
            self.counters["positions_pushed"] += 1
        except Exception:  # never the run's problem: counted
            self.counters["push_errors"] += 1

    def publish_frames(self, items):
        """The signal samples of a decoded batch (``(event, arrival_s)`` pairs; gaps and replies skipped)."""
        outlet = self._signals
        if outlet is None:
            return
        scale = self._scale
        for event, arrival_s in items:
            samples = getattr(event, "samples", None)
            if samples is None or samples.ndim != 2 or samples.shape[1] != scale.shape[1]:
                continue
            try:
                outlet.push_chunk(np.multiply(samples, scale, dtype=np.float32), arrival_s + self.offset_s)
                self.counters["signal_chunks_pushed"] += 1
                self.counters["signal_samples_pushed"] += samples.shape[0]
            except Exception:  # never the run's problem: counted
                self.counters["push_errors"] += 1

    def summary(self):
        """For the stats document: names, the clock offset, the counters."""
        summary = {"name": self.name, "signals": (self.name + "-signals") if self.signals else None,
                   "clock_offset_s": self.offset_s}
        summary.update(self.counters)
        return summary

    def close(self):
        """Destroy the outlets (consumers see the streams end).  Safe to call twice."""
        self._positions = self._signals = None
