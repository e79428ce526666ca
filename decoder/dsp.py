"""Runtime filter chain: stored SOS coefficients applied block by block with carried state.

One implementation, numpy only, everywhere the chain runs: on the Jetson, in
workstation replay and evaluation, in offline ``transform`` and in the
benchmarks' latency figures.  scipy is used only to design the coefficients
(decoder/filter_design.py) and, in tests and benchmarks, as the reference this
chain is checked against; it is never imported here.  An engine picked by
whether scipy happens to import made workstation figures describe a different
filter from the device's, and a Jetson with scipy installed started about 5x
slower with 2.5x the memory.

The chain computes the causal cascade of second-order sections in direct form
II transposed, with the state layout of ``scipy.signal.sosfilt``'s ``zi``
(n_sections, 2, n_channels), so states compare directly with the reference.
It is a block formulation.  The cascade is linear, so for a chunk of ``r``
samples with input ``x`` (r, n_channels) and state ``s`` (2 * n_sections,
n_channels)::

    y  = H_r @ x + G_r @ s          (output)
    s' = F_r @ x + A_r @ s          (state after the chunk)

where ``H`` is the lower-triangular Toeplitz matrix of the cascade's impulse
response and ``G``, ``F``, ``A`` map initial state to output, input to final
state and state to state.  All four are measured once, at construction, by
running the plain per-sample recursion (:func:`sosfilt_reference`) on unit
inputs, for a chunk length ``L``; a chunk of any ``r <= L`` uses slices of
them, so no block size ever needs a new design.  A per-sample Python loop over
200 samples x ~7 sections costs milliseconds; these four small matrix products
per chunk cost tens of microseconds and vectorise across channels for free.

The filter always runs in float64, whatever the feature dtype: poles within
1e-3 of the unit circle (a 50 Hz notch at 10 kHz) make a float32 recursion
drift over a long session.
"""
import numpy as np

from neurohand.firmware_bridge.shared.checks import check_int, check_real_array
from neurohand.firmware_bridge.shared.errors import ConfigError, UsageError

# Chunk length of the block formulation: cost per sample grows with L (the H
# product) while Python overhead per chunk shrinks.  With whole chunks run
# together (``_BlockEngine.run``), 50 measured best for 200-sample blocks x 16
# channels (four whole chunks; 20 µs against 25 µs at 64, which leaves a
# remainder, with numpy 2.4, and 47 against 55 µs with the device's numpy 1.19;
# 2026-12-07, docs/latency.md).
DEFAULT_CHUNK_SAMPLES = 50
# Same bound as design: a pole this close to the unit circle is refused.
MAX_POLE_RADIUS = 1.0 - 1e-7


def sos_pole_radius(sos):
    """Largest pole magnitude over all sections (stable iff < 1).

    sos : array-like, shape (n_sections, 6), rows ``[b0, b1, b2, 1, a1, a2]``.
    Returns 0.0 for an empty chain.
    """
    sos = np.asarray(sos, dtype=np.float64).reshape(-1, 6)
    if len(sos) == 0:
        return 0.0
    a1 = sos[:, 4] / sos[:, 3]
    a2 = sos[:, 5] / sos[:, 3]
    # Roots of z^2 + a1 z + a2, in closed form (np.roots per section would be slower and no clearer).
    root = np.sqrt((a1 * a1 - 4.0 * a2).astype(np.complex128))
    return float(max(np.max(np.abs((-a1 + root) / 2.0)), np.max(np.abs((-a1 - root) / 2.0))))


