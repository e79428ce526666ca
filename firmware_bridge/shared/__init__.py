"""What every neurohand package shares: the error types a user sees as one line,
argument checks, atomic file writing and event counters.

The bottom layer: it imports only the standard library (and numpy), so
decoder/, train/ and deploy/ may all use it without pulling in anything else.
"""
