"""Signal and label quality: live (:class:`ChannelMonitor`, for the displays) and at the end of a
session (:func:`analyse`, :func:`format_text`, :func:`unusable_reason`).

End of session, per channel (from the recording, read in 1 s blocks, so an hour
needs no more memory than a second):

* noise, µV: the robust standard deviation of the first difference, divided by
  sqrt(2) (median absolute deviation x 1.4826): white noise's level, blind to
  slow drift and to the few spikes;
* saturation: the fraction of samples at the ADC's limits (int16 -32768, 32767);
* mains: the power within 1 Hz of 50 Hz and of 60 Hz (Hann-windowed spectra of
  up to :data:`SPECTRUM_BLOCKS` one-second blocks spread over the file), as µV rms
  and as a fraction of the channel's power above 1 Hz; the larger of the two is
  the mains frequency reported;
* flat: a channel whose noise is below :data:`FLAT_COUNTS` counts carries no signal.

Labels: the range each finger used (5th to 95th percentile of the calibrated
glove stream), rows held because the glove was late (``glove_gap`` events);
frames lost (``missing`` events and the link's counters); trials and
repetitions completed.

A session is *unusable* (one line, ``neurohand collect`` exits 1, the file is
kept) when it holds under a second of signal, when every channel is flat or
mostly saturated, when no finger moved over :data:`MIN_USABLE_FINGER_RANGE`, or
when it completed no trial.

numpy and the standard library only (Python 3.6); the PNG is drawn by the
command (deploy/cli/collect.py) where matplotlib is importable.
"""
import collections
import math

import numpy as np

INT16_MIN, INT16_MAX = -32768, 32767
#: One-second blocks whose spectra are averaged for the mains figure (spread over the file).
SPECTRUM_BLOCKS = 60
#: Blocks whose noise is estimated (spread over the file); the median is reported.
NOISE_BLOCKS = 120
MAINS_FREQUENCIES = (50.0, 60.0)
MAINS_HALF_WIDTH_HZ = 1.0
#: Below this noise (ADC counts) a channel is flat: nothing is connected, or the amplifier is off.
FLAT_COUNTS = 0.5
#: Above this fraction of samples at the limits a channel is saturated.
SATURATED_FRACTION = 0.5
#: A finger whose calibrated glove range is below this barely moved (a warning)...
LOW_FINGER_RANGE = 0.3
#: ... and when no finger reaches this, the labels are unusable.
MIN_USABLE_FINGER_RANGE = 0.1
#: Mains above this fraction of a channel's power is worth a warning (ground, cable, shielding).
HIGH_MAINS_FRACTION = 0.5
#: Live view: seconds per trace bucket, buckets shown, seconds behind the live level and saturation.
BUCKET_S = 0.02
TRACE_BUCKETS = 100
LEVEL_BUCKETS = 50


class ChannelMonitor(object):
    """Live per-channel level, saturation and a min/max trace of the last seconds (for the displays).

    ``add(samples)`` with each chip frame, int16 (n, n_channels); ``snapshot()`` gives a
    JSON-able dict: ``rms_uv`` (AC, last second), ``saturation`` (fraction, last second),
    ``trace_min_uv`` / ``trace_max_uv`` (per channel, one value per :data:`BUCKET_S`).
    """

    def __init__(self, n_channels, rate, scale_uv):
        self.n_channels = int(n_channels)
        self.scale = float(scale_uv)
        self._bucket_samples = max(1, int(round(BUCKET_S * float(rate))))
        self._reset_bucket()
        self._levels = collections.deque(maxlen=LEVEL_BUCKETS)      # (n, sum, sumsq, saturated) per channel
        self._trace = collections.deque(maxlen=TRACE_BUCKETS)       # (min, max) per channel

    def _reset_bucket(self):
        c = self.n_channels
        self._n = 0
        self._sum = np.zeros(c)
        self._sumsq = np.zeros(c)
        self._sat = np.zeros(c)
        self._min = np.full(c, np.inf)
        self._max = np.full(c, -np.inf)

    def add(self, samples):
        x = samples.astype(np.float64)
        self._n += x.shape[0]
        self._sum += x.sum(axis=0)
        self._sumsq += (x * x).sum(axis=0)
        self._sat += np.count_nonzero((samples <= INT16_MIN) | (samples >= INT16_MAX), axis=0)
        np.minimum(self._min, x.min(axis=0), out=self._min)
        np.maximum(self._max, x.max(axis=0), out=self._max)
        if self._n >= self._bucket_samples:
            self._levels.append((self._n, self._sum, self._sumsq, self._sat))
            self._trace.append((self._min, self._max))
            self._reset_bucket()

    def snapshot(self):
        if not self._levels:
            return {"rms_uv": [None] * self.n_channels, "saturation": [None] * self.n_channels,
                    "trace_min_uv": [[] for _ in range(self.n_channels)],
                    "trace_max_uv": [[] for _ in range(self.n_channels)]}
        n = sum(level[0] for level in self._levels)
        total = sum(level[1] for level in self._levels)
        squares = sum(level[2] for level in self._levels)
        saturated = sum(level[3] for level in self._levels)
        mean = total / n
        rms = np.sqrt(np.maximum(squares / n - mean * mean, 0.0)) * self.scale
        lows = np.array([t[0] for t in self._trace]) * self.scale
        highs = np.array([t[1] for t in self._trace]) * self.scale
        return {"rms_uv": [round(float(v), 2) for v in rms],
                "saturation": [round(float(v), 4) for v in saturated / n],
                "trace_min_uv": [[round(float(v), 1) for v in lows[:, c]] for c in range(self.n_channels)],
                "trace_max_uv": [[round(float(v), 1) for v in highs[:, c]] for c in range(self.n_channels)]}


