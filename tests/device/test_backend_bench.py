"""Shape of the backend benchmark's output (never its speed: that is the bench's job)."""
import json
import os

from neurohand.deploy.bench import backends as backend_bench
from neurohand.deploy.cli.main import main

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def test_measure_step_times_a_callable():
    calls = []
    figures = backend_bench.measure_step(lambda: calls.append(1), steps=30, repeats=3, warmup=5)
    assert len(calls) == 5 + 30 * 3
    assert set(figures) == {"p50_us", "p99_us", "max_us", "p99_us_range", "steps", "repeats"}
    assert 0 <= figures["p50_us"] <= figures["p99_us"] <= figures["max_us"]
    low, high = figures["p99_us_range"]
    assert low <= figures["p99_us"] <= high


def test_measure_backends_on_a_model_file():
    results, skipped = backend_bench.measure_backends(
        os.path.join(DATA, "golden_gru.onnx"), names=["numpy", "tensorrt"], steps=20, repeats=2)
    assert list(results) == ["numpy"] and results["numpy"]["steps"] == 20
    assert "tensorrt" in skipped or "tensorrt" in results


def test_cli_prints_one_json_object(capsys):
    assert main(["bench", "backends", "--json", "--quick"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert "rnn_step" in document and "skipped" in document
    for figures in document["rnn_step"].values():
        assert figures["p50_us"] > 0 and figures["p99_us"] >= figures["p50_us"]
    if document["rnn_step"]:      # torch present: the default-size model was measured
        assert "numpy" in document["rnn_step"] and "torch" in document["rnn_step"]
        assert document["model"]["hidden_size"] == 128 and document["model"]["num_layers"] == 2
        assert set(document["decode_step"]) == set(document["rnn_step"]) - {"torch"}
        for name, figures in document["decode_step"].items():
            # A decode step contains an RNN step, so its typical time cannot be smaller.
            assert figures["p50_us"] >= document["rnn_step"][name]["p50_us"] * 0.5
