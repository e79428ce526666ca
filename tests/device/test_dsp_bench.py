"""`neurohand bench dsp|features` produce the documented JSON (shape only: speed is never asserted)."""
import json
import subprocess
import sys


def bench(target):
    output = subprocess.run([sys.executable, "-m", "neurohand.deploy", "bench", target, "--json", "--quick"],
                            stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout
    return json.loads(output)


def has_timing(entry):
    return {"p50_us", "p99_us", "p50_us_spread", "p99_us_spread", "blocks", "repeats"} <= set(entry)


def test_bench_dsp_reports_agreement_and_timings():
    result = bench("dsp")
    assert has_timing(result["numpy_block"]) and result["per_sample_loop_one_block_us"] > 0
    if "scipy_block" in result:
        assert has_timing(result["scipy_block"])
        assert result["max_abs_diff_numpy_vs_scipy"] < 1e-9
        assert result["numpy_over_scipy_p50"] > 0


def test_bench_features_reports_every_stream_variant():
    result = bench("features")
    assert result["n_features_raw"] == 144
    assert has_timing(result["raw_float64_numpy"]) and has_timing(result["raw_float32_numpy"])
    assert has_timing(result["envelope_float64_1_sample_blocks"])
    assert ("raw_float64_scipy" in result) == result["scipy_importable"]
