"""Recordings on disk: neurohand's crash-safe file format (docs/recording-format.md)."""
