"""The 1-euro filter of the post-processing (deploy/runtime/postprocess.py; Casiez et al., CHI 2012):
against the paper's own formulation, its step response, what it does to a hold and to a fast move
next to exponential smoothing, and its settings' ranges (docs/runtime.md)."""
import json
import math

import numpy as np
import pytest

from neurohand.deploy.runtime.config import DEFAULTS, RANGES, RuntimeConfig
from neurohand.deploy.runtime.options import add_runtime_arguments, config_from_args
from neurohand.deploy.runtime.postprocess import PostProcessor
from neurohand.firmware_bridge.shared.errors import UsageError

DT = 0.02
ONE_EURO_SETTINGS = ("one_euro_min_cutoff_hz", "one_euro_beta", "one_euro_d_cutoff_hz")


def one_euro(min_cutoff, beta, d_cutoff=1.0, n=1, slew=None):
    return PostProcessor(n, [0.0] * n, [1.0] * n, [0.0] * n, None if slew is None else [slew] * n,
                         one_euro=([min_cutoff] * n, [beta] * n, [d_cutoff] * n))


def exponential(tau_s, n=1):
    return PostProcessor(n, [0.0] * n, [1.0] * n, [tau_s] * n, None)


def run(post, values, dt=DT):
    return np.array([post.process(np.atleast_1d(v), dt)[0] for v in values])


class PaperFilter(object):
    """The paper's pseudo-code (its Algorithm 1), scalar, written apart from the runtime's vector code;
    started at ``x0`` with no speed, as the runtime starts at the hand position."""

    def __init__(self, min_cutoff, beta, d_cutoff, x0=0.0):
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.hat_x, self.hat_dx = x0, 0.0

    @staticmethod
    def alpha(rate, cutoff):
        tau = 1.0 / (2 * math.pi * cutoff)
        te = 1.0 / rate
        return 1.0 / (1.0 + tau / te)

    def filter(self, x, rate):
        dx = (x - self.hat_x) * rate
        a_d = self.alpha(rate, self.d_cutoff)
        self.hat_dx = a_d * dx + (1 - a_d) * self.hat_dx
        cutoff = self.min_cutoff + self.beta * abs(self.hat_dx)
        a = self.alpha(rate, cutoff)
        self.hat_x = a * x + (1 - a) * self.hat_x
        return self.hat_x


def test_it_is_the_papers_filter_at_any_step_and_setting():
    rng = np.random.RandomState(0)
    settings = [(0.5, 0.0, 1.0), (1.0, 2.0, 1.0), (3.0, 20.0, 0.3)]
    post = PostProcessor(3, [0.0] * 3, [1.0] * 3, [0.0] * 3, None,
                         one_euro=tuple(list(column) for column in zip(*settings)))
    papers = [PaperFilter(*s) for s in settings]
    inputs = np.clip(np.cumsum(rng.normal(scale=0.05, size=(300, 3)), axis=0) + 0.5, 0, 1)
    steps = rng.choice([0.01, 0.02, 0.04, 0.06], size=300)      # skipped windows change dt
    for x, dt in zip(inputs, steps):
        out = post.process(x, dt)
        expected = [paper.filter(value, 1.0 / dt) for paper, value in zip(papers, x)]
        assert out == pytest.approx(expected, abs=1e-12)


def test_step_response_without_speed_term_is_a_first_order_low_pass():
    # beta = 0: a fixed cut-off f, so s_n = 1 - (1 - a)^n with a = 2 pi f dt / (1 + 2 pi f dt).
    a = 2 * math.pi * 2.0 * DT / (1 + 2 * math.pi * 2.0 * DT)
    out = run(one_euro(2.0, 0.0), [1.0] * 20)
    assert out == pytest.approx([1 - (1 - a) ** n for n in range(1, 21)], abs=1e-12)


def test_step_response_with_speed_term_is_faster_and_never_overshoots():
    slow = run(one_euro(1.0, 0.0), [1.0] * 50)
    fast = run(one_euro(1.0, 5.0), [1.0] * 50)
    assert np.all(fast >= slow) and np.all(np.diff(fast) >= 0) and fast.max() <= 1.0
    assert np.argmax(fast >= 0.9) < np.argmax(slow >= 0.9) / 2
    assert fast[-1] > 0.99


def test_a_stationary_noisy_input_is_smoothed():
    rng = np.random.RandomState(1)
    noisy = 0.5 + rng.normal(scale=0.03, size=2000)
    out = run(one_euro(1.0, 1.0), noisy)[200:]          # past the start from the open hand
    assert abs(out.mean() - 0.5) < 0.01
    assert np.std(np.diff(out, 2)) < np.std(np.diff(noisy[200:], 2)) / 10
    assert np.std(out) < np.std(noisy) / 3


def hold_jitter_and_crossing(post, signal, holds, level):
    """RMS second difference over the ``holds`` (slices), and the first step at or past ``level``."""
    out = run(post, signal)
    second = np.concatenate([np.diff(out[hold], 2) for hold in holds])
    return np.sqrt(np.mean(second ** 2)), int(np.argmax(out >= level))


