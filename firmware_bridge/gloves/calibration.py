"""Glove calibration: raw sensor values -> 0 (open) .. 1 (flexed) per finger.

Fitted at the start of a session from poses the wearer holds (docs/glove-protocol.md,
"Calibration")::

    calibration = GloveCalibration.fit({"open": open_raw, "fist": fist_raw, "thumb": thumb_raw, ...},
                                       glove.sensor_fingers)
    fingers = calibration.apply(raw)          # ndarray (n, 5), 0..1, in the order of FINGERS
    stored = calibration.to_config()          # JSON-able; GloveCalibration.from_config(stored)

Each finger has one or more sensors (``sensor_fingers``).  Sensor s of finger f
maps linearly from its median in the open pose (0) to its median in the pose
that flexed it most (1): the fist, or the pose named after the finger (f
flexed alone) if it was held and moved s further (a thumb flexed alone goes
further than a thumb in a fist).  A finger's value is the mean over its
sensors, clipped to 0..1.  A sensor that did not move (less than ``min_range``
counts, or less than ``NOISE_FACTOR`` times its noise within a pose, a robust
standard deviation) makes the fit refuse, naming the finger: its labels would
be noise.

Default sensor maps (which sensors belong to which finger):

* neurohand serial glove (``serial``): sensor i is finger i for the first five
  channels (thumb, index, middle, ring, little, in that order; docs/glove-protocol.md).
* CyberGlove II/III, 22 sensors: the flexion sensors of each finger, in the
  CyberGlove's sensor order (CyberGlove reference manual, "sensor
  numbering"; the same order as NinaPro's glove columns, Atzori et al. 2014):
  thumb MCP and IP (1, 2); index MCP, PIP, DIP (4, 5, 6); middle (7, 8, 9);
  ring (11, 12, 13); little (15, 16, 17).  Thumb rotation (0), the abduction
  sensors (3, 10, 14, 18), palm arch (19) and wrist (20, 21) belong to no finger.
* CyberGlove, 18 sensors: thumb MCP and IP (1, 2); index MCP, PIP (4, 5);
  middle (6, 7); ring (9, 10); little (12, 13).
"""
import numpy as np

from neurohand.firmware_bridge.hands.base import DECODER_FINGERS
from neurohand.firmware_bridge.shared.errors import ConfigError, UsageError

#: Finger order of every calibrated output: the decoder's (hands/base.py).
FINGERS = DECODER_FINGERS
#: Poses :meth:`GloveCalibration.fit` needs; the others (one per finger) are optional.
REQUIRED_POSES = ("open", "fist")
#: A sensor must move by more than this many times its within-pose noise (standard deviation).
NOISE_FACTOR = 4.0
#: ... and by at least this many raw counts.
DEFAULT_MIN_RANGE = 3.0
CONFIG_FORMAT = "neurohand-glove-calibration"
CONFIG_VERSION = 1

CYBERGLOVE_22_FINGERS = {"thumb": [1, 2], "index": [4, 5, 6], "middle": [7, 8, 9], "ring": [11, 12, 13],
                         "little": [15, 16, 17]}
CYBERGLOVE_18_FINGERS = {"thumb": [1, 2], "index": [4, 5], "middle": [6, 7], "ring": [9, 10],
                         "little": [12, 13]}


def default_sensor_fingers(kind, n_sensors):
    """The documented default ``{finger: [sensor index, ...]}`` of a glove kind (see the module docstring)."""
    if kind == "cyberglove":
        if n_sensors == 22:
            return {f: list(s) for f, s in CYBERGLOVE_22_FINGERS.items()}
        if n_sensors == 18:
            return {f: list(s) for f, s in CYBERGLOVE_18_FINGERS.items()}
        raise UsageError("no default sensor map for a CyberGlove with {} sensors (18 or 22 are known); "
                         "give sensor_fingers".format(n_sensors))
    if n_sensors < len(FINGERS):
        raise UsageError("a {} glove with {} sensors has fewer than one per finger; give sensor_fingers "
                         "(which sensors belong to which of {})".format(kind, n_sensors, ", ".join(FINGERS)))
    return {finger: [i] for i, finger in enumerate(FINGERS)}


def check_sensor_fingers(sensor_fingers, n_sensors):
    """Return ``sensor_fingers`` as {finger: [int, ...]} for every finger; UsageError otherwise."""
    if not isinstance(sensor_fingers, dict):
        raise UsageError("sensor_fingers must be a dict finger -> list of sensor indices, got {!r}".format(
            sensor_fingers))
    unknown = sorted(set(sensor_fingers) - set(FINGERS), key=str)
    if unknown:
        raise UsageError("sensor_fingers names {!r}, not a finger ({})".format(unknown[0], ", ".join(FINGERS)))
    checked = {}
    for finger in FINGERS:
        sensors = sensor_fingers.get(finger)
        if not isinstance(sensors, (list, tuple)) or not sensors:
            raise UsageError("sensor_fingers gives the {} no sensor; each finger needs at least one".format(finger))
        for s in sensors:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < n_sensors:
                raise UsageError("sensor_fingers: {} sensor {!r} is not a sensor index 0..{}".format(
                    finger, s, n_sensors - 1))
        if len(set(sensors)) != len(sensors):
            raise UsageError("sensor_fingers lists a sensor of the {} twice".format(finger))
        checked[finger] = [int(s) for s in sensors]
    return checked


