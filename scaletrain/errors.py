"""Errors meant for users: one line of text, no traceback."""

from __future__ import annotations


class ScaletrainError(Exception):
    """A problem the user can fix; the CLI prints `str(err)` on one line and exits 2."""

    exit_code = 2


class ConfigError(ScaletrainError):
    """A bad config value: names the field path and how to fix it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"config error: {field}: {message}")


def require_positive(value: float | int, path: str) -> None:
    """The most common config rule, worded the same everywhere."""
    if value <= 0:
        raise ConfigError(path, f"must be > 0, got {value}")
