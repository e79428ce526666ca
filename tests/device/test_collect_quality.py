"""The end-of-session quality report (deploy/collect/quality.py) on recordings whose truth is known."""
import numpy as np

from neurohand.deploy.collect import quality
from neurohand.deploy.collect.protocol import load_protocol
from neurohand.firmware_bridge.recording.file_format import RecordingWriter

RATE = 2000.0
SCALE = 0.5


def write(path, signals, glove, events=(), protocol="paper"):
    meta = {"protocol": load_protocol(protocol).to_config()}
    with RecordingWriter(str(path), RATE, ["ch{:02d}".format(c) for c in range(signals.shape[1])], "int16",
                         [SCALE] * signals.shape[1], metadata=meta,
                         label_streams={"glove": {"rate": 100.0, "names": ["thumb", "index", "middle", "ring",
                                                                           "little"]}}) as writer:
        writer.append_signals(signals)
        writer.append_labels("glove", glove)
        for event in events:
            writer.add_event(*event)
    return str(path)


def test_noise_saturation_mains_and_finger_ranges_are_measured(tmp_path):
    rng = np.random.RandomState(0)
    n = int(10 * RATE)
    t = np.arange(n) / RATE
    noise = rng.normal(0.0, 8.0, size=(n, 4))                        # 8 counts = 4 uV rms
    signals = noise.copy()
    signals[:, 1] += 40.0 * np.sin(2 * np.pi * 50.0 * t)             # strong 50 Hz on channel 1
    signals[:, 2] += 20.0 * np.sin(2 * np.pi * 60.0 * t)             # 60 Hz on channel 2
    signals[: n // 10, 3] = 32767                                    # channel 3 clipped 10 % of the time
    signals = np.clip(np.round(signals), -32768, 32767).astype(np.int16)
    glove = np.zeros((1000, 5))
    glove[:, 1] = np.linspace(0.0, 0.9, 1000)                        # index used 0 .. 0.9
    glove[:, 4] = 0.1                                                # little never moved
    trials = [(i * 4000, "trial_done", i) for i in range(8)]         # repetition 1 of 'paper' complete
    path = write(tmp_path / "r.nh", signals, glove, trials + [(100, "missing", 20), (300, "glove_gap", 3)])
    report = quality.analyse(path, {"chip_parser_crc_errors": 2}, trials_total=80, done_before=[8, 9])
    channels = report["channels"]
    assert abs(channels[0]["noise_uv"] - 4.0) < 0.3                # the robust estimate finds 4 uV
    assert abs(channels[1]["noise_uv"] - 4.0) < 0.5                 # nearly blind to the 50 Hz ...
    assert channels[1]["mains_hz"] == 50.0 and channels[1]["mains_fraction"] > 0.9    # ... which is mains
    assert channels[2]["mains_hz"] == 60.0 and 0.5 < channels[2]["mains_fraction"] < 0.95
    assert channels[0]["mains_fraction"] < 0.05
    assert abs(channels[3]["saturation"] - 0.1) < 0.001 and channels[0]["saturation"] == 0.0
    assert not any(c["flat"] for c in channels)
    fingers = report["fingers"]
    assert abs(fingers["index"]["range"] - 0.81) < 0.02 and fingers["little"]["range"] == 0.0
    assert report["samples_missing"] == 20 and report["glove_rows_held"] == 3
    assert report["trials_done_here"] == 8 and report["trials_done_total"] == 10
    assert report["repetitions"]["complete"] == 1 and report["repetitions"]["total"] == 10
    assert report["unusable"] is None
    text = quality.format_text(report)
    assert "verdict: usable" in text and "2 CRC errors" in text
    assert "channel ch01: 9" in text and "mains (50 Hz)" in text
    assert "channel ch03 is saturated 10.0% of the time" in text
    assert "the little used only 0% of its calibrated range" in text


def test_an_unusable_session_says_why_in_one_line(tmp_path):
    n = int(5 * RATE)
    glove = np.tile(np.linspace(0, 1, 500)[:, None], (1, 5))
    done = [(10, "trial_done", 0)]
    flat = write(tmp_path / "flat.nh", np.zeros((n, 3), np.int16), glove, done)
    reason = quality.analyse(flat)["unusable"]
    assert reason.startswith("every channel is flat or saturated") and "\n" not in reason
    signals = np.random.RandomState(1).randint(-50, 50, size=(n, 3)).astype(np.int16)
    still = write(tmp_path / "still.nh", signals, np.full((500, 5), 0.3), done)
    assert quality.analyse(still)["unusable"].startswith("no finger moved over 10%")
    no_trial = write(tmp_path / "none.nh", signals, glove)
    assert quality.analyse(no_trial)["unusable"] == "no trial was completed"
    short = write(tmp_path / "short.nh", signals[:1000], glove[:50], done)
    assert "under the 1 s needed" in quality.analyse(short)["unusable"]
    assert quality.analyse(write(tmp_path / "good.nh", signals, glove, done))["unusable"] is None


def test_the_live_monitor_reports_level_saturation_and_traces():
    monitor = quality.ChannelMonitor(2, RATE, SCALE)
    assert monitor.snapshot()["rms_uv"] == [None, None]
    rng = np.random.RandomState(2)
    for _ in range(200):                                   # 1 s in frames of 10 samples
        block = np.round(rng.normal(0, 20, size=(10, 2))).astype(np.int16)
        block[:, 1] = 32767
        monitor.add(block)
    snapshot = monitor.snapshot()
    assert abs(snapshot["rms_uv"][0] - 10.0) < 1.0 and snapshot["rms_uv"][1] == 0.0
    assert snapshot["saturation"] == [0.0, 1.0]
    assert len(snapshot["trace_max_uv"][0]) == quality.TRACE_BUCKETS // 2      # 1 s of 20 ms buckets
    assert all(lo <= hi for lo, hi in zip(snapshot["trace_min_uv"][0], snapshot["trace_max_uv"][0]))
