"""User-facing errors: one line, naming what is wrong, with the exit code the CLI returns."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad config, bad URL, missing data). Printed as one line."""

    exit_code = 1


class ConfigError(UserError):
    """Invalid configuration: rejected before any work starts."""

    exit_code = 2


def describe_error(exc: BaseException, limit: int = 300) -> str:
    """`exc` as one line for a UserError message: whitespace folded, cut to `limit` characters."""
    return " ".join(str(exc).split())[:limit]
