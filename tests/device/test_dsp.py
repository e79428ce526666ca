"""Runtime filter chain (decoder/dsp.py): the numpy chain vs references, state carrying, validation.

The chain is the one filter implementation of the device path; scipy only serves
as a reference here.  Runs without scipy: coefficients and a scipy.sosfilt golden
output come from tests/device/data/pipelines.json; tests that call
scipy.signal.sosfilt directly skip where it is absent.
"""
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from neurohand.decoder.dsp import FilterChain, sos_pole_radius, sosfilt_reference, validate_sos
from neurohand.firmware_bridge.shared.errors import ConfigError, UsageError

with open(os.path.join(os.path.dirname(__file__), "data", "pipelines.json")) as _handle:
    DATA = json.load(_handle)
SOS = np.array(DATA["default_10k_16ch"]["sos"])          # 7 sections: band-pass 20-3000 Hz + 3 notches
GOLDEN_INPUT = np.random.RandomState(0).normal(0.0, 20.0, (300, 3))
GOLDEN_OUTPUT = np.array(DATA["sosfilt_golden"]["output"])
TOLERANCE = 1e-9   # µV, on signals of tens of µV


def direct_form_one(sos, x):
    """Independent reference: each section as y[n] = b0 x[n] + b1 x[n-1] + b2 x[n-2] - a1 y[n-1] - a2 y[n-2]."""
    signal = [float(v) for v in x]
    for b0, b1, b2, _, a1, a2 in sos:
        out = []
        for n in range(len(signal)):
            value = b0 * signal[n]
            if n >= 1:
                value += b1 * signal[n - 1] - a1 * out[n - 1]
            if n >= 2:
                value += b2 * signal[n - 2] - a2 * out[n - 2]
            out.append(value)
        signal = out
    return np.array(signal)


def stream(chain, x, sizes):
    """Feed x through chain in blocks of the given sizes (cycled), concatenating copies."""
    pieces, start, index = [], 0, 0
    while start < len(x):
        size = sizes[index % len(sizes)]
        pieces.append(chain.process(x[start:start + size]).copy())
        start += size
        index += 1
    return np.concatenate(pieces)


def test_reference_loop_matches_direct_form_one_by_hand():
    sos = np.array([[0.5, 0.25, 0.125, 1.0, -0.5, 0.25], [1.0, -1.0, 0.0, 1.0, 0.1, 0.0]])
    x = np.array([1.0, 0.0, -2.0, 3.0, 0.5, 0.0, 0.0, 1.0])
    # First section's first outputs by hand: y0 = 0.5; y1 = 0.25 + 0.5*0.5 = 0.5;
    # y2 = -1 + 0.125 + 0.5*0.5 - 0.25*0.5 = -0.75
    expected = direct_form_one(sos[:1], x)
    assert expected[:3].tolist() == [0.5, 0.5, -0.75]
    y, _ = sosfilt_reference(sos[:1], x[:, None], np.zeros((1, 2, 1)))
    np.testing.assert_allclose(y[:, 0], expected, rtol=0, atol=1e-12)
    y, _ = sosfilt_reference(sos, x[:, None], np.zeros((2, 2, 1)))
    np.testing.assert_allclose(y[:, 0], direct_form_one(sos, x), rtol=0, atol=1e-12)


def test_chain_matches_stored_scipy_golden():
    chain = FilterChain(SOS, 3)
    out = stream(chain, GOLDEN_INPUT, [200, 1, 37, 64, 65])
    assert np.max(np.abs(out - GOLDEN_OUTPUT)) < TOLERANCE


def test_chain_matches_direct_form_one():
    x = GOLDEN_INPUT[:150, 0]
    chain = FilterChain(SOS, 1)
    assert np.max(np.abs(chain.process(x[:, None])[:, 0] - direct_form_one(SOS, x))) < TOLERANCE


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=8),
       chunk=st.sampled_from([1, 7, 64, 200]))
def test_chain_any_block_split_and_chunk_length_equals_one_pass(sizes, chunk):
    x = GOLDEN_INPUT[:, :2]
    reference, final_state = sosfilt_reference(SOS, x, np.zeros((len(SOS), 2, 2)))
    chain = FilterChain(SOS, 2, chunk_samples=chunk)
    assert np.max(np.abs(stream(chain, x, sizes) - reference)) < TOLERANCE
    assert np.max(np.abs(chain.state - final_state)) < TOLERANCE


