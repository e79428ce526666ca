"""Post-processing math (calibration, clamp, smoothing, slew) and runtime settings."""
import json
import math

import numpy as np
import pytest

from neurohand.deploy.runtime.config import RuntimeConfig, load_runtime_config
from neurohand.deploy.runtime.postprocess import PostProcessor
from neurohand.firmware_bridge.shared.errors import ConfigError, UsageError


def make(n=1, lo=0.0, hi=1.0, tau=0.0, slew=None, initial=None):
    def vec(v):
        return v if isinstance(v, list) else [v] * n
    return PostProcessor(n, vec(lo), vec(hi), vec(tau), None if slew is None else vec(slew), initial)


def test_calibration_maps_range_and_clamps():
    post = make(lo=0.2, hi=0.6)
    # (0.4 - 0.2) / 0.4 = 0.5; below lo -> 0; above hi -> 1
    assert post.process(np.array([0.4]), 0.02)[0] == pytest.approx(0.5)
    assert post.process(np.array([0.1]), 0.02)[0] == 0.0
    assert post.process(np.array([0.9]), 0.02)[0] == 1.0
    assert post.process(np.array([0.3]), 0.02)[0] == pytest.approx(0.25)


def test_inverted_calibration():
    post = make(lo=1.0, hi=0.0)
    assert post.process(np.array([0.25]), 0.02)[0] == pytest.approx(0.75)


def test_empty_calibration_range_is_refused():
    with pytest.raises(ValueError, match="empty"):
        make(lo=0.5, hi=0.5)


def test_exponential_smoothing_follows_closed_form():
    # Step from 0 to 1 with tau = 0.1 s, dt = 0.02 s: s_n = 1 - exp(-n dt / tau).
    post = make(tau=0.1)
    values = [post.process(np.array([1.0]), 0.02)[0] for _ in range(5)]
    expected = [1 - math.exp(-0.2 * n) for n in range(1, 6)]
    assert values == pytest.approx(expected, abs=1e-12)
    assert values[0] == pytest.approx(0.18126924692201818)


def test_no_smoothing_when_tau_is_zero():
    post = make(tau=0.0)
    assert post.process(np.array([0.7]), 0.02)[0] == pytest.approx(0.7)


def test_slew_limit_steps_at_rate_times_dt():
    post = make(slew=5.0)  # 5 per second, 0.02 s -> 0.1 per window
    values = [post.process(np.array([1.0]), 0.02)[0] for _ in range(12)]
    assert values == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.0, 1.0])
    # Down again, and a skipped window (dt = 0.06) allows three steps' worth.
    assert post.process(np.array([0.0]), 0.02)[0] == pytest.approx(0.9)
    assert post.process(np.array([0.0]), 0.06)[0] == pytest.approx(0.6)


def test_smoothing_then_slew_limit():
    # tau 0.1 s and 5/s: the smoothed value 1 - exp(-0.2 n) rises faster than
    # 0.1 per window for the first 7 windows, so the slew limit holds it to
    # 0.1 n; at n = 8 the limited value 0.7 is 0.098 below 1 - exp(-1.6) =
    # 0.798103, within one slew step, so it catches up.
    post = make(tau=0.1, slew=5.0)
    values = [post.process(np.array([1.0]), 0.02)[0] for _ in range(9)]
    assert values[:7] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    assert values[7] == pytest.approx(0.7981034820053446)
    assert values[8] == pytest.approx(1 - math.exp(-1.8))


def test_reset_restarts_from_the_hand_position():
    post = make(slew=5.0)
    post.reset(np.array([0.5]))
    assert post.process(np.array([1.0]), 0.02)[0] == pytest.approx(0.6)
    post.reset(np.array([2.0]))  # clamped into 0..1
    assert post.position[0] == 1.0


def test_per_finger_settings_are_independent():
    post = make(n=3, lo=[0.0, 0.5, 0.0], hi=[1.0, 1.0, 2.0], tau=[0.0, 0.0, 0.1], slew=[100.0, 100.0, 100.0])
    out = post.process(np.array([0.5, 0.75, 1.0]), 0.02)
    # finger 0: 0.5; finger 1: (0.75 - 0.5) / 0.5 = 0.5; finger 2: 0.5 smoothed once from 0
    assert out == pytest.approx([0.5, 0.5, 0.5 * (1 - math.exp(-0.2))])


