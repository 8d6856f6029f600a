"""Errors a user can fix. The CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input (config, data file, checkpoint, flag); the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A config field that cannot work."""


class DataError(UserError):
    """A data file or tokenizer that cannot be read as asked."""


class CheckpointError(UserError):
    """A checkpoint that is missing, partial or does not fit the config."""


class TrainingError(UserError):
    """The run stopped on purpose (e.g. non-finite loss); the message says why and what was kept."""


def first_line(e: BaseException, lines: int = 1, limit: int | None = None) -> str:
    """The start of a library exception's message, to quote inside one of ours: its first `lines` lines joined,
    at most `limit` characters (the exception type's name when it has no message)."""
    text = " ".join(str(e).strip().splitlines()[:lines])
    return text[:limit] if text else type(e).__name__
