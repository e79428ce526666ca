"""Everything that touches bytes: the neural-chip link, hand drivers, virtual
devices, the recording file format and the synthetic nerve simulator.

Runs on the Jetson (Python 3.6, numpy 1.19, pyserial 3.5); no torch, no scipy.
"""