def _pose_array(name, samples, n_sensors):
    from neurohand.firmware_bridge.shared.checks import check_real_array
    array = check_real_array("calibration pose {!r}".format(name), samples)
    if array.ndim == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2 or array.shape[0] == 0:
        raise UsageError("calibration pose {!r} must be samples x sensors with at least one sample, got "
                         "shape {}".format(name, array.shape))
    if n_sensors is not None and array.shape[1] != n_sensors:
        raise UsageError("calibration pose {!r} has {} sensors, the open pose {}".format(
            name, array.shape[1], n_sensors))
    if not np.all(np.isfinite(array)):
        raise UsageError("calibration pose {!r} holds non-finite values".format(name))
    return array


def _robust_std(samples):
    """Per-sensor noise of a held pose: 1.4826 x the median absolute deviation, so that
    the moments of getting into and out of the pose do not count as noise."""
    return 1.4826 * np.median(np.abs(samples - np.median(samples, axis=0)), axis=0)


class GloveCalibration(object):
    """A fitted linear map per sensor; see the module docstring.

    Parameters
    ----------
    sensor_fingers : dict finger -> list of int
    open_raw : array (n_sensors,), each sensor's raw value with the hand open (0)
    flexed_raw : dict finger -> array (len(sensor_fingers[finger]),), raw values of
        that finger's sensors with it flexed (1)
    sensor_names : list of str or None
    poses : list of str, the poses it was fitted on (for the record)
    """

    def __init__(self, sensor_fingers, open_raw, flexed_raw, sensor_names=None, poses=()):
        open_raw = np.asarray(open_raw, dtype=np.float64).reshape(-1)
        self.n_sensors = open_raw.shape[0]
        self.sensor_fingers = check_sensor_fingers(sensor_fingers, self.n_sensors)
        self.open_raw = open_raw
        self.flexed_raw = {}
        for finger in FINGERS:
            flexed = np.asarray(flexed_raw[finger], dtype=np.float64).reshape(-1)
            if flexed.shape[0] != len(self.sensor_fingers[finger]):
                raise UsageError("the {} has {} sensors but {} flexed values".format(
                    finger, len(self.sensor_fingers[finger]), flexed.shape[0]))
            span = flexed - open_raw[self.sensor_fingers[finger]]
            if not np.all(np.isfinite(span)) or np.any(span == 0):
                raise UsageError("the {}'s flexed and open values are equal for a sensor; a calibration "
                                 "needs a range".format(finger))
            self.flexed_raw[finger] = flexed
        self.sensor_names = None if sensor_names is None else [str(n) for n in sensor_names]
        self.poses = list(poses)
        # apply() as one matrix product: out = raw @ weights + bias, then clip.
        weights = np.zeros((self.n_sensors, len(FINGERS)))
        bias = np.zeros(len(FINGERS))
        for column, finger in enumerate(FINGERS):
            sensors = self.sensor_fingers[finger]
            span = self.flexed_raw[finger] - open_raw[sensors]
            weights[sensors, column] = 1.0 / (span * len(sensors))
            bias[column] = -np.sum(open_raw[sensors] / span) / len(sensors)
        self._weights, self._bias = weights, bias

    @classmethod
    def fit(cls, poses, sensor_fingers, sensor_names=None, min_range=DEFAULT_MIN_RANGE):
        """Fit from held poses.

        Parameters
        ----------
        poses : dict pose name -> array (n_samples, n_sensors) of raw samples
            Needs "open" and "fist"; may have one pose per finger (named as in
            FINGERS: that finger flexed alone), used as that finger's flexed
            reference instead of the fist.
        sensor_fingers : dict finger -> list of sensor indices (default maps:
            :func:`default_sensor_fingers`)
        min_range : float, least movement in raw counts of every finger sensor

        Raises UsageError (one line, naming the finger) when a pose is missing or
        a sensor of a finger did not move.
        """
        if not isinstance(poses, dict):
            raise UsageError("calibration poses must be a dict pose name -> samples, got {!r}".format(poses))
        for name in REQUIRED_POSES:
            if name not in poses:
                raise UsageError("calibration needs the {!r} pose (held: {})".format(
                    name, ", ".join(sorted(poses)) or "none"))
        unknown = sorted(set(poses) - set(REQUIRED_POSES) - set(FINGERS))
        if unknown:
            raise UsageError("calibration pose {!r} is not one of {}".format(
                unknown[0], ", ".join(REQUIRED_POSES + FINGERS)))
        open_samples = _pose_array("open", poses["open"], None)
        n_sensors = open_samples.shape[1]
        arrays = {name: _pose_array(name, samples, n_sensors) for name, samples in poses.items()}
        sensor_fingers = check_sensor_fingers(sensor_fingers, n_sensors)
        if sensor_names is not None and len(sensor_names) != n_sensors:
            raise UsageError("{} sensor names for {} sensors".format(len(sensor_names), n_sensors))
        open_raw = np.median(arrays["open"], axis=0)
        medians = {name: np.median(samples, axis=0) for name, samples in arrays.items()}
        noise = {name: _robust_std(samples) for name, samples in arrays.items()}
        flexed_raw = {}
        for finger in FINGERS:
            sensors = sensor_fingers[finger]
            candidates = ["fist"] + ([finger] if finger in arrays else [])
            flexed = np.empty(len(sensors))
            for k, sensor in enumerate(sensors):
                # The pose that flexed this sensor most: a thumb's own flexion, but a finger's whole fist.
                pose = max(candidates, key=lambda name: abs(medians[name][sensor] - open_raw[sensor]))
                moved = abs(medians[pose][sensor] - open_raw[sensor])
                sigma = max(noise["open"][sensor], noise[pose][sensor])
                if moved < max(min_range, NOISE_FACTOR * sigma):
                    name = sensor_names[sensor] if sensor_names is not None else "sensor {}".format(sensor)
                    raise UsageError(
                        "glove calibration: the {finger} did not move its {name} between the open hand and "
                        "the {poses} ({moved:.3g} counts, noise {sigma:.2g}); hold the poses again, or check "
                        "that sensor".format(finger=finger, name=name, poses=" or ".join(
                            "fist" if c == "fist" else "{} pose".format(c) for c in candidates),
                            moved=moved, sigma=sigma))
                flexed[k] = medians[pose][sensor]
            flexed_raw[finger] = flexed
        return cls(sensor_fingers, open_raw, flexed_raw, sensor_names, sorted(arrays))

    def apply(self, raw):
        """Raw samples, array (n, n_sensors) or (n_sensors,) -> ndarray (n, 5) float64, 0..1 per finger."""
        raw = np.asarray(raw, dtype=np.float64)
        if raw.ndim == 1:
            raw = raw.reshape(1, -1)
        if raw.ndim != 2 or raw.shape[1] != self.n_sensors:
            raise UsageError("glove samples must be (n, {}) raw sensor values, got shape {}".format(
                self.n_sensors, raw.shape))
        return np.clip(raw.dot(self._weights) + self._bias, 0.0, 1.0)

    def ranges(self):
        """{finger: mean |flexed - open| of its sensors, raw counts}: the range the wearer used."""
        return {finger: float(np.mean(np.abs(self.flexed_raw[finger] - self.open_raw[self.sensor_fingers[finger]])))
                for finger in FINGERS}

    # -- storage -----------------------------------------------------------------
    def to_config(self):
        """A JSON-able dict (what collect stores in the recording's metadata)."""
        return {
            "format": CONFIG_FORMAT,
            "version": CONFIG_VERSION,
            "fingers": list(FINGERS),
            "sensor_names": self.sensor_names,
            "sensor_fingers": {f: list(self.sensor_fingers[f]) for f in FINGERS},
            "open": [float(v) for v in self.open_raw],
            "flexed": {f: [float(v) for v in self.flexed_raw[f]] for f in FINGERS},
            "poses": list(self.poses),
        }

    @classmethod
    def from_config(cls, config):
        """Rebuild from :meth:`to_config`'s dict; ConfigError naming what is wrong."""
        if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
            raise ConfigError("not a glove calibration (format {!r})".format(
                config.get("format") if isinstance(config, dict) else type(config).__name__))
        if config.get("version") != CONFIG_VERSION:
            raise ConfigError("glove calibration version {!r}; this neurohand reads version {}".format(
                config.get("version"), CONFIG_VERSION))
        if config.get("fingers") != list(FINGERS):
            raise ConfigError("glove calibration is for fingers {!r}, not {}".format(
                config.get("fingers"), list(FINGERS)))
        try:
            return cls(config["sensor_fingers"], config["open"], config["flexed"], config.get("sensor_names"),
                       config.get("poses", ()))
        except (KeyError, TypeError, ValueError, UsageError) as exc:
            raise ConfigError("glove calibration is damaged: {}".format(exc)) from exc

    def __repr__(self):
        return "GloveCalibration({} sensors, poses {})".format(self.n_sensors, ", ".join(self.poses) or "-")
