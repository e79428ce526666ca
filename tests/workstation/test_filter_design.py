"""Filter design (scipy, workstation): validation, responses, and the device tests' stored configs.

The device tests run without scipy, so they read pipeline configs and a
scipy.sosfilt golden output from tests/device/data/pipelines.json.  That file
is made by ``build_reference_data()`` below; regenerate it with
``.venv/bin/python tests/workstation/test_filter_design.py`` and the test
``test_stored_reference_data_is_current`` keeps it honest.
"""
import json
import os
import sys

import numpy as np
import pytest

signal = pytest.importorskip("scipy.signal")

from neurohand.decoder.filter_design import (  # noqa: E402
    design_band_pass, design_chain, design_notches, notch_frequencies)
from neurohand.decoder.pipeline import FeaturePipeline  # noqa: E402
from neurohand.firmware_bridge.shared.errors import UsageError  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "device", "data", "pipelines.json")


def build_reference_data():
    """The JSON the device tests read: two pipeline configs and a sosfilt golden output."""
    default = FeaturePipeline.design(10000.0, 16)
    small = FeaturePipeline.design(1000.0, 4, {
        "band_hz": [10.0, 300.0], "band_order": 2, "notch_hz": 50.0, "notch_harmonics": 2,
        "window_s": 0.05, "stride_s": 0.01, "car": True})
    x = np.random.RandomState(0).normal(0.0, 20.0, (300, 3))
    golden = signal.sosfilt(default.sos, x, axis=0)
    return {
        "about": "made by tests/workstation/test_filter_design.py build_reference_data(); do not edit",
        "default_10k_16ch": default.to_config(),
        "small_1k_4ch": small.to_config(),
        "sosfilt_golden": {"input": "np.random.RandomState(0).normal(0.0, 20.0, (300, 3))",
                           "sos": "default_10k_16ch", "output": golden.tolist()},
    }


def test_stored_reference_data_is_current():
    with open(DATA) as handle:
        stored = json.load(handle)
    assert stored == json.loads(json.dumps(build_reference_data()))


def _gain(sos, frequency, rate):
    _, response = signal.sosfreqz(sos, worN=[frequency], fs=rate)
    return abs(response[0])


def test_default_chain_passes_band_and_removes_mains():
    sos, description = design_chain(10000.0, [20.0, 3000.0], 4, 50.0, 3, 30.0)
    assert sos.shape == (7, 6)
    assert description["notch_hz"] == [50.0, 100.0, 150.0]
    assert abs(_gain(sos, 500.0, 10000.0) - 1.0) < 0.01
    for mains in (50.0, 100.0, 150.0):
        assert _gain(sos, mains, 10000.0) < 1e-3
    assert _gain(sos, 4500.0, 10000.0) < 0.05
    assert _gain(sos, 2.0, 10000.0) < 0.01


def test_harmonics_stop_below_nyquist():
    assert notch_frequencies(250.0, 50.0, 5) == [50.0, 100.0]
    sos, frequencies = design_notches(250.0, 50.0, 5, 30.0)
    assert frequencies == [50.0, 100.0] and sos.shape == (2, 6)


@pytest.mark.parametrize("band, message", [
    ([20.0, 5000.0], "Nyquist"),
    ([20.0, 6000.0], "Nyquist"),
    ([0.0, 300.0], "greater than 0"),
    ([-5.0, 300.0], "greater than 0"),
    ([300.0, 20.0], "below the high edge"),
    ([20.0], "pair"),
])
def test_band_pass_refuses_nonsense(band, message):
    with pytest.raises(UsageError, match=message):
        design_band_pass(10000.0, band, 4)


@pytest.mark.parametrize("order", [0, 9, 2.5, True])
def test_band_order_limits(order):
    with pytest.raises(UsageError, match="band_order"):
        design_band_pass(10000.0, [20.0, 3000.0], order)


def test_notch_above_nyquist_refused():
    with pytest.raises(UsageError, match="Nyquist"):
        notch_frequencies(80.0, 50.0, 1)
    with pytest.raises(UsageError, match="notch_hz"):
        notch_frequencies(1000.0, 0.0, 1)


def test_marginal_design_refused():
    # A 1e-4 Hz-wide band at 10 kHz puts poles within ~1e-7 of the unit circle.
    with pytest.raises(UsageError, match="pole radius"):
        design_band_pass(10000.0, [10.0, 10.0001], 8)


def test_pipeline_design_defaults_and_settings_checks():
    pipeline = FeaturePipeline.design(10000.0, 16)
    assert (pipeline.window_samples, pipeline.stride_samples) == (1000, 200)
    assert pipeline.n_features == 16 * (5 + 4)
    assert len(pipeline.feature_names) == pipeline.n_features
    low_rate = FeaturePipeline.design(2000.0, 2)       # default upper edge follows the rate
    assert low_rate.to_config()["filter"]["band_hz"] == [20.0, 900.0]
    with pytest.raises(UsageError, match="Nyquist"):
        FeaturePipeline.design(2000.0, 2, {"band_hz": [20.0, 3000.0]})
    with pytest.raises(UsageError, match="did you mean 'window_s'"):
        FeaturePipeline.design(10000.0, 16, {"windw_s": 0.1})
    with pytest.raises(UsageError, match="envelope mode"):
        FeaturePipeline.design(100.0, 10, {"mode": "envelope", "band_hz": [1.0, 20.0]})
    with pytest.raises(UsageError, match="at least 2 channels"):
        FeaturePipeline.design(10000.0, 1, {"car": True})
    with pytest.raises(UsageError, match="holds no FFT bin"):
        FeaturePipeline.design(10000.0, 2, {"bandpower_bands_hz": [[21.0, 29.0]]})
    with pytest.raises(UsageError, match="feature"):
        FeaturePipeline.design(10000.0, 2, {"features": ["mav", "rsm"]})


def test_design_then_device_load_gives_same_features():
    pipeline = FeaturePipeline.design(10000.0, 4, {"car": True})
    x = np.random.RandomState(3).normal(0.0, 10.0, (4000, 4))
    loaded = FeaturePipeline.from_config(json.loads(json.dumps(pipeline.to_config())))
    np.testing.assert_array_equal(pipeline.transform(x)[0], loaded.transform(x)[0])


if __name__ == "__main__":
    with open(DATA, "w") as handle:
        json.dump(build_reference_data(), handle, indent=1)
        handle.write("\n")
    print("wrote", os.path.normpath(DATA), file=sys.stderr)
