"""The LibEMG comparison bench (deploy/bench/libemg.py).

LibEMG is not a neurohand dependency, so in the project's own venvs only the
"absent" report and the comparison helpers are tested; the agreement test
runs where LibEMG imports (e.g. a separate venv, see the module docstring).
"""
import importlib.util
import json
import sys

import numpy as np
import pytest

from neurohand.deploy.bench import libemg as libemg_compare

STATUS_KEYS = {"quick", "libemg_importable", "libemg_version", "libemg_unavailable_reason"}


def test_report_without_libemg_says_why_and_measures_nothing(monkeypatch):
    # None in sys.modules makes "import libemg" fail as if it were not installed.
    monkeypatch.delitem(sys.modules, "libemg.feature_extractor", raising=False)
    monkeypatch.setitem(sys.modules, "libemg", None)
    report = libemg_compare.run(quick=True)
    assert set(report) == STATUS_KEYS
    assert report["libemg_importable"] is False
    assert report["libemg_version"] is None
    assert report["libemg_unavailable_reason"].startswith("not installed: ")
    assert report["quick"] is True
    json.dumps(report)


def test_reason_names_a_missing_libemg_here():
    if importlib.util.find_spec("libemg") is not None:
        pytest.skip("libemg is installed in this environment")
    status = libemg_compare.libemg_status()
    assert status == {"importable": False, "version": None,
                      "reason": "not installed: No module named 'libemg'"}


def test_broken_dependency_is_reported_as_installed_but_not_importable(monkeypatch, tmp_path, capsys):
    # A stand-in package whose import fails the way LibEMG's does when one of its dependencies is missing,
    # after printing to stdout as LibEMG does on import.
    package = tmp_path / "libemg"
    package.mkdir()
    (package / "__init__.py").write_text("print('Bluepy not installed...')\nimport neurohand_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("libemg", "libemg.feature_extractor"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    status = libemg_compare.libemg_status()
    assert status["importable"] is False
    assert status["reason"] == ("installed but not importable: ModuleNotFoundError: "
                                "No module named 'neurohand_no_such_dependency'")
    printed = capsys.readouterr()
    assert printed.out == ""
    assert "Bluepy not installed" in printed.err


def test_differences_by_hand():
    ours = np.array([[1.0, 2.0, 0.0], [4.0, 0.0, 3.0]])
    reference = np.array([[1.0, 2.5, 0.0], [4.0, 0.0, 2.0]])
    assert libemg_compare.differences(ours, reference) == {
        "max_abs_diff": 1.0, "max_rel_diff": 0.5, "n_values": 6, "n_different": 2}
    # Nonzero where the reference is zero: no finite relative difference.
    assert libemg_compare.differences([1.0], [0.0])["max_rel_diff"] == float("inf")
    with pytest.raises(ValueError):
        libemg_compare.differences(np.zeros(2), np.zeros(3))


def test_flat_steps_counts_zero_slope_products():
    # Inner samples: 1 (steps +1, 0 -> product 0), 2 (0, 0), 3 (0, -1 -> 0), 4 (-1, +1 -> nonzero).
    windows = np.array([0.0, 1.0, 1.0, 1.0, 0.0, 1.0]).reshape(1, 1, 6)
    assert libemg_compare.flat_steps(windows) == 3


def test_ours_by_feature_matches_hand_values():
    window = np.array([1.0, -2.0, 3.0, 3.0, -1.0])
    windows = np.tile(window, (2, libemg_compare.N_CHANNELS, 1))
    values = libemg_compare.ours_by_feature(libemg_compare.ours_extractor(5, 0.0), windows)
    assert values["mav"].shape == (2, libemg_compare.N_CHANNELS)
    assert values["mav"][0, 0] == pytest.approx(2.0)
    assert values["rms"][0, 0] == pytest.approx(np.sqrt(24.0 / 5.0))
    assert values["wl"][0, 0] == pytest.approx(3 + 5 + 0 + 4)
    assert values["zc"][0, 0] == 3
    # Slope products at samples 1..3: 15, 0, 0 (flat step, not counted by ours).
    assert values["ssc"][0, 0] == 1


def test_features_agree_with_libemg():
    pytest.importorskip("scipy")
    status = libemg_compare.libemg_status()
    if not status["importable"]:
        pytest.skip("LibEMG not importable: {}".format(status["reason"]))
    report = libemg_compare.run(quick=True)
    json.dumps(report)
    features = report["features"]
    # Same formulas, same float64 operations: rounding at most.
    for name in ("mav", "rms", "wl"):
        assert features[name]["max_rel_diff"] <= 1e-12, (name, features[name])
    assert features["zc"]["n_different"] == 0
    # SSC may differ only on exactly flat steps (LibEMG counts product == 0 at threshold 0).
    assert features["ssc"]["max_abs_diff"] <= report["ssc_flat_steps"]
    assert report["ssc_at_default_threshold"]["n_different"] == 0
    assert features["zc"]["n_values"] == report["workload"]["windows_shape"][0] * libemg_compare.N_CHANNELS
    for case in ("batch", "per_window"):
        timing = report["speed"][case]
        assert timing["ours_ms"] > 0 and timing["libemg_ms"] > 0
        assert timing["ours_ms_spread"][0] <= timing["ours_ms"] <= timing["ours_ms_spread"][1]


def test_flat_steps_are_where_ssc_definitions_differ():
    status = libemg_compare.libemg_status()
    if not status["importable"]:
        pytest.skip("LibEMG not importable: {}".format(status["reason"]))
    from libemg.feature_extractor import FeatureExtractor
    windows = np.tile(np.array([1.0, -2.0, 3.0, 3.0, -1.0]), (1, libemg_compare.N_CHANNELS, 1))
    theirs = libemg_compare.libemg_by_feature(FeatureExtractor(), windows, 0.0)
    ours = libemg_compare.ours_by_feature(libemg_compare.ours_extractor(5, 0.0), windows)
    # Slope products 15, 0, 0: LibEMG's ">= 0" counts the two flat ones, ours does not.
    assert theirs["ssc"][0, 0] == 3 and ours["ssc"][0, 0] == 1
    assert libemg_compare.flat_steps(windows) == 2 * libemg_compare.N_CHANNELS
    for name in ("mav", "rms", "wl", "zc"):
        np.testing.assert_array_equal(ours[name], theirs[name])


def test_our_lda_decides_as_libemg_s_lda():
    status = libemg_compare.libemg_status()
    if not status["importable"]:
        pytest.skip("LibEMG not importable: {}".format(status["reason"]))
    rng = np.random.default_rng(0)
    means = rng.normal(scale=1.5, size=(4, 6))
    mixing = rng.normal(size=(6, 6)) / 3.0 + np.eye(6)
    classes_ = rng.integers(0, 4, 2000)
    features = means[classes_] + rng.normal(size=(2000, 6)) @ mixing
    result = libemg_compare.lda_comparison(features[:1500], classes_[:1500], features[1500:], classes_[1500:])
    # Same model (shared covariance, empirical priors, no shrinkage): the same decisions.
    assert result["agreement"] == 1.0
    assert result["ours"] == result["libemg"]
    assert 0.6 < result["ours"]["balanced_accuracy"] < 1.0
