"""The host heap under XLA's CPU executions: freed memory given back to the OS, and big blocks on huge pages.

Two things glibc's malloc does by default cost the CPU trainer:

- It keeps freed blocks in its heap. XLA's CPU compiler allocates a few hundred MB in small blocks while it
  compiles a train step and frees them when it is done, fragmented, so the process stays at the compile's
  high-water mark and the step's own buffers come on top of it: on the default config the train step's peak
  RSS was 1.25 GB, of which 0.34 GB was free heap (docs/BENCHMARKS.md). `release_free_heap` returns the free
  pages (malloc_trim).
- It maps every block over 32 MB (a worker thread's over 64 MB) fresh from the kernel and unmaps it when freed.
  Each execution of the default train step allocates its temporaries as one block of over 300 MB from an XLA worker
  thread, so every step faulted in 90,000 zero-filled 4 KiB pages: 0.17 s of kernel time a step, and the
  default job took 152 s against 116 s without (docs/BENCHMARKS.md). With glibc's `glibc.malloc.hugetlb=1`
  tunable those mappings ask for transparent huge pages (under the kernel's usual `madvise` THP mode): the block
  takes 180 faults of 2 MiB, and a whole step about 550.
  glibc reads tunables when a process starts, so the `skymoe` command starts itself again with it once
  (`restart_with_huge_pages`); elsewhere (a notebook, a script) set GLIBC_TUNABLES before Python starts.

Keeping the block in the heap instead (one malloc arena, mapping off, no trimming) ended the faults as well, but
the heap held every place the block had landed and the default job's peak RSS doubled, to 1.9 GB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Mapping

HUGE_PAGES = "glibc.malloc.hugetlb"
HUGE_PAGES_TUNABLE = f"{HUGE_PAGES}=1"
OPT_OUT = "SKYMOE_HUGE_PAGES"  # =0 keeps glibc's defaults
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


def release_free_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc's malloc_trim); False where the C library has none."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode (always, madvise or never); None where it has none."""
    try:
        with open(path, encoding="ascii") as f:
            return next(word[1:-1] for word in f.read().split() if word.startswith("["))
    except (OSError, StopIteration):
        return None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library when it is glibc, else None."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (ValueError, OSError, AttributeError):
        return None
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None


def jax_is_cpu_only(environ: Mapping[str, str]) -> bool:
    """Whether JAX can only run on the CPU here, decided without importing it: platforms pinned to the CPU, or no
    accelerator plugin installed (GPU plugins register under `jax_plugins`, TPUs come with libtpu)."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not (
        list(importlib.metadata.entry_points(group="jax_plugins"))
        or importlib.util.find_spec("jax_plugins")
        or importlib.util.find_spec("libtpu")
    )


def huge_pages_environment(
    environ: Mapping[str, str], *, thp: str | None, glibc: tuple[int, int] | None, cpu_only: bool
) -> dict[str, str] | None:
    """The environment to start this process again with, so that glibc maps big blocks on huge pages; None when
    there is nothing to gain: the tunable already set or opted out of (SKYMOE_HUGE_PAGES=0), no glibc 2.35+ (the
    first with it), THP not in `madvise` mode (`always` gives every mapping huge pages already, `never` none), or
    an accelerator that JAX may run on instead (its buffers are not the host's)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if HUGE_PAGES in tunables or environ.get(OPT_OUT) == "0":
        return None
    if glibc is None or glibc < (2, 35) or thp != "madvise" or not cpu_only:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, HUGE_PAGES_TUNABLE)))}


def restart_with_huge_pages() -> None:
    """Start this Python process again (exec: the same PID and arguments) with huge pages for big blocks, when
    `huge_pages_environment` finds something to gain; otherwise return. For a process's entry point only."""
    env = huge_pages_environment(
        os.environ, thp=thp_mode(), glibc=glibc_version(), cpu_only=jax_is_cpu_only(os.environ)
    )
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # no interpreter to exec (an embedded or frozen Python): run on without huge pages
        return
