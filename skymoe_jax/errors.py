"""Errors a user can fix, and failures a run cannot get past. The CLI prints their message as one line and exits
non-zero."""

import errno
import os
import re


class UserError(Exception):
    """Bad input (config, data file, checkpoint, flag); the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A config field that cannot work."""


class DataError(UserError):
    """A data file or tokenizer that cannot be read as asked."""


class CheckpointError(UserError):
    """A checkpoint that is missing, partial or does not fit the config."""


class WorkdirError(UserError):
    """A workdir another run is training in."""


class TrainingError(UserError):
    """The run stopped on purpose (e.g. non-finite loss); the message says why and what was kept."""


class RunFailure(Exception):
    """The run cannot go on for a reason outside its input (a checkpoint or metrics write failed, a peer process
    is gone, the workdir lock was lost). The CLI prints the message, which says what was kept and what to do,
    as one line and exits 1."""


class TrackerError(Exception):
    """An experiment tracker (W&B, MLflow) refused to open a run or to take a record. The run reports it as a failed
    metrics write (`write_failed`); the message is the tracker's own first line."""


def first_line(e: BaseException, lines: int = 1, limit: int | None = None) -> str:
    """The start of a library exception's message, to quote inside one of ours: its first `lines` lines joined,
    at most `limit` characters (the exception type's name when it has no message)."""
    text = " ".join(str(e).strip().splitlines()[:lines])
    return text[:limit] if text else type(e).__name__


# What to do about a write the OS refused, by its errno.
_WRITE_FIXES = {
    errno.ENOSPC: "free disk space",
    errno.EDQUOT: "free space or raise the quota",
    errno.EFBIG: "raise the file-size limit (ulimit -f) or the filesystem's",
    errno.EACCES: "make the directory writable",
    errno.EPERM: "make the directory writable",
    errno.EROFS: "mount the filesystem read-write",
    errno.ENOENT: "check that the directory and its mount are still there",
    errno.EIO: "check the disk",
}


def os_error_code(e: BaseException) -> int | None:
    """The errno behind a write failure: an OSError in the exception's chain, or the code tensorstore quotes
    in its message (os_error_code='27')."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        found = re.search(r"os_error_code='?(\d+)", str(e))
        if found:
            return int(found.group(1))
        e = e.__cause__ or e.__context__
    return None


def write_failed(what: str, e: BaseException, kept: str) -> RunFailure:
    """`what` failed: one sentence with the OS's reason, what was kept, and what to do."""
    code = os_error_code(e)
    if code is None:
        reason, fix = first_line(e, limit=300), "fix the cause"
    else:
        reason = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
        fix = _WRITE_FIXES.get(code, "fix the cause")
    return RunFailure(f"{what} failed: {reason}; {kept}; {fix}, then run the same command to resume")
