"""Footprint benchmark: output shape, and the device path loads neither torch nor scipy.

Figures are never checked for speed (that is the bench's job); only for
properties that hold on any machine (a median lies within its range, numpy
costs memory over a bare interpreter).
"""
import json
import os

import pytest

from neurohand.deploy.bench import footprint as footprint_bench

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SPREAD_KEYS = {"median", "min", "max"}


@pytest.fixture(scope="module")
def quick_result():
    return footprint_bench.run(True, data_dir=DATA)


def test_quick_run_is_one_json_document_with_every_scenario(quick_result):
    document = json.loads(json.dumps(quick_result))
    assert set(document["scenarios"]) == {"python_bare", "import_numpy", "cli_parser", "device_step"}
    assert document["skipped"] == {}
    assert document["repeats"] == 2 and document["quick"] is True
    for name, figures in document["scenarios"].items():
        assert figures["what"]
        for metric in ("wall_ms", "cpu_ms", "peak_rss_mib"):
            spread = figures[metric]
            assert set(spread) == SPREAD_KEYS, (name, metric)
            assert 0 < spread["min"] <= spread["median"] <= spread["max"], (name, metric, spread)
        assert figures["modules"] > 0
    assert set(document["ratios"]) == {"cli_parser", "device_step"}
    assert set(document["ratios"]["device_step"]) == {
        "peak_rss_vs_python_bare", "peak_rss_vs_import_numpy", "wall_vs_python_bare", "wall_vs_import_numpy"}


def test_scenarios_measure_what_they_load(quick_result):
    scenarios = quick_result["scenarios"]
    # numpy is loaded by the device step and not by a bare interpreter: memory and modules show it.
    assert scenarios["import_numpy"]["peak_rss_mib"]["median"] > scenarios["python_bare"]["peak_rss_mib"]["median"]
    assert scenarios["device_step"]["peak_rss_mib"]["median"] > scenarios["python_bare"]["peak_rss_mib"]["median"]
    assert scenarios["device_step"]["modules"] > scenarios["import_numpy"]["modules"]
    ratio = quick_result["ratios"]["device_step"]["peak_rss_vs_python_bare"]
    expected = scenarios["device_step"]["peak_rss_mib"]["median"] / scenarios["python_bare"]["peak_rss_mib"]["median"]
    assert ratio == pytest.approx(expected, abs=0.01)


def test_device_path_imports_neither_torch_nor_scipy(quick_result):
    for name in ("cli_parser", "device_step"):
        heavy = quick_result["scenarios"][name]["heavy_modules"]
        assert "torch" not in heavy and "scipy" not in heavy, (name, heavy)
    assert quick_result["device_path"] == {"forbidden": ["torch", "scipy"], "forbidden_found": {}, "ok": True}


def test_bundle_size_counts_every_file(quick_result):
    bundle = quick_result["bundle"]
    assert set(bundle["files"]) == {"manifest.json", "model.onnx", "config.json", "golden.npz"}
    assert bundle["files"]["model.onnx"] == os.path.getsize(os.path.join(DATA, "golden_gru.onnx"))
    assert bundle["total_bytes"] == sum(bundle["files"].values())
    assert 0 < bundle["archive_gz_bytes"] < bundle["total_bytes"] + 10240
    assert quick_result["default_size_bundle"] == {"skipped": "quick run"}


def test_a_forbidden_module_in_the_child_is_detected():
    # The detector must be able to fail: a child that registers a module named
    # torch (without needing torch installed) is reported.
    sample = footprint_bench.measure_once("import types\nsys.modules['torch'] = types.ModuleType('torch')\n")
    assert "torch" in footprint_bench.heavy_modules(sample["modules"])
    assert sample["peak_rss_kib"] > 0 and sample["wall_s"] > 0


def test_heavy_modules_matches_top_level_names_only():
    assert footprint_bench.heavy_modules(["scipy.signal", "numpy", "torchvision", "json"]) == ["scipy"]


def test_a_failing_scenario_raises_with_its_error():
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        footprint_bench.measure_once("1 / 0\n")


def test_without_test_data_the_bundle_scenarios_say_why(monkeypatch):
    monkeypatch.setattr(footprint_bench, "default_data_dir", lambda: None)
    monkeypatch.setattr(footprint_bench, "BASELINES", ("python_bare",))

    def only_bare(names, repeats, bundle_path=None, cwd=None):
        assert bundle_path is None and "device_step" not in names
        return {name: {"heavy_modules": [], "peak_rss_mib": {"median": 1.0}, "wall_ms": {"median": 1.0}}
                for name in names}
    monkeypatch.setattr(footprint_bench, "measure_scenarios", only_bare)
    result = footprint_bench.run(True)
    assert set(result["skipped"]) == {"device_step"}
    assert "skipped" in result["bundle"] and "skipped" in result["default_size_bundle"]
    assert result["device_path"]["ok"] is True
