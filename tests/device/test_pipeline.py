"""FeaturePipeline (decoder/pipeline.py): offline == streaming for any chunking, gaps, config, envelope mode.

Runs without scipy: the raw-mode pipelines are loaded from tests/device/data/pipelines.json
(designed once on the workstation); envelope mode designs nothing and is built here.  Both
paths filter with the one numpy FilterChain; scipy.signal.sosfilt, where installed, is only
the reference the offline features are checked against.
"""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from neurohand.decoder.dsp import DEFAULT_CHUNK_SAMPLES, FilterChain
from neurohand.decoder.pipeline import FeaturePipeline, _resolve_settings
from neurohand.firmware_bridge.shared.errors import ConfigError, UsageError

with open(os.path.join(os.path.dirname(__file__), "data", "pipelines.json")) as _handle:
    DATA = json.load(_handle)
SMALL = DATA["small_1k_4ch"]            # 1 kHz, 4 channels, CAR, 4 sections, window 50, stride 10
DEFAULT = DATA["default_10k_16ch"]
SIGNALS = np.random.RandomState(7).normal(0.0, 25.0, (700, 4)) + 40.0 * np.sin(np.arange(700) / 9.0)[:, None]
TOLERANCE = {"float64": 1e-9, "float32": 1e-5}


# The small pipeline in three feature modes (decoder/features.py WindowFeatures):
#   window: as stored, bandpower from one FFT of each window, block sums over 10-sample strides;
#   welch:  bandpower_welch, whose block periodograms are shared between windows (BlockRing);
#   direct: stride 15 does not divide the 50-sample window: whole windows, WindowRing.
VARIANTS = {
    "window": {},
    "welch": {"features": ["mav", "rms", "wl", "zc", "ssc", "bandpower_welch"],
              "bandpower_bands_hz": [[100.0, 300.0], [300.0, 500.0]]},
    "direct": {"stride_samples": 15},
}


def small(dtype="float64", variant="window", **changes):
    config = copy.deepcopy(SMALL)
    config["dtype"] = dtype
    config.update(copy.deepcopy(VARIANTS[variant]))
    config.update(changes)
    return FeaturePipeline.from_config(config)


def fitted(pipeline, signals=SIGNALS):
    features, _ = pipeline.transform(signals)
    return pipeline.fit_normalisation(features)


def run_stream(stream, signals, sizes, gaps=None):
    """Push signals in blocks of the given sizes (cycled); gaps: {row index: n_missing} pushed before that row."""
    gaps = gaps or {}
    features, ends = [], []
    start, index = 0, 0
    while start < len(signals):
        size = sizes[index % len(sizes)]
        index += 1
        stop = min(len(signals), start + size)
        cut = [g for g in sorted(gaps) if start < g < stop]
        if cut:
            stop = cut[0]
        if start in gaps:
            stream.push_gap(gaps[start])
        block_features, block_ends = stream.push(signals[start:stop])
        features.append(block_features)
        ends.append(block_ends)
        start = stop
    return np.concatenate(features), np.concatenate(ends)


def assert_close(actual, expected, dtype):
    scale = np.maximum(1.0, np.abs(expected))
    assert np.max(np.abs(actual.astype(np.float64) - expected) / scale) <= TOLERANCE[dtype]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@settings(max_examples=24, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=130), min_size=1, max_size=6))
def test_stream_equals_offline_for_any_chunking(variant, dtype, sizes):
    pipeline = fitted(small(dtype, variant))
    assert pipeline.window_features.aligned == (variant != "direct")
    offline, offline_ends = pipeline.transform(SIGNALS)
    expected = pipeline.normalise(offline)
    streamed, ends = run_stream(pipeline.stream(), SIGNALS, sizes)
    np.testing.assert_array_equal(ends, offline_ends)
    assert streamed.dtype == np.dtype(dtype)
    assert_close(streamed, expected.astype(np.float64), dtype)


