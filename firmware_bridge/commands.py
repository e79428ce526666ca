"""Subcommands contributed by this package (see neurohand.deploy.cli).

Only the standard library is imported at module level; each handler imports
what it needs, so the CLI starts fast and without torch on the device."""


def register(subparsers):
    """Add this package's subcommands to the ``neurohand`` parser."""
