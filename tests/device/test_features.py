"""Windowed features (decoder/features.py) against hand-computed values and plain-loop references."""
import math

import numpy as np
import pytest

from neurohand.decoder.features import (
    FEATURES, WindowFeatures, WindowRing, Workspace, band_bins, fit_normalisation, offline_windows, window_ends,
    windows_touching_missing)
from neurohand.firmware_bridge.shared.errors import UsageError

ALL_PLAIN = ["mav", "rms", "wl", "zc", "ssc", "mean", "std", "max", "min"]


def plan(names, window, n_channels=1, rate=1000.0, bands=(), threshold=0.5, log=False, dtype="float64", stride=None):
    return WindowFeatures(names, rate, window, n_channels, [list(b) for b in bands], threshold, log, 1e-6, dtype,
                          stride_samples=stride)


def one_window(values):
    """A single one-channel window, shape (1, 1, W)."""
    return np.array(values, dtype=np.float64)[None, None, :]


def loop_reference(name, x, threshold):
    """Each feature of one channel's window, written as a plain loop over samples."""
    n = len(x)
    if name == "mav":
        return sum(abs(v) for v in x) / n
    if name == "rms":
        return math.sqrt(sum(v * v for v in x) / n)
    if name == "wl":
        return sum(abs(x[i + 1] - x[i]) for i in range(n - 1))
    if name == "zc":
        return sum(1 for i in range(n - 1) if x[i] * x[i + 1] < 0 and abs(x[i] - x[i + 1]) >= threshold)
    if name == "ssc":
        count = 0
        for i in range(1, n - 1):
            product = (x[i] - x[i - 1]) * (x[i] - x[i + 1])
            if product > 0 and product >= threshold ** 2:
                count += 1
        return count
    if name == "mean":
        return sum(x) / n
    if name == "std":
        mean = sum(x) / n
        return math.sqrt(sum((v - mean) ** 2 for v in x) / n)
    if name == "max":
        return max(x)
    if name == "min":
        return min(x)
    raise KeyError(name)


