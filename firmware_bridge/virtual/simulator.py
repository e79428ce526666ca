"""Synthetic intrafascicular nerve recordings with finger labels (``neurohand simulate``).

The recording is the sum, in microvolts, of

* spikes of finger-tuned units (see :mod:`simulator_units`) driven by the
  patient's intended movement (see :mod:`simulator_protocol`),
* amplifier noise (white, a few microvolts rms),
* mains interference at 50 Hz (or 60) with harmonics,
* slow baseline drift,
* occasional motion artefacts, large and slow, some beyond the ADC's range,

quantised to int16 at 0.195 uV/count (Intan RHD2000) with real clipping.  The
labels are the data glove's finger flexions at 100 Hz.

Reproducibility: every random draw comes from a stream keyed by
``(seed, purpose, segment)`` where a segment is a fixed run of
``SEGMENT_SAMPLES`` signal samples, and everything else is a function of the
absolute sample index.  Any sample range can therefore be generated on its own
and equals the same range cut out of a longer generation, bit for bit, whatever
the block size.  See docs/simulator.md.
"""
import math

import numpy as np

from neurohand.firmware_bridge.shared import checks
from neurohand.firmware_bridge.shared.errors import UsageError
from neurohand.firmware_bridge.virtual.movements import FINGERS, make_protocol, trajectories
from neurohand.firmware_bridge.virtual.units import draw_spikes, make_units, render_spikes

# Bump when the same seed would give different data (it is stored in metadata).
SIMULATOR_VERSION = 1

SCALE_UV = 0.195                 # uV per count, Intan RHD2000
INT16_MIN, INT16_MAX = -32768, 32767
LABEL_RATE = 100.0               # Hz, the glove
LABEL_STREAM = "fingers"
MAX_SECONDS = 86400.0            # a day; the protocol and drift are drawn up front
SEGMENT_SAMPLES = 4096           # unit of random draws; never depends on the block size
DRIFT_KNOT_S = 0.5
MAINS_HARMONICS = ((1, 1.0), (2, 0.08), (3, 0.30), (4, 0.04), (5, 0.12))   # (order, relative amplitude)

# Independent random streams, so adding draws to one leaves the others alone.
_STREAM_PROTOCOL, _STREAM_UNITS, _STREAM_DRIFT, _STREAM_MAINS, _STREAM_ARTEFACTS = 1, 2, 3, 4, 5
_STREAM_NOISE, _STREAM_SPIKES = 10, 11


class SimulatorConfig(object):
    """What to simulate.  Stores and validates settings; builds nothing.

    seconds: duration; n_channels: electrode sites; rate: samples/s per channel;
    seed: non-negative int; mains_hz: 50 or 60; noise_uv: amplifier noise, uV rms;
    mains_uv: mean 50/60 Hz amplitude per channel, uV; drift_uv: baseline drift, uV rms;
    artefact_interval_s: mean time between motion artefacts (0 = none);
    units_per_channel / hash_per_channel: large and background units per channel.
    """

    def __init__(self, seconds, n_channels=16, rate=10000.0, seed=0, mains_hz=50.0, noise_uv=3.0,
                 mains_uv=25.0, drift_uv=30.0, artefact_interval_s=15.0, units_per_channel=4,
                 hash_per_channel=16):
        self.seconds = checks.check_number("seconds", seconds, minimum=0.0, exclusive_minimum=True,
                                           maximum=MAX_SECONDS)
        self.n_channels = checks.check_int("channels", n_channels, minimum=1, maximum=256)
        self.rate = checks.check_number("rate", rate, minimum=1000.0, maximum=50000.0)
        self.seed = checks.check_int("seed", seed, minimum=0, maximum=2 ** 63 - 1)
        self.mains_hz = float(checks.check_option("mains", mains_hz, (50, 60)))
        self.noise_uv = checks.check_number("noise_uv", noise_uv, minimum=0.0)
        self.mains_uv = checks.check_number("mains_uv", mains_uv, minimum=0.0)
        self.drift_uv = checks.check_number("drift_uv", drift_uv, minimum=0.0)
        self.artefact_interval_s = checks.check_number("artefact_interval_s", artefact_interval_s, minimum=0.0)
        self.units_per_channel = checks.check_int("units_per_channel", units_per_channel, minimum=0)
        self.hash_per_channel = checks.check_int("hash_per_channel", hash_per_channel, minimum=0)
        if self.seconds * self.rate < 1:
            raise UsageError("seconds={} at rate={} gives no samples".format(seconds, rate))

    @property
    def n_samples(self):
        return int(round(self.seconds * self.rate))

    @property
    def n_labels(self):
        return int(math.ceil(self.n_samples * LABEL_RATE / self.rate))

    def to_metadata(self):
        return {"seconds": self.seconds, "n_channels": self.n_channels, "rate": self.rate,
                "seed": self.seed, "mains_hz": self.mains_hz, "noise_uv": self.noise_uv,
                "mains_uv": self.mains_uv, "drift_uv": self.drift_uv,
                "artefact_interval_s": self.artefact_interval_s,
                "units_per_channel": self.units_per_channel, "hash_per_channel": self.hash_per_channel}


