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
    decode = result["decode_step"]
    assert has_timing(dict(decode["decode_step"], blocks=0, repeats=0)) and decode["n_features"] == 144
    estimate = decode["estimate"]
    assert estimate["operations"]["rnn"]["macs"] == 3 * 128 * (144 + 128) + 3 * 128 * 256 + 5 * 128
    assert estimate["numpy_calls"]["stream_push"] > estimate["numpy_calls"]["filter"] > 0
    low, high = estimate["nano"]["decode_step_nano_us"]
    assert 0 < low <= high and estimate["nano"]["floor_us"] > 0


# ---------------------------------------------------------------- the decode step, its counts, the Nano estimate

def small_pipeline(stride=40, window=120, channels=3):
    """Raw pipeline from stored coefficients (no scipy): 2 sections at 1 kHz, mav/rms/wl/zc/ssc/bandpower."""
    from neurohand.decoder.pipeline import CONFIG_FORMAT, CONFIG_VERSION, FeaturePipeline

    sos = [[0.2, 0.4, 0.2, 1.0, -0.5, 0.3], [1.0, -2.0, 1.0, 1.0, -1.8, 0.85]]
    return FeaturePipeline.from_config({
        "format": CONFIG_FORMAT, "version": CONFIG_VERSION, "signal_rate": 1000.0, "n_channels": channels,
        "mode": "raw", "dtype": "float64", "window_samples": window, "stride_samples": stride, "car": False,
        "sos": sos, "features": ["mav", "rms", "wl", "zc", "ssc", "bandpower"],
        "bandpower_bands_hz": [[50.0, 150.0], [150.0, 400.0]], "threshold_uv": 0.5, "log": True,
        "log_epsilon": 1e-6, "normalisation": None})


def test_decode_step_operations_counted_from_the_sizes():
    from neurohand.deploy.bench.dsp import decode_step_operations, random_rnn_weights

    pipeline = small_pipeline()
    weights = random_rnn_weights(pipeline.n_features, hidden=8, layers=2, n_outputs=5)
    ops = decode_step_operations(pipeline, weights, chunk_samples=16)
    # Filter: 40 samples = 2 chunks of 16 + 8; 4 states; 3 channels; each chunk r: H r*r, G and F r*4, A 4*4.
    def chunk(r):
        return 3 * (r * r + 8 * r + 16)
    assert ops["filter"]["macs"] == 2 * chunk(16) + chunk(8)
    assert ops["filter"]["recursion_macs"] == 5 * 2 * 40 * 3
    # GRU: 3 gates x 8 x (n_features + 8), then 3 x 8 x (8 + 8); head 5 x 8.
    assert ops["rnn"]["macs"] == 24 * (pipeline.n_features + 8) + 24 * 16 + 40
    assert ops["block_sums"]["flops"] == (2 + 2 + 3 + 5 + 4) * 40 * 3
    assert ops["total"]["macs"] == ops["filter"]["macs"] + ops["rnn"]["macs"]
    assert ops["total"]["flops"] == sum(ops[stage]["flops"] for stage in ("filter", "block_sums", "window_features",
                                                                          "rnn"))


def test_count_numpy_calls_counts_and_puts_numpy_back():
    import numpy as np
    from neurohand.decoder import dsp, features
    from neurohand.decoder.dsp import FilterChain
    from neurohand.deploy.bench.dsp import count_numpy_calls

    chain = FilterChain([[0.2, 0.4, 0.2, 1.0, -0.5, 0.3]], 2, chunk_samples=8)
    block = np.ones((8, 2))
    per_step, total = count_numpy_calls(lambda: chain.process(block), steps=3)
    # One whole chunk: h, k_rev, a, g products (np.matmul); the input copied in (np.copyto).
    assert per_step["np.matmul"] == 4 and per_step["np.copyto"] == 1
    assert total >= 5
    assert dsp.np is np and features.np is np