def loop_band_power(x, rate, low, high):
    """Hann-tapered one-sided periodogram summed over bins low <= f < high, by explicit DFT sums."""
    n = len(x)
    taper = [0.5 - 0.5 * math.cos(2 * math.pi * i / n) for i in range(n)]
    total = 0.0
    for k in range(n // 2 + 1):
        if low <= k * rate / n < high:
            re = sum(taper[i] * x[i] * math.cos(2 * math.pi * k * i / n) for i in range(n))
            im = -sum(taper[i] * x[i] * math.sin(2 * math.pi * k * i / n) for i in range(n))
            total += re * re + im * im
    return 2.0 * total / (n * sum(t * t for t in taper))


def test_hand_computed_values():
    x = [1.0, -2.0, 3.0, 0.0, -1.0, 0.2]
    features = plan(["mav", "rms", "wl", "zc", "ssc", "mean", "max", "min"], 6)
    got = features.compute(one_window(x))[0]
    expected = [7.2 / 6, math.sqrt(15.04 / 6), 13.2, 3, 3, 1.2 / 6, 3.0, -2.0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    # The threshold drops the small crossing (|-1 - 0.2| = 1.2) and the small slope change (1.2 < 2^2).
    strict = plan(["zc", "ssc"], 6, threshold=2.0).compute(one_window(x))[0]
    assert strict.tolist() == [2.0, 2.0]


def test_zero_samples_are_not_crossings():
    # 0 is neither side: x[i] x[i+1] < 0 is the definition, so 1, 0, -1 crosses nowhere.
    got = plan(["zc"], 3, threshold=0.0).compute(one_window([1.0, 0.0, -1.0]))[0]
    assert got.tolist() == [0.0]


@pytest.mark.parametrize("window, stride, blocks", [(24, None, 1), (24, 7, 1), (24, 1, 1), (24, 2, 12), (24, 3, 8),
                                                    (24, 8, 3), (24, 24, 1)])
@pytest.mark.parametrize("threshold", [0.0, 0.7])
def test_every_feature_matches_loop_reference_on_random_windows(window, stride, blocks, threshold):
    # Block sums split each window at every stride (aligned) or not at all: a window's value is
    # the same whatever the split, including crossings, steps and slope changes at block edges.
    random = np.random.RandomState(11)
    windows = random.normal(0.0, 3.0, (3, 2, window))
    windows[0, 1, 5:9] = 0.0                     # flat run and exact zeros, across a block edge
    windows[1, 0, 7:10] = [1.0, -1.0, 1.0]       # crossings and slope changes around sample 8
    features = plan(ALL_PLAIN, window, n_channels=2, threshold=threshold, stride=stride)
    assert (features.blocks_per_window, features.aligned) == (blocks, blocks > 1 or stride == window)
    got = features.compute(windows)
    names = features.feature_names
    for w in range(3):
        for column, label in enumerate(names):
            name, channel = label.rsplit("_ch", 1)
            expected = loop_reference(name, windows[w, int(channel)].tolist(), threshold)
            assert abs(got[w, column] - expected) < 1e-12, (w, label)


@pytest.mark.parametrize("names", [["zc", "mean", "wl", "mav", "ssc"], ["ssc", "zc"], ["rms", "max", "zc"],
                                   ["mav", "zc", "rms"], ["wl", "rms", "mav", "ssc", "zc"],
                                   ["zc", "ssc", "mav", "rms", "wl", "std"], ["mav", "bandpower_welch", "zc", "wl"]])
@pytest.mark.parametrize("window, stride", [(40, 8), (600, 300)])
@pytest.mark.parametrize("threshold", [0.0, 0.7])
def test_block_kinds_in_any_order_and_block_length_match_loop_reference(names, window, stride, threshold):
    # mav, rms, wl, zc and ssc are summed together (decoder/features.py _shared_block_sums) into
    # whichever block-sum rows the list gives them, with window kinds between, and counted in
    # bytes only where a block is under 256 samples (300 here is not).
    random = np.random.RandomState(5)
    windows = random.normal(0.0, 2.0, (2, 3, window))
    windows[0, 2, stride - 3:stride + 3] = [0.5, -0.4, 0.3, -0.2, 0.0, 0.1]   # small wiggles across a block edge
    windows[1, 1] = (1.0 + random.uniform(size=window)) * (-1.0) ** np.arange(window)   # a crossing at every step
    features = plan(names, window, n_channels=3, threshold=threshold, stride=stride, bands=[(100.0, 300.0)])
    got = features.compute(windows)
    for w in range(2):
        for column, label in enumerate(features.feature_names):
            name, channel = label.rsplit("_ch", 1)
            if name.startswith("bandpower"):
                continue        # its own tests below; here it only takes block-sum rows between the others
            expected = loop_reference(name, windows[w, int(channel)].tolist(), threshold)
            assert abs(got[w, column] - expected) < 1e-9 * max(1.0, abs(expected)), (names, w, label)


def test_shared_block_sums_equal_each_window_alone():
    # Offline, consecutive windows share their blocks' sums; the value must be exactly what
    # compute() gives for each window on its own (same numbers, same order of additions).
    random = np.random.RandomState(3)
    channels = random.normal(0.0, 4.0, (3, 2 + 400))
    channels[:, :2] = 99.0                       # before the first block: no window may read it
    features = plan(ALL_PLAIN[:5] + ["bandpower_welch"], 100, n_channels=3, bands=[(50.0, 200.0), (200.0, 500.0)],
                    log=True, stride=20)
    inner, closed = features.block_sums(channels, 20)
    starts = np.array([0, 1, 7, 15])
    shared = features.compute_from_blocks(inner, closed, starts, None, np.empty((4, features.n_features)))
    windows = np.stack([channels[:, 2 + 20 * s:2 + 20 * s + 100] for s in starts])
    np.testing.assert_array_equal(shared, features.compute(windows))


def loop_block_band_power(x, rate, block, low, high):
    """bandpower_welch by definition: the mean over the window's blocks of each block's periodogram band sum."""
    return sum(loop_band_power(x[i:i + block], rate, low, high) for i in range(0, len(x), block)) / (len(x) // block)


def test_welch_band_power_matches_explicit_dft_loop_per_block():
    random = np.random.RandomState(5)
    x = random.normal(0.0, 5.0, (2, 2, 40))
    bands = [(100.0, 300.0), (300.0, 500.0)]
    features = plan(["bandpower_welch"], 40, n_channels=2, rate=1000.0, bands=bands, stride=10)
    got = features.compute(x)
    for w in range(2):
        expected = [loop_block_band_power(x[w, c].tolist(), 1000.0, 10, low, high) for low, high in bands
                    for c in range(2)]
        np.testing.assert_allclose(got[w], expected, rtol=1e-12, atol=0)
    assert features.feature_names[:2] == ["bandpower_welch_100-300Hz_ch0", "bandpower_welch_100-300Hz_ch1"]
    # A sine on a block bin: A^2 / 2, as the whole-window band power gives.
    sine = 3.0 * np.sin(2 * np.pi * 200.0 * np.arange(40) / 1000.0 + 0.3)
    one = plan(["bandpower_welch"], 40, rate=1000.0, bands=[(100.0, 400.0), (400.0, 500.0)], stride=10).compute(
        one_window(sine))[0]
    assert abs(one[0] - 4.5) < 1e-9 and one[1] < 1e-20


@pytest.mark.parametrize("name", ["bandpower", "bandpower_welch"])
def test_band_power_without_bands_has_no_columns(name):
    features = plan(["mav", name], 40, n_channels=2, stride=10)
    assert features.n_features == 2
    got = features.compute(np.ones((3, 2, 40)))
    np.testing.assert_array_equal(got, np.ones((3, 2)))


def test_welch_band_power_needs_whole_blocks_that_resolve_the_bands():
    with pytest.raises(UsageError, match="whole number of strides"):
        plan(["bandpower_welch"], 40, bands=[(100.0, 300.0)], stride=15)
    with pytest.raises(UsageError, match="whole number of strides"):
        plan(["bandpower_welch"], 40, bands=[(100.0, 300.0)])
    with pytest.raises(UsageError, match="no FFT bin of a 10-sample block"):
        plan(["bandpower_welch"], 40, bands=[(20.0, 90.0)], stride=10)


def test_band_power_of_a_sine_is_half_its_squared_amplitude():
    rate, window, amplitude = 1000.0, 100, 3.0
    x = amplitude * np.sin(2 * np.pi * 100.0 * np.arange(window) / rate + 0.3)
    features = plan(["bandpower"], window, rate=rate, bands=[(50.0, 150.0), (200.0, 400.0)])
    got = features.compute(one_window(x))[0]
    assert abs(got[0] - amplitude ** 2 / 2) < 1e-9
    assert got[1] < 1e-20


def test_band_power_matches_explicit_dft_loop():
    random = np.random.RandomState(4)
    x = random.normal(0.0, 5.0, (1, 2, 40))
    bands = [(25.0, 100.0), (100.0, 250.0), (250.0, 500.0)]
    features = plan(["bandpower"], 40, n_channels=2, rate=1000.0, bands=bands)
    got = features.compute(x)[0]
    expected = [loop_band_power(x[0, c].tolist(), 1000.0, low, high) for low, high in bands for c in range(2)]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    assert features.feature_names[:2] == ["bandpower_25-100Hz_ch0", "bandpower_25-100Hz_ch1"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_band_power_with_a_kept_workspace_is_the_same_and_reuses_its_memory(dtype):
    random = np.random.RandomState(5)
    features = plan(["mav", "bandpower"], 40, n_channels=3, rate=1000.0, bands=[(25.0, 100.0), (100.0, 400.0)],
                    dtype=dtype)
    workspace = Workspace()
    held = []
    for n_windows in (6, 2, 6, 1):      # smaller batches reuse the first, larger memory
        windows = random.normal(0.0, 5.0, (n_windows, 3, 40)).astype(dtype)
        np.testing.assert_array_equal(features.compute(windows, workspace=workspace), features.compute(windows))
        held.append(dict(workspace._arrays))    # what band power took from the workspace, by name
    assert {"bandpower_tapered", "bandpower_squares"} <= set(held[0])
    assert all(later[name] is held[0][name] for later in held[1:] for name in held[0])


def test_workspace_grows_and_keeps_dtypes_apart():
    workspace = Workspace()
    small = workspace.array("a", (2, 3), np.float64)
    assert np.shares_memory(workspace.array("a", (3, 2), np.float64), small)
    bigger = workspace.array("a", (4, 3), np.float64)
    assert bigger.shape == (4, 3) and not np.shares_memory(bigger, small)
    # A shape asked for before the memory grew gets the new memory, not its old view.
    again = workspace.array("a", (2, 3), np.float64)
    assert np.shares_memory(again, bigger) and not np.shares_memory(again, small)
    assert workspace.array("a", (2, 3), np.float64) is again
    assert workspace.array("a", (2,), np.float32).dtype == np.float32


def test_log_compression_applies_to_amplitudes_only():
    x = one_window([1.0, -2.0, 3.0, 0.0, -1.0, 0.2])
    raw = plan(["mav", "zc", "bandpower"], 6, bands=[(100.0, 400.0)]).compute(x)[0]
    logged = plan(["mav", "zc", "bandpower"], 6, bands=[(100.0, 400.0)], log=True).compute(x)[0]
    np.testing.assert_allclose(logged, [math.log(raw[0] + 1e-6), raw[1], math.log(raw[2] + 1e-6)], rtol=1e-15)
    silent = plan(["rms"], 6, log=True).compute(one_window([0.0] * 6))[0]
    assert silent[0] == math.log(1e-6)


def test_float32_features_follow_float64_closely():
    windows = np.random.RandomState(8).normal(0.0, 10.0, (4, 3, 50))
    names = ["mav", "rms", "wl", "zc", "ssc", "bandpower", "bandpower_welch"]
    f64 = plan(names, 50, n_channels=3, bands=[(100.0, 400.0)], log=True, stride=10).compute(windows)
    f32 = plan(names, 50, n_channels=3, bands=[(100.0, 400.0)], log=True, dtype="float32", stride=10).compute(
        windows.astype(np.float32))
    assert f32.dtype == np.float32
    np.testing.assert_allclose(f32, f64, rtol=1e-5, atol=1e-5)


def test_feature_settings_are_checked():
    with pytest.raises(UsageError, match="did you mean 'rms'"):
        plan(["rsm"], 10)
    with pytest.raises(UsageError, match="repeat"):
        plan(["mav", "mav"], 10)
    with pytest.raises(UsageError, match="at least 3 samples"):
        plan(["ssc"], 2)
    with pytest.raises(UsageError, match="Nyquist"):
        band_bins(1000.0, 100, [[100.0, 600.0]])
    with pytest.raises(UsageError, match="no FFT bin"):
        band_bins(1000.0, 10, [[110.0, 150.0]])
    assert band_bins(1000.0, 10, [[100.0, 300.0], [300.0, 500.0]]) == [(1, 3), (3, 5)]
    assert set(ALL_PLAIN + ["bandpower", "bandpower_welch"]) == set(FEATURES)


def test_offline_windows_and_ends():
    channels = np.arange(20, dtype=np.float64).reshape(2, 10)
    windows, ends = offline_windows(channels, 4, 3)
    assert ends.tolist() == [4, 7, 10]
    np.testing.assert_array_equal(windows[1], channels[:, 3:7])
    assert window_ends(3, 4, 3).tolist() == []
    missing = np.zeros(10, dtype=bool)
    missing[5] = True
    assert windows_touching_missing(missing, ends, 4).tolist() == [False, True, False]   # [6, 10) misses it


def test_ring_gives_the_same_windows_as_slicing():
    samples = np.random.RandomState(0).normal(size=(57, 2))
    ring = WindowRing(6, 4, 2, np.float64)
    out = np.zeros((20, 2, 6))
    ends = np.zeros(20, dtype=np.int64)
    count = 0
    for start, stop in [(0, 1), (1, 13), (13, 14), (14, 40), (40, 57)]:
        count += ring.feed(samples[start:stop], out[count:], ends[count:])
    assert ends[:count].tolist() == list(range(6, 58, 4))
    for index in range(count):
        np.testing.assert_array_equal(out[index], samples[ends[index] - 6:ends[index]].T)


def test_fit_normalisation():
    features = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [5.0, 5.0, 9.0]])
    mean, std = fit_normalisation(features)
    np.testing.assert_allclose(mean, [3.0, 5.0, 5.0])
    np.testing.assert_allclose(std, [math.sqrt(8.0 / 3.0), 1.0, math.sqrt(26.0 / 3.0)])   # constant column -> 1
    with pytest.raises(UsageError, match="NaN"):
        fit_normalisation([[1.0, float("nan")], [2.0, 3.0]])
    with pytest.raises(UsageError, match="n_windows >= 2"):
        fit_normalisation([[1.0, 2.0]])
