"""What the collect tests share: virtual chip and glove on pseudo-terminals (in this process), a fake
glove worn by a perfect patient who follows the cues, short protocols, the collect command.

Also tests of the rig itself (the fake glove keeps the GloveSource contract)."""
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

from neurohand.firmware_bridge.gloves.calibration import FINGERS
from neurohand.firmware_bridge.virtual.chip import ArraySource, RecordingSource, VirtualChip

SHORT = {"name": "short", "movements": [{"id": 1, "name": "thumb", "posture": {"thumb": 1.0}},
                                        {"id": 8, "name": "fist", "posture": {f: 1.0 for f in FINGERS}}],
         "repetitions": 2, "hold_s": 0.5, "rest_s": 0.3, "lead_in_s": 0.3, "order": "fixed",
         "calibration": {"poses": ["open", "fist"], "hold_s": 0.4, "rest_s": 0.1, "settle_s": 0.15}}
RATE = 2000.0
CHANNELS = 4
SCALE = 0.195
OPEN_COUNTS, FLEXED_COUNTS = 200.0, 800.0


def moving_labels(seconds=4.0, rate=100.0):
    """Finger labels that never rest: each finger flexes and opens once a second, out of phase."""
    t = np.arange(int(seconds * rate)) / rate
    return 0.5 - 0.5 * np.cos(2 * np.pi * (t[:, None] + np.arange(len(FINGERS)) / 5.0))


def write_protocol(path, **changes):
    config = json.loads(json.dumps(SHORT))
    config.update(changes)
    with open(str(path), "w") as handle:
        json.dump(config, handle)
    return str(path)


def write_virtual_calibration(path, protocol="serial"):
    from neurohand.firmware_bridge.virtual.glove import virtual_calibration
    with open(str(path), "w") as handle:
        json.dump(virtual_calibration(protocol).to_config(), handle)
    return str(path)


def simulated(path, seconds=12.0, n_channels=CHANNELS, rate=RATE, seed=1, difficulty="easy"):
    from neurohand.firmware_bridge.virtual.simulator import SimulatorConfig, write_recording
    write_recording(str(path), SimulatorConfig(seconds=seconds, n_channels=n_channels, rate=rate, seed=seed,
                                               difficulty=difficulty))
    return str(path)


def noise_source(seconds=60.0, seed=3):
    samples = np.random.RandomState(seed).randint(-300, 300, size=(int(seconds * RATE), CHANNELS)).astype(np.int16)
    return ArraySource(samples, RATE, SCALE)


class ChipThread(object):
    """A VirtualChip serving in a thread; ``path`` is its terminal."""

    def __init__(self, source, **options):
        self.chip = VirtualChip(source, samples_per_frame=options.pop("samples_per_frame", 10), **options)
        self.path = self.chip.open()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.chip.serve, args=(self._stop,), daemon=True)
        self._thread.start()

    @classmethod
    def playing(cls, recording_path, **options):
        from neurohand.firmware_bridge.recording.file_format import open_recording
        recording = open_recording(recording_path)
        return cls(RecordingSource(recording), **options)

    def stop(self):
        self._stop.set()
        self._thread.join(5.0)
        self.chip.close()


class GloveThread(object):
    """A VirtualGlove (serial protocol) playing a recording's finger labels (or ``labels`` (n, 5) at
    ``rate``), serving in a thread."""

    def __init__(self, recording_path=None, labels=None, rate=100.0, **options):
        from neurohand.firmware_bridge.recording.file_format import open_recording
        from neurohand.firmware_bridge.virtual.glove import VirtualGlove, recording_labels
        if recording_path is not None:
            with open_recording(recording_path) as recording:
                labels, rate, _ = recording_labels(recording)
        self.glove = VirtualGlove(labels, rate, **options)
        self.path = self.glove.open()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.glove.serve, args=(self._stop,), daemon=True)
        self._thread.start()

    def freeze(self):
        """The glove's firmware hangs: nothing more is sent, the port stays open."""
        self._stop.set()
        self._thread.join(5.0)

    def stop(self):
        self.freeze()
        self.glove.close()


