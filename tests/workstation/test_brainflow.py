"""BrainFlow boards as a signal source, with the real BrainFlow: its synthetic board and its playback board.

The bundle is made here for the synthetic board's layout (16 EXG channels at
250 Hz; window 200 ms, stride 20 ms) with an untrained GRU exported by the
workstation's exporter: these tests check the path from the board to the
hand, not the quality of a decode.  Skipped without brainflow (the 'lab'
extra) or torch.
"""
import json
import os
import time

import numpy as np
import pytest

pytest.importorskip("brainflow")
pytest.importorskip("torch")

from neurohand.deploy.bundle import make_bundle  # noqa: E402
from neurohand.deploy.cli import main as cli  # noqa: E402
from neurohand.firmware_bridge.streams.brainflow_source import fix_library_lookup  # noqa: E402
from neurohand.firmware_bridge.virtual.hand import VirtualHand  # noqa: E402

RATE = 250.0
CHANNELS = 16
FEATURES = ["mav", "rms"]


def pipeline_config():
    return {"format": "neurohand-feature-pipeline", "version": 1, "signal_rate": RATE, "n_channels": CHANNELS,
            "mode": "envelope", "dtype": "float64", "window_samples": 50, "stride_samples": 5, "car": False,
            "sos": [], "features": FEATURES, "bandpower_bands_hz": [], "threshold_uv": 0.0, "log": False,
            "log_epsilon": 1e-6,
            "normalisation": {"mean": [100.0] * (CHANNELS * len(FEATURES)),
                              "std": [100.0] * (CHANNELS * len(FEATURES))}}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from neurohand.train.export import export_onnx
    from neurohand.train.model import ModelConfig, build_model

    folder = tmp_path_factory.mktemp("brainflow-bundle")
    run = folder / "run"
    run.mkdir()
    config = ModelConfig(n_features=CHANNELS * len(FEATURES), n_outputs=5, cell="gru", hidden_size=8, num_layers=1)
    export_onnx(build_model(config), config, str(run / "model.onnx"), check_steps=5)
    (run / "config.json").write_text(json.dumps({
        "format": "neurohand-run", "model": config.to_dict(), "pipeline": pipeline_config(),
        "channel_names": ["exg{}".format(i) for i in range(CHANNELS)],
        "labels": {"names": ["thumb", "index", "middle", "ring", "little"], "rate": 50.0,
                   "scaling": {"kind": "none"}, "stream": "fingers"}}))
    path = str(folder / "bundle")
    make_bundle(str(run), path)
    assert cli.main(["selftest", path, "--backend", "numpy"]) == 0
    return path


@pytest.fixture
def hand():
    hand = VirtualHand("neurohand").start()
    yield hand
    hand.stop()


def run_on_board(capsys, bundle, spec, hand, seconds, tmp_path):
    stats = str(tmp_path / "stats.json")
    code = cli.main(["run", "--bundle", bundle, "--chip", spec, "--hand", "neurohand:" + hand.slave_path,
                     "--backend", "numpy", "--duration", str(seconds), "--stats-json", stats, "--quiet"])
    assert code == 0, capsys.readouterr().err
    with open(stats) as handle:
        document = json.load(handle)
    assert hand.wait_for(document["commands_sent"], 2.0)
    return document


