"""The intent-to-command lag (decoder/lag.py, docs/latency.md): synthetic trajectories with a known
delay, leads, misses and degenerate input; and ``neurohand replay --json`` end to end."""
import json

import numpy as np
import pytest

from neurohand.decoder import lag
from neurohand.deploy.bundle import make_bundle
from neurohand.deploy.cli import main as cli
from neurohand.deploy.demo import write_session_parts
from neurohand.firmware_bridge.virtual.simulator import SimulatorConfig

STEP_MS = 10.0           # one sample of a 100 Hz glove
MOVE, REST = 200, 150    # samples per movement and rest
RAMP = 30
HEADLINE = ("onset_p50", "onset_p90", "release_p50", "release_p90", "xcorr")


def trajectories(n_movements=8, outputs=2, seed=0):
    """Rounded ramps up and back, one output per movement at full range and the next at 60 %;
    returns (truth (n, outputs), movements [(start, stop)] in samples)."""
    rng = np.random.RandomState(seed)
    n = REST + n_movements * (MOVE + REST)
    t = np.arange(n)
    truth = np.zeros((n, outputs))
    movements = []
    for k in range(n_movements):
        start = REST + k * (MOVE + REST) + rng.randint(-20, 20)
        shape = np.clip((t - start) / float(RAMP), 0, 1) * np.clip((start + MOVE - t) / float(RAMP), 0, 1)
        truth[:, k % outputs] += shape
        truth[:, (k + 1) % outputs] += 0.6 * shape
        movements.append((start, start + MOVE))
    return truth, movements


def delayed(truth, delay, noise=0.0, seed=1):
    """``truth`` late by ``delay`` samples (early where negative), nan before its first sample, plus noise."""
    rng = np.random.RandomState(seed)
    decoded = np.full(truth.shape, np.nan)
    if delay >= 0:
        decoded[delay:] = truth[:len(truth) - delay]
    else:
        decoded[:delay] = truth[-delay:]
        decoded[delay:] = truth[-1]
    return decoded + rng.normal(scale=noise, size=truth.shape)


def summary(truth, decoded, movements):
    return lag.lag_summary([(truth, decoded, movements)], step_ms=STEP_MS)


@pytest.mark.parametrize("delay", [0, 3, 12, 25])
@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_a_delayed_copy_shows_its_delay_within_a_sample(delay, noise):
    truth, movements = trajectories()
    result = summary(truth, delayed(truth, delay, noise), movements)
    assert result["reason"] is None and result["movements"] == len(movements)
    assert result["onsets"] == result["releases"] == 2 * len(movements)
    assert result["onsets_missed"] == result["releases_missed"] == 0
    for key in ("onset_p50", "release_p50", "xcorr"):
        assert abs(result[key] - delay * STEP_MS) <= STEP_MS, (key, result)
    # Noise moves single crossings by a sample or so either way; the 90th percentile shows it.
    for key in ("onset_p90", "release_p90"):
        assert abs(result[key] - delay * STEP_MS) <= (1 if noise == 0 else 2) * STEP_MS, (key, result)
    for f in ("0.2", "0.5"):
        assert abs(result["thresholds"][f]["onset_p50"] - delay * STEP_MS) <= STEP_MS


def test_a_decoded_signal_that_leads_has_a_negative_lag():
    truth, movements = trajectories()
    result = summary(truth, delayed(truth, -8, 0.01), movements)
    for key in HEADLINE:
        assert abs(result[key] + 80.0) <= STEP_MS, (key, result)


def test_random_delays_and_noise():
    """Property: for any delay within +-300 ms and mild noise, the medians and the cross-correlation are
    the delay within a sample, the 90th percentiles within two."""
    rng = np.random.RandomState(42)
    for trial in range(12):
        delay = int(rng.randint(-30, 31))
        truth, movements = trajectories(n_movements=int(rng.randint(3, 9)), outputs=int(rng.randint(1, 4)),
                                        seed=trial)
        result = summary(truth, delayed(truth, delay, rng.uniform(0, 0.03), seed=trial), movements)
        assert result["onsets_missed"] == result["releases_missed"] == 0, (delay, result)
        for key in HEADLINE:
            tolerance = 2 if key.endswith("p90") else 1
            assert abs(result[key] - delay * STEP_MS) <= tolerance * STEP_MS, (trial, delay, key, result)