class Patient(object):
    """A display the session shows its cues on, read by a perfect patient: ``posture()`` is the target
    shown ``reaction_s`` ago (open hand before any cue).  Keeps every state shown."""

    def __init__(self, reaction_s=0.0):
        self.reaction_s = reaction_s
        self.states = []
        self._shown = []          # (time, posture)
        self._lock = threading.Lock()
        self.closed = False

    def show(self, state):
        self.states.append(state)
        step = state.get("step")
        if step is not None:
            with self._lock:
                if not self._shown or self._shown[-1][1] != step["posture"]:
                    self._shown.append((time.monotonic(), list(step["posture"])))

    def posture(self):
        now = time.monotonic() - self.reaction_s
        with self._lock:
            for t, posture in reversed(self._shown):
                if t <= now:
                    return posture
        return [0.0] * len(FINGERS)

    def close(self):
        self.closed = True


class FakeGlove(object):
    """A glove source after the GloveSource contract, worn by ``patient``: samples at ``rate_hz`` with
    sequence numbers, raw = 200 + 600 * flexion, from a thread.  ``stop_after_s``: it goes silent."""

    kind = "serial"

    def __init__(self, patient, rate_hz=100.0, stop_after_s=None, sequence=True, noise=2.0):
        self.patient = patient
        self.rate_hz = rate_hz
        self.sensor_names = ["flex{}".format(i) for i in range(len(FINGERS))]
        self.sensor_fingers = {f: [i] for i, f in enumerate(FINGERS)}
        self.counters = {"frames": 0, "lost": 0, "crc_errors": 0, "resyncs": 0, "timeouts": 0}
        self._queue = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stop_after = stop_after_s
        self._sequence = sequence
        self._noise = noise
        self._started = time.monotonic()
        self._last = self._started
        self.closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        from neurohand.firmware_bridge.gloves.base import GloveSample
        rng = np.random.RandomState(0)
        k = 0
        while not self._stop.is_set():
            due = self._started + k / self.rate_hz
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if self._stop_after is not None and time.monotonic() - self._started > self._stop_after:
                time.sleep(0.01)
                continue
            raw = OPEN_COUNTS + (FLEXED_COUNTS - OPEN_COUNTS) * np.array(self.patient.posture())
            raw = raw + rng.normal(0.0, self._noise, size=raw.shape)
            now = time.monotonic()
            with self._lock:
                self._queue.append(GloveSample(now, k if self._sequence else None, tuple(float(v) for v in raw)))
                self.counters["frames"] += 1
                self._last = now
            k += 1

    @property
    def silent_s(self):
        return time.monotonic() - self._last

    def read(self, timeout=0.1):
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                samples, self._queue = self._queue, []
            if samples or time.monotonic() >= deadline:
                return samples
            time.sleep(0.002)

    def close(self):
        self.closed = True
        self._stop.set()
        self._thread.join(2.0)


class Signals(object):
    """A StopSignals stand-in: the session stops once ``reason`` is set (by a test's thread)."""

    def __init__(self):
        self.reason = None

    def raise_if_stopped(self):
        pass


def collect_command(*args):
    return [sys.executable, "-m", "neurohand.deploy", "collect"] + [str(a) for a in args]


def run_collect(*args, timeout=60):
    return subprocess.run(collect_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)


def wait_for(condition, timeout_s, step_s=0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step_s)
    return condition()


def file_size(path):
    return os.path.getsize(path) if os.path.exists(path) else 0


# --- the rig itself -------------------------------------------------------------------

def test_the_fake_glove_keeps_the_glove_source_contract():
    patient = Patient()
    patient.show({"step": {"posture": [1.0, 0.0, 0.0, 0.0, 1.0]}})
    glove = FakeGlove(patient, rate_hz=200.0)
    try:
        time.sleep(0.1)
        samples = glove.read(0.1)
        assert len(samples) >= 10
        sequences = [s.sequence for s in samples]
        assert sequences == list(range(sequences[0], sequences[0] + len(samples)))
        assert all(a.arrival <= b.arrival for a, b in zip(samples, samples[1:]))
        raw = np.array([s.raw for s in samples])
        assert raw.shape[1] == len(glove.sensor_names)
        assert np.allclose(raw.mean(axis=0), [800, 200, 200, 200, 800], atol=5)
    finally:
        glove.close()
