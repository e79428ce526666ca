"""End to end through real pseudo-terminals: virtual chip -> serial link ->
runtime threads -> neurohand-protocol hand driver -> virtual hand."""
import os
import threading

import numpy as np
import pytest

from neurohand.decoder.backends import create_backend
from neurohand.decoder.pipeline import FeaturePipeline
from neurohand.deploy.runtime import run_realtime
from neurohand.firmware_bridge.chip.session import chip_opener
from neurohand.deploy.runtime.config import RuntimeConfig
from neurohand.firmware_bridge.shared.errors import ConfigError
from neurohand.firmware_bridge.hands import create_hand
from neurohand.firmware_bridge.recording.file_format import open_recording
from neurohand.firmware_bridge.virtual.chip import ArraySource, VirtualChip
from neurohand.firmware_bridge.virtual.hand import VirtualHand

MODEL = os.path.join(os.path.dirname(__file__), "data", "golden_gru.onnx")
RATE = 1000.0
SCALE = 0.5
PIPELINE = {"format": "neurohand-feature-pipeline", "version": 1, "signal_rate": RATE, "n_channels": 3,
            "mode": "envelope", "dtype": "float64", "window_samples": 50, "stride_samples": 10,
            "car": False, "sos": [], "features": ["mean", "std"], "bandpower_bands_hz": [],
            "threshold_uv": 0.0, "log": False, "log_epsilon": 1e-6,
            "normalisation": {"mean": [0.0] * 6, "std": [50.0] * 6}}


@pytest.fixture
def bench():
    samples = np.random.RandomState(3).randint(-200, 200, size=(5000, 3)).astype(np.int16)
    chip = VirtualChip(ArraySource(samples, RATE, SCALE), samples_per_frame=10)
    chip_path = chip.open()
    stop = threading.Event()
    serving = threading.Thread(target=chip.serve, args=(stop,), daemon=True)
    serving.start()
    hand_side = VirtualHand("neurohand").start()
    try:
        yield samples, chip, chip_path, hand_side
    finally:
        stop.set()
        serving.join(5.0)
        chip.close()
        hand_side.stop()


def test_run_between_virtual_chip_and_virtual_hand(bench, tmp_path):
    samples, chip, chip_path, hand_side = bench
    hand = create_hand("neurohand:" + hand_side.slave_path, n_outputs=5)
    record = str(tmp_path / "run.nhr")
    document = run_realtime(FeaturePipeline.from_config(PIPELINE), create_backend("numpy", MODEL), hand,
                            chip_opener(chip_path, 3, RATE, [SCALE] * 3), [SCALE] * 3, ["a", "b", "c"],
                            RuntimeConfig(status_interval_s=0), record_path=record, duration_s=1.0, quiet=True,
                            install_signals=False)
    assert hand_side.wait_for(document["commands_sent"], 2.0)
    received = hand_side.received()
    assert len(received) == document["commands_sent"] >= 40
    assert hand_side.counters["bad_checksums"] == 0 and hand_side.counters["framing_errors"] == 0
    assert hand_side.counters["timeouts"] == 0                 # keep-alive held for the whole run
    assert any(max(c.positions) > 0 for c in received)         # it followed the decoder
    assert all(p == 0 for p in received[-1].positions)         # and ended in the safe posture
    frames = document["frames"]
    assert frames["received"] >= 80 and frames["missing"] == 0 and frames["corrupt"] == 0
    assert document["chip_link"]["replies"] >= 2               # GET_CONFIG and START acknowledged
    assert document["latency_us"]["count"] > 0
    with open_recording(record) as recording:
        assert recording.integrity["complete"]
        assert recording.n_samples == 10 * frames["received"]
        assert np.array_equal(recording.read_signals(), samples[:recording.n_samples])


def test_chip_configured_differently_is_refused_before_decoding(bench):
    samples, chip, chip_path, hand_side = bench
    hand = create_hand("neurohand:" + hand_side.slave_path, n_outputs=5)
    pipeline = FeaturePipeline.from_config(PIPELINE)
    with pytest.raises(ConfigError, match="configured for 3 channels, the decoder needs 4"):
        run_realtime(pipeline, create_backend("numpy", MODEL), hand, chip_opener(chip_path, 4, RATE),
                     [SCALE] * 3, ["a", "b", "c"], RuntimeConfig(status_interval_s=0), duration_s=1.0,
                     quiet=True, install_signals=False)
    assert not chip.streaming
    received = hand_side.received()
    assert received and all(p == 0 for p in received[-1].positions)