def test_stream_equals_offline_default_pipeline():
    pipeline = FeaturePipeline.from_config(DEFAULT)
    signals = np.random.RandomState(1).normal(0.0, 20.0, (3000, 16))
    fitted(pipeline, signals)
    offline, offline_ends = pipeline.transform(signals)
    streamed, ends = run_stream(pipeline.stream(), signals, [200])
    np.testing.assert_array_equal(ends, offline_ends)
    assert ends.tolist() == [1000, 1200, 1400, 1600, 1800, 2000, 2200, 2400, 2600, 2800, 3000]
    assert_close(streamed, pipeline.normalise(offline), "float64")
    # Blocks of whole filter chunks (DEFAULT_CHUNK_SAMPLES): the stream filters in the same
    # chunks as the offline pass, and every later stage adds the same numbers in the same order.
    chunk = DEFAULT_CHUNK_SAMPLES
    streamed, _ = run_stream(pipeline.stream(), signals, [chunk, 2 * chunk, 3 * chunk])
    np.testing.assert_array_equal(streamed, pipeline.normalise(offline))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_stream_is_bit_identical_to_offline_in_whole_filter_chunks(variant, dtype):
    pipeline = fitted(small(dtype, variant))
    expected = pipeline.normalise(pipeline.transform(SIGNALS)[0])
    for sizes in ([700], [DEFAULT_CHUNK_SAMPLES], [2 * DEFAULT_CHUNK_SAMPLES, DEFAULT_CHUNK_SAMPLES]):
        streamed, _ = run_stream(pipeline.stream(), SIGNALS, sizes)
        np.testing.assert_array_equal(streamed, expected)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_offline_features_match_scipy_sosfilt_reference(variant):
    # The reference filter is scipy's, called here; features of its windows, one at a time.
    scipy_signal = pytest.importorskip("scipy.signal")
    pipeline = small(variant=variant)
    features, ends = pipeline.transform(SIGNALS)
    referenced = SIGNALS - SIGNALS.mean(axis=1, keepdims=True)          # the small pipeline has CAR
    filtered = scipy_signal.sosfilt(pipeline.sos, referenced, axis=0)
    windows = [np.ascontiguousarray(filtered[end - pipeline.window_samples:end].T)[None] for end in ends]
    expected = np.concatenate([pipeline.window_features.compute(window) for window in windows])
    assert_close(features, expected, "float64")


def test_device_path_never_imports_scipy():
    # Even where scipy is installed: the stream and transform run the numpy chain only.
    code = ("import json, sys\n"
            "import numpy as np\n"
            "from neurohand.decoder.pipeline import FeaturePipeline\n"
            "pipeline = FeaturePipeline.from_config(json.loads(sys.argv[1]))\n"
            "signals = np.random.RandomState(0).normal(0.0, 20.0, (400, 4))\n"
            "pipeline.fit_normalisation(pipeline.transform(signals)[0])\n"
            "pipeline.stream().push(signals)\n"
            "print('scipy' in sys.modules)\n")
    output = subprocess.run([sys.executable, "-c", code, json.dumps(SMALL)], stdout=subprocess.PIPE,
                            universal_newlines=True, check=True).stdout
    assert output.strip() == "False"


def test_stream_counts_and_needs_normalisation():
    pipeline = small()
    with pytest.raises(ConfigError, match="fit_normalisation"):
        pipeline.stream()
    raw_stream = pipeline.stream(normalised=False)
    features, ends = run_stream(raw_stream, SIGNALS, [33])
    offline, _ = pipeline.transform(SIGNALS)
    assert_close(features, offline, "float64")
    assert raw_stream.counters["windows_emitted"] == len(ends) == (700 - 50) // 10 + 1
    assert raw_stream.counters["samples_received"] == 700
    assert raw_stream.counters["blocks"] == 22


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@settings(max_examples=24, deadline=None)
@given(gap_rows=st.lists(st.integers(min_value=1, max_value=699), min_size=1, max_size=3, unique=True),
       lengths=st.lists(st.integers(min_value=1, max_value=80), min_size=3, max_size=3),
       sizes=st.lists(st.integers(min_value=1, max_value=90), min_size=1, max_size=4))
def test_gaps_stream_equals_offline_gap_list_and_mask(variant, gap_rows, lengths, sizes):
    pipeline = fitted(small(variant=variant))
    stride = pipeline.stride_samples
    gaps = {row: lengths[i] for i, row in enumerate(sorted(gap_rows))}
    stream = pipeline.stream()
    streamed, ends = run_stream(stream, SIGNALS, sizes, gaps)

    offline, offline_ends = pipeline.transform(SIGNALS, gaps=sorted(gaps.items()))
    np.testing.assert_array_equal(ends, offline_ends)
    assert_close(streamed, pipeline.normalise(offline), "float64")

    # The same recording as a full-axis array with a missing-sample mask (lost rows hold NaN, ignored).
    total = len(SIGNALS) + sum(gaps.values())
    missing = np.zeros(total, dtype=bool)
    shift = 0
    for row in sorted(gaps):
        missing[row + shift:row + shift + gaps[row]] = True
        shift += gaps[row]
    full = np.full((total, 4), np.nan)
    full[~missing] = SIGNALS
    masked, masked_ends = pipeline.transform(full, missing=missing)
    np.testing.assert_array_equal(masked_ends, offline_ends)
    np.testing.assert_array_equal(masked, offline)

    # Every window on the full axis is either emitted or counted as dropped; none ever overlaps a gap.
    n_windows = (total - 50) // stride + 1
    assert stream.counters["windows_emitted"] + stream.counters["windows_dropped_for_gaps"] == n_windows
    assert stream.counters["samples_missing"] == sum(gaps.values())
    assert stream.counters["gaps"] == len(gaps)
    for end in ends:
        assert not missing[end - 50:end].any()


