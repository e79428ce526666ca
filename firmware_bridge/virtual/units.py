"""Nerve fibres ("units") of the synthetic recordings: tuning, waveforms, spikes.

Each unit lies somewhere along the electrode's row of active sites and is seen
on the nearest few channels with amplitudes that fall off with distance
(crosstalk).  Units near each other tend to serve the same finger, as fibres of
one fascicle do.  Three kinds:

* flexor units fire more the more their finger is flexed (and a little more
  while it is flexing);
* extensor units fire while their finger opens again (returns to rest), with a
  little co-contraction while it is held flexed;
* untuned units fire at a constant rate.

Many small "hash" units, below the noise one by one, give the multi-unit
background whose power follows the movement too.
"""
import numpy as np

from neurohand.firmware_bridge.virtual.movements import trajectories

UNIT_KINDS = ("flexor", "extensor", "untuned")
WAVEFORM_MS = 1.6              # length of the stored waveform, covers every phase
CROSSTALK_SPACE = 0.7          # channels; amplitude falls by e over this distance
CROSSTALK_FLOOR = 0.08         # projections weaker than this fraction are dropped
VELOCITY_SCALE = 4.0           # 1/s of finger velocity that counts as "full speed"


class Units(object):
    """The units of one simulated nerve.

    Attributes (n = number of units, L = waveform samples, P = projections):
    ``kind`` (n,) int index into UNIT_KINDS; ``finger_weights`` (n, 5);
    ``base_hz``, ``gain_hz``, ``velocity_hz``, ``max_hz`` (n,) firing rates;
    ``waveforms`` (n, L) peak-normalised shapes; ``proj_unit``, ``proj_channel``,
    ``proj_gain_uv`` (P,) one row per (unit, channel) with its peak amplitude in
    microvolts, sorted by unit; ``proj_start`` (n + 1,) offsets into them.
    """

    def __init__(self, **arrays):
        for name, value in arrays.items():
            setattr(self, name, value)

    @property
    def n_units(self):
        return len(self.kind)


