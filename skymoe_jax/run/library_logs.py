"""The libraries' own logs of a run (orbax's, through absl) go to a file under the workdir, not the console.

When a checkpoint write fails, orbax logs the error with a traceback from each of its threads; the run says what
failed in one line (checkpoint/manager.py) and names this file, which keeps the details.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Iterator

_LIBRARIES = ("absl", "asyncio")


@contextlib.contextmanager
def logged_to(path: str) -> Iterator[str]:
    """Within the block, the records of absl (orbax's) and asyncio (the tasks of its writes) go to path, created at
    the first record, instead of the console."""
    loggers = [logging.getLogger(name) for name in _LIBRARIES]
    handler = logging.FileHandler(path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s"))
    propagate = [logger.propagate for logger in loggers]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield path
    finally:
        # The write tasks of a failed save report their errors when they are collected: here, into the file.
        gc.collect()
        for logger, was in zip(loggers, propagate):
            logger.removeHandler(handler)
            logger.propagate = was
        handler.close()
