"""User-facing errors: one line, naming what is wrong, with the exit code the CLI returns."""

from __future__ import annotations

from imagenet_ray.redact import redact_text


class UserError(Exception):
    """A problem the user can fix (bad config, bad URL, missing data). Printed as one line.

    A URL's password in a message is masked (`user:***@host`) as the error is made, and again by `str()`
    for arguments that are not strings: the CLI's error line, logs and Ray's copies never show it."""

    exit_code = 1

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact_text(a) if isinstance(a, str) else a for a in args))

    def __str__(self) -> str:
        return redact_text(super().__str__())  # args that are not strings (an exception, a URL object)


class ConfigError(UserError):
    """Invalid configuration: rejected before any work starts."""

    exit_code = 2


def describe_error(exc: BaseException, limit: int = 300) -> str:
    """`exc` as one line for a UserError message: URL passwords masked, whitespace folded, cut to `limit`
    characters (masked before the cut: a URL cut inside its password would no longer look like one)."""
    return " ".join(redact_text(str(exc)).split())[:limit]