def refused(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_the_synthetic_board_drives_the_hand(bundle, capsys, hand, tmp_path):
    document = run_on_board(capsys, bundle, "brainflow:synthetic", hand, 1.5, tmp_path)
    link = document["chip_link"]
    # 250 samples a second from BrainFlow's own thread, all of them through, no gap.
    assert 1.0 * RATE <= link["samples"] <= 2.0 * RATE and link["gaps"] == 0 and link["reader_errors"] == 0
    assert document["decoder"]["frames"] == link["chunks"] and document["decoder"]["missing_samples"] == 0
    assert document["windows"]["decoded"] >= 30
    events = [e["kind"] for e in document["safety_events"]["events"]]
    assert events[0] == "ready" and "data_timeout" not in events
    positions = np.array([c.positions for c in hand.received()])
    assert len(positions) == document["commands_sent"] and positions.std(axis=0).max() > 0.001


def synthetic_file(tmp_path, seconds):
    """A BrainFlow file of the synthetic board's layout (DataFilter.write_file), EXG rows known."""
    from brainflow import data_filter
    from brainflow.board_shim import BoardIds, BoardShim
    fix_library_lookup(data_filter)
    board = BoardIds.SYNTHETIC_BOARD.value
    n = int(seconds * RATE)
    data = np.zeros((BoardShim.get_num_rows(board), n))
    data[BoardShim.get_package_num_channel(board)] = np.arange(n) % 256
    data[BoardShim.get_timestamp_channel(board)] = time.time() + np.arange(n) / RATE
    exg = BoardShim.get_exg_channels(board)
    t = np.arange(n) / RATE
    for k, row in enumerate(exg):
        # Millivolt-sized values with three decimals: exact after BrainFlow's text round trip.
        data[row] = np.round(50.0 * (k + 1) * np.sin(2 * np.pi * (3 + k) * t) + 10 * k, 3)
    path = str(tmp_path / "synthetic.csv")
    data_filter.DataFilter.write_file(data, path, "w")
    return path, data[exg].T


def test_a_playback_file_reaches_the_decoder_sample_for_sample_and_drives_the_hand(bundle, capsys, hand,
                                                                                    tmp_path):
    from neurohand.deploy.runtime.queues import BatchQueue
    from neurohand.deploy.runtime.stats import RuntimeStats
    from neurohand.firmware_bridge.chip.parser import ChipParser, SampleFrame
    from neurohand.firmware_bridge.chip.receiver import ChipReceiver
    from neurohand.firmware_bridge.chip.session import ChipSession

    path, exg = synthetic_file(tmp_path, 3.0)
    frames = BatchQueue(1000)
    receiver = ChipReceiver(ChipParser(), frames, RuntimeStats(), time.perf_counter, sample_rate=RATE)
    source = ChipSession("brainflow:playback:" + path).open()
    got = []
    try:
        assert type(source).__name__ == "BrainFlowSource"
        assert source.chip_config.n_channels == CHANNELS and source.chip_config.sample_rate_hz == RATE
        source.check(CHANNELS, RATE)
        source.start_streaming(receiver)
        deadline = time.time() + 3.0
        while sum(len(g) for g in got) < RATE and time.time() < deadline:
            items = []
            frames.take_all(items, 0.1)
            got += [event.samples for event, _ in items if isinstance(event, SampleFrame)]
    finally:
        source.close()
    got = np.concatenate(got)
    assert got.shape[0] >= RATE and got.shape[1] == CHANNELS
    assert np.array_equal(got, exg[:len(got)])            # the file's EXG rows, in order, in microvolts

    document = run_on_board(capsys, bundle, "brainflow:playback:synthetic:" + path, hand, 1.2, tmp_path)
    assert document["chip_link"]["samples"] >= 0.8 * RATE and document["chip_link"]["gaps"] == 0
    assert document["windows"]["decoded"] >= 25 and document["commands_sent"] >= 25


def test_a_wrong_board_is_refused_in_one_line(bundle, capsys, hand, tmp_path):
    base = ["run", "--bundle", bundle, "--hand", "neurohand:" + hand.slave_path, "--backend", "numpy", "--chip"]
    assert "did you mean 'cyton'" in refused(capsys, base + ["brainflow:cytn"])
    assert "playback board needs a file" in refused(capsys, base + ["brainflow:playback"])
    assert "does not exist" in refused(capsys, base + ["brainflow:playback:" + str(tmp_path / "none.csv")])
    assert "pyserial URL" in refused(capsys, base + ["brainflow:cyton:socket://192.0.2.1:9"])
    assert "cannot start" in refused(capsys, base + ["brainflow:cyton:" + str(tmp_path / "no-such-tty")])
    # The synthetic board is not what a 4-channel, 2 kHz bundle was trained on.
    small = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "device", "data", "replay_run")
    other = str(tmp_path / "other")
    make_bundle(small, other)
    assert cli.main(["selftest", other, "--backend", "numpy"]) == 0
    capsys.readouterr()
    message = refused(capsys, ["run", "--bundle", other, "--hand", "none", "--backend", "numpy",
                               "--chip", "brainflow:synthetic"])
    assert "signal source brainflow:synthetic is configured for 16 channels, the decoder needs 4" in message
    assert "250.0 Hz, the decoder needs 2000 Hz" in message
    assert hand.received() == []
