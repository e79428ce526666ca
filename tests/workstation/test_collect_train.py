"""``neurohand train`` takes what ``neurohand collect`` records, as it is: an interrupted session and its
continuation, together (the workstation half of the real-patient workflow)."""
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "device"))

from neurohand.deploy.collect.protocol import Protocol  # noqa: E402
from neurohand.deploy.collect.session import CollectSession, Settings, previous_session  # noqa: E402
from neurohand.train import dataset, splits  # noqa: E402

from test_collect_rig import SHORT, ChipThread, FakeGlove, Patient, Signals, noise_source  # noqa: E402
from test_collect_session import CALIBRATION  # noqa: E402

PROTOCOL = dict(SHORT, repetitions=5, hold_s=0.4, rest_s=0.2, lead_in_s=0.2)


def collect(chip, out, **options):
    patient = Patient()
    settings = Settings(chip.path, "serial:fake", str(out), Protocol.from_config(PROTOCOL),
                        open_glove=lambda spec, **o: FakeGlove(patient), displays=[patient], **options)
    return CollectSession(settings), patient


def test_train_accepts_an_interrupted_session_and_its_continuation(tmp_path):
    chip = ChipThread(noise_source())
    try:
        session, patient = collect(chip, tmp_path / "a.nh", calibration=CALIBRATION)
        signals = Signals()

        def stop_in_repetition_3():
            while signals.reason is None:
                if any((s.get("step") or {}).get("repetition", 0) >= 3 for s in list(patient.states)):
                    signals.reason = "SIGINT"
                time.sleep(0.01)
        threading.Thread(target=stop_in_repetition_3, daemon=True).start()
        first = session.run(signals)
        assert first.stop_reason == "SIGINT"
        session, _ = collect(chip, tmp_path / "b.nh", previous=previous_session(str(tmp_path / "a.nh")))
        second = session.run()
        assert second.stop_reason == "complete"
    finally:
        chip.stop()
    assert sorted(first.trials_done + second.trials_done) == list(range(10))
    # The trainer's own reading: the glove stream, and the repetitions for a leakage-free split.
    loaded = [dataset.load_recording(str(tmp_path / name)) for name in ("a.nh", "b.nh")]
    assert all(r.labels.name == "glove" and r.labels.names == ["thumb", "index", "middle", "ring", "little"]
               for r in loaded)
    repetitions = set()
    for recording in loaded:
        runs = splits.repetition_runs(recording.n_samples, recording.events)
        assert runs and runs[0][0] == 0 and runs[-1][1] == recording.n_samples
        repetitions |= {r for _, _, r in runs}
    assert repetitions == {1, 2, 3, 4, 5}
    result = subprocess.run([sys.executable, "-m", "neurohand.deploy", "train", str(tmp_path / "a.nh"),
                             str(tmp_path / "b.nh"), "--out", str(tmp_path / "run"), "--epochs", "1", "--threads", "1",
                             "--quiet", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert result.returncode == 0, result.stderr
    run_config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run_config["labels"]["stream"] == "glove"
    summary = json.loads(result.stdout)
    assert summary["label_names"] == ["thumb", "index", "middle", "ring", "little"]
    assert summary["n_windows"]["train"] > 0 and summary["n_windows"]["test"] > 0
    # Each file is split on its own: the continuation holds test repetition 5 and validation
    # repetition 4, so it is split by repetition; the first (1-3) lacks 4, so by time.
    methods = {os.path.basename(r["recording"]): r["method"] for r in run_config["split"]["recordings"]}
    assert methods == {"a.nh": "time", "b.nh": "repetition"}