def _spread(n_blocks, wanted):
    """Up to ``wanted`` block indices spread evenly over ``n_blocks``."""
    if n_blocks <= wanted:
        return list(range(n_blocks))
    return sorted(set(int(round(i)) for i in np.linspace(0, n_blocks - 1, wanted)))


def analyse(path, counters=None, trials_total=None, done_before=()):
    """The end-of-session report of the recording at ``path`` (a JSON-able dict).

    counters : dict, the session's counters (chip and glove links), reported as they are
    trials_total : int, trials in the protocol;  done_before : trial indices done in earlier files
    """
    from neurohand.firmware_bridge.recording.file_format import open_recording

    with open_recording(path) as recording:
        rate = float(recording.signal_rate)
        n, n_channels = recording.n_samples, recording.n_channels
        scale = np.asarray(recording.scale_uv, dtype=np.float64)
        block = max(1, int(round(rate)))
        n_blocks = n // block
        channels = _channel_figures(recording, rate, block, n_blocks, scale)
        events = recording.events
        missing = sum(e.value for e in events if e.kind == "missing")
        held = sum(e.value for e in events if e.kind == "glove_gap")
        trials_here = sorted({e.value for e in events if e.kind == "trial_done"})
        glove = recording.label_streams.get("glove")
        fingers = {}
        if glove is not None and len(glove.data):
            data = glove.data.astype(np.float64)
            finite = np.all(np.isfinite(data), axis=1)
            data = data[finite]
            for column, name in enumerate(glove.names):
                if len(data):
                    low, high = np.percentile(data[:, column], [5.0, 95.0])
                    fingers[name] = {"p5": round(float(low), 3), "p95": round(float(high), 3),
                                     "range": round(float(high - low), 3)}
                else:
                    fingers[name] = {"p5": None, "p95": None, "range": 0.0}
        meta = recording.metadata if isinstance(recording.metadata, dict) else {}
        integrity = dict(recording.integrity)
        label_rows = 0 if glove is None else int(len(glove.data))
        label_rate = None if glove is None else float(glove.rate)
    repetitions = _repetitions(meta.get("protocol"), set(trials_here) | set(done_before))
    report = {
        "path": path,
        "seconds": round(n / rate, 3),
        "signal_rate": rate,
        "n_channels": n_channels,
        "complete": bool(integrity.get("complete")),
        "channels": channels,
        "fingers": fingers,
        "label_rows": label_rows,
        "label_rate": label_rate,
        "samples_missing": int(missing),
        "glove_rows_held": int(held),
        "trials_done_here": len(trials_here),
        "trials_done_total": len(set(trials_here) | set(done_before)),
        "trials_total": trials_total,
        "repetitions": repetitions,
        "counters": dict(counters or {}),
    }
    report["unusable"] = unusable_reason(report)
    report["warnings"] = _warnings(report)
    return report