def _rng(seed, *key):
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


class NerveSimulator(object):
    """A drawn nerve, protocol and interference; generates any sample range on demand.

    Build with :meth:`from_config`.  Methods return int16 counts or float64
    microvolts with shape (n_samples, n_channels), labels with shape (n, 5).
    """

    def __init__(self, config, protocol, units, drift_knots, mains, artefacts):
        self.config = config
        self.protocol = protocol
        self.units = units
        self.drift_knots = drift_knots          # (n_knots, n_channels) uV
        self.mains = mains                      # dict of per-channel and per-harmonic parameters
        self.artefacts = artefacts              # list of dicts, sorted by start sample
        self._cache = {}                        # stream -> {segment: draws}; bounded, see _segment

    @classmethod
    def from_config(cls, config):
        seed, n_ch = config.seed, config.n_channels
        protocol = make_protocol(config.seconds, _rng(seed, _STREAM_PROTOCOL))
        units = make_units(n_ch, config.rate, _rng(seed, _STREAM_UNITS),
                           units_per_channel=config.units_per_channel,
                           hash_per_channel=config.hash_per_channel)
        return cls(config, protocol, units, _draw_drift(config, _rng(seed, _STREAM_DRIFT)),
                   _draw_mains(config, _rng(seed, _STREAM_MAINS)),
                   _draw_artefacts(config, _rng(seed, _STREAM_ARTEFACTS)))

    # -- signals -----------------------------------------------------------
    def signals_uv(self, start, stop):
        """Float64 microvolts of samples [start, stop), before quantisation."""
        cfg = self.config
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= cfg.n_samples:
            raise ValueError("sample range [{}, {}) outside [0, {})".format(start, stop, cfg.n_samples))
        sample = np.arange(start, stop)
        total = self._noise(start, stop)
        total += self._spikes(start, stop)
        total += self._mains(sample)
        total += self._drift(sample)
        total += self._artefacts(start, stop)
        return total

    def signals(self, start, stop):
        """Int16 counts of samples [start, stop): what the chip would send (clipped)."""
        counts = np.rint(self.signals_uv(start, stop) / SCALE_UV)
        return np.clip(counts, INT16_MIN, INT16_MAX).astype(np.int16)

    def _segment(self, stream, k, make):
        """Draws of segment ``k`` of ``stream``, made by ``make(rng, k)``; cached because
        consecutive blocks share their boundary segments."""
        cache = self._cache.setdefault(stream, {})
        if k not in cache:
            if len(cache) >= 4:
                del cache[min(cache)]
            cache[k] = make(_rng(self.config.seed, stream, k), k)
        return cache[k]

    def _noise(self, start, stop):
        n_ch = self.config.n_channels
        if stop == start:
            return np.zeros((0, n_ch))
        first, last = start // SEGMENT_SAMPLES, (stop - 1) // SEGMENT_SAMPLES

        def make(rng, k):
            return rng.standard_normal((SEGMENT_SAMPLES, n_ch)) * self.mains["noise_uv"]
        pieces = [self._segment(_STREAM_NOISE, k, make) for k in range(first, last + 1)]
        joined = np.concatenate(pieces, axis=0)
        offset = start - first * SEGMENT_SAMPLES
        return joined[offset:offset + stop - start]          # a view of a fresh array

    def _spikes(self, start, stop):
        n_ch = self.config.n_channels
        length = self.units.waveforms.shape[1]
        lo = max(start - length + 1, 0)
        if stop <= lo:
            return np.zeros((stop - start, n_ch))
        first, last = lo // SEGMENT_SAMPLES, (stop - 1) // SEGMENT_SAMPLES

        def make(rng, k):
            seg_start = k * SEGMENT_SAMPLES
            # Always the whole segment, so a recording's end does not change its draws.
            return draw_spikes(self.units, self.protocol, seg_start, seg_start + SEGMENT_SAMPLES,
                               self.config.rate, rng)
        pieces = [self._segment(_STREAM_SPIKES, k, make) for k in range(first, last + 1)]
        sample = np.concatenate([p[0] for p in pieces])
        unit = np.concatenate([p[1] for p in pieces])
        near = (sample >= lo) & (sample < stop)
        return render_spikes(self.units, sample[near], unit[near], start, stop, n_ch)

    def _mains(self, sample):
        m = self.mains
        t = sample / self.config.rate
        # The grid's frequency wanders slowly (a few hundredths of a hertz).
        phase = 2 * np.pi * self.config.mains_hz * t + m["wander_rad"] * np.sin(2 * np.pi * m["wander_hz"] * t)
        envelope = 1.0 + 0.1 * np.sin(2 * np.pi * m["envelope_hz"] * t + m["envelope_phase"])
        columns = []
        for order, _ in MAINS_HARMONICS:
            columns.append(np.cos(order * phase))
            columns.append(np.sin(order * phase))
        # Explicit sum rather than a BLAS product: BLAS may round differently
        # for different block lengths, and blocks must not change the data.
        out = np.zeros((sample.size, self.config.n_channels))
        for column, coefficient in zip(columns, m["coefficients"]):
            out += (column * envelope)[:, None] * coefficient[None, :]
        return out

    def _drift(self, sample):
        position = sample / (self.config.rate * DRIFT_KNOT_S)
        k = np.floor(position).astype(np.int64)
        frac = position - k
        smooth = 0.5 - 0.5 * np.cos(np.pi * frac)
        a, b = self.drift_knots[k], self.drift_knots[k + 1]
        return a + (b - a) * smooth[:, None]

    def _artefacts(self, start, stop):
        out = np.zeros((stop - start, self.config.n_channels))
        rate = self.config.rate
        for art in self.artefacts:
            a_start, a_stop = art["start"], art["stop"]
            if a_stop <= start or a_start >= stop:
                continue
            lo, hi = max(a_start, start), min(a_stop, stop)
            t = (np.arange(lo, hi) - a_start) / rate
            shape = (art["amplitude_uv"] * (1.0 - np.exp(-t / 0.003)) * np.exp(-t / art["tau_s"])
                     * np.cos(2 * np.pi * art["freq_hz"] * t))
            out[lo - start:hi - start] += shape[:, None] * art["channel_gain"][None, :]
        return out

    # -- labels and events ---------------------------------------------------
    def label_range(self, start, stop):
        """Label indices [j0, j1) whose times fall in signal samples [start, stop)."""
        rate = self.config.rate
        return int(math.ceil(start * LABEL_RATE / rate)), int(math.ceil(stop * LABEL_RATE / rate))

    def labels(self, j0, j1):
        """Glove flexions of labels [j0, j1): ndarray (j1 - j0, 5) float32 in 0..1."""
        position, _ = trajectories(self.protocol, np.arange(j0, j1) / LABEL_RATE, kind="glove")
        return position.astype(np.float32)

    def events(self):
        """[(sample, kind, value)] sorted by sample: repetition starts, movement starts and ends."""
        rate, n = self.config.rate, self.config.n_samples
        events = []
        seen = set()
        for movement, repetition, t_start, t_end in self.protocol.movement_spans():
            s0 = int(round(t_start * rate))
            if repetition not in seen:
                seen.add(repetition)
                events.append((s0, 0, "repetition", repetition))
            events.append((s0, 1, "movement", movement))
            events.append((int(round(t_end * rate)), 2, "movement", 0))
        return [(s, kind, value) for s, _, kind, value in sorted(events) if s < n]

    def metadata(self):
        """JSON-able description of how the data were made (no wall-clock time)."""
        return {
            "source": "synthetic",
            "simulator": {"name": "neurohand simulate", "version": SIMULATOR_VERSION,
                          "config": self.config.to_metadata()},
            "labels": "data-glove finger flexion of the mirrored intact hand, 0 = open/rest .. 1 = fully flexed",
            "protocol": self.protocol.to_metadata(),
            "units": {"n_units": int(self.units.n_units),
                      "flexor": int((self.units.kind == 0).sum()),
                      "extensor": int((self.units.kind == 1).sum()),
                      "untuned": int((self.units.kind == 2).sum())},
            "artefacts": [{"start_sample": a["start"], "peak_uv": round(a["amplitude_uv"], 1)}
                          for a in self.artefacts],
        }

    def iter_blocks(self, block_samples):
        """Yield (start, stop, signals int16, labels float32, events) covering the recording."""
        block_samples = checks.check_int("block_samples", block_samples, minimum=1)
        events = self.events()
        e = 0
        for start in range(0, self.config.n_samples, block_samples):
            stop = min(start + block_samples, self.config.n_samples)
            j0, j1 = self.label_range(start, stop)
            block_events = []
            while e < len(events) and events[e][0] < stop:
                block_events.append(events[e])
                e += 1
            yield start, stop, self.signals(start, stop), self.labels(j0, j1), block_events