def test_output_is_a_fresh_array_in_range():
    post = make(n=2, slew=None)
    first = post.process(np.array([0.2, 5.0]), 0.02)
    second = post.process(np.array([-3.0, 0.4]), 0.02)
    assert first.tolist() == [0.2, 1.0]
    assert second.tolist() == [0.0, 0.4]


def test_from_config_uses_milliseconds_and_per_finger_lists():
    config = RuntimeConfig(smoothing="exponential", smoothing_tau_ms=[0, 100], max_slew_per_s=None,
                           calibration={"lo": [0.0, 0.0], "hi": 0.5})
    post = PostProcessor.from_config(config, 2)
    out = post.process(np.array([0.25, 0.5]), 0.02)
    assert out == pytest.approx([0.5, 1 - math.exp(-0.2)])


# -- settings


def test_defaults_are_valid_and_round_trip():
    config = RuntimeConfig()
    assert config.safe_posture == "open" and config.data_timeout_ms == 100.0
    again = RuntimeConfig(**config.to_dict())
    assert again.to_dict() == config.to_dict()


def test_unknown_setting_suggests_the_right_name():
    with pytest.raises(UsageError, match="did you mean 'data_timeout_ms'"):
        RuntimeConfig(data_timout_ms=50)


@pytest.mark.parametrize("settings, match", [
    ({"safe_posture": "closed"}, "safe_posture"),
    ({"data_timeout_ms": 0}, "at least 10"),
    ({"recovery_windows": 0}, "at least 1"),
    ({"smoothing_tau_ms": -1}, "at least 0"),
    ({"smoothing_tau_ms": [1, float("nan")]}, "finite"),
    ({"max_slew_per_s": "fast"}, "number"),
    ({"calibration": {"lo": 0, "hi": 1, "mid": 0.5}}, "calibration key"),
    ({"calibration": [0, 1]}, "calibration must be an object"),
])
def test_bad_settings_are_refused_with_their_name(settings, match):
    with pytest.raises(UsageError, match=match):
        RuntimeConfig(**settings)


def test_per_finger_lists_must_match_the_outputs():
    config = RuntimeConfig(smoothing="exponential", smoothing_tau_ms=[10, 20, 30])
    with pytest.raises(UsageError, match="3 values but the decoder has 5 outputs"):
        config.check_outputs(5)
    with pytest.raises(UsageError, match="range must not be empty"):
        RuntimeConfig(calibration={"lo": 0.3, "hi": 0.3}).check_outputs(5)


def test_load_from_json_with_overrides(tmp_path):
    path = tmp_path / "runtime.json"
    path.write_text(json.dumps({"safe_posture": "hold", "max_slew_per_s": [1, 2, 3, 4, 5]}))
    config = load_runtime_config(str(path), {"data_timeout_ms": 50})
    assert config.safe_posture == "hold"
    assert config.data_timeout_ms == 50.0
    assert config.per_finger("max_slew_per_s", 5) == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_bad_json_file_names_the_file(tmp_path):
    path = tmp_path / "runtime.json"
    path.write_text('{"safe_posture": "hold",')
    with pytest.raises(ConfigError, match="runtime.json"):
        load_runtime_config(str(path))
    path.write_text('{"safe_posture": "sideways"}')
    with pytest.raises(ConfigError, match="runtime.json.*safe_posture"):
        load_runtime_config(str(path))
    path.write_text('[1, 2]')
    with pytest.raises(ConfigError, match="JSON object"):
        load_runtime_config(str(path))


def test_cli_options_build_the_config_without_importing_numpy(tmp_path):
    import subprocess
    import sys
    path = tmp_path / "runtime.json"
    path.write_text(json.dumps({"safe_posture": "hold", "data_timeout_ms": 80}))
    code = ("import argparse, sys\n"
            "from neurohand.deploy.runtime.options import add_runtime_arguments, config_from_args\n"
            "parser = add_runtime_arguments(argparse.ArgumentParser())\n"
            "args = parser.parse_args(['--runtime-config', sys.argv[1], '--data-timeout-ms', '150', '--quiet'])\n"
            "config = config_from_args(args)\n"
            "print(config.safe_posture, config.data_timeout_ms, config.status_interval_s, args.quiet,\n"
            "      'numpy' in sys.modules)\n")
    out = subprocess.check_output([sys.executable, "-c", code, str(path)], universal_newlines=True)
    assert out.split() == ["hold", "150.0", "0.0", "True", "False"]
