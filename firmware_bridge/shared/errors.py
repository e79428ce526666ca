"""Exceptions for the whole of neurohand.

Every error a user can cause (a missing file, a bad value, a corrupt bundle) is a
``NeurohandError``: the CLI turns it into a one-line message and exit status 2
instead of a traceback.  Anything else escaping the CLI is a bug and keeps its
traceback.
"""


class NeurohandError(Exception):
    """Base class for errors that are reported to the user as one line."""


class UsageError(NeurohandError):
    """A bad argument or value given by the user."""


class RecordingError(NeurohandError):
    """A recording file that cannot be read or written."""


class ProtocolError(NeurohandError):
    """Bytes on a serial link that break the protocol."""


class LinkError(NeurohandError):
    """A serial port that cannot be opened, vanished, or timed out."""


class ConfigError(NeurohandError):
    """A configuration or model file that is invalid."""


class BundleError(NeurohandError):
    """A deploy bundle that is missing, modified or incompatible."""
