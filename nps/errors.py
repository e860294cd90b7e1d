"""Errors that nps reports to people: each names the problem and the fix in one line."""


class NPSError(Exception):
    """Base class; the CLI prints these as a single `nps: error: ...` line."""


class ConfigError(NPSError, ValueError):
    """A configuration value is invalid (names the field and the fix)."""


class CheckpointError(NPSError):
    """No usable checkpoint could be read or written."""


class OutputDirError(NPSError):
    """The output folder cannot be created or written."""