def validate_sos(sos, where="sos"):
    """Return ``sos`` as a float64 (n_sections, 6) array after checking it can run.

    Checks shape, finiteness, normalised ``a0 == 1`` and stability (all poles
    strictly inside the unit circle).  Raises :class:`ConfigError` naming
    ``where`` (e.g. the config file) otherwise: a device refuses to start on a
    corrupt or hand-edited filter.
    """
    try:
        # check_real_array, not np.array: True would pass as 1.0 and 10**400 overflow.
        array = check_real_array("sos", sos)
    except UsageError as error:
        raise ConfigError("{}: filter coefficients must be a numeric array of shape (n_sections, 6): {}".format(
            where, error)) from error
    if array.size == 0:
        return np.zeros((0, 6), dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 6:
        raise ConfigError("{}: filter coefficients must have shape (n_sections, 6), but got {}".format(
            where, array.shape))
    if not np.all(np.isfinite(array)):
        raise ConfigError("{}: filter coefficients contain NaN or infinity".format(where))
    if not np.all(array[:, 3] == 1.0):
        raise ConfigError("{}: every section's a0 (column 3) must be exactly 1, but got {}".format(
            where, array[:, 3].tolist()))
    radius = sos_pole_radius(array)
    if radius > MAX_POLE_RADIUS:
        raise ConfigError("{}: filter is unstable: a pole has magnitude {:.9f} (must be below 1)".format(
            where, radius))
    return array


def sosfilt_reference(sos, x, zi):
    """Plain direct-form II transposed recursion, one sample at a time (slow; a reference).

    Parameters
    ----------
    sos : ndarray, shape (n_sections, 6)
    x : ndarray, shape (n_samples, n_channels)
    zi : ndarray, shape (n_sections, 2, n_channels), initial state (not modified)

    Returns
    -------
    y : ndarray, shape (n_samples, n_channels), float64
    zf : ndarray, shape (n_sections, 2, n_channels), final state
    """
    y = np.array(x, dtype=np.float64)
    z = np.array(zi, dtype=np.float64)
    for section in range(len(sos)):
        b0, b1, b2, _, a1, a2 = sos[section]
        z0 = z[section, 0]
        z1 = z[section, 1]
        for n in range(len(y)):
            xn = y[n].copy()
            yn = b0 * xn + z0
            z0 = b1 * xn - a1 * yn + z1
            z1 = b2 * xn - a2 * yn
            y[n] = yn
        z[section, 0] = z0
        z[section, 1] = z1
    return y, z


class _BlockEngine(object):
    """Block matrices measured once, applied per chunk (see module doc)."""

    def __init__(self, sos, chunk_samples):
        n_states = 2 * len(sos)
        length = chunk_samples
        # Column 0: unit impulse from rest; columns 1..: zero input from unit state k.
        x = np.zeros((length, 1 + n_states))
        x[0, 0] = 1.0
        zi = np.zeros((n_states, 1 + n_states))
        zi[:, 1:] = np.eye(n_states)
        zi = zi.reshape(len(sos), 2, 1 + n_states)
        outputs = np.empty((length, 1 + n_states))
        states = np.empty((length + 1, n_states, 1 + n_states))
        states[0] = zi.reshape(n_states, -1)
        state = zi
        for n in range(length):
            y, state = sosfilt_reference(sos, x[n:n + 1], state)
            outputs[n] = y[0]
            states[n + 1] = state.reshape(n_states, -1)
        impulse = outputs[:, 0]
        lags = np.arange(length)[:, None] - np.arange(length)[None, :]
        self.h = np.where(lags >= 0, impulse[np.clip(lags, 0, None)], 0.0)   # (L, L)
        self.g = np.ascontiguousarray(outputs[:, 1:])                       # (L, M)
        # k_rev[:, j] = state L - j samples after an impulse; F_r = k_rev[:, L - r:].
        self.k_rev = np.ascontiguousarray(states[length:0:-1, :, 0].T)      # (M, L)
        self.a_pow = np.ascontiguousarray(states[:, :, 1:])                 # (L + 1, M, M)
        self.length = length
        self._scratch = None

    # Whole chunks filtered together (see run): at most this many at a time, so the
    # batch's temporaries stay small on a long offline pass.
    GROUP_CHUNKS = 32

    def _scratch_for(self, n_channels):
        # The products' temporaries, allocated once per channel count: the same products into
        # kept arrays instead of fresh ones each chunk (a few microseconds per 20 ms block).
        if self._scratch is None or self._scratch[0].shape[1] != n_channels:
            n_states = len(self.a_pow[0])
            group = self.GROUP_CHUNKS
            self._scratch = (np.empty((self.length, n_channels)), np.empty((n_states, n_channels)),
                             np.empty((n_states, n_channels)), np.empty((group, n_states, n_channels)),
                             np.empty((group + 1, n_states, n_channels)), np.empty((group, self.length, n_channels)))
        return self._scratch

    def run(self, x, state, out):
        """Filter ``x`` (n, C) into ``out`` (n, C); ``state`` (M, C) is updated in place.

        Whole chunks go through the products together, as stacks (one call
        each): only the state at each chunk's start is carried from chunk to
        chunk, two small products a chunk.  Each chunk's arithmetic is the
        same as one at a time: y = H x + G s, s' = F x + A s, the same sums
        in the same order, so the output does not depend on how chunks are
        grouped (tests/device/test_dsp.py).
        """
        length = self.length
        scratch = self._scratch_for(state.shape[1])
        n_total = len(x)
        start = 0
        while n_total - start >= length:
            count = min((n_total - start) // length, self.GROUP_CHUNKS)
            stop = start + count * length
            self._run_whole_chunks(x[start:stop], state, out[start:stop], count, scratch)
            start = stop
        if start < n_total:
            self._run_chunk(x[start:], state, out[start:], scratch)

    def _run_whole_chunks(self, x, state, out, count, scratch):
        length = self.length
        n_channels = state.shape[1]
        _, _, _, from_input, states, from_state = scratch
        chunks = x.reshape(count, length, n_channels)
        np.matmul(self.h, chunks, out=out.reshape(count, length, n_channels))
        from_input = from_input[:count]
        np.matmul(self.k_rev, chunks, out=from_input)
        states[0] = state
        step = self.a_pow[length]
        for index in range(count):
            following = states[index + 1]
            np.matmul(step, states[index], out=following)
            np.add(from_input[index], following, out=following)
        from_state = from_state[:count]
        np.matmul(self.g, states[:count], out=from_state)
        out.reshape(count, length, n_channels)[...] += from_state
        state[...] = states[count]

    def _run_chunk(self, chunk, state, out, scratch):
        length = self.length
        r = len(chunk)
        from_state, state_from_input, state_from_state = scratch[:3]
        np.matmul(self.h[:r, :r], chunk, out=out)
        out += np.matmul(self.g[:r], state, out=from_state[:r])
        np.matmul(self.k_rev[:, length - r:], chunk, out=state_from_input)
        np.matmul(self.a_pow[r], state, out=state_from_state)
        np.add(state_from_input, state_from_state, out=state)


class FilterChain(object):
    """Optional common-average reference, then a causal SOS cascade, with carried state.

    The one filter implementation of the device path (see module doc): there is
    no engine to choose.

    Parameters
    ----------
    sos : array-like, shape (n_sections, 6); validated (may be empty: identity).
    n_channels : int
    car : bool, subtract the across-channel mean from every sample first
    chunk_samples : int, chunk length of the block formulation
    where : str, names the source of ``sos`` in error messages

    ``process(block)`` takes ``(n_samples, n_channels)`` samples in µV (any real
    dtype) and returns their filtered values, float64, same shape.  The
    returned array is a view of an internal buffer, overwritten by the next
    call: copy it to keep it.
    """

    def __init__(self, sos, n_channels, car=False, chunk_samples=DEFAULT_CHUNK_SAMPLES, where="sos"):
        self.sos = validate_sos(sos, where)
        self.n_channels = check_int("n_channels", n_channels, minimum=1)
        if car and self.n_channels < 2:
            raise ConfigError("{}: a common-average reference needs at least 2 channels".format(where))
        self.car = bool(car)
        chunk_samples = check_int("chunk_samples", chunk_samples, minimum=1)
        # An empty chain (envelope mode) is the identity: nothing to measure.
        self._engine = _BlockEngine(self.sos, chunk_samples) if len(self.sos) else None
        self._zi = np.zeros((len(self.sos), 2, self.n_channels))
        self._state = self._zi.reshape(2 * len(self.sos), self.n_channels)   # view: same memory
        self._input = np.zeros((0, self.n_channels))
        self._output = np.zeros((0, self.n_channels))
        self._mean = np.zeros(0)
        self._reserve(256)

    @property
    def state(self):
        """Copy of the filter state, shape (n_sections, 2, n_channels), as scipy's ``zi``."""
        return self._zi.copy()

    def reset(self):
        """Forget the past: filter state back to rest (zeros)."""
        self._zi[...] = 0.0

    def _reserve(self, n_samples):
        # Buffers grow only when a block larger than any before arrives.
        if n_samples > len(self._input):
            self._input = np.zeros((n_samples, self.n_channels))
            self._output = np.zeros((n_samples, self.n_channels))
            self._mean = np.zeros(n_samples)

    def process(self, block):
        """Filter one block, carrying state; returns a float64 view (n_samples, n_channels)."""
        n = len(block)
        if n == 0:
            return self._output[:0]
        self._reserve(n)
        x = self._input[:n]
        np.copyto(x, block, casting="unsafe")
        if self.car:
            mean = self._mean[:n]
            np.mean(x, axis=1, out=mean)
            x -= mean[:, None]
        out = self._output[:n]
        if self._engine is None:
            out[...] = x
            return out
        self._engine.run(x, self._state, out)
        return out
