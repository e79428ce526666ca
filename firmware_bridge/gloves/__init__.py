"""Data gloves: the sources of a training session's labels (docs/glove-protocol.md).

    from neurohand.firmware_bridge.gloves import open_glove
    with open_glove("serial:/dev/ttyACM0") as glove:    # or cyberglove:PORT, virtual:PORT
        samples = glove.read(timeout=0.1)              # [GloveSample(arrival, sequence, raw)]
        glove.counters                                 # frames, lost, crc_errors, resyncs, timeouts, ...

Raw sensor values become 0 (open) .. 1 (flexed) per finger through a
:class:`GloveCalibration` fitted on held poses.
"""
from neurohand.firmware_bridge.gloves.base import GLOVE_COUNTERS, GloveSample, GloveSource
from neurohand.firmware_bridge.gloves.calibration import FINGERS, GloveCalibration, default_sensor_fingers
from neurohand.firmware_bridge.gloves.registry import GLOVE_KINDS, open_glove, parse_glove_spec

__all__ = ["FINGERS", "GLOVE_COUNTERS", "GLOVE_KINDS", "GloveCalibration", "GloveSample", "GloveSource",
           "default_sensor_fingers", "open_glove", "parse_glove_spec"]
