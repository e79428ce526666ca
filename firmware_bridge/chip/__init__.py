"""The neural-interface chip: its wire protocol (the one place its constants
live), the streaming frame parser, the receiver that turns link bytes into
sample blocks, and the session that configures, starts and re-starts it.
docs/chip-protocol.md is the specification."""