def test_gap_policy_by_hand():
    # Window 50, stride 10: windows end at 50, 60, ...  Lose 5 samples after sample 100 (indices 100..104):
    # windows ending at 110 .. 150 contain them; ends 160 onwards are clean again.
    pipeline = small()
    stream = pipeline.stream(normalised=False)
    _, first = stream.push(SIGNALS[:100])
    stream.push_gap(5)
    _, second = stream.push(SIGNALS[100:200])
    assert first.tolist() == [50, 60, 70, 80, 90, 100]
    assert second.tolist() == [160, 170, 180, 190, 200]
    assert stream.counters["windows_dropped_for_gaps"] == 5
    assert stream.samples_seen == 205
    # The filter state is carried across the gap: the window ending at 160 holds received rows
    # 105..154 filtered as one continuous (spliced) signal.
    filtered = FilterChain(pipeline.sos, 4, car=True).process(SIGNALS[:200])
    expected = pipeline.window_features.compute(np.ascontiguousarray(filtered[105:155].T)[None])
    empty, empty_ends = pipeline.stream(normalised=False).push(SIGNALS[:0])
    assert empty.shape == (0, pipeline.n_features) and empty_ends.shape == (0,)
    restarted = pipeline.stream(normalised=False)
    restarted.push(SIGNALS[:100])
    restarted.push_gap(5)
    after_gap, _ = restarted.push(SIGNALS[100:155])
    assert_close(after_gap, expected, "float64")


def test_stream_matches_each_window_computed_alone():
    # The BlockRing's shared block sums against WindowFeatures.compute on copies of the filtered
    # windows, one at a time: the same numbers added in the same order.
    pipeline = small(variant="welch")
    signals = SIGNALS[:300]
    streamed, ends = run_stream(pipeline.stream(normalised=False), signals, [7, 64, 1, 23])
    filtered = FilterChain(pipeline.sos, 4, car=True).process(signals)
    alone = np.concatenate([pipeline.window_features.compute(np.ascontiguousarray(filtered[end - 50:end].T)[None])
                            for end in ends])
    assert_close(streamed, alone, "float64")
    assert len(ends) == (300 - 50) // 10 + 1


def test_welch_band_power_gets_default_bands_and_needs_whole_strides():
    bands = _resolve_settings(10000.0, 16, {"features": ["mav", "bandpower_welch"]})["bandpower_bands_hz"]
    assert bands == [[20.0, 70.0], [70.0, 244.9], [244.9, 857.2], [857.2, 3000.0]]
    assert _resolve_settings(10000.0, 16, {"features": ["mav"]})["bandpower_bands_hz"] is None
    with pytest.raises(ConfigError, match="whole number of strides"):
        small(variant="welch", stride_samples=15)


def test_bad_blocks_refused_without_poisoning_state():
    pipeline = fitted(small())
    stream = pipeline.stream()
    with pytest.raises(UsageError, match=r"shape \(n_samples, 4\)"):
        stream.push(SIGNALS[:10, :3])
    bad = SIGNALS[:10].copy()
    bad[3, 1] = np.nan
    with pytest.raises(UsageError, match="NaN"):
        stream.push(bad)
    with pytest.raises(UsageError, match="non-negative"):
        stream.push_gap(-1)
    streamed, _ = run_stream(stream, SIGNALS, [64])
    assert_close(streamed, pipeline.normalise(pipeline.transform(SIGNALS)[0]), "float64")
    with pytest.raises(UsageError, match="NaN"):
        pipeline.transform(bad)


def test_config_round_trip_is_exact():
    pipeline = fitted(small())
    text = json.dumps(pipeline.to_config())
    loaded = FeaturePipeline.from_config(json.loads(text), expected_channels=4)
    assert json.dumps(loaded.to_config()) == text
    np.testing.assert_array_equal(loaded.sos, pipeline.sos)
    np.testing.assert_array_equal(loaded.normalise(loaded.transform(SIGNALS)[0]),
                                  pipeline.normalise(pipeline.transform(SIGNALS)[0]))
    assert loaded.feature_names == pipeline.feature_names and len(loaded.feature_names) == loaded.n_features


