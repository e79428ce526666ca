"""Exponential backoff: the one rule for how long to wait before trying again.

Used wherever something that vanished is looked for again: the serial link
reopening its port, the writer asking a hand driver for its port, the chip
restarter repeating an unanswered command.
"""


class Backoff(object):
    """Waits of ``initial_s``, doubling up to ``max_s``; :meth:`reset` after a success.

        backoff = Backoff(0.05, 2.0)
        wait = backoff.next_wait()      # 0.05, then 0.1, 0.2, ... 2.0, 2.0
        backoff.reset()                 # it worked: start again from 0.05
    """

    def __init__(self, initial_s, max_s):
        if not 0 < initial_s <= max_s:
            raise ValueError("backoff needs 0 < initial_s <= max_s, got {!r} and {!r}".format(initial_s, max_s))
        self.initial_s = float(initial_s)
        self.max_s = float(max_s)
        self._wait = self.initial_s

    def next_wait(self):
        """The wait before the next try (seconds); each call doubles the following one."""
        wait = self._wait
        self._wait = min(2.0 * wait, self.max_s)
        return wait

    def reset(self):
        self._wait = self.initial_s
