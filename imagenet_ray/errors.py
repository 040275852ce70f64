"""User-facing errors: one line, naming what is wrong, with the exit code the CLI returns."""


class UserError(Exception):
    """A problem the user can fix (bad config, bad URL, missing data). Printed as one line."""

    exit_code = 1


class ConfigError(UserError):
    """Invalid configuration: rejected before any work starts."""

    exit_code = 2