def test_a_fast_move_is_followed_with_less_lag_than_exponential_smoothing_of_equal_hold_jitter():
    """Rest at 0.2, a 100 ms ramp to 0.8, hold; noise throughout.  The time constant of exponential
    smoothing is chosen (bisection) to give the 1-euro filter's jitter in the holds; then the 1-euro
    output crosses the movement's middle at least 40 ms earlier."""
    rng = np.random.RandomState(2)
    n, start = 400, 200
    clean = np.full(n, 0.2)
    clean[start:start + 5] = 0.2 + 0.6 * np.arange(1, 6) / 5.0
    clean[start + 5:] = 0.8
    noisy = clean + rng.normal(scale=0.02, size=n)
    hold = (slice(100, start), slice(start + 100, n))
    euro_jitter, euro_cross = hold_jitter_and_crossing(one_euro(1.0, 1.0), noisy, hold, 0.5)
    low, high = 0.0, 2.0
    for _ in range(16):
        tau = 0.5 * (low + high)
        if hold_jitter_and_crossing(exponential(tau), noisy, hold, 0.5)[0] > euro_jitter:
            low = tau
        else:
            high = tau
    exp_jitter, exp_cross = hold_jitter_and_crossing(exponential(high), noisy, hold, 0.5)
    assert exp_jitter <= euro_jitter * 1.001 and high > 0.05      # a real trade, not tau = 0
    assert (exp_cross - euro_cross) * DT >= 0.04, (euro_cross, exp_cross, high)


def test_reset_clears_the_speed_and_the_slew_limit_still_applies():
    post = one_euro(1.0, 5.0, slew=5.0)
    out = run(post, [1.0] * 3)
    assert out == pytest.approx([0.1, 0.2, 0.3])                  # 5 per second at 20 ms steps
    post.reset(np.array([0.5]))
    again = one_euro(1.0, 5.0, slew=5.0)
    again.reset(np.array([0.5]))
    assert run(post, [0.5, 0.9]) == pytest.approx(run(again, [0.5, 0.9]), abs=0)


def test_from_config_builds_the_one_euro_filter_per_finger():
    config = RuntimeConfig(smoothing="one_euro", one_euro_min_cutoff_hz=[1.0, 2.0], one_euro_beta=0.0,
                           one_euro_d_cutoff_hz=1.0, max_slew_per_s=None)
    post = PostProcessor.from_config(config, 2)
    out = post.process(np.array([1.0, 1.0]), DT)
    expected = [2 * math.pi * f * DT / (1 + 2 * math.pi * f * DT) for f in (1.0, 2.0)]
    assert out == pytest.approx(expected, abs=1e-12)
    with pytest.raises(UsageError, match="3 values but the decoder has 2"):
        PostProcessor.from_config(RuntimeConfig(smoothing="one_euro", one_euro_beta=[1, 2, 3]), 2)


def test_the_constructor_refuses_both_smoothings_and_bad_parameters():
    with pytest.raises(ValueError, match="time constants must be 0"):
        PostProcessor(1, [0.0], [1.0], [0.1], None, one_euro=([1.0], [1.0], [1.0]))
    for bad in (([0.0], [1.0], [1.0]), ([1.0], [-1.0], [1.0]), ([1.0], [1.0], [0.0])):
        with pytest.raises(ValueError, match="cut-offs"):
            PostProcessor(1, [0.0], [1.0], [0.0], None, one_euro=bad)


# -- settings

@pytest.mark.parametrize("name", ONE_EURO_SETTINGS)
def test_one_euro_settings_outside_their_range_or_not_numbers_are_refused(name):
    low, high = RANGES[name]
    RuntimeConfig(smoothing="one_euro", **{name: low})
    RuntimeConfig(smoothing="one_euro", **{name: [high, low]})
    for value in (low - 1e-3, -1.0, high * 10, float("nan"), float("inf"), True, "1", None, [], [1.0, -5.0]):
        with pytest.raises(UsageError) as caught:
            RuntimeConfig(smoothing="one_euro", **{name: value})
        assert name in str(caught.value) and "\n" not in str(caught.value)


def test_the_smoothing_kind_is_checked_and_the_other_kinds_settings_refused():
    for value in ("euro", "", None, 1, True):
        with pytest.raises(UsageError, match="smoothing"):
            RuntimeConfig(smoothing=value)
    other = "one_euro" if DEFAULTS["smoothing"] == "exponential" else "exponential"
    with pytest.raises(UsageError, match="smoothing_tau_ms applies to smoothing 'exponential'"):
        RuntimeConfig(smoothing="one_euro", smoothing_tau_ms=[0, 30])
    with pytest.raises(UsageError, match="one_euro_beta applies to smoothing 'one_euro'"):
        RuntimeConfig(smoothing="exponential", one_euro_beta=3.0)
    # Values equal to the defaults do nothing either way and round-trip.
    for kind in (DEFAULTS["smoothing"], other):
        config = RuntimeConfig(smoothing=kind, smoothing_tau_ms=[0, 0])
        assert RuntimeConfig(**config.to_dict()).to_dict() == config.to_dict()


def test_smoothing_flags(tmp_path):
    import argparse
    path = tmp_path / "runtime.json"
    path.write_text(json.dumps({"smoothing": "one_euro", "one_euro_beta": 4}))

    def parse(*argv):
        return config_from_args(add_runtime_arguments(argparse.ArgumentParser()).parse_args(list(argv)))
    config = parse("--runtime-config", str(path))
    assert config.smoothing == "one_euro" and config.one_euro_beta == 4.0
    assert parse("--smoothing-ms", "30").smoothing == "exponential"       # the flag names what it sets
    assert parse("--smoothing", "one_euro").smoothing == "one_euro"
    with pytest.raises(UsageError, match="smoothing_tau_ms applies"):
        parse("--smoothing", "one_euro", "--smoothing-ms", "30")
