"""The lab's streams: Lab Streaming Layer in and out, BrainFlow boards as a signal source.

Each module imports its library (pylsl, brainflow: the ``lab`` extra) only
inside the function that needs it, so the device's base install stays numpy
and pyserial::

    source.py            what every signal source shares: sample chunks, the gap rule, the reader thread
    lsl_inlet.py         --chip lsl:NAME / lsl:type=EEG: an LSL stream decoded like the chip
    brainflow_source.py  --chip brainflow:BOARD[:PORT]: a BrainFlow board decoded like the chip
    lsl_outlet.py        --lsl-outlet NAME: decoded finger positions (and the raw signals) published over LSL

A signal source stands where the chip's session stands
(:mod:`neurohand.firmware_bridge.chip.session` picks it by the prefix of
``--chip``): it reads its configuration, is checked against the bundle like
the chip, and feeds the same receiver, decode stage and safety rules.
docs/lab-streams.md is the guide.
"""
