"""Workstation side: importers, training, evaluation, reports and export.

Modern Python and torch are fine here; nothing on the device imports this."""
