"""Streaming signal processing, features and the recurrent decoder with its
inference backends.  The runtime parts run on the Jetson without torch."""
