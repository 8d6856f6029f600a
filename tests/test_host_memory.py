"""The host heap under XLA (run/host_memory.py): a fragmented glibc heap keeps its freed pages resident until
release_free_heap, and skymoe train calls it once the train step is compiled and after each evaluation,
similarity or checkpoint (once its background write has ended), not at every step; the `skymoe` command starts
itself again with glibc's huge-page tunable, so a train step's big buffers stop costing a page fault per 4 KiB."""

import os
import subprocess
import sys

import numpy as np
import pytest

from skymoe_jax.run import host_memory

# A fresh process mallocs 48,000 blocks of 4 KiB (188 MiB, below glibc's mmap threshold, so in the heap)
# and frees all but every 16th: the survivors pin the heap's top, so glibc cannot shrink it by itself.
FRAGMENT = r"""
import ctypes
from skymoe_jax.run.host_memory import release_free_heap

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

blocks = [libc.malloc(4096) for _ in range(48_000)]
for b in blocks:
    ctypes.memset(b, 1, 4096)
for i, b in enumerate(blocks):
    if i % 16:
        libc.free(b)
before = rss_mib()
assert release_free_heap()
print(before, rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_release_returns_a_fragmented_heaps_free_pages():
    out = subprocess.run([sys.executable, "-c", FRAGMENT], capture_output=True, text=True, check=True).stdout
    before, after = map(float, out.split())
    # 15/16 of 188 MiB is free; at least 150 MiB of it must leave the resident set.
    assert before - after > 150, (before, after)


def test_train_releases_after_compiling_and_once_each_checkpoint_is_written(monkeypatch, tmp_path):
    from skymoe_jax.checkpoint.manager import Checkpointer
    from skymoe_jax.config import load_config
    from skymoe_jax.run import loop

    # A save reports itself in progress at the step that starts it and done at the next: the heap is released
    # after the compile and then only once a save's background write has ended (its host copies freed).
    events = []
    real_save = Checkpointer.save

    def save(self, step, *args, **kwargs):
        events.append(f"save {step}")
        self.fake_saving = True
        return real_save(self, step, *args, **kwargs)

    def saving(self):
        in_progress, self.fake_saving = getattr(self, "fake_saving", False), False
        events.append(f"saving={in_progress}")
        return in_progress

    monkeypatch.setattr(Checkpointer, "save", save)
    monkeypatch.setattr(Checkpointer, "saving", saving)
    monkeypatch.setattr(loop, "release_free_heap", lambda: events.append("release") or True)
    tiny = ["--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.num_heads=2"]
    tiny += ["--config.model.num_kv_heads=1", "--config.model.ffn_dim=64", "--config.moe.expert_ffn_dim=32"]
    tiny += ["--config.moe.num_experts=4", "--config.moe.group_size=0", "--config.data.seq_len=32"]
    tiny += [
        "--config.data.batch_size=8",
        "--config.data.shuffle_window=64",
        "--config.train.steps=5",
        "--config.train.checkpoint_every=2",
        "--config.metrics.similarity_every=0",
        "--config.optim.warmup_steps=1",
    ]
    tiny += ["--config.train.eval_every=0", "--config.train.progress=False", "--config.metrics.tensorboard=False"]
    loop.train(load_config(overrides=tiny), str(tmp_path))
    # Not per step: step 1 asks nothing. Each save is released at once; step 2's is released again at step 3,
    # when its write has ended; step 4's is still being written at step 5, whose save ends the run.
    assert events == [
        "release",
        "save 2",
        "release",
        "saving=True",
        "saving=False",
        "release",
        "save 4",
        "release",
        "saving=True",
        "save 5",
        "release",
        "saving=True",
    ]


def test_a_synchronous_save_is_written_when_it_returns(tmp_path):
    import jax.numpy as jnp

    from skymoe_jax.checkpoint.manager import Checkpointer
    from skymoe_jax.config import load_config

    ckpt = Checkpointer(str(tmp_path), create=True, asynchronous=False)
    ckpt.save(7, {"w": jnp.arange(4.0)}, load_config())
    assert not ckpt.saving()
    assert ckpt.latest_step() == 7 and (tmp_path / "checkpoints" / "7").is_dir()
    ckpt.close()


# The default config's train step on one CPU device, as `skymoe train` runs it: minor page faults in each of five
# steps once compiled. Its temporaries are one 353 MB block (90,000 pages) that glibc maps afresh every step.
STEP_FAULTS = r"""
import resource
from skymoe_jax.bench.step import random_tokens, skymoe_step_fn
from skymoe_jax.config import load_config

