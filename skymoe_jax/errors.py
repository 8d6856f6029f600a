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
