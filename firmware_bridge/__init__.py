"""Everything that touches bytes, one folder or file per job::

    shared/      what every package shares: errors, argument checks, atomic writes, backoff, counters
    link.py      the one serial link: a reader thread, reconnect with backoff (chip and hands)
    chip/        the neural-interface chip: protocol, parser, receiver, session
    hands/       the hand drivers and their registry
    recording/   the crash-safe recording file format
    virtual/     what stands in for hardware on the bench: simulator, virtual chip, virtual hand

Runs on the Jetson (Python 3.6, numpy 1.19, pyserial 3.5); no torch, no scipy.
``neurohand run`` never imports ``virtual/``.
"""
