"""Errors that nps reports to people: each names the problem and the fix in one line."""

from __future__ import annotations


class NPSError(Exception):
    """Base class; the CLI prints these as a single `nps: error: ...` line and exits with ``exit_code``."""

    exit_code = 2


class ConfigError(NPSError, ValueError):
    """A configuration value is invalid (names the field and the fix).

    ``field``: the config field the message starts with, when it is about one; a nested config
    re-raises it ``under`` its own field name, so the message names the full path
    (``train.batch_size=0 ...``) however deep the field sits.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def under(self, prefix: str) -> ConfigError:
        """This error as seen from the config that holds this one under the field ``prefix``."""
        if not prefix or self.field is None:
            return self
        return ConfigError(f"{prefix}.{self}", f"{prefix}.{self.field}")


def invalid(field: str, value, requirement: str) -> ConfigError:
    """The error for ``field=value`` that breaks ``requirement`` (e.g. "must be a positive integer")."""
    return ConfigError(f"{field}={value!r} {requirement}", field)


class CheckpointError(NPSError):
    """No usable checkpoint could be read or written."""


class OutputDirError(NPSError):
    """The output folder cannot be created or written."""


class WriteError(NPSError):
    """Something nps records could not be written (a full disk); the message says what is kept."""
