"""Time in tests without fixed sleeps: a clock the test moves itself, and polling
for a condition with a deadline (generous, so a loaded machine only makes a test
slower, never wrong)."""
import time


class FakeClock(object):
    """A monotonic clock that moves only when the test advances it."""

    def __init__(self, start=1000.0):
        self.now = start

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def wait_until(condition, timeout_s=5.0):
    """Poll ``condition`` until it holds or ``timeout_s`` (real time) passed; return whether it held."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
