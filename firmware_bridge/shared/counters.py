"""Event counters: one convention everywhere in neurohand.

A counter set is a plain dict of names to ints, made with all its names at
zero, so ``counters["frames_good"] += 1`` on a misspelt name is a KeyError,
never a new silent counter.  ``dict(counters)`` is a snapshot, ready for a
stats document or JSON.  Readers in other threads only ever see whole ints.
"""


def new_counters(names):
    """A counter set of ``names``, every count 0."""
    return dict.fromkeys(names, 0)