def _channel_figures(recording, rate, block, n_blocks, scale):
    n_channels = recording.n_channels
    saturated = np.zeros(n_channels)
    noise_blocks = set(_spread(n_blocks, NOISE_BLOCKS))
    spectrum_blocks = set(_spread(n_blocks, SPECTRUM_BLOCKS))
    noises = []
    spectrum = None
    window = np.hanning(block)
    freqs = np.fft.rfftfreq(block, 1.0 / rate)
    total = 0
    sums = np.zeros(n_channels)
    squares = np.zeros(n_channels)
    for index, counts in enumerate(recording.iter_signal_blocks(block)):
        total += counts.shape[0]
        saturated += np.count_nonzero((counts <= INT16_MIN) | (counts >= INT16_MAX), axis=0)
        x = counts.astype(np.float64)
        sums += x.sum(axis=0)
        squares += (x * x).sum(axis=0)
        if counts.shape[0] != block:
            continue
        if index in noise_blocks:
            d = np.diff(x, axis=0)
            mad = np.median(np.abs(d - np.median(d, axis=0)), axis=0)
            noises.append(1.4826 * mad / math.sqrt(2.0))
        if index in spectrum_blocks:
            centred = (x - x.mean(axis=0)) * window[:, None]
            power = np.abs(np.fft.rfft(centred, axis=0)) ** 2
            spectrum = power if spectrum is None else spectrum + power
    out = []
    noise = np.median(np.array(noises), axis=0) if noises else np.full(n_channels, np.nan)
    if total:
        mean = sums / total
        rms = np.sqrt(np.maximum(squares / total - mean * mean, 0.0))
    else:
        rms = np.full(n_channels, np.nan)
    mains = {}
    if spectrum is not None:
        above = freqs > 1.0
        for hz in MAINS_FREQUENCIES:
            band = np.abs(freqs - hz) <= MAINS_HALF_WIDTH_HZ
            mains[hz] = (spectrum[band].sum(axis=0), spectrum[above].sum(axis=0))
        # Parseval with the Hann window: power in a band as a fraction of the total is what is
        # reported, and its µV rms scales the channel's AC rms by the root of that fraction.
    for c in range(n_channels):
        figure = {"name": recording.channel_names[c],
                  "noise_uv": _round(noise[c] * scale[c]),
                  "rms_uv": _round(rms[c] * scale[c]),
                  "saturation": round(float(saturated[c] / total), 5) if total else None,
                  "flat": bool(total and noise[c] == noise[c] and noise[c] < FLAT_COUNTS and rms[c] < FLAT_COUNTS)}
        if mains:
            fractions = {hz: float(band[c] / above[c]) if above[c] > 0 else 0.0 for hz, (band, above) in mains.items()}
            hz = max(fractions, key=lambda k: fractions[k])
            figure["mains_hz"] = hz
            figure["mains_fraction"] = round(fractions[hz], 4)
            figure["mains_uv"] = _round(math.sqrt(fractions[hz]) * rms[c] * scale[c])
        else:
            figure.update(mains_hz=None, mains_fraction=None, mains_uv=None)
        out.append(figure)
    return out


def _round(value, digits=3):
    value = float(value)
    return round(value, digits) if value == value else None


def _repetitions(protocol_config, done):
    """{"complete": repetitions with every trial done, "total": repetitions} across the chain."""
    if not isinstance(protocol_config, dict):
        return {"complete": None, "total": None}
    from neurohand.deploy.collect.protocol import Protocol
    from neurohand.deploy.collect.schedule import trial_order
    try:
        protocol = Protocol.from_config(protocol_config)
    except Exception:   # a damaged header is reported by the reader; the count is a courtesy
        return {"complete": None, "total": None}
    per = collections.defaultdict(set)
    for trial in trial_order(protocol):
        per[trial.repetition].add(trial.index)
    complete = sorted(r for r, trials in per.items() if trials <= done)
    return {"complete": len(complete), "total": protocol.repetitions, "numbers": complete}


def unusable_reason(report):
    """One line saying why the session cannot be trained on, or None."""
    if report["seconds"] < 1.0:
        return "the recording holds {:.2f} s of signal, under the 1 s needed".format(report["seconds"])
    channels = report["channels"]
    bad = [c for c in channels if c["flat"] or (c["saturation"] or 0.0) > SATURATED_FRACTION]
    if channels and len(bad) == len(channels):
        return "every channel is flat or saturated more than {:.0f} % of the time: check the electrodes, the " \
               "cable and the chip".format(100 * SATURATED_FRACTION)
    fingers = report["fingers"]
    if not fingers or report["label_rows"] == 0:
        return "the recording has no glove labels"
    best = max((f["range"] or 0.0) for f in fingers.values())
    if best < MIN_USABLE_FINGER_RANGE:
        return "no finger moved over {:.0%} of its calibrated range (largest {:.0%}): the labels are " \
               "unusable; check the glove and its calibration".format(MIN_USABLE_FINGER_RANGE, best)
    if report["trials_done_here"] == 0:
        return "no trial was completed"
    return None