def make_units(n_channels, rate, rng, units_per_channel=4, hash_per_channel=16,
               unit_uv=(12.0, 0.45), hash_uv=(2.0, 5.0), fascicles=5, fascicle_purity=0.7,
               shared_fraction=0.3, recruitment_rng=None, channel_finger=None):
    """Draw the units of a nerve recorded on ``n_channels`` at ``rate`` Hz.

    ``unit_uv`` is (median, log-sd) of the peak amplitude of the large units at
    the fibre (the nearest channel sees ``exp(-distance / CROSSTALK_SPACE)`` of
    it) in microvolts; ``hash_uv`` the (low, high) of the small ones.
    ``fascicles``: groups of neighbouring channels, each mostly serving one
    finger; ``fascicle_purity``: fraction of a fascicle's fibres serving its
    finger (the rest serve a random one); ``shared_fraction``: fibres that also
    serve a neighbouring finger.  ``recruitment_rng``: if given, motor units
    are recruited by size (silent at rest, see :func:`add_recruitment`),
    drawn from this stream so the other draws stay as they were.
    ``channel_finger``: the finger of each channel's fascicle, if already drawn
    (more fibres of the same nerve: units that appear in later sessions).
    """
    # Fascicles: contiguous groups of channels whose fibres mostly serve one finger.
    if channel_finger is not None:
        pass
    elif fascicles == 5:
        fascicle_finger = rng.permutation(5)
    else:
        # Every finger has a fascicle (if there are enough); the rest are drawn, so
        # one finger's fibres can lie in fascicles far apart.
        extra = rng.integers(0, 5, size=max(fascicles - 5, 0))
        fascicle_finger = rng.permutation(np.concatenate([rng.permutation(5), extra]))[:fascicles]
    if channel_finger is None:
        channel_finger = fascicle_finger[(np.arange(n_channels) * fascicles) // max(n_channels, 1)]

    n_big = n_channels * units_per_channel
    n_hash = n_channels * hash_per_channel
    n = n_big + n_hash
    location = rng.uniform(-0.5, n_channels - 0.5, size=n)
    nearest = np.clip(np.rint(location).astype(int), 0, n_channels - 1)
    main_finger = np.where(rng.random(n) < fascicle_purity, channel_finger[nearest], rng.integers(0, 5, size=n))
    weights = np.zeros((n, 5))
    weights[np.arange(n), main_finger] = 1.0
    # Some fibres serve a neighbouring finger too (shared muscle bellies).
    second = np.clip(main_finger + rng.choice([-1, 1], size=n), 0, 4)
    mixed = (rng.random(n) < shared_fraction) & (second != main_finger)
    weights[np.nonzero(mixed)[0], second[mixed]] = rng.uniform(0.3, 0.6, size=int(mixed.sum()))

    kind = rng.choice(3, size=n, p=[0.55, 0.30, 0.15])
    base = rng.uniform(2.0, 8.0, size=n)
    gain = np.where(kind == 0, rng.uniform(20.0, 60.0, size=n),
                    np.where(kind == 1, rng.uniform(30.0, 70.0, size=n), 0.0))
    velocity = np.where(kind == 0, rng.uniform(0.0, 15.0, size=n), 0.0)
    # Hash units are many and weak; keep their rates moderate too.
    is_hash = np.arange(n) >= n_big
    base = np.where(is_hash, base * 0.7, base)
    gain = np.where(is_hash, gain * 0.5, gain)
    peak_uv = np.where(is_hash, rng.uniform(hash_uv[0], hash_uv[1], size=n),
                       np.minimum(unit_uv[0] * np.exp(unit_uv[1] * rng.standard_normal(n)), 80.0))

    waveforms = _draw_waveforms(n, rate, rng)
    unit_idx, channel_idx, proj_gain, proj_start = _project(location, peak_uv, n_channels)
    units = Units(kind=kind, finger_weights=weights, base_hz=base, gain_hz=gain, velocity_hz=velocity,
                  max_hz=base + gain * np.where(kind == 1, 1.2, 1.0) + velocity,
                  waveforms=waveforms, location=location, channel_finger=channel_finger,
                  proj_unit=unit_idx, proj_channel=channel_idx, proj_gain_uv=proj_gain,
                  proj_start=proj_start, peak_uv=peak_uv, recruited=False)
    if recruitment_rng is not None:
        add_recruitment(units, recruitment_rng)
    return units


def _project(location, peak_uv, n_channels):
    """Which channels see each unit, and how strongly (crosstalk falling off with
    distance): ``(proj_unit, proj_channel, proj_gain_uv, proj_start)``, sorted by unit."""
    distance = np.abs(location[:, None] - np.arange(n_channels)[None, :])
    falloff = np.exp(-distance / CROSSTALK_SPACE)
    unit_idx, channel_idx = np.nonzero(falloff >= CROSSTALK_FLOOR)   # sorted by unit
    proj_gain = peak_uv[unit_idx] * falloff[unit_idx, channel_idx]
    proj_start = np.concatenate([[0], np.cumsum(np.bincount(unit_idx, minlength=location.size))])
    return unit_idx, channel_idx, proj_gain, proj_start


_PER_UNIT = ("kind", "finger_weights", "base_hz", "gain_hz", "velocity_hz", "max_hz", "waveforms", "location",
             "peak_uv", "threshold", "recruit_hz", "peak_hz")


def session_units(units, extra, shift, visible, channel_gain, n_channels):
    """The fibres of one patient as a later session's electrode sees them.

    ``units`` (every session) and ``extra`` (fibres no channel saw on the first
    day, or None) are joined; the electrode has moved by ``shift`` channel
    spacings along the nerve, so every projection is recomputed from the
    fibres' locations; units with ``visible`` (n,) false are seen by no
    channel (lost, or not yet appeared); each channel's gain is multiplied by
    ``channel_gain`` (n_channels,).  Spikes are still drawn for invisible
    units, so visibility changes what is seen, not what fires.
    """
    arrays = {}
    for name in _PER_UNIT:
        if not hasattr(units, name):
            continue
        parts = [getattr(units, name)] + ([getattr(extra, name)] if extra is not None else [])
        arrays[name] = np.concatenate(parts, axis=0)
    location = arrays["location"] + shift
    peak_uv = np.where(visible, arrays["peak_uv"], 0.0)
    unit_idx, channel_idx, proj_gain, _ = _project(location, peak_uv, n_channels)
    seen = proj_gain > 0
    unit_idx, channel_idx = unit_idx[seen], channel_idx[seen]
    proj_gain = proj_gain[seen] * channel_gain[channel_idx]
    arrays["proj_start"] = np.concatenate([[0], np.cumsum(np.bincount(unit_idx, minlength=location.size))])
    return Units(proj_unit=unit_idx, proj_channel=channel_idx, proj_gain_uv=proj_gain,
                 channel_finger=units.channel_finger, recruited=units.recruited, **arrays)


def scale_channels(units, channel_gain):
    """A copy of ``units`` seen through channels whose gains are multiplied by ``channel_gain``."""
    arrays = dict(vars(units))
    arrays["proj_gain_uv"] = units.proj_gain_uv * channel_gain[units.proj_channel]
    return Units(**arrays)


# Recruitment by size (Henneman) and rate coding.  The shape follows the
# "onion skin" of De Luca & Hostage 2010 (J Neurophysiol 104:1034): motor units
# are silent until the excitation passes their threshold, start firing at a
# low rate and speed up as it rises, and units recruited early fire faster
# than those recruited late.  The numbers below are assumed (chosen within
# the ranges reported for hand and forearm muscles), not taken from one paper.
RECRUIT_MAX = 0.6              # highest threshold, as a fraction of full effort
RECRUIT_HZ = (6.0, 10.0)       # rate at recruitment
PEAK_HZ = (22.0, 40.0)         # rate at full effort: the lowest-threshold units fire fastest
SPONTANEOUS_HZ = (0.2, 2.0)    # untuned fibres (afferent/spontaneous background)
DYNAMIC_GAIN = 0.3             # extra excitation while flexing (the force-rate burst)


def add_recruitment(units, rng):
    """Give motor units thresholds and rate coding (in place); untuned units fire slowly."""
    n = units.n_units
    # Many low-threshold units, few high-threshold ones; larger fibres (bigger
    # spikes) are recruited later (size principle), with some scatter.
    threshold = np.sort(RECRUIT_MAX * rng.random(n) ** 2)
    size_rank = np.argsort(np.argsort(np.log(units.peak_uv) + 0.3 * rng.standard_normal(n)))
    threshold = threshold[size_rank]
    recruit_hz = rng.uniform(RECRUIT_HZ[0], RECRUIT_HZ[1], size=n)
    peak_hz = PEAK_HZ[1] - (PEAK_HZ[1] - PEAK_HZ[0]) * threshold / RECRUIT_MAX + rng.uniform(-3.0, 3.0, size=n)
    spontaneous = rng.uniform(SPONTANEOUS_HZ[0], SPONTANEOUS_HZ[1], size=n)
    units.recruited = True
    units.threshold = threshold
    units.recruit_hz = recruit_hz
    units.peak_hz = peak_hz
    units.base_hz = np.where(units.kind == 2, spontaneous, 0.0)
    units.max_hz = np.where(units.kind == 2, spontaneous, peak_hz)


# EMG cross-talk: motor units of the residual forearm muscles, seen from inside
# the nerve as slow, small potentials on every channel (volume conduction).
MUAP_MS = 14.0                 # stored length of a far-field motor-unit potential
MUAP_WIDTH_MS = (1.0, 2.5)     # Gaussian width of its phases (assumed)


def make_emg_sources(n_channels, rate, rng, n_sources, peak_uv):
    """Muscle motor units whose far-field potentials reach every channel.

    Each source serves one or two fingers (a forearm muscle's compartment),
    is recruited by size like the nerve's motor units, and is seen on every
    channel with a gain of 0.4-1.0 of ``peak_uv`` (log-normal, sd 0.5).
    Returns :class:`Units` usable with :func:`draw_spikes` and :func:`render_spikes`.
    """
    n = int(n_sources)
    main = rng.integers(0, 5, size=n)
    weights = np.zeros((n, 5))
    weights[np.arange(n), main] = 1.0
    second = rng.integers(0, 5, size=n)
    shared = (rng.random(n) < 0.5) & (second != main)
    weights[np.nonzero(shared)[0], second[shared]] = rng.uniform(0.3, 0.8, size=int(shared.sum()))
    length = max(int(round(MUAP_MS * 1e-3 * rate)), 2)
    t = (np.arange(length) / rate * 1e3)[None, :]
    width = rng.uniform(MUAP_WIDTH_MS[0], MUAP_WIDTH_MS[1], size=n)[:, None]
    centre = MUAP_MS / 2.0
    # Biphasic (first derivative of a Gaussian), sign and skew per source.
    x = (t - centre) / width
    shape = -x * np.exp(-0.5 * x * x) * (1.0 + rng.uniform(-0.3, 0.3, size=n)[:, None] * x)
    shape = shape * np.where(rng.random(n) < 0.5, 1.0, -1.0)[:, None]
    shape = shape / np.abs(shape).max(axis=1, keepdims=True)
    amplitude = peak_uv * np.exp(0.5 * rng.standard_normal(n))
    gain = amplitude[:, None] * rng.uniform(0.4, 1.0, size=(n, n_channels))
    unit_idx = np.repeat(np.arange(n), n_channels)
    channel_idx = np.tile(np.arange(n_channels), n)
    kind = np.where(rng.random(n) < 0.65, 0, 1)          # flexor and extensor muscles
    units = Units(kind=kind, finger_weights=weights, base_hz=np.zeros(n), gain_hz=np.zeros(n),
                  velocity_hz=np.zeros(n), max_hz=np.zeros(n), waveforms=shape, peak_uv=amplitude,
                  proj_unit=unit_idx, proj_channel=channel_idx, proj_gain_uv=gain.ravel(),
                  proj_start=np.arange(n + 1) * n_channels, recruited=False)
    add_recruitment(units, rng)
    return units


def _draw_waveforms(n, rate, rng):
    """Biphasic or triphasic extracellular spike shapes, ndarray (n, L), peak |1|.

    Each phase is a Gaussian bump; widths and timings differ per unit so units
    can be told apart, as in real recordings (about 1 ms in all).
    """
    length = max(int(round(WAVEFORM_MS * 1e-3 * rate)), 2)
    t = (np.arange(length) / rate * 1e3)[None, :]                # ms
    main_t = rng.uniform(0.35, 0.55, size=n)[:, None]
    width = rng.uniform(0.06, 0.14, size=n)[:, None]
    triphasic = (rng.random(n) < 0.5)[:, None]
    lead = np.where(triphasic, rng.uniform(0.2, 0.5, size=n)[:, None], 0.0)
    trail = rng.uniform(0.25, 0.6, size=n)[:, None]
    trail_width = width * rng.uniform(1.8, 3.0, size=n)[:, None]

    def bump(center, w):
        return np.exp(-0.5 * ((t - center) / w) ** 2)

    shape = (lead * bump(main_t - 2.2 * width, width)
             - bump(main_t, width)
             + trail * bump(main_t + width + trail_width, trail_width))
    # Extracellular spikes are mostly negative-first; some sites see them inverted.
    sign = np.where(rng.random(n) < 0.8, 1.0, -1.0)[:, None]
    shape = shape * sign
    return shape / np.abs(shape).max(axis=1, keepdims=True)


def firing_rates(units, unit_index, position, velocity):
    """Rates in Hz of units ``unit_index`` (m,) given their finger state (m, 5) each."""
    weights = units.finger_weights[unit_index]
    drive = np.minimum((weights * position).sum(axis=1), 1.0)
    speed = (weights * velocity).sum(axis=1) / VELOCITY_SCALE
    flexing = np.clip(speed, 0.0, 1.0)
    opening = np.clip(-speed, 0.0, 1.0)
    kind = units.kind[unit_index]
    if units.recruited:
        excitation = np.where(kind == 0, drive + DYNAMIC_GAIN * flexing, opening + 0.2 * drive)
        threshold = units.threshold[unit_index]
        above = np.clip((excitation - threshold) / (1.0 - threshold), 0.0, 1.0)
        recruit = units.recruit_hz[unit_index]
        rate = np.where(excitation > threshold,
                        recruit + (units.peak_hz[unit_index] - recruit) * above, 0.0)
        return np.where(kind == 2, units.base_hz[unit_index], rate)
    gain = units.gain_hz[unit_index]
    flexor_rate = gain * drive + units.velocity_hz[unit_index] * flexing
    extensor_rate = gain * (opening + 0.2 * drive)
    modulation = np.where(kind == 0, flexor_rate, np.where(kind == 1, extensor_rate, 0.0))
    return units.base_hz[unit_index] + modulation


def draw_spikes(units, protocol, start, stop, rate, rng):
    """Spikes of all units in signal samples [start, stop), by thinning.

    Candidates are drawn at each unit's maximum rate and kept with probability
    rate(t) / max rate, where rate(t) follows the intended finger movement.
    Returns ``(sample, unit)``, int64 arrays (k,) sorted by sample (then unit).
    """
    duration = (stop - start) / rate
    counts = rng.poisson(units.max_hz * duration)
    unit = np.repeat(np.arange(units.n_units), counts)
    sample = rng.integers(start, stop, size=unit.size)
    accept_draw = rng.random(unit.size)
    position, velocity = trajectories(protocol, sample / rate, kind="intent")
    rates = firing_rates(units, unit, position, velocity)
    keep = accept_draw * units.max_hz[unit] < rates
    sample, unit = sample[keep], unit[keep]
    order = np.lexsort((unit, sample))
    return sample[order].astype(np.int64), unit[order].astype(np.int64)


def render_spikes(units, sample, unit, start, stop, n_channels):
    """Sum the spike waveforms that fall into signal samples [start, stop).

    ``sample``/``unit`` (k,) give each spike's first waveform sample; spikes may
    begin before ``start`` (their tails are rendered).  Returns ndarray
    (stop - start, n_channels) float64 in microvolts.  Contributions are summed
    in spike order, so the same spikes give bit-identical sums whatever the block.
    """
    n = stop - start
    length = units.waveforms.shape[1]
    n_proj = np.diff(units.proj_start)[unit]
    spike_of_pair = np.repeat(np.arange(unit.size), n_proj)
    first = np.repeat(units.proj_start[unit], n_proj)
    proj = first + (np.arange(spike_of_pair.size) - np.repeat(np.cumsum(n_proj) - n_proj, n_proj))
    offset = (sample[spike_of_pair] - start)[:, None] + np.arange(length)[None, :]   # (pairs, L)
    flat = offset * n_channels + units.proj_channel[proj][:, None]
    weight = units.proj_gain_uv[proj][:, None] * units.waveforms[unit[spike_of_pair]]
    valid = (offset >= 0) & (offset < n)
    summed = np.bincount(flat[valid], weights=weight[valid], minlength=n * n_channels)
    return summed.reshape(n, n_channels)