def _draw_drift(config, rng):
    n_knots = int(math.ceil(config.seconds / DRIFT_KNOT_S)) + 2
    rho = 0.95
    innovation = config.drift_uv * math.sqrt(1 - rho * rho)
    # One row of draws per knot, so a longer recording starts with the shorter one's drift.
    draws = rng.standard_normal((n_knots, config.n_channels + 1))
    steps = draws[:, 1:] * 0.6 + draws[:, :1] * 0.8          # channels drift partly together
    knots = np.zeros((n_knots, config.n_channels))
    level = steps[0] * config.drift_uv
    for k in range(n_knots):
        if k:
            level = rho * level + innovation * steps[k]
        knots[k] = level
    return knots


def _draw_mains(config, rng):
    n_ch = config.n_channels
    amplitude = config.mains_uv * rng.uniform(0.5, 1.5, size=n_ch)
    base_phase = rng.uniform(0, 2 * np.pi)
    coefficients = []
    for order, relative in MAINS_HARMONICS:
        phase = base_phase * order + rng.uniform(0, 2 * np.pi) + rng.uniform(-0.3, 0.3, size=n_ch)
        coefficients.append(relative * amplitude * np.cos(phase))
        coefficients.append(-relative * amplitude * np.sin(phase))
    return {"coefficients": np.array(coefficients),
            "noise_uv": config.noise_uv * rng.uniform(0.8, 1.25, size=n_ch),
            "wander_hz": 0.01, "wander_rad": 0.02 / 0.01,
            "envelope_hz": rng.uniform(0.03, 0.1), "envelope_phase": rng.uniform(0, 2 * np.pi)}