def test_nano_estimate_scales_fixed_cost_and_arithmetic_apart():
    from neurohand.deploy.bench import dsp as bench

    operations = {"filter": {"flops": 5720}, "block_sums": {"flops": 0}, "window_features": {"flops": 5720},
                  "rnn": {"flops": 0}}
    estimate = bench.nano_estimate({"filter": 10.0, "features": 20.0, "rnn": 1.0},
                                   {"filter": 10, "features": 100, "rnn": 1}, 0.5, operations)
    low_py, high_py = bench.NANO_SLOWDOWN_INTERPRETED
    low_ar, high_ar = bench.NANO_SLOWDOWN_ARITHMETIC
    stages = estimate["stages"]
    # filter: 10 calls x 0.5 = 5 µs fixed, 5 µs arithmetic; features: 50 µs of calls > 20 µs measured: all fixed.
    assert stages["filter"]["nano_us"] == [5 * low_py + 5 * low_ar, 5 * high_py + 5 * high_ar]
    assert stages["features"]["nano_us"] == [20 * low_py, 20 * high_py]
    assert stages["rnn"]["fixed_cost_here_us"] == 0.5
    # 5720 flops at 1.43 GHz x 4 flops a cycle: 1 µs.
    assert abs(stages["filter"]["floor_us"] - 5720 / (bench.NANO_CLOCK_HZ * bench.NANO_FLOPS_PER_CYCLE_F64) * 1e6) < 0.05
    assert estimate["decode_step_nano_us"][0] == sum(stage["nano_us"][0] for stage in stages.values())
    assert "not a measurement" in estimate["is"]


def test_time_decode_step_reports_each_part():
    from neurohand.deploy.bench.dsp import time_decode_step

    result = time_decode_step(blocks_per_repeat=5, repeats=1)
    for part in ("decode_step", "stream_push", "rnn_step", "prepare", "filter"):
        assert {"p50_us", "p99_us", "p50_us_spread", "p99_us_spread"} <= set(result[part])
        assert result[part]["p50_us"] > 0
    assert result["decode_step"]["p50_us"] >= result["rnn_step"]["p50_us"]
    assert result["n_features"] == 144


def test_decode_step_in_rhythm_paces_the_frames_and_times_every_window(monkeypatch):
    import time as real_time

    from neurohand.deploy.bench import dsp

    sleeps = []
    sleep = real_time.sleep

    def recorded(seconds):
        sleeps.append(seconds)
        sleep(seconds)

    monkeypatch.setattr(real_time, "sleep", recorded)
    started = real_time.perf_counter()
    result = dsp.time_decode_step_in_rhythm(blocks_per_repeat=4, repeats=2)
    # Two in-rhythm repeats of 40 frames, each frame at its due time 2 ms after the last.
    assert real_time.perf_counter() - started >= 2 * 40 * 0.002
    # One window per 20 ms block in each mode, the first window filled before timing.
    assert result["in_rhythm"]["windows"] == result["back_to_back"]["windows"] == 4
    # In rhythm only: a pause before frames that are not yet due, none beyond one frame period
    # (2 ms at 20 samples); back to back never sleeps.
    assert 0 < len(sleeps) <= 2 * 4 * 10 and all(0 < pause <= 0.002 + 1e-9 for pause in sleeps)
    for mode in ("in_rhythm", "back_to_back"):
        for part in ("window_push", "rnn_step", "decode_step"):
            assert result[mode][part]["p50_us"] > 0
        assert result[mode]["decode_step"]["p50_us"] >= result[mode]["window_push"]["p50_us"]
    assert result["ratio_p50"]["decode_step"] == round(
        result["in_rhythm"]["decode_step"]["p50_us"] / result["back_to_back"]["decode_step"]["p50_us"], 2)
    assert result["frame_period_ms"] == 2.0


def test_decode_step_in_rhythm_from_the_command_line():
    output = subprocess.run([sys.executable, "-m", "neurohand.deploy.bench.dsp", "decode-step", "--rhythm",
                             "--blocks", "2", "--repeats", "1"],
                            stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout
    result = json.loads(output)
    assert result["blocks"] == 2 and result["repeats"] == 1 and result["in_rhythm"]["windows"] == 2
    refused = subprocess.run([sys.executable, "-m", "neurohand.deploy.bench.dsp", "decode-step", "--rhythm",
                              "--estimate"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert refused.returncode == 2 and "--rhythm times one checkout" in refused.stderr


def test_compare_decode_steps_times_both_checkouts_alternately():
    import os
    from neurohand.deploy.bench.dsp import compare_decode_steps

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = compare_decode_steps(root, rounds=1, blocks=3, repeats=1)
    assert [run["decoder_from"] for run in result["reference"]] == [root]
    assert len(result["this"]) == 1 and result["ratio_p50"]["decode_step"] > 0
    assert set(result["this_median"]) == {"decode_step", "stream_push", "rnn_step", "filter"}
