"""collect.rig.collect_simulated (the demo's and `bench collect`'s rig): when the session starts
against the virtual devices' start time.  The devices' processes and the session are faked here; the
demo test runs the real ones."""
import time

from neurohand.deploy.collect import rig
from neurohand.deploy.collect import session as collect_session


class FakeProcess(object):
    def poll(self):
        return 0

    def communicate(self, timeout=None):
        return "", ""


def start_times(monkeypatch, tmp_path, launch_s):
    """Run collect_simulated with devices that take ``launch_s`` to print their terminal; returns the
    devices' --start-at and the clock when the session ran."""
    seen = {}

    def launch(command, what):
        time.sleep(launch_s)
        seen["start_at"] = float(command[command.index("--start-at") + 1])
        return FakeProcess(), "/dev/null"

    class Outcome(object):
        error, stop_reason = None, "complete"

    class Session(object):
        def __init__(self, settings):
            self.settings = settings

        def run(self):
            seen["run_at"] = time.monotonic()
            return Outcome()

    monkeypatch.setattr(rig, "_launch", launch)
    monkeypatch.setattr(collect_session, "CollectSession", Session)
    monkeypatch.setattr(rig, "START_DELAY_S", 1.5)          # the same arithmetic, a shorter test
    monkeypatch.setattr(rig, "SESSION_LEAD_S", 0.5)
    rig.collect_simulated(str(tmp_path), "unused.nhr", protocol=None)
    return seen["start_at"], seen["run_at"]


def test_fast_launches_do_not_start_the_session_long_before_the_devices(monkeypatch, tmp_path):
    # Devices that start at once: the session waits until SESSION_LEAD_S before their start, so its
    # START comes within the first-data timeout of their first sample (it came START_DELAY_S before).
    start_at, run_at = start_times(monkeypatch, tmp_path, 0.0)
    assert 0.5 - 0.05 <= start_at - run_at <= 0.5 + 0.05
    assert rig.SESSION_LEAD_S < collect_session.FIRST_DATA_TIMEOUT_S


def test_slow_launches_start_the_session_at_once(monkeypatch, tmp_path):
    before = time.monotonic()
    start_at, run_at = start_times(monkeypatch, tmp_path, 0.6)      # both launched 1.2 s after: 0.3 s to the start
    assert run_at - before < 1.2 + 0.1 and start_at - run_at < 0.5
