"""Filter design on the workstation: settings in, second-order sections out.

Design is kept apart from application (as MNE's ``filter.py`` does): this
module turns cut-offs into SOS coefficients with ``scipy.signal`` once, at
training time; :mod:`neurohand.decoder.dsp` applies the stored coefficients
on the device, which needs no scipy and no design step.

Everything here refuses to start on nonsense: a cut-off at or above Nyquist,
a non-positive one, an order outside the supported range or a design whose
poles are not strictly inside the unit circle raises :class:`UsageError`
naming the value and the limit.
"""
import numpy as np

from neurohand.decoder.dsp import sos_pole_radius
from neurohand.firmware_bridge.shared.checks import check_int, check_number
from neurohand.firmware_bridge.shared.errors import UsageError

# Butterworth band-pass of order N has 2N poles, i.e. N sections.  Beyond 8
# sections the extra steepness buys nothing for EMG/ENG and costs run time.
MAX_BAND_ORDER = 8
# Each notch is one biquad evaluated for every sample on the device, so the
# number of mains harmonics notched is a budget, not "all below Nyquist"
# (at 10 kHz and 50 Hz that would be 99 sections, far over the 20 ms block).
MAX_NOTCHES = 10
# A design whose slowest pole is closer to the unit circle than this is
# numerically marginal in float64 and would ring for many seconds.
MAX_POLE_RADIUS = 1.0 - 1e-7


def _import_signal():
    try:
        from scipy import signal
    except ImportError as error:
        raise UsageError("designing filters needs scipy (a workstation install: pip install "
                         "'neurohand[train]'); the device loads designed coefficients instead") from error
    return signal


def design_band_pass(signal_rate, band_hz, order):
    """Butterworth band-pass as SOS.

    Parameters
    ----------
    signal_rate : float, Hz
    band_hz : (low, high) in Hz, 0 < low < high < signal_rate / 2
    order : int, 1..MAX_BAND_ORDER (sections produced: ``order``)

    Returns
    -------
    ndarray, shape (order, 6), float64
    """
    signal_rate = check_number("signal_rate", signal_rate, minimum=0.0, exclusive_minimum=True)
    nyquist = signal_rate / 2.0
    low, high = _check_band("band_hz", band_hz, nyquist)
    order = check_int("band_order", order, minimum=1, maximum=MAX_BAND_ORDER)
    signal = _import_signal()
    sos = signal.butter(order, [low, high], btype="bandpass", output="sos", fs=signal_rate)
    return _checked(np.asarray(sos, dtype=np.float64), "band-pass {}-{} Hz order {}".format(low, high, order))


def notch_frequencies(signal_rate, notch_hz, n_harmonics):
    """Mains frequency and its harmonics strictly below Nyquist, at most ``n_harmonics`` of them.

    ``n_harmonics`` counts the fundamental: 3 gives 50, 100, 150 Hz for 50 Hz mains.
    """
    signal_rate = check_number("signal_rate", signal_rate, minimum=0.0, exclusive_minimum=True)
    notch_hz = check_number("notch_hz", notch_hz, minimum=0.0, exclusive_minimum=True)
    n_harmonics = check_int("notch_harmonics", n_harmonics, minimum=1, maximum=MAX_NOTCHES)
    nyquist = signal_rate / 2.0
    if notch_hz >= nyquist:
        raise UsageError("notch_hz must be below Nyquist ({} Hz at {} Hz sampling), but got {!r}".format(
            nyquist, signal_rate, notch_hz))
    return [notch_hz * k for k in range(1, n_harmonics + 1) if notch_hz * k < nyquist]


def design_notches(signal_rate, notch_hz, n_harmonics, quality):
    """IIR notches (``scipy.signal.iirnotch``) at the mains frequency and harmonics, as SOS.

    Returns
    -------
    sos : ndarray, shape (n_notches, 6), float64
    frequencies : list of float, Hz, one per section
    """
    frequencies = notch_frequencies(signal_rate, notch_hz, n_harmonics)
    quality = check_number("notch_q", quality, minimum=0.5, maximum=1000.0)
    signal = _import_signal()
    rows = []
    for frequency in frequencies:
        b, a = signal.iirnotch(frequency, quality, fs=signal_rate)
        rows.append(np.concatenate([np.asarray(b, dtype=np.float64) / a[0], np.asarray(a, dtype=np.float64) / a[0]]))
    sos = np.array(rows, dtype=np.float64).reshape(len(rows), 6)
    return _checked(sos, "notches at {} Hz (Q {})".format(frequencies, quality)), frequencies


def design_chain(signal_rate, band_hz, band_order, notch_hz, notch_harmonics, notch_q):
    """The whole causal chain: band-pass sections then notch sections.

    ``band_hz`` or ``notch_hz`` may be None to leave that stage out.

    Returns
    -------
    sos : ndarray, shape (n_sections, 6), float64 (n_sections may be 0)
    description : dict, JSON-able: what was designed, for the config and for humans
    """
    parts = []
    description = {"band_hz": None, "band_order": None, "notch_hz": [], "notch_q": None}
    if band_hz is not None:
        parts.append(design_band_pass(signal_rate, band_hz, band_order))
        description["band_hz"] = [float(band_hz[0]), float(band_hz[1])]
        description["band_order"] = int(band_order)
    if notch_hz is not None:
        sos, frequencies = design_notches(signal_rate, notch_hz, notch_harmonics, notch_q)
        parts.append(sos)
        description["notch_hz"] = frequencies
        description["notch_q"] = float(notch_q)
    sos = np.concatenate(parts, axis=0) if parts else np.zeros((0, 6), dtype=np.float64)
    return sos, description


def _check_band(name, band, nyquist):
    try:
        low, high = band
    except (TypeError, ValueError):
        raise UsageError("{} must be a pair [low, high] in Hz, but got {!r}".format(name, band)) from None
    low = check_number(name + " low edge", low, minimum=0.0, exclusive_minimum=True)
    high = check_number(name + " high edge", high, minimum=0.0, exclusive_minimum=True)
    if high >= nyquist:
        raise UsageError("{} high edge must be below Nyquist ({} Hz), but got {!r}".format(name, nyquist, high))
    if low >= high:
        raise UsageError("{} low edge must be below the high edge, but got {!r}".format(name, [low, high]))
    return low, high


def _checked(sos, what):
    if not np.all(np.isfinite(sos)):
        raise UsageError("the {} design produced non-finite coefficients".format(what))
    radius = sos_pole_radius(sos)
    if radius > MAX_POLE_RADIUS:
        raise UsageError("the {} design is unstable or marginal: largest pole radius {:.9f} "
                         "(must be below {}); use a lower order or wider band".format(what, radius, MAX_POLE_RADIUS))
    return sos