def test_whole_chunks_run_together_give_the_bits_of_one_chunk_at_a_time():
    # The engine filters whole chunks as stacks, up to GROUP_CHUNKS at a time (decoder/dsp.py):
    # 150 chunks in one pass (five groups, the last one short) must give exactly the numbers
    # of 150 calls of one chunk each, and end in exactly the same state.
    x = np.random.RandomState(9).normal(0.0, 30.0, (600, 3))
    together = FilterChain(SOS, 3, chunk_samples=4)
    one_pass = together.process(x).copy()
    alone = FilterChain(SOS, 3, chunk_samples=4)
    np.testing.assert_array_equal(stream(alone, x, [4]), one_pass)
    np.testing.assert_array_equal(alone.state, together.state)
    assert np.max(np.abs(one_pass - sosfilt_reference(SOS, x, np.zeros((len(SOS), 2, 3)))[0])) < TOLERANCE


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=8))
def test_chain_equals_scipy_sosfilt_across_splits(sizes):
    scipy_signal = pytest.importorskip("scipy.signal")
    x = np.random.RandomState(5).normal(0.0, 30.0, (2000, 4))
    expected, final_state = scipy_signal.sosfilt(SOS, x, axis=0, zi=np.zeros((len(SOS), 2, 4)))
    chain = FilterChain(SOS, 4)
    assert np.max(np.abs(stream(chain, x, sizes) - expected)) < TOLERANCE
    assert np.max(np.abs(chain.state - final_state)) < TOLERANCE


def test_chain_state_is_scipy_zi():
    # Half the signal through the chain, the rest through scipy from the chain's state:
    # the same as one scipy pass, so the state layout is sosfilt's zi.
    scipy_signal = pytest.importorskip("scipy.signal")
    chain = FilterChain(SOS, 3)
    first = stream(chain, GOLDEN_INPUT[:150], [1, 50, 99])
    rest, _ = scipy_signal.sosfilt(SOS, GOLDEN_INPUT[150:], axis=0, zi=chain.state)
    assert np.max(np.abs(np.concatenate([first, rest]) - GOLDEN_OUTPUT)) < TOLERANCE


def test_no_engine_to_choose():
    # One implementation everywhere: a filter engine can no longer be asked for.
    with pytest.raises(TypeError, match="backend"):
        FilterChain(SOS, 2, backend="numpy")
    with pytest.raises(UsageError, match="chunk_samples"):
        FilterChain(SOS, 2, chunk_samples=0)


def test_common_average_reference_removes_shared_signal():
    random = np.random.RandomState(2)
    common = 100.0 * np.sin(np.arange(400) / 7.0)[:, None]
    private = random.normal(0.0, 5.0, (400, 4))
    with_common = FilterChain(SOS, 4, car=True).process(private + common).copy()
    without = FilterChain(SOS, 4, car=True).process(private).copy()
    assert np.max(np.abs(with_common - without)) < TOLERANCE
    expected, _ = sosfilt_reference(SOS, private - private.mean(axis=1, keepdims=True), np.zeros((7, 2, 4)))
    assert np.max(np.abs(without - expected)) < TOLERANCE
    with pytest.raises(ConfigError, match="at least 2 channels"):
        FilterChain(SOS, 1, car=True)


def test_reset_and_empty_chain():
    chain = FilterChain(SOS, 3)
    first = chain.process(GOLDEN_INPUT).copy()
    assert np.any(chain.state != 0)
    chain.reset()
    np.testing.assert_array_equal(chain.process(GOLDEN_INPUT), first)
    identity = FilterChain([], 3)
    np.testing.assert_array_equal(identity.process(GOLDEN_INPUT), GOLDEN_INPUT)
    assert identity.state.shape == (0, 2, 3)


def test_integer_and_float32_blocks_are_filtered_in_float64():
    chain = FilterChain(SOS, 3)
    as_int = chain.process(np.round(GOLDEN_INPUT).astype(np.int16))
    assert as_int.dtype == np.float64
    expected, _ = sosfilt_reference(SOS, np.round(GOLDEN_INPUT), np.zeros((7, 2, 3)))
    assert np.max(np.abs(as_int - expected)) < TOLERANCE


def test_pole_radius_by_hand():
    # z^2 - 1.5 z + 0.56 = (z - 0.8)(z - 0.7); z^2 + 0.81 = poles at +-0.9j
    assert abs(sos_pole_radius([[1, 0, 0, 1, -1.5, 0.56]]) - 0.8) < 1e-12
    assert abs(sos_pole_radius([[1, 0, 0, 1, 0.0, 0.81]]) - 0.9) < 1e-12
    assert sos_pole_radius(np.zeros((0, 6))) == 0.0


@pytest.mark.parametrize("sos, message", [
    ([[1, 0, 0, 1, -2.1, 1.1]], "unstable"),           # real pole at 1.1
    ([[1, 0, 0, 1, 0.0, 1.0]], "unstable"),            # poles on the unit circle
    ([[1, 0, 0, 2, 0.0, 0.1]], "a0"),
    ([[1, 0, 0, 1, 0.0]], "shape"),
    ([[1, 0, float("nan"), 1, 0.0, 0.1]], "NaN"),
    ([["a", 0, 0, 1, 0, 0]], "numeric"),
])
def test_validate_sos_refuses_bad_filters(sos, message):
    with pytest.raises(ConfigError, match=message):
        validate_sos(sos, "model.json")
    with pytest.raises(ConfigError, match="model.json"):
        FilterChain(sos, 2, where="model.json")
