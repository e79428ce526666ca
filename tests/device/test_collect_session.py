"""The collection loop in this process (deploy/collect/session.py): a virtual chip on a pseudo-terminal,
a fake glove worn by a patient who follows the cues shown."""
import os
import threading
import time

import numpy as np
import pytest

from neurohand.deploy.collect import session as collect_session
from neurohand.deploy.collect.protocol import Protocol
from neurohand.deploy.collect.session import CollectError, CollectSession, Settings, previous_session
from neurohand.firmware_bridge.recording.file_format import open_recording
from neurohand.firmware_bridge.virtual.chip import FaultInjector

from test_collect_rig import SHORT, ChipThread, FakeGlove, Patient, Signals, noise_source

CALIBRATION = {"format": "neurohand-glove-calibration", "version": 1,
               "fingers": ["thumb", "index", "middle", "ring", "little"],
               "sensor_names": ["flex0", "flex1", "flex2", "flex3", "flex4"],
               "sensor_fingers": {"thumb": [0], "index": [1], "middle": [2], "ring": [3], "little": [4]},
               "open": [200.0] * 5, "flexed": {f: [800.0] for f in ["thumb", "index", "middle", "ring", "little"]},
               "poses": ["open", "fist"]}


@pytest.fixture
def chip():
    rig = ChipThread(noise_source())
    yield rig
    rig.stop()


def settings(chip, glove, out, **options):
    return Settings(chip.path, "serial:fake", str(out), Protocol.from_config(SHORT),
                    open_glove=lambda spec, **o: glove, **options)


def stop_at_trial(patient, signals, trial):
    """Set ``signals.reason`` once the patient is shown trial ``trial``."""
    def watch():
        while signals.reason is None:
            if any((s.get("step") or {}).get("trial", -1) >= trial for s in list(patient.states)):
                signals.reason = "SIGINT"
            time.sleep(0.01)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_calibration_then_trials_record_what_the_patient_did(tmp_path):
    # A lossy link: 3 % of the chip's frames never arrive.
    rig = ChipThread(noise_source(), faults=FaultInjector(drop_rate=0.03, seed=2))
    patient = Patient(reaction_s=0.05)
    glove = FakeGlove(patient)
    out = tmp_path / "s.nh"
    try:
        session = CollectSession(settings(rig, glove, out, displays=[patient], subject="P1"))
        outcome = session.run()
    finally:
        rig.stop()
    assert outcome.stop_reason == "complete" and outcome.error is None
    assert sorted(outcome.trials_done) == [0, 1, 2, 3]
    assert glove.closed and patient.closed
    phases = {s["phase"] for s in patient.states}
    assert phases == {"calibration", "trials"}
    with open_recording(str(out)) as rec:
        assert rec.integrity["complete"]
        meta = rec.metadata
        calibration = meta["glove_calibration"]
        # The patient opened (200 counts) and made a fist (800): the fit found them.
        assert np.allclose(calibration["open"], 200, atol=3) and np.allclose(calibration["flexed"]["ring"], 800, atol=3)
        assert meta["subject"] == "P1" and meta["protocol"]["name"] == "short"
        assert meta["chip"]["n_channels"] == 4 and meta["collect"]["chip_sample_at_start"] > 0
        glove_rows, raw_rows = rec.label_streams["glove"].data, rec.label_streams["glove_raw"].data
        rate = rec.signal_rate
        # Every signal sample has its label row, and no more than one row beyond.
        assert len(glove_rows) == len(raw_rows) == int(np.ceil(rec.n_samples / (rate / 100.0)))
        events = list(rec.events)
        kinds = [e.kind for e in events]
        assert [e.value for e in events if e.kind == "repetition"] == [1, 2]
        assert [e.value for e in events if e.kind == "trial_done"] == [0, 1, 2, 3]
        movements = [(e.sample, e.value) for e in events if e.kind == "movement"]
        assert [v for _, v in movements] == [1, 0, 8, 0, 1, 0, 8, 0]
        assert kinds.count("cue") == 9       # lead-in, then move and rest of four trials
        missing = [e for e in events if e.kind == "missing"]
        assert missing and sum(e.value for e in missing) == outcome.counters["missing_recorded"]
        # Since START (the calibration too): every missing frame's samples, none silent.
        assert outcome.counters["chip_samples_missing"] == 10 * outcome.counters["chip_parser_frames_missing"]
        signal = rec.read_signals()
        for e in missing:
            assert not signal[e.sample:e.sample + e.value].any()     # lost samples are zeros
        # What the glove says during each hold is the posture that was cued.
        for (start, movement), (stop, _) in zip(movements[::2], movements[1::2]):
            rows = glove_rows[int((start / rate + 0.2) * 100):int(stop / rate * 100)]
            target = np.array([1, 0, 0, 0, 0] if movement == 1 else [1, 1, 1, 1, 1], dtype=float)
            assert len(rows) > 10 and np.abs(rows.mean(axis=0) - target).max() < 0.05
        rests = [e.sample for e in events if e.kind == "movement" and e.value == 0]
        for start in rests:
            rows = glove_rows[int((start / rate + 0.15) * 100):int((start / rate + 0.3) * 100)]
            assert np.abs(rows).max() < 0.05
        assert outcome.counters["glove_rows_held"] == sum(e.value for e in events if e.kind == "glove_gap")