def test_movements_the_decoder_never_crosses_are_counted_as_missed():
    truth, movements = trajectories(outputs=1)
    decoded = delayed(truth, 5)
    # The third and sixth movements reach only 30 % of their excursion.
    for start, stop in (movements[2], movements[5]):
        decoded[start:stop + 60] *= 0.3
    result = summary(truth, decoded, movements)
    assert result["onsets_missed"] == 2 and result["onsets"] == len(movements) - 2
    assert result["releases_missed"] == 2
    assert result["thresholds"]["0.2"]["onsets_missed"] == 0     # 30 % is past the 20 % level
    assert abs(result["onset_p50"] - 50.0) <= STEP_MS


def test_a_dip_during_the_hold_is_not_the_release():
    truth, movements = trajectories(outputs=1)
    decoded = delayed(truth, 5)
    for start, _ in movements:
        decoded[start + 80:start + 100] = 0.0      # 200 ms dropout in the middle of every hold
    result = summary(truth, decoded, movements)
    assert abs(result["release_p50"] - 50.0) <= STEP_MS


def test_flat_labels_and_no_movements_give_nulls_with_a_reason():
    truth, movements = trajectories()
    flat = np.full_like(truth, 0.3)
    result = summary(flat, delayed(truth, 2), movements)
    assert result["xcorr"] is None and result["onset_p50"] is None and result["onsets"] == 0
    assert "no output varies" in result["reason"]
    result = summary(truth, delayed(truth, 2), [])
    assert result["onset_p50"] is None and result["movements"] == 0 and "no movement" in result["reason"]
    assert abs(result["xcorr"] - 20.0) <= STEP_MS        # the trajectories still have a timing
    result = lag.lag_summary([], step_ms=STEP_MS)
    assert result["xcorr"] is None and result["reason"]
    json.dumps(result)


def test_a_lag_beyond_the_cross_correlation_search_is_null_not_its_edge():
    truth, movements = trajectories()
    result = lag.lag_summary([(truth, delayed(truth, 25), movements)], step_ms=STEP_MS, max_xcorr_ms=150.0)
    assert result["xcorr"] is None and "edge" in result["reason"]
    assert abs(result["onset_p50"] - 250.0) <= STEP_MS       # the crossings do not depend on the search


def test_a_short_piece_and_no_decoded_command_are_not_measured():
    truth, movements = trajectories()
    nothing = np.full_like(truth, np.nan)
    result = summary(truth, nothing, movements)
    assert result["onsets"] == 0 and result["onsets_not_measured"] == 2 * len(movements)
    assert result["xcorr"] is None and result["reason"]
    short = summary(truth[:3], delayed(truth, 0)[:3], movements)
    assert short["xcorr"] is None and short["movements"] == 0


def test_hold_jitter_of_white_noise_is_its_second_difference():
    """Independent noise of SD s has a second difference of SD sqrt(6) s; measured only where the truth
    is still, and nothing of a clean (late) copy's movements counts as jitter."""
    truth, movements = trajectories()
    clean = summary(truth, delayed(truth, 5), movements)
    assert clean["jitter"] == 0.0 and clean["jitter_points"] > 0
    noisy = summary(truth, delayed(truth, 5, noise=0.02), movements)
    assert noisy["jitter_points"] == clean["jitter_points"]
    assert abs(noisy["jitter"] - np.sqrt(6.0) * 0.02) < 0.1 * np.sqrt(6.0) * 0.02, noisy["jitter"]
    # Noise while the truth moves (and for 100 ms after) is the lag's and R²'s business, not jitter.
    moving = np.abs(np.diff(truth, axis=0, prepend=truth[:1])) > 0
    near_moving = np.zeros_like(moving)
    for shift in range(-10, 11):
        near_moving |= np.roll(moving, shift, axis=0)
    rng = np.random.RandomState(3)
    decoded = delayed(truth, 5) + np.where(near_moving, rng.normal(scale=0.2, size=truth.shape), 0.0)
    assert summary(truth, decoded, movements)["jitter"] == 0.0


def test_hold_jitter_needs_the_truth_still_for_the_whole_half_width():
    truth, movements = trajectories(n_movements=2, outputs=1)
    # Up 0.03 every 100 ms: 0.16 in any 520 ms, over 2 % of its range (3.5): never still.
    drift = truth + 0.03 * np.arange(len(truth))[:, None] / 10.0
    rng = np.random.RandomState(4)
    decoded = drift + rng.normal(scale=0.02, size=drift.shape)
    result = summary(drift, decoded, movements)
    assert result["jitter"] is None and result["jitter_points"] == 0
    # The first second of decoding is the decoder starting from rest, not a hold.
    start = delayed(truth, 5)
    start[5:40] += 0.5 * (np.arange(35) % 2)[:, None]
    assert summary(truth, start, movements)["jitter"] == 0.0
    nothing = summary(truth, np.full_like(truth, np.nan), movements)
    assert nothing["jitter"] is None and nothing["jitter_points"] == 0
    # A half-width of 2 steps counts more of the holds than one of 26.
    wide, narrow = (lag.hold_jitter([(truth, delayed(truth, 0, 0.01), movements)], STEP_MS, half_width_ms=h)[1]
                    for h in (260.0, 40.0))
    assert 0 < wide < narrow


