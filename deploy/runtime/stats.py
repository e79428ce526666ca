"""Instrumentation with bounded memory: stage timings and end-to-end latency.

Each :class:`Distribution` is written by exactly one thread (the reader, the
decoder or the writer) and read by the main thread for the status line and
the final JSON, so it takes no lock: a status line computed while a value is
being added is off by that one value at most.

Memory is fixed at construction.  The first ``capacity`` values are kept
exactly (a 10-minute run at 50 Hz is 30 000 windows, inside the default of
65 536); after that a uniform reservoir sample (Vitter's algorithm R, with a
seeded generator so runs are repeatable) stands for all of them.  ``max`` and
``count`` are always exact.  A short ring of recent values feeds the status
line, so printing it does not sort the whole reservoir while the decoder runs.
"""
import random

import numpy as np

#: Values kept exactly before reservoir sampling starts.
DEFAULT_CAPACITY = 65536
#: Values behind the status line's "recent" percentiles.
RECENT_CAPACITY = 512
#: Stages timed, in the order data flows through them.
# prepare: the next RNN step's recurrent half, computed once a command is on its way (Backend.prepare).
STAGES = ("read", "parse", "dsp_features", "inference", "postprocess", "write", "prepare")


class Distribution(object):
    """Bounded-memory record of durations in seconds, summarised in µs."""

    def __init__(self, capacity=DEFAULT_CAPACITY, recent=RECENT_CAPACITY, seed=0):
        self._values = np.zeros(int(capacity), dtype=np.float64)
        self._recent = np.zeros(int(recent), dtype=np.float64)
        self._random = random.Random(seed)
        self.count = 0
        self.max_s = 0.0

    def add(self, seconds):
        """Record one duration (seconds)."""
        count = self.count
        capacity = self._values.shape[0]
        if count < capacity:
            self._values[count] = seconds
        else:
            slot = self._random.randrange(count + 1)
            if slot < capacity:
                self._values[slot] = seconds
        self._recent[count % self._recent.shape[0]] = seconds
        self.count = count + 1
        if seconds > self.max_s:
            self.max_s = seconds

    def summary(self, percentiles=(50, 90, 99)):
        """``{"p50": µs, ..., "max": µs, "count": n}``; percentiles are None when empty."""
        kept = self._values[:min(self.count, self._values.shape[0])]
        return _summarise(kept, percentiles, self.count, self.max_s)

    def recent_summary(self, percentiles=(50, 99)):
        """Like :meth:`summary` over the most recent values only (status line)."""
        kept = self._recent[:min(self.count, self._recent.shape[0])].copy()
        return _summarise(kept, percentiles, self.count, float(kept.max()) if kept.size else 0.0)


def _summarise(values, percentiles, count, max_s):
    result = {}
    if values.size:
        points = np.percentile(values, percentiles)
        for p, v in zip(percentiles, points):
            result["p{}".format(p)] = round(float(v) * 1e6, 1)
    else:
        for p in percentiles:
            result["p{}".format(p)] = None
    result["max"] = round(max_s * 1e6, 1) if count else None
    result["count"] = int(count)
    return result


class RuntimeStats(object):
    """All timings of one run plus the counters that are not owned by a stage.

    Attributes
    ----------
    latency : Distribution
        Arrival of the window's last byte (reader's monotonic stamp) to the
        return of ``hand.send`` for that window's command.
    stages : dict name -> Distribution
        Time per call of each stage in :data:`STAGES`.
    """

    def __init__(self, capacity=DEFAULT_CAPACITY):
        self.latency = Distribution(capacity)
        self.stages = {name: Distribution(capacity, seed=i + 1) for i, name in enumerate(STAGES)}

    def stage_summary(self):
        """``{stage: {"p50", "p90", "p99", "max", "count"}}`` in µs."""
        return {name: dist.summary() for name, dist in self.stages.items()}


def build_stats_document(stats, frames, decoder_counters, writer_counters, safety, extra=None):
    """Assemble the ``--stats-json`` document (plain JSON types only).

    Parameters
    ----------
    stats : RuntimeStats
    frames : dict
        ``received``, ``missing``, ``corrupt``, ``resyncs`` (and optionally more).
    decoder_counters, writer_counters : dict
        Counters of the decode and writer stages.
    safety : dict
        ``SafetySupervisor.summary()``.
    extra : dict or None
        Anything else to include (mode, duration, recording, hand counters).
    """
    document = {
        "latency_us": stats.latency.summary(),
        "stage_us": stats.stage_summary(),
        "frames": dict(frames),
        "windows": {"decoded": decoder_counters["windows_decoded"],
                    "skipped": decoder_counters["windows_skipped"]},
        "skips": decoder_counters["windows_skipped"],
        "decoder": dict(decoder_counters),
        "safety_events": safety,
        "commands_sent": writer_counters["commands_sent"],
        "writer": dict(writer_counters),
    }
    document.update(extra or {})
    return document


def format_status_line(elapsed_s, stats, frames, decoder_counters, writer_counters, safety_state,
                       recording_error=None, decided_class=None):
    """One short human line for stderr (recent latency, counts, safety state, the movement class the hand was
    last told where the model has a class head (``decided_class``, a name), a stopped recording)."""
    recent = stats.latency.recent_summary()
    inference = stats.stages["inference"].recent_summary()
    return ("[{:7.1f} s] {} | latency p50 {} p99 {} µs | inference p50 {} µs | frames {} missing {} "
            "corrupt {} | windows {} skipped {} | sent {}").format(
        elapsed_s, safety_state, _us(recent["p50"]), _us(recent["p99"]), _us(inference["p50"]),
        frames.get("received", 0), frames.get("missing", 0), frames.get("corrupt", 0),
        decoder_counters["windows_decoded"], decoder_counters["windows_skipped"],
        writer_counters["commands_sent"]) + (
        "" if decided_class is None else " | class {}".format(decided_class)) + (
        "" if recording_error is None else " | RECORDING STOPPED: {}".format(recording_error))


def _us(value):
    return "-" if value is None else "{:.0f}".format(value)
