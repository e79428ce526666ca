"""``neurohand collect``: record a labelled training session from the chip and a data glove, with cues.

One job per module (docs/collect.md):

* :mod:`.protocol`: the protocol file (movements, postures, repetitions, timing), built-ins, validation;
* :mod:`.schedule`: the cue timeline, pure functions of the protocol;
* :mod:`.timeline`: the chip's sample counter as the master clock, the glove mapped onto it;
* :mod:`.session`: the collection loop and the recording it writes;
* :mod:`.quality`: the end-of-session report;
* :mod:`.display_terminal`, :mod:`.display_web` (+ ``web/``): what the patient and the operator see.

Device code: Python 3.6, numpy and the standard library only.
"""