def test_a_stopped_session_continues_where_it_stopped(chip, tmp_path):
    patient = Patient()
    first = tmp_path / "first.nh"
    signals = Signals()
    stop_at_trial(patient, signals, 2)
    outcome = CollectSession(settings(chip, FakeGlove(patient), first, displays=[patient],
                                      calibration=CALIBRATION)).run(signals)
    assert outcome.stop_reason == "SIGINT" and sorted(outcome.trials_done) == [0, 1]
    with open_recording(str(first)) as rec:
        assert rec.integrity["complete"]
    previous = previous_session(str(first))
    assert previous["done"] == [0, 1] and previous["calibration"] == CALIBRATION
    patient = Patient()
    second = tmp_path / "second.nh"
    outcome = CollectSession(settings(chip, FakeGlove(patient), second, displays=[patient],
                                      previous=previous)).run()
    assert outcome.stop_reason == "complete" and sorted(outcome.trials_done) == [2, 3]
    with open_recording(str(second)) as rec:
        collect = rec.metadata["collect"]
        assert collect["done_before"] == [0, 1] and collect["continued_from"] == "first.nh"
        assert rec.metadata["glove_calibration"] == CALIBRATION
        assert [e.value for e in rec.events if e.kind == "repetition"] == [2]
        assert [e.value for e in rec.events if e.kind == "trial"] == [2, 3]
    with pytest.raises(Exception, match="complete"):
        # Both files together did every trial: nothing is left to continue.
        previous_session(str(second))


def test_a_glove_that_stops_ends_the_session_and_keeps_the_file(chip, tmp_path, monkeypatch):
    monkeypatch.setattr(collect_session, "GLOVE_STOP_S", 0.4)
    patient = Patient()
    out = tmp_path / "s.nh"
    glove = FakeGlove(patient, stop_after_s=1.0)
    started = time.monotonic()
    outcome = CollectSession(settings(chip, glove, out, displays=[patient], calibration=CALIBRATION)).run()
    assert time.monotonic() - started < 3.0
    assert isinstance(outcome.error, CollectError) and "glove serial:fake sent nothing for" in str(outcome.error)
    assert outcome.stop_reason == "device" and glove.closed
    with open_recording(str(out)) as rec:
        assert rec.integrity["complete"]
        assert 0.9 < rec.duration_s < 2.0
        rows = rec.label_streams["glove"].data
        assert len(rows) == int(np.ceil(rec.n_samples / (rec.signal_rate / 100.0)))
        held = sum(e.value for e in rec.events if e.kind == "glove_gap")
        # The silence is in the labels as held rows, marked: every row after the glove stopped but one.
        assert held >= int((rec.duration_s - 1.0) * 100) - 10 and held == outcome.counters["glove_rows_held"]


def test_a_glove_sending_nothing_is_refused_before_anything_is_recorded(chip, tmp_path, monkeypatch):
    monkeypatch.setattr(collect_session, "FIRST_DATA_TIMEOUT_S", 0.5)
    patient = Patient()
    out = tmp_path / "s.nh"
    with pytest.raises(Exception, match="glove serial:fake sent no samples within"):
        CollectSession(settings(chip, FakeGlove(patient, stop_after_s=0.0), out, calibration=CALIBRATION)).run()
    assert not os.path.exists(str(out))
    assert not chip.chip.streaming       # STOP was sent, the port closed


def test_decode_records_the_decoders_output_next_to_the_glove(chip, tmp_path):
    from neurohand.deploy.bundle import make_bundle
    from neurohand.deploy.session import load_decoder
    bundle = str(tmp_path / "bundle")
    make_bundle(os.path.join(os.path.dirname(__file__), "data", "replay_run"), bundle)
    decoder = load_decoder(bundle, "numpy")
    patient = Patient()
    out = tmp_path / "s.nh"
    try:
        outcome = CollectSession(settings(chip, FakeGlove(patient), out, displays=[patient], calibration=CALIBRATION,
                                          decoder=decoder)).run()
    finally:
        decoder.close()
    assert outcome.stop_reason == "complete"
    assert outcome.counters["decode_windows_decoded"] > 50
    assert any(s["decoded"] is not None for s in patient.states)
    with open_recording(str(out)) as rec:
        decoded = rec.label_streams["decoded"]
        glove = rec.label_streams["glove"]
        assert decoded.names == glove.names and decoded.rate == glove.rate
        assert len(decoded.data) == len(glove.data)
        rows = decoded.data
        finite = np.all(np.isfinite(rows), axis=1)
        # NaN only before the first window (0.1 s of signal), then the decoder's hand positions.
        first = int(np.argmax(finite))
        assert first <= 12 and finite[first:].all()
        assert rows[finite].min() >= 0.0 and rows[finite].max() <= 1.0
        assert rec.metadata["decoder"]["backend"] == "numpy"