def _warnings(report):
    out = []
    for c in report["channels"]:
        if c["flat"]:
            out.append("channel {} is flat (noise {} uV): nothing connected?".format(c["name"], c["noise_uv"]))
        elif (c["saturation"] or 0.0) > 0.01:
            out.append("channel {} is saturated {:.1%} of the time".format(c["name"], c["saturation"]))
        if (c.get("mains_fraction") or 0.0) > HIGH_MAINS_FRACTION:
            out.append("channel {}: {:.0%} of its power is mains ({:g} Hz): check grounding and shielding".format(
                c["name"], c["mains_fraction"], c["mains_hz"]))
    for name, finger in report["fingers"].items():
        if (finger["range"] or 0.0) < LOW_FINGER_RANGE:
            out.append("the {} used only {:.0%} of its calibrated range".format(name, finger["range"] or 0.0))
    if report["samples_missing"]:
        out.append("{} chip samples were lost (written as zeros, marked 'missing')".format(report["samples_missing"]))
    if report["label_rows"] and report["glove_rows_held"] > 0.01 * report["label_rows"]:
        out.append("{} label rows ({:.1%}) held the last glove value because the glove was late".format(
            report["glove_rows_held"], report["glove_rows_held"] / float(report["label_rows"])))
    if not report["complete"]:
        out.append("the recording did not end cleanly")
    return out


def format_text(report):
    """The report as text (what the command prints and writes next to the recording)."""
    lines = ["Session quality: {}".format(report["path"]),
             "  {:.1f} s of signal, {} channels at {:g} Hz; {} label rows at {} Hz".format(
                 report["seconds"], report["n_channels"], report["signal_rate"], report["label_rows"],
                 "-" if report["label_rate"] is None else "{:g}".format(report["label_rate"]))]
    total = report["trials_total"]
    reps = report["repetitions"]
    lines.append("  trials completed: {} in this file, {} of {} in the protocol{}".format(
        report["trials_done_here"], report["trials_done_total"], "?" if total is None else total,
        "" if reps.get("total") is None else "; repetitions complete: {} of {}".format(reps["complete"],
                                                                                      reps["total"])))
    counters = report["counters"]
    lost_frames = counters.get("chip_parser_frames_missing", 0) + counters.get("chip_frames_dropped_queue_full", 0)
    lines.append("  chip: {} samples lost ({} frames missing, {} CRC errors, {} resyncs, {} reconnects)".format(
        report["samples_missing"], lost_frames, counters.get("chip_parser_crc_errors", 0),
        counters.get("chip_parser_resyncs", 0), counters.get("chip_link_reconnects", 0)))
    lines.append("  glove: {} samples, {} lost, {} CRC errors, {} resyncs; {} label rows held".format(
        counters.get("glove_samples", 0), max(counters.get("glove_lost", 0), counters.get("glove_sequence_lost", 0)),
        counters.get("glove_crc_errors", 0), counters.get("glove_resyncs", 0), report["glove_rows_held"]))
    lines.append("  channel      noise uV   rms uV  saturated  mains")
    for c in report["channels"]:
        mains = "-" if c["mains_hz"] is None else "{:.0%} at {:g} Hz ({} uV)".format(
            c["mains_fraction"], c["mains_hz"], c["mains_uv"])
        lines.append("  {:<10} {:>9} {:>8} {:>9.2%}  {}{}".format(
            c["name"], _fmt(c["noise_uv"]), _fmt(c["rms_uv"]), c["saturation"] or 0.0, mains,
            "  FLAT" if c["flat"] else ""))
    lines.append("  finger   range used (5th-95th percentile)")
    for name, f in report["fingers"].items():
        lines.append("  {:<8} {:>5.0%}  ({} .. {})".format(name, f["range"] or 0.0, _fmt(f["p5"]), _fmt(f["p95"])))
    for warning in report["warnings"]:
        lines.append("  warning: " + warning)
    lines.append("  verdict: " + ("UNUSABLE: " + report["unusable"] if report["unusable"] else "usable"))
    return "\n".join(lines) + "\n"


def _fmt(value):
    return "-" if value is None else "{:.2f}".format(value)