def broken(change):
    config = fitted(small()).to_config()
    change(config)
    return config


@pytest.mark.parametrize("change, message", [
    (lambda c: c["sos"][0].__setitem__(5, 1.5), "unstable"),
    (lambda c: c["sos"].append([1.0, 0.0, 0.0, 1.0, 0.0]), "shape"),
    (lambda c: c["filter"].__setitem__("band_hz", [10.0, 600.0]), "Nyquist"),
    (lambda c: c["bandpower_bands_hz"].append([100.0, 700.0]), "Nyquist"),
    (lambda c: c["normalisation"]["mean"].pop(), "one per feature"),
    (lambda c: c["normalisation"]["std"].__setitem__(0, 0.0), "non-positive"),
    (lambda c: c.__setitem__("n_channels", 1), "at least 2 channels"),
    (lambda c: c.__setitem__("version", 99), "version 99"),
    (lambda c: c.__setitem__("format", "other"), "format"),
    (lambda c: c.pop("window_samples"), "missing keys"),
    (lambda c: c.__setitem__("features", ["mav", "rsm"]), "did you mean 'rms'"),
    (lambda c: c.__setitem__("mode", "envelope"), "envelope mode takes no filter"),
    (lambda c: c.__setitem__("dtype", "float16"), "dtype"),
])
def test_config_validation_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        FeaturePipeline.from_config(broken(change), where="bundle/model.json")
    with pytest.raises(ConfigError, match="bundle/model.json"):
        FeaturePipeline.from_config(broken(change), where="bundle/model.json")


def test_wrong_channel_count_refused():
    with pytest.raises(ConfigError, match="made for 4 channels, but the signal has 16"):
        FeaturePipeline.from_config(SMALL, expected_channels=16)
    with pytest.raises(UsageError, match=r"shape \(n_samples, 4\)"):
        small().transform(np.zeros((100, 16)))
    with pytest.raises(UsageError, match=r"shape \(n_windows, 36\)"):
        small().fit_normalisation(np.zeros((10, 41)))


def test_envelope_mode_windowed_mean():
    envelope = np.abs(np.random.RandomState(3).normal(0.0, 1.0, (400, 10)))
    pipeline = FeaturePipeline.design(100.0, 10, {"mode": "envelope"})
    assert (pipeline.window_samples, pipeline.stride_samples, pipeline.n_features) == (20, 1, 20)
    assert len(pipeline.sos) == 0
    features, ends = pipeline.transform(envelope)
    assert ends[0] == 20 and len(ends) == 381
    # Column 3 is the mean of channel 3; columns 10.. the standard deviations.
    np.testing.assert_allclose(features[:, 3], [envelope[e - 20:e, 3].mean() for e in ends], rtol=1e-12)
    np.testing.assert_allclose(features[:, 13], [envelope[e - 20:e, 3].std() for e in ends], rtol=1e-12)
    pipeline.fit_normalisation(features)
    loaded = FeaturePipeline.from_config(json.loads(json.dumps(pipeline.to_config())))
    streamed, stream_ends = run_stream(loaded.stream(), envelope, [1])
    np.testing.assert_array_equal(stream_ends, ends)
    assert_close(streamed, pipeline.normalise(features), "float64")
    custom = FeaturePipeline.design(100.0, 2, {"mode": "envelope", "window_s": 0.1, "stride_s": 0.05,
                                               "features": ["mean", "max"], "dtype": "float32"})
    assert (custom.window_samples, custom.stride_samples, custom.n_features) == (10, 5, 4)


@pytest.mark.parametrize("features", [["mean", "min"], ["mean", "max", "std"]])
def test_a_negative_envelope_window_gives_log_epsilon_not_nan(features):
    # Filtering leaves envelope tables slightly negative; log(mean + epsilon) was NaN there (issue 14).
    pipeline = FeaturePipeline.design(100.0, 2, {"mode": "envelope", "log": True, "window_s": 0.2,
                                                  "stride_s": 0.1, "features": features})
    signals = np.full((40, 2), 0.02)
    signals[:, 1] = -0.03
    raw, ends = pipeline.transform(signals)
    assert np.isfinite(raw).all()
    epsilon = pipeline.to_config()["log_epsilon"]
    names = pipeline.feature_names
    np.testing.assert_allclose(raw[:, names.index("mean_ch1")], np.log(epsilon))
    np.testing.assert_allclose(raw[:, names.index("mean_ch0")], np.log(0.02 + epsilon))
    pipeline.fit_normalisation(raw)
    streamed, _ = run_stream(pipeline.stream(), signals, [7])
    assert np.isfinite(streamed).all()
