"""What the simulator produces, measured (a ``neurohand bench`` target, ``realism``).

Measures a recording of each difficulty preset rather than trusting the
settings: spike amplitudes on the nearest channel, firing rates at rest and
while the unit's fingers are flexed, the spectrum's slope, how long the nerve
leads the glove (per-finger cross-correlation of the signal's envelope with
the glove, and onset detection per movement), how much of the envelope's
variance five components explain, and the linear yardstick's R^2 and r.
docs/simulator.md reports these figures.

``run(quick) -> dict``; also ``python -m neurohand.deploy.bench.realism
[--seconds S] [--seeds 0,1] [--difficulty realistic,easy]`` prints JSON.

``days(...)`` (``--sessions N``) measures how different the sessions of one
patient are: the yardstick fitted on session 0 and scored on sessions 1..N-1,
against the yardstick fitted within each of them, on the same test part.
"""
import argparse
import json
import sys

ENVELOPE_S = 0.010          # envelope bins
MAX_LAG_S = 0.4             # cross-correlation searched over +-this
ONSET_SD = 3.0              # onset: baseline mean + this many SDs, two bins in a row
GLOVE_ONSET = 0.05          # glove onset: first flexion above this


def _spike_band(signals_uv, rate, band=(300.0, 3000.0)):
    """The signal band-passed (FFT mask, per channel): drift, mains and most of a
    motion artefact's power removed, as a spike-band filter would."""
    import numpy as np
    out = np.empty_like(signals_uv)
    freq = np.fft.rfftfreq(signals_uv.shape[0], 1.0 / rate)
    mask = (freq >= band[0]) & (freq <= band[1])
    for c in range(signals_uv.shape[1]):
        out[:, c] = np.fft.irfft(np.fft.rfft(signals_uv[:, c]) * mask, n=signals_uv.shape[0])
    return out


def _envelope(banded_uv, rate, bin_s=ENVELOPE_S):
    """RMS of the spike-band signal per channel in bins: ndarray (n_bins, ch)."""
    import numpy as np
    size = int(round(bin_s * rate))
    d = banded_uv
    n = d.shape[0] // size
    return np.sqrt((d[:n * size].reshape(n, size, -1) ** 2).mean(axis=1))


def _smooth(x, n):
    import numpy as np
    kernel = np.ones(n) / n
    return np.stack([np.convolve(x[:, c], kernel, mode="same") for c in range(x.shape[1])], axis=1)


def _xcorr_lead(envelope, glove, max_lag):
    """Lag (bins) at the peak of the correlation of ``envelope`` (n,) with ``glove`` (n,);
    positive when the envelope leads."""
    import numpy as np
    e = (envelope - envelope.mean()) / (envelope.std() + 1e-12)
    g = (glove - glove.mean()) / (glove.std() + 1e-12)
    best, best_lag = -2.0, 0
    for lag in range(-max_lag, max_lag + 1):
        if lag >= 0:        # envelope at t correlates with glove at t + lag
            c = float(np.mean(e[:e.size - lag] * g[lag:]))
        else:
            c = float(np.mean(e[-lag:] * g[:g.size + lag]))
        if c > best:
            best, best_lag = c, lag
    return best_lag, best