def test_movement_events_become_grid_spans():
    events = [(100, "movement", 0), (300, "repetition", 1), (300, "movement", 4), (500, "movement", 0),
              (700, "movement", 2), (800, "movement", 3), (950, "movement", 5)]
    # A new movement ends the one before it; the last one runs on to the end of the recording.
    assert lag.movements_from_events(events, 100, 2.0) == [(100, 200), (300, 350), (350, 425), (425, None)]


def test_hold_keeps_each_command_until_the_next():
    held = lag.hold(np.array([10.0, 20.0]), np.array([[1.0], [2.0]]), np.array([5.0, 10.0, 15.0, 20.0, 99.0]))
    assert np.isnan(held[0, 0]) and held[1:, 0].tolist() == [1.0, 1.0, 2.0, 2.0]


# --- replay end to end ------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(bundle, held-out recording) as in test_run_replay.py: the committed fixture run, easy simulator."""
    import os
    from test_run_replay import HELDOUT_S, RUN_DIR, read_fixture_config

    folder = tmp_path_factory.mktemp("lag")
    bundle = str(folder / "bundle")
    make_bundle(RUN_DIR, bundle)
    fixture = read_fixture_config()["fixture"]
    recording = str(folder / "heldout.nhr")
    start = fixture["train_s"]
    write_session_parts(SimulatorConfig(**fixture["session"]), [(recording, start, start + HELDOUT_S)])
    assert cli.main(["selftest", bundle, "--backend", "numpy"]) == 0
    assert os.path.exists(recording)
    return bundle, recording


def test_fast_replay_json_holds_the_lag(data, capsys):
    bundle, recording = data
    capsys.readouterr()
    assert cli.main(["replay", bundle, recording, "--fast", "--json", "--backend", "numpy", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    lag_ms = result["lag_ms"]
    for key in HEADLINE + ("onsets", "onsets_missed", "releases_missed", "movements", "reason", "thresholds",
                           "jitter", "jitter_points"):
        assert key in lag_ms, key
    assert lag_ms["jitter_points"] > 0 and lag_ms["jitter"] >= 0
    assert lag_ms["movements"] >= 1 and lag_ms["reason"] is None
    # A window of 0.1 s and a stride of 0.02 s cannot make a decoder earlier than its window's middle
    # lags the glove's own 40-140 ms behind the nerve; only a bound that cannot move with tuning here.
    assert -500 < lag_ms["xcorr"] < 1000 and lag_ms["onsets"] >= 1
    assert cli.main(["replay", bundle, recording, "--fast", "--backend", "numpy", "--quiet"]) == 0
    assert "onset p50" in capsys.readouterr().out


def test_the_lag_bench_scores_post_processing_as_evaluate_scores_the_decoder(data):
    """deploy/bench/lag.py (workstation): its raw variant is ``evaluate``'s decoder, and a heavy filter
    shows what it costs (a later cross-correlation) and what it buys (less hold jitter)."""
    pytest.importorskip("neurohand.train.evaluate")
    from test_run_replay import RUN_DIR
    from neurohand.deploy.bench import lag as lag_bench
    from neurohand.train import evaluate

    _, recording = data
    variants = {"raw": None, "today": {"smoothing_tau_ms": 0.0, "max_slew_per_s": 10.0},
                "heavy": {"smoothing": "one_euro", "one_euro_min_cutoff_hz": 0.3, "one_euro_beta": 0.0}}
    result = lag_bench.measure(RUN_DIR, recording, variants, split="test")
    scores = evaluate.evaluate_run(RUN_DIR, recording, with_baselines=False)
    raw, heavy = result["variants"]["raw"], result["variants"]["heavy"]
    assert raw["mean_r2"] == pytest.approx(scores["mean_r2"], abs=1e-9)
    assert raw["xcorr"] == scores["lag_ms"]["xcorr"] and raw["jitter"] == scores["lag_ms"]["jitter"]
    assert heavy["settings"]["smoothing"] == "one_euro" and result["variants"]["raw"]["settings"] is None
    assert 0 < heavy["jitter"] < raw["jitter"] / 3
    assert heavy["xcorr"] > raw["xcorr"] + 50
    json.dumps(result)