def _draw_artefacts(config, rng):
    artefacts = []
    if config.artefact_interval_s <= 0:
        return artefacts
    t = rng.exponential(config.artefact_interval_s)
    while t < config.seconds:
        tau = rng.uniform(0.03, 0.25)
        sign = 1.0 if rng.random() < 0.5 else -1.0
        gain = rng.uniform(0.3, 1.0, size=config.n_channels)
        start = int(round(t * config.rate))
        artefacts.append({
            "start": start, "stop": start + int(round(8 * tau * config.rate)),
            "amplitude_uv": float(sign * math.exp(rng.uniform(math.log(300.0), math.log(20000.0)))),
            "tau_s": tau, "freq_hz": rng.uniform(1.0, 6.0), "channel_gain": gain})
        t += rng.exponential(config.artefact_interval_s)
    return artefacts


def generate(config, block_samples=10000):
    """The whole recording in memory: (signals int16 (n, ch), labels float32 (m, 5), events)."""
    sim = NerveSimulator.from_config(config)
    signals, labels, events = [], [], []
    for _, _, sig, lab, ev in sim.iter_blocks(block_samples):
        signals.append(sig)
        labels.append(lab)
        events.extend(ev)
    return np.concatenate(signals), np.concatenate(labels), events


def channel_names(n_channels):
    return ["ch{:02d}".format(i) for i in range(n_channels)]


def write_recording(path, config, block_seconds=1.0, progress=None):
    """Simulate ``config`` into the recording file ``path`` (exactly that path).

    Writes in blocks of ``block_seconds`` so memory stays bounded; ``progress``,
    if given, is called with the fraction done after each block.  Returns the
    :class:`NerveSimulator` used.
    """
    from neurohand.firmware_bridge.recording.file_format import RecordingWriter

    sim = NerveSimulator.from_config(config)
    block_samples = max(int(round(block_seconds * config.rate)), 1)
    names = channel_names(config.n_channels)
    with RecordingWriter(path, signal_rate=config.rate, channel_names=names, dtype="int16",
                         scale_uv=[SCALE_UV] * config.n_channels, metadata=sim.metadata(),
                         label_streams={LABEL_STREAM: {"rate": LABEL_RATE, "names": list(FINGERS)}}) as writer:
        for start, stop, signals, labels, events in sim.iter_blocks(block_samples):
            writer.append_signals(signals)
            writer.append_labels(LABEL_STREAM, labels)
            for sample, kind, value in events:
                writer.add_event(sample, kind, value=value)
            if progress is not None:
                progress(stop / float(config.n_samples))
    return sim