config = load_config("configs/default.py", [])
step = skymoe_step_fn(config, random_tokens(config))[0]
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _step_faults(env) -> float:
    env = {k: v for k, v in env.items() if k != "XLA_FLAGS"}  # one device, not the tests' eight
    run = subprocess.run([sys.executable, "-c", STEP_FAULTS], capture_output=True, text=True, check=True, env=env)
    return float(np.median([int(n) for n in run.stdout.split()]))


def _cli_environment():
    """(this environment without any huge-page setting, the one `skymoe` would restart itself with from it: None
    where this machine has nothing to gain)."""
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
    return base, host_memory.huge_pages_environment(
        base, thp=host_memory.thp_mode(), glibc=host_memory.glibc_version(), cpu_only=True
    )


def test_train_steps_on_huge_pages_stop_faulting_in_every_4k_page():
    base, huge = _cli_environment()
    if huge is None:
        pytest.skip(f"no glibc 2.35+ with THP in madvise mode here (THP {host_memory.thp_mode()})")
    # Measured: 90,464 faults a step with glibc's defaults, about 540 with the block on 2 MiB pages.
    assert _step_faults(base) > 50_000
    assert _step_faults(huge) < 5_000


HUGE = "glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
    "environ, thp, glibc, cpu_only, tunables",
    [
        ({}, "madvise", (2, 36), True, HUGE),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", (2, 36), True, "glibc.malloc.arena_max=2:" + HUGE),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", (2, 36), True, None),  # the user chose
        ({"SKYMOE_HUGE_PAGES": "0"}, "madvise", (2, 36), True, None),
        ({}, "always", (2, 36), True, None),  # every mapping has huge pages already
        ({}, "never", (2, 36), True, None),
        ({}, None, (2, 36), True, None),
        ({}, "madvise", (2, 34), True, None),  # no such tunable yet
        ({}, "madvise", None, True, None),  # not glibc
        ({}, "madvise", (2, 36), False, None),  # a GPU may run it: device buffers are not the host's
    ],
)
def test_when_the_command_restarts_itself_with_huge_pages(environ, thp, glibc, cpu_only, tunables):
    env = host_memory.huge_pages_environment(environ, thp=thp, glibc=glibc, cpu_only=cpu_only)
    assert (env and env["GLIBC_TUNABLES"]) == tunables


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert host_memory.thp_mode(str(path)) == "madvise"
    assert host_memory.thp_mode(str(tmp_path / "missing")) is None


def test_jax_is_cpu_only_when_its_platforms_are_pinned_to_the_cpu():
    assert host_memory.jax_is_cpu_only({"JAX_PLATFORMS": "cpu"})
    assert not host_memory.jax_is_cpu_only({"JAX_PLATFORMS": "cuda,cpu"})


def test_restart_execs_the_same_program_with_the_tunable():
    base, huge = _cli_environment()
    if huge is None:
        pytest.skip("nothing to restart for on this machine")
    code = "from skymoe_jax.run import host_memory; host_memory.restart_with_huge_pages(); import os, sys; "
    code += "print(os.getpid(), os.environ['GLIBC_TUNABLES'], *sys.argv[1:])"
    child = subprocess.Popen([sys.executable, "-c", code, "a", "b"], stdout=subprocess.PIPE, text=True, env=base)
    out = child.communicate()[0].split()
    assert child.returncode == 0 and out == [str(child.pid), host_memory.HUGE_PAGES_TUNABLE, "a", "b"]


def test_a_failed_restart_runs_on(monkeypatch):
    def refuse(*args):
        raise OSError("no interpreter")

    monkeypatch.setattr(host_memory, "huge_pages_environment", lambda *a, **k: {"GLIBC_TUNABLES": "x"})
    monkeypatch.setattr(os, "execve", refuse)
    assert host_memory.restart_with_huge_pages() is None


def test_the_command_restarts_itself_only_as_the_process_entry_point(monkeypatch):
    from skymoe_jax import cli

    calls = []
    monkeypatch.setattr(host_memory, "restart_with_huge_pages", lambda: calls.append(1))
    monkeypatch.setattr(sys, "argv", ["skymoe", "--version"])
    assert cli.main() == 0 and calls == [1]
    assert cli.main(["--version"]) == 0 and calls == [1]  # called from Python (a test, a notebook): never
