"""Returning the free C heap to the OS (run/host_memory.py): a fragmented glibc heap keeps its freed pages
resident until release_free_heap, and skymoe train calls it once the train step is compiled and after each
evaluation, similarity or checkpoint (once its background write has ended), not at every step."""

import subprocess
import sys

import pytest

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
