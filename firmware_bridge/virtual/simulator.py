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
the block size.  Sessions (days) of one patient share the seed's fibres and
electrode and draw the rest from streams keyed by the session as well; session
0 is the recording without sessions, bit for bit.  See docs/simulator.md.
"""
import math

import numpy as np

from neurohand.firmware_bridge.shared import checks
from neurohand.firmware_bridge.shared.errors import UsageError
from neurohand.firmware_bridge.virtual.movements import FINGERS, make_protocol, mirror_mismatch, trajectories
from neurohand.firmware_bridge.virtual.units import (
    draw_spikes, make_emg_sources, make_units, render_spikes, scale_channels, session_units)

# Bump when the same seed would give different data (it is stored in metadata).
# 2: the difficulty presets and physiology options; "easy" gives version 1's
# signals, labels and events bit for bit (tests/device/test_simulator.py).
SIMULATOR_VERSION = 2

SCALE_UV = 0.195                 # uV per count, Intan RHD2000
INT16_MIN, INT16_MAX = -32768, 32767
LABEL_RATE = 100.0               # Hz, the glove
LABEL_STREAM = "fingers"
MAX_SECONDS = 86400.0            # a day; the protocol and drift are drawn up front
SEGMENT_SAMPLES = 4096           # unit of random draws; never depends on the block size
DRIFT_KNOT_S = 0.5
MAINS_HARMONICS = ((1, 1.0), (2, 0.08), (3, 0.30), (4, 0.04), (5, 0.12))   # (order, relative amplitude)
FLICKER_OCTAVES_S = tuple(0.001 * 2 ** o for o in range(10))   # 1/f from about 1 Hz to 500 Hz
FLICKER_CHUNK = 4096             # knots per random draw of the 1/f noise
EMG_SOURCES_PER_FINGER = 12      # muscle motor units seen as cross-talk (assumed)

# Independent random streams, so adding draws to one leaves the others alone.
_STREAM_PROTOCOL, _STREAM_UNITS, _STREAM_DRIFT, _STREAM_MAINS, _STREAM_ARTEFACTS = 1, 2, 3, 4, 5
_STREAM_ORDER, _STREAM_RECRUITMENT, _STREAM_EMG_UNITS, _STREAM_ELECTRODE, _STREAM_ONSET_ARTEFACTS = 6, 7, 8, 9, 12
_STREAM_NOISE, _STREAM_SPIKES, _STREAM_FLICKER, _STREAM_EMG = 10, 11, 13, 14
# Sessions: the day's changes are drawn from (seed, _STREAM_DAY, day); a later
# session's recording streams are keyed (seed, _STREAM_SESSION, session, stream, ...)
# so session 0 keeps the streams (and the bits) of a recording without sessions.
_STREAM_DAY, _STREAM_SESSION, _STREAM_NEW_UNITS, _STREAM_NEW_RECRUITMENT = 15, 16, 17, 18
# Confounds added after sessions: their own streams, so with the options at their
# no-op values every earlier draw (and so the file) is unchanged.
_STREAM_MIRROR, _STREAM_YIELD = 19, 20
# What belongs to the patient (the same in every session); every other stream is the day's.
_PATIENT_STREAMS = (_STREAM_UNITS, _STREAM_RECRUITMENT, _STREAM_EMG_UNITS, _STREAM_ELECTRODE, _STREAM_YIELD)
MAX_SESSION = 10000

DIFFICULTIES = ("realistic", "easy")

# The physiology and interference settings of each preset.  "easy" is the
# simulator of version 1 (kept for tests that need a clean signal); "realistic"
# is calibrated to published recordings (docs/simulator.md gives each value's
# source, or says that it is assumed).
PRESETS = {
    "easy": {
        "noise_uv": 3.0, "mains_uv": 25.0, "drift_uv": 30.0, "artefact_interval_s": 15.0,
        "units_per_channel": 4, "hash_per_channel": 16,
        "electrode_noise_uv": 0.0, "flicker_uv": 0.0, "emg_uv": 0.0, "artefact_onset_prob": 0.0,
        "lead_min_s": -0.20, "lead_max_s": 0.15, "aligned_release": False, "recruitment": False,
        "random_order": False, "fascicles": 5, "fascicle_purity": 0.7, "shared_fraction": 0.3,
        "mirror_effort_sd": 0.0, "mirror_timing_sd_s": 0.0, "mirror_cocontraction": 0.0,
        "mirror_miss_prob": 0.0, "electrode_yield": 1.0,
    },
    "realistic": {
        "noise_uv": 2.4, "mains_uv": 25.0, "drift_uv": 30.0, "artefact_interval_s": 60.0,
        "units_per_channel": 4, "hash_per_channel": 16,
        "electrode_noise_uv": 4.0, "flicker_uv": 3.0, "emg_uv": 3.0, "artefact_onset_prob": 0.25,
        "lead_min_s": 0.04, "lead_max_s": 0.14, "aligned_release": True, "recruitment": True,
        "random_order": True, "fascicles": 10, "fascicle_purity": 0.4, "shared_fraction": 0.6,
        "mirror_effort_sd": 0.6, "mirror_timing_sd_s": 0.1, "mirror_cocontraction": 0.4,
        "mirror_miss_prob": 0.25, "electrode_yield": 0.8,
    },
}
# What changes between sessions (days) of one patient; the same in both presets.
# docs/simulator.md ("Sessions") gives each value's source or says it is assumed.
SESSION_OPTIONS = {
    "electrode_shift_sd": 0.1,     # channel spacings per day, a random walk along the nerve
    "unit_turnover": 0.025,        # chance per day that a seen large unit is lost (as many appear)
    "channel_gain_sd": 0.2,        # log-sd of each channel's gain on a day
    "channel_noise_sd": 0.15,      # log-sd of each channel's white noise on a day
    "speed_sd": 0.1,               # log-sd of the day's movement speed
    "strength_sd": 0.1,            # log-sd of the day's intended effort
}
for _preset in PRESETS.values():
    _preset.update(SESSION_OPTIONS)
_FLAGS = ("aligned_release", "recruitment", "random_order")
_COUNTS = ("units_per_channel", "hash_per_channel", "fascicles")
_FRACTIONS = ("artefact_onset_prob", "fascicle_purity", "shared_fraction", "mirror_cocontraction",
              "mirror_miss_prob", "electrode_yield")
_MIRROR = ("mirror_effort_sd", "mirror_timing_sd_s", "mirror_cocontraction", "mirror_miss_prob")


class SimulatorConfig(object):
    """What to simulate.  Stores and validates settings; builds nothing.

    seconds: duration; n_channels: electrode sites; rate: samples/s per channel;
    seed: non-negative int; mains_hz: 50 or 60; difficulty: "realistic" (default)
    or "easy" (version 1's clean signal), which sets every option below that is
    left as None:

    noise_uv: amplifier noise, uV rms; electrode_noise_uv: electrode thermal noise,
    uV rms (white, added in quadrature); flicker_uv: 1/f noise, uV rms;
    mains_uv: mean 50/60 Hz amplitude per channel, uV; drift_uv: baseline drift, uV rms;
    emg_uv: median peak of a muscle motor unit's cross-talk potential, uV (0 = none);
    artefact_interval_s: mean time between random motion artefacts (0 = none);
    artefact_onset_prob: chance that a movement's onset brings a motion artefact;
    units_per_channel / hash_per_channel: large and background units per channel;
    lead_min_s / lead_max_s: range of how long the nerve leads the glove (negative: lags);
    aligned_release: the nerve also leads the glove's release;
    recruitment: motor units silent at rest, recruited by size with rate coding
    (else every unit fires at 2-8 Hz at rest); random_order: movement order drawn
    per repetition (else in id order); fascicles: fascicles along the channels;
    fascicle_purity: fraction of a fascicle's fibres serving its finger;
    shared_fraction: fibres also serving a neighbouring finger.
    Mirror mismatch, per trial (0 = none): mirror_effort_sd, log-sd of each finger's
    intended effort against the glove; mirror_timing_sd_s, sd of the intent's shift;
    mirror_cocontraction, up to this fraction of the trial's effort intended for
    fingers the glove does not move; mirror_miss_prob, chance that the phantom does
    not perform a trial.  electrode_yield: share of channels that record the nerve's
    units at all (the rest: noise and EMG only; 1 = all).

    Sessions: ``seed`` draws the patient (fibres, fascicles, electrode array);
    ``session`` (0 = the first day, the recording as without sessions) draws
    the day: its movements, noise and interference, and how the day differs from
    the first (per session: electrode_shift_sd, a random walk of the electrode
    along the nerve in channel spacings; unit_turnover, the chance that a large
    unit is lost, with as many new ones appearing on average; channel_gain_sd and
    channel_noise_sd, log-sd of each channel's gain and white noise; speed_sd
    and strength_sd, log-sd of the day's movement speed and intended effort).
    """

    def __init__(self, seconds, n_channels=16, rate=10000.0, seed=0, mains_hz=50.0, noise_uv=None,
                 mains_uv=None, drift_uv=None, artefact_interval_s=None, units_per_channel=None,
                 hash_per_channel=None, difficulty="realistic", session=0, **options):
        self.seconds = checks.check_number("seconds", seconds, minimum=0.0, exclusive_minimum=True,
                                           maximum=MAX_SECONDS)
        self.n_channels = checks.check_int("channels", n_channels, minimum=1, maximum=256)
        self.rate = checks.check_number("rate", rate, minimum=1000.0, maximum=50000.0)
        self.seed = checks.check_int("seed", seed, minimum=0, maximum=2 ** 63 - 1)
        self.mains_hz = float(checks.check_option("mains", mains_hz, (50, 60)))
        self.difficulty = checks.check_option("difficulty", difficulty, DIFFICULTIES)
        self.session = checks.check_int("session", session, minimum=0, maximum=MAX_SESSION)
        unknown = sorted(set(options) - set(PRESETS["easy"]))
        if unknown:
            raise UsageError("unknown simulator option {!r}".format(unknown[0]))
        options.update(noise_uv=noise_uv, mains_uv=mains_uv, drift_uv=drift_uv,
                       artefact_interval_s=artefact_interval_s, units_per_channel=units_per_channel,
                       hash_per_channel=hash_per_channel)
        for name, preset in sorted(PRESETS[self.difficulty].items()):
            value = options.get(name)
            value = preset if value is None else value
            if name in _FLAGS:
                if not isinstance(value, bool):
                    raise UsageError("{} must be true or false, but got {!r}".format(name, value))
            elif name in _COUNTS:
                value = checks.check_int(name, value, minimum=1 if name == "fascicles" else 0,
                                         maximum=256 if name == "fascicles" else None)
            elif name in _FRACTIONS:
                value = checks.check_number(name, value, minimum=0.0, maximum=1.0)
            elif name == "unit_turnover":
                value = checks.check_number(name, value, minimum=0.0, maximum=0.5)
            elif name in SESSION_OPTIONS or name in ("mirror_effort_sd", "mirror_timing_sd_s"):
                value = checks.check_number(name, value, minimum=0.0, maximum=2.0)
            elif name in ("lead_min_s", "lead_max_s"):
                value = checks.check_number(name, value, minimum=-1.0, maximum=1.0)
            else:
                value = checks.check_number(name, value, minimum=0.0)
            setattr(self, name, value)
        if self.lead_min_s > self.lead_max_s:
            raise UsageError("lead_min_s must be <= lead_max_s, but got {} > {}".format(
                self.lead_min_s, self.lead_max_s))
        if self.seconds * self.rate < 1:
            raise UsageError("seconds={} at rate={} gives no samples".format(seconds, rate))

    @property
    def n_samples(self):
        return int(round(self.seconds * self.rate))

    @property
    def n_labels(self):
        return int(math.ceil(self.n_samples * LABEL_RATE / self.rate))

    def to_metadata(self):
        meta = {"seconds": self.seconds, "n_channels": self.n_channels, "rate": self.rate,
                "seed": self.seed, "mains_hz": self.mains_hz, "difficulty": self.difficulty}
        for name in sorted(PRESETS["easy"]):
            if self.session or name not in SESSION_OPTIONS:
                meta[name] = getattr(self, name)
        if self.session:
            # Session 0 is the seed's recording byte for byte, metadata included: no session
            # means session 0 of patient = seed.
            meta.update(patient=self.seed, session=self.session)
        return meta


def _rng(seed, *key):
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def _day_rng(config, stream, *key):
    """The stream ``stream`` of ``config``'s session: the patient's streams and
    every stream of session 0 are keyed as without sessions."""
    if config.session == 0 or stream in _PATIENT_STREAMS:
        return _rng(config.seed, stream, *key)
    return _rng(config.seed, _STREAM_SESSION, config.session, stream, *key)


def _draw_day(config):
    """How session ``config.session`` differs from session 0 (None for session 0).

    Day k's draws come from their own stream, always in the same order and
    number, so the walk of the electrode and the units' fates up to day k are
    the same in every later session.  Returns a dict: ``shift`` (channel
    spacings), ``visible_large`` (the large units seen, then the new fibres
    seen), ``channel_gain`` and ``noise_factor`` (n_channels,), ``speed``,
    ``strength``.
    """
    if config.session == 0:
        return None
    n_ch, n_big = config.n_channels, config.n_channels * config.units_per_channel
    visible = np.concatenate([np.ones(n_big, bool), np.zeros(n_big, bool)])
    shift = 0.0
    for day in range(1, config.session + 1):
        rng = _rng(config.seed, _STREAM_DAY, day)
        shift += config.electrode_shift_sd * float(rng.standard_normal())
        # Losses and appearances at the same rate from equal pools: as many
        # units are seen on every day, on average.
        change = rng.random(2 * n_big) < config.unit_turnover
        visible = visible ^ change
        gain_z, noise_z = rng.standard_normal(n_ch), rng.standard_normal(n_ch)
        speed_z, strength_z = rng.standard_normal(2)
    return {"shift": shift, "visible_large": visible,
            "channel_gain": np.exp(config.channel_gain_sd * gain_z),
            "noise_factor": np.exp(config.channel_noise_sd * noise_z),
            "speed": float(np.exp(config.speed_sd * speed_z)),
            "strength": float(np.exp(config.strength_sd * strength_z))}


class NerveSimulator(object):
    """A drawn nerve, protocol and interference; generates any sample range on demand.

    Build with :meth:`from_config`.  Methods return int16 counts or float64
    microvolts with shape (n_samples, n_channels), labels with shape (n, 5).
    """

    def __init__(self, config, protocol, units, drift_knots, mains, artefacts, emg=None, day=None):
        self.config = config
        self.day = day                          # how this session differs from session 0, or None
        self.protocol = protocol
        self.units = units
        self.emg = emg                          # Units of the muscles' cross-talk, or None
        self.drift_knots = drift_knots          # (n_knots, n_channels) uV
        self.mains = mains                      # dict of per-channel and per-harmonic parameters
        self.artefacts = artefacts              # list of dicts, sorted by start sample
        self._cache = {}                        # stream -> {segment: draws}; bounded, see _segment

    @classmethod
    def from_config(cls, config):
        seed, n_ch = config.seed, config.n_channels
        day = _draw_day(config)
        # New draws come from their own streams, so the easy preset's draws are version 1's.
        protocol = make_protocol(config.seconds, _day_rng(config, _STREAM_PROTOCOL),
                                 order_rng=_day_rng(config, _STREAM_ORDER) if config.random_order else None,
                                 lead_s=(config.lead_min_s, config.lead_max_s),
                                 aligned_release=config.aligned_release,
                                 speed=day["speed"] if day else 1.0, strength=day["strength"] if day else 1.0)
        if any(getattr(config, name) > 0 for name in _MIRROR):
            protocol = mirror_mismatch(protocol, _day_rng(config, _STREAM_MIRROR),
                                       effort_sd=config.mirror_effort_sd, timing_sd_s=config.mirror_timing_sd_s,
                                       cocontraction=config.mirror_cocontraction,
                                       miss_prob=config.mirror_miss_prob)
        units = make_units(n_ch, config.rate, _rng(seed, _STREAM_UNITS),
                           units_per_channel=config.units_per_channel,
                           hash_per_channel=config.hash_per_channel, fascicles=config.fascicles,
                           fascicle_purity=config.fascicle_purity, shared_fraction=config.shared_fraction,
                           recruitment_rng=_rng(seed, _STREAM_RECRUITMENT) if config.recruitment else None)
        if day is not None:
            units = _units_of_the_day(config, units, day)
        if config.electrode_yield < 1:
            # Tips outside a fascicle record no unit: the patient's array, fixed over days.
            units = scale_channels(units, _yielding_channels(n_ch, config.electrode_yield,
                                                             _rng(seed, _STREAM_YIELD)))
        emg = None
        if config.emg_uv > 0:
            emg = make_emg_sources(n_ch, config.rate, _rng(seed, _STREAM_EMG_UNITS),
                                   5 * EMG_SOURCES_PER_FINGER, config.emg_uv)
            if day is not None:
                emg = scale_channels(emg, day["channel_gain"])
        mains = _draw_mains(config, _day_rng(config, _STREAM_MAINS))
        if day is not None:
            # The amplifier's noise per channel is the patient's hardware, drawn with
            # session 0's mains; the day changes it by ``channel_noise_sd`` only.
            mains["noise_uv"] = _draw_mains(config, _rng(seed, _STREAM_MAINS))["noise_uv"]
        if config.electrode_noise_uv > 0:
            # Electrode thermal noise (impedance differs per site) is white like the
            # amplifier's and independent of it: one draw with the summed variance.
            electrode = config.electrode_noise_uv * np.exp(
                0.25 * _rng(seed, _STREAM_ELECTRODE).standard_normal(n_ch))
            mains["noise_uv"] = np.sqrt(mains["noise_uv"] ** 2 + electrode ** 2)
        if day is not None:
            mains["noise_uv"] = mains["noise_uv"] * day["noise_factor"]
        artefacts = _draw_artefacts(config, _day_rng(config, _STREAM_ARTEFACTS))
        if config.artefact_onset_prob > 0:
            artefacts = sorted(artefacts + _draw_onset_artefacts(config, protocol,
                                                                 _day_rng(config, _STREAM_ONSET_ARTEFACTS)),
                               key=lambda a: a["start"])
        return cls(config, protocol, units, _draw_drift(config, _day_rng(config, _STREAM_DRIFT)), mains,
                   artefacts, emg, day)

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
        if self.emg is not None:
            total += self._spikes(start, stop, self.emg, _STREAM_EMG)
        if self.config.flicker_uv > 0:
            total += self._flicker(start, stop)
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
            cache[k] = make(_day_rng(self.config, stream, k), k)
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

    def _spikes(self, start, stop, units=None, stream=_STREAM_SPIKES):
        units = self.units if units is None else units
        n_ch = self.config.n_channels
        length = units.waveforms.shape[1]
        lo = max(start - length + 1, 0)
        if stop <= lo:
            return np.zeros((stop - start, n_ch))
        first, last = lo // SEGMENT_SAMPLES, (stop - 1) // SEGMENT_SAMPLES

        def make(rng, k):
            seg_start = k * SEGMENT_SAMPLES
            # Always the whole segment, so a recording's end does not change its draws.
            return draw_spikes(units, self.protocol, seg_start, seg_start + SEGMENT_SAMPLES,
                               self.config.rate, rng)
        pieces = [self._segment(stream, k, make) for k in range(first, last + 1)]
        sample = np.concatenate([p[0] for p in pieces])
        unit = np.concatenate([p[1] for p in pieces])
        near = (sample >= lo) & (sample < stop)
        return render_spikes(units, sample[near], unit[near], start, stop, n_ch)

    def _flicker(self, start, stop):
        """1/f noise: octaves of smoothly interpolated random knots of equal power
        (Voss-McCartney), every knot drawn from a stream keyed by its chunk, so
        any range is generated on its own."""
        n_ch = self.config.n_channels
        out = np.zeros((stop - start, n_ch))
        if stop == start:
            return out
        per_octave = self.config.flicker_uv / math.sqrt(len(FLICKER_OCTAVES_S))
        sample = np.arange(start, stop)
        for octave, spacing_s in enumerate(FLICKER_OCTAVES_S):
            position = sample / (self.config.rate * spacing_s)
            k = np.floor(position).astype(np.int64)
            frac = position - k
            k0, k1 = int(k[0]), int(k[-1]) + 1
            chunks = range(k0 // FLICKER_CHUNK, k1 // FLICKER_CHUNK + 1)
            knots = np.concatenate([
                _day_rng(self.config, _STREAM_FLICKER, octave, c).standard_normal((FLICKER_CHUNK, n_ch))
                for c in chunks])
            base = chunks[0] * FLICKER_CHUNK
            a, b = knots[k - base], knots[k + 1 - base]
            smooth = (0.5 - 0.5 * np.cos(np.pi * frac))[:, None]
            # Cosine interpolation keeps about 3/4 of the knots' variance on average.
            out += (a + (b - a) * smooth) * (per_octave / 0.87)
        return out

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
        meta = {
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
        if self.config.session:
            meta.update(patient=self.config.seed, session=self.config.session)
        if self.day is not None:
            n_big = self.config.n_channels * self.config.units_per_channel
            visible = self.day["visible_large"]
            meta["day"] = {
                "about": "how this session differs from session 0 of the patient",
                "electrode_shift_channels": round(self.day["shift"], 4),
                "large_units_seen": int(visible.sum()),
                "large_units_lost": int(n_big - visible[:n_big].sum()),
                "large_units_new": int(visible[n_big:].sum()),
                "channel_gain": [round(float(g), 4) for g in self.day["channel_gain"]],
                "noise_factor": [round(float(g), 4) for g in self.day["noise_factor"]],
                "speed": round(self.day["speed"], 4), "strength": round(self.day["strength"], 4)}
        return meta

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


def _units_of_the_day(config, units, day):
    """The patient's fibres as session ``day`` sees them: the electrode moved,
    some large units lost, some of the patient's other fibres (drawn once per
    patient, unseen on the first day) seen, each channel's gain changed."""
    n_ch, n_big = config.n_channels, config.n_channels * config.units_per_channel
    extra = None
    if n_big:
        extra = make_units(n_ch, config.rate, _rng(config.seed, _STREAM_NEW_UNITS),
                           units_per_channel=config.units_per_channel, hash_per_channel=0,
                           fascicles=config.fascicles, fascicle_purity=config.fascicle_purity,
                           shared_fraction=config.shared_fraction,
                           recruitment_rng=(_rng(config.seed, _STREAM_NEW_RECRUITMENT) if config.recruitment
                                            else None),
                           channel_finger=units.channel_finger)
    large = day["visible_large"]
    visible = np.concatenate([large[:n_big], np.ones(units.n_units - n_big, bool), large[n_big:]])
    return session_units(units, extra, day["shift"], visible, day["channel_gain"], n_ch)


def _yielding_channels(n_channels, share, rng):
    """(n_channels,) gains: 1 for the round(share * n) channels that record units
    (at least one while share > 0), 0 for the others."""
    n_yield = int(round(share * n_channels))
    if share > 0:
        n_yield = max(n_yield, 1)
    gain = np.zeros(n_channels)
    gain[rng.permutation(n_channels)[:n_yield]] = 1.0
    return gain


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


def _draw_onset_artefacts(config, protocol, rng):
    """Motion artefacts tied to movements: with probability ``artefact_onset_prob``
    a movement's onset (the limb and cable move) brings one, 0-0.4 s after the
    nerve's onset, amplitudes as the random ones (assumed)."""
    artefacts = []
    for trial in range(protocol.n_trials):
        u, delay, tau, sign_draw, freq, log_amp = rng.random(6)
        gain = rng.uniform(0.3, 1.0, size=config.n_channels)
        if u >= config.artefact_onset_prob:
            continue
        tau = 0.03 + 0.22 * tau
        start = int(round((protocol.window_start[trial] + 0.4 * delay) * config.rate))
        if start >= config.n_samples:
            continue
        amplitude = math.exp(math.log(300.0) + (math.log(20000.0) - math.log(300.0)) * log_amp)
        artefacts.append({
            "start": start, "stop": start + int(round(8 * tau * config.rate)),
            "amplitude_uv": float(amplitude if sign_draw < 0.5 else -amplitude),
            "tau_s": tau, "freq_hz": 1.0 + 5.0 * freq, "channel_gain": gain, "movement": True})
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
