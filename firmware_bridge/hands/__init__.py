"""Prosthetic-hand drivers behind one small interface (see base.HandDriver).

    from neurohand.firmware_bridge.hands import create_hand
    hand = create_hand("psyonic:/dev/ttyUSB0", n_outputs=5)
    hand.send(positions)      # ndarray (5,), 0..1, at least every hand.keepalive_period_s
"""
from neurohand.firmware_bridge.hands.base import (  # noqa: F401
    DECODER_FINGERS, HandDriver, HandError, NullHand, check_positions, finger_names)
from neurohand.firmware_bridge.hands.registry import HAND_DRIVERS, create_hand, parse_hand_spec  # noqa: F401
