"""Draw docs/latency-definition.png: how decoder/lag.py measures the intent-to-command lag.

A synthetic movement (truth) and a decoded command late by 150 ms with noise, held between steps
as the hand holds it; the 50 % onset and release levels and the crossings the metric finds.
Run from the repository root with the workstation venv (matplotlib):

    .venv/bin/python scripts/plot_lag.py [--out docs/latency-definition.png]
"""
import argparse

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from neurohand.decoder import lag  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/latency-definition.png")
    args = parser.parse_args()
    t = np.arange(0, 4000)                     # ms, the metric's 1 ms grid
    start, stop = 1000, 2600                   # the recording's movement events
    truth = 0.05 + 0.8 * np.clip((t - start - 100) / 350.0, 0, 1) * np.clip((stop + 250 - t) / 350.0, 0, 1)
    rng = np.random.RandomState(3)
    steps = np.arange(0, 4000, 20)             # a decoded command every 20 ms (the stride)
    late = 150
    command = np.interp(steps - late, t, truth) + rng.normal(scale=0.025, size=steps.size)
    decoded = lag.hold(steps, command[:, None], t)[:, 0]
    result = lag.lag_summary([(truth[:, None], decoded[:, None], [(start, stop)])], step_ms=1.0)

    r0, peak = 0.05, 0.85
    level = r0 + 0.5 * (peak - r0)
    true_on = int(np.argmax(truth >= level))
    true_off = true_on + int(np.argmax(truth[true_on:] < level))
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=90)
    ax.axvspan(start, stop, color="0.93", label="movement (events)")
    ax.plot(t, truth, color="black", lw=1.6, label="true trajectory (labels)")
    ax.step(t, decoded, where="post", color="tab:blue", lw=1.2, label="decoded command, as the hand holds it")
    ax.axhline(level, color="tab:red", ls="--", lw=0.8)
    ax.text(30, level + 0.02, "50 % of the movement's excursion", color="tab:red", fontsize=8)
    for true_t, lag_ms, name in ((true_on, result["onset_p50"], "onset"), (true_off, result["release_p50"], "release")):
        ax.annotate("", xy=(true_t + lag_ms, level - 0.12), xytext=(true_t, level - 0.12),
                    arrowprops=dict(arrowstyle="->", color="tab:red"))
        ax.plot([true_t, true_t], [level - 0.16, level], color="tab:red", lw=0.8)
        ax.text(true_t + lag_ms / 2.0, level - 0.2, "{} lag {:+.0f} ms".format(name, lag_ms), ha="center",
                va="top", fontsize=8, color="tab:red", bbox=dict(fc="white", ec="none", alpha=0.85))
    ax.set_xlabel("time (ms)")
    ax.set_ylabel("position (0..1)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("intent-to-command lag: decoded late by {:.0f} ms; cross-correlation lag {:+.0f} ms".format(
        late, result["xcorr"]), fontsize=10)
    ax.legend(loc="upper right", fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(args.out)
    print("{}: onset {onset_p50:+.0f} ms, release {release_p50:+.0f} ms, xcorr {xcorr:+.0f} ms".format(
        args.out, **result))


if __name__ == "__main__":
    main()