def measure(difficulty="realistic", seed=0, seconds=120.0, n_channels=16, rate=10000.0):
    """Figures of one simulated recording; a JSON-able dict."""
    import numpy as np
    from neurohand.firmware_bridge.virtual import simulator as simmod
    from neurohand.firmware_bridge.virtual.movements import trajectories
    from neurohand.firmware_bridge.virtual.units import draw_spikes
    from neurohand.firmware_bridge.virtual.yardstick import linear_decoder_r2

    config = simmod.SimulatorConfig(seconds, n_channels=n_channels, rate=rate, seed=seed, difficulty=difficulty)
    sim = simmod.NerveSimulator.from_config(config)
    units, protocol = sim.units, sim.protocol
    n = config.n_samples
    signals_uv = np.concatenate([sim.signals_uv(s, min(s + 100000, n)) for s in range(0, n, 100000)])
    signals = np.clip(np.rint(signals_uv / simmod.SCALE_UV), simmod.INT16_MIN, simmod.INT16_MAX)
    labels = sim.labels(0, config.n_labels)
    out = {"difficulty": difficulty, "seed": seed, "seconds": seconds, "channels": n_channels, "rate_hz": rate}

    # Amplitudes: the large units' peak on their nearest channel.
    n_big = n_channels * config.units_per_channel
    nearest = np.array([units.proj_gain_uv[units.proj_start[u]:units.proj_start[u + 1]].max()
                        for u in range(n_big)]) if n_big else np.zeros(0)
    out["unit_uv_nearest"] = {"median": round(float(np.median(nearest)), 1) if n_big else None,
                              "max": round(float(nearest.max()), 1) if n_big else None}

    # Firing rates from the drawn spikes (the simulator's own streams).
    spikes = [draw_spikes(units, protocol, k * simmod.SEGMENT_SAMPLES, (k + 1) * simmod.SEGMENT_SAMPLES, rate,
                          simmod._rng(seed, simmod._STREAM_SPIKES, k))
              for k in range((n - 1) // simmod.SEGMENT_SAMPLES + 1)]
    sample = np.concatenate([s[0] for s in spikes])
    unit = np.concatenate([s[1] for s in spikes])
    keep = sample < n
    sample, unit = sample[keep], unit[keep]
    grid = np.arange(0, n, int(rate * 0.01))            # 10 ms grid for time in each state
    intent, _ = trajectories(protocol, grid / rate, kind="intent")
    glove, _ = trajectories(protocol, grid / rate, kind="glove")
    rest = (intent.max(axis=1) < 0.01) & (glove.max(axis=1) < 0.01)
    bin_of_spike = np.minimum(sample // int(rate * 0.01), grid.size - 1)
    tuned = np.nonzero(units.kind[:n_big] != 2)[0]
    rest_hz, move_hz = [], []
    for u in tuned:
        drive = intent.dot(units.finger_weights[u])
        moving = drive > 0.5
        mine = bin_of_spike[unit == u]
        rest_hz.append(np.count_nonzero(rest[mine]) / max(rest.sum() * 0.01, 1e-9))
        if moving.any():
            move_hz.append(np.count_nonzero(moving[mine]) / (moving.sum() * 0.01))
    rest_hz, move_hz = np.array(rest_hz), np.array(move_hz)
    out["rates_hz"] = {
        "rest_median": round(float(np.median(rest_hz)), 2),
        "rest_silent_fraction": round(float(np.mean(rest_hz < 0.5)), 2),
        "moving_median": round(float(np.median(move_hz)), 1),
        "moving_p90": round(float(np.percentile(move_hz, 90)), 1),
        "about": "large tuned units; rest: no finger intended or flexed; moving: the unit's fingers' "
                 "intended flexion > 0.5"}

    # Spectrum (Welch, 1 s Hann segments, mean over channels).
    seg = int(rate)
    window = np.hanning(seg)
    n_seg = n // seg
    psd = np.zeros(seg // 2 + 1)
    for k in range(n_seg):
        if any(a["start"] < (k + 1) * seg and a["stop"] > k * seg for a in sim.artefacts):
            continue        # the interference's spectrum, not the artefacts'
        x = signals_uv[k * seg:(k + 1) * seg] - signals_uv[k * seg:(k + 1) * seg].mean(axis=0)
        psd += (np.abs(np.fft.rfft(x * window[:, None], axis=0)) ** 2).mean(axis=1)
    freq = np.fft.rfftfreq(seg, 1.0 / rate)
    slopes = {}
    for lo, hi in ((5, 40), (60, 290), (300, 3000)):
        band = (freq >= lo) & (freq <= hi) & (np.abs(freq - np.rint(freq / config.mains_hz) * config.mains_hz) > 3)
        slopes["slope_{}_{}hz".format(lo, hi)] = round(float(np.polyfit(np.log10(freq[band]),
                                                                        np.log10(psd[band]), 1)[0]), 2)
    out["spectrum"] = slopes
    out["spectrum"]["about"] = "log-log slope of the mean PSD (1 s Welch), mains harmonics left out; 0 = white, -1 = 1/f"

    banded = _spike_band(signals_uv, rate)
    env = _envelope(banded, rate)
    rest_bins = rest[:env.shape[0]]
    out["rest_noise_uv"] = round(float(np.median(env[rest_bins])), 2)

    # Lead: cross-correlation of each finger's glove with the best channel's envelope.
    smooth = _smooth(env, 5)
    g = glove[:env.shape[0]]
    leads = []
    for f in range(5):
        corr = [abs(np.corrcoef(smooth[:, c], g[:, f])[0, 1]) for c in range(n_channels)]
        c = int(np.argmax(corr))
        lag, value = _xcorr_lead(smooth[:, c], g[:, f], int(MAX_LAG_S / ENVELOPE_S))
        leads.append({"lead_ms": int(round(lag * ENVELOPE_S * 1000)), "channel": c, "r": round(value, 2)})
    out["xcorr_lead_ms"] = [item["lead_ms"] for item in leads]
    out["xcorr_peak_r"] = [item["r"] for item in leads]

    # Lead: onsets per movement (channels' z-scored envelopes, smoothed over 50 ms,
    # summed, against the baseline before the trial).
    z = _smooth((env - np.median(env[rest_bins], axis=0)) / (env[rest_bins].std(axis=0) + 1e-9), 5)
    total = z.sum(axis=1)
    onset_leads = []
    for trial in range(protocol.n_trials):
        w0 = protocol.window_start[trial]
        b0, b1 = int((w0 - 0.6) / ENVELOPE_S), int((w0 - 0.1) / ENVELOPE_S)
        glove_on = protocol.onset[trial].min()
        if b0 < 0:
            continue
        base = total[b0:b1]
        threshold = base.mean() + ONSET_SD * base.std()
        lo, hi = b1, min(int((glove_on + 0.8) / ENVELOPE_S), total.size - 1)
        above = total[lo:hi] > threshold
        hits = np.nonzero(above[:-1] & above[1:])[0]
        fingers = g[int(glove_on / ENVELOPE_S) - 20:hi]
        glove_hits = np.nonzero(fingers.max(axis=1) > GLOVE_ONSET)[0]
        if hits.size and glove_hits.size:
            nerve_t = (lo + hits[0]) * ENVELOPE_S
            glove_t = (int(glove_on / ENVELOPE_S) - 20 + glove_hits[0]) * ENVELOPE_S
            onset_leads.append(glove_t - nerve_t)
    onset_leads = np.array(onset_leads)
    out["onset_lead_ms"] = {"median": int(round(1000 * float(np.median(onset_leads)))) if onset_leads.size else None,
                            "nerve_first_fraction": round(float(np.mean(onset_leads > 0)), 2) if onset_leads.size else None,
                            "trials": int(onset_leads.size)}
    designed = protocol.onset.min(axis=1) - protocol.intent_onset.min(axis=1)
    out["designed_lead_ms"] = {"mean": int(round(1000 * float(designed.mean()))),
                               "nerve_first_fraction": round(float(np.mean(designed > 0)), 2)}

    # Envelope dimensionality: log RMS of the differenced signal in 100 ms windows.
    log_env = np.log(_envelope(banded, rate, 0.1) + 1e-3)
    log_env = log_env - log_env.mean(axis=0)
    eig = np.sort(np.linalg.eigvalsh(np.cov(log_env.T)))[::-1]
    out["variance_first5"] = round(float(eig[:5].sum() / eig.sum()), 2)

    yard = linear_decoder_r2(signals, labels, rate)
    out["yardstick"] = {"mean_r2": round(yard["mean_r2"], 3), "mean_r": round(yard["mean_r"], 3),
                        "r2": [round(v, 2) for v in yard["r2"]], "r": [round(v, 2) for v in yard["r"]]}
    return out


def days(patients=(0, 1, 2), n_sessions=6, seconds=120.0, difficulty="realistic", n_channels=16, rate=10000.0):
    """Decay of a decoder over days: per patient and session, the yardstick fitted on
    the first 70 % of session 0 ("carried") and one fitted on the first 70 % of the
    session itself ("within"), both scored on the session's last 30 %; a JSON-able dict."""
    import numpy as np
    from neurohand.firmware_bridge.virtual import simulator as simmod
    from neurohand.firmware_bridge.virtual.yardstick import across_sessions

    def recording(patient, session):
        config = simmod.SimulatorConfig(seconds, n_channels=n_channels, rate=rate, seed=patient, session=session,
                                        difficulty=difficulty)
        sim = simmod.NerveSimulator.from_config(config)
        n = config.n_samples
        signals = np.concatenate([sim.signals(s, min(s + 100000, n)) for s in range(0, n, 100000)])
        return (signals, sim.labels(0, config.n_labels)), sim.metadata().get("day")

    rows = []
    for patient in patients:
        first, _ = recording(patient, 0)
        for session in range(n_sessions):
            data, day = (first, None) if session == 0 else recording(patient, session)
            scores = across_sessions(first, data, rate)
            row = {"patient": patient, "session": session}
            for kind in ("carried", "renormalised", "within"):
                row[kind] = {"mean_r": round(scores[kind]["mean_r"], 3), "mean_r2": round(scores[kind]["mean_r2"], 3)}
            if day is not None:
                row["day"] = {"shift": day["electrode_shift_channels"], "lost": day["large_units_lost"],
                              "new": day["large_units_new"], "speed": day["speed"], "strength": day["strength"]}
            rows.append(row)
    summary = []
    for session in range(n_sessions):
        mine = [r for r in rows if r["session"] == session]
        summary.append({"session": session, "patients": len(mine),
                        "carried_r": round(float(np.mean([r["carried"]["mean_r"] for r in mine])), 3),
                        "renormalised_r": round(float(np.mean([r["renormalised"]["mean_r"] for r in mine])), 3),
                        # R^2 as medians: one patient's day can reach -30 and swamp a mean.
                        "renormalised_r2_median": round(float(np.median([r["renormalised"]["mean_r2"]
                                                                         for r in mine])), 3),
                        "within_r": round(float(np.mean([r["within"]["mean_r"] for r in mine])), 3),
                        "carried_r2_median": round(float(np.median([r["carried"]["mean_r2"] for r in mine])), 3),
                        "within_r2_median": round(float(np.median([r["within"]["mean_r2"] for r in mine])), 3)})
    return {"difficulty": difficulty, "seconds": seconds, "channels": n_channels, "rate_hz": rate,
            "about": "yardstick fitted on 70 % of session 0 (carried) or of the session itself (within), "
                     "scored on the session's last 30 %; renormalised: carried with its feature mean and SD "
                     "re-fitted on the session's first 70 %; session 0's three are the same fit",
            "sessions": rows, "per_session": summary}


def run(quick, seeds=(0,), difficulties=("realistic", "easy"), seconds=None):
    """Both presets, ``seconds`` (120, or 40 when ``quick``) of 16 channels at 10 kHz."""
    seconds = (40.0 if quick else 120.0) if seconds is None else seconds
    results = [measure(d, seed, seconds) for d in difficulties for seed in seeds]
    return {"recordings": results}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m neurohand.deploy.bench.realism",
                                     description="measure what the simulator produces (JSON on stdout)")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    parser.add_argument("--difficulty", default="realistic,easy", help="comma-separated presets")
    parser.add_argument("--sessions", type=int, default=0,
                        help="instead: sessions 0..N-1 of each seed (patient), the yardstick carried over from "
                             "session 0 against one fitted within each session")
    args = parser.parse_args(argv)
    if args.sessions:
        result = {"days": [days([int(s) for s in args.seeds.split(",")], args.sessions, args.seconds, difficulty)
                           for difficulty in args.difficulty.split(",")]}
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    result = run(False, seeds=[int(s) for s in args.seeds.split(",")],
                 difficulties=args.difficulty.split(","), seconds=args.seconds)
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
