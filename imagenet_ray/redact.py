"""Credentials out of URLs (`https://user:token@host`, `postgresql://u:p@h/db`, `s3://KEY:SECRET@bucket`)
before a URL is logged, printed, stored in MLflow or put in an error. Pure: imports nothing of the package,
so every layer (errors included) can use it. Only the password goes; user names and hosts stay readable."""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"

# scheme://authority: the authority runs to the path, query, fragment, whitespace or a quote (RFC 3986 keeps
# '/', '?', '#' out of the userinfo). Its last '@' ends the userinfo, as in urllib.parse.urlsplit, so a raw
# '@' in a password is still masked whole.
_URL_AUTHORITY = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<authority>[^/?#\s'\"<>`]*)")


def _mask(match: re.Match[str]) -> str:
    userinfo, at, host = match.group("authority").rpartition("@")
    if not at or ":" not in userinfo:
        return match.group(0)  # no credentials, or a user name alone (`git@`, `postgres@`)
    user = userinfo.split(":", 1)[0]
    return f"{match.group('scheme')}{user}:{MASK}@{host}"


def redact_text(text: str) -> str:
    """`text` with the password of every URL in it replaced by `***` (free text: an error, a log line)."""
    if not isinstance(text, str):
        text = str(text)
    if "://" not in text:
        return text
    return _URL_AUTHORITY.sub(_mask, text)


def redact_url(url: str) -> str:
    """`url` with its password replaced by `***`; unchanged without one; never raises."""
    return redact_text(url)


def redact_values(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, tuples, strings) with every string redacted."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_values(v) for v in value]
    if isinstance(value, tuple):
        return tuple(redact_values(v) for v in value)
    return value


class RedactingFilter(logging.Filter):
    """A handler filter that masks URL credentials in a record's message, traceback and stack, then lets it
    through: the message is formatted (msg % args) first and the args cleared, so no handler sees the raw one."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True  # a malformed record: logging reports its own formatting error
        record.msg, record.args = redact_text(message), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True
