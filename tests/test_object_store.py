"""Workdirs on object storage, against an S3-compatible server (moto) on 127.0.0.1 started here: `skymoe train` to
s3://, SIGKILLed and resumed, ends bit for bit where a run on a local workdir ends; `skymoe eval` and `export-hf` read
it; the lock refuses a second run; a flipped byte in a checkpoint object is refused; the mistakes a user can make
are one line. gs:// cannot be served here: its kvstore spec is checked where it reaches tensorstore."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import own_stderr, xla_flags

from skymoe_jax.checkpoint import object_store, storage
from skymoe_jax.checkpoint.manager import Checkpointer
from skymoe_jax.cli import main
from skymoe_jax.errors import WorkdirError
from skymoe_jax.run.staging import Staging
from skymoe_jax.run.workdir_lock import LOCK_NAME, Holder, WorkdirLock

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

BUCKET = "skymoe-test"
STEPS = 10
FLAGS = [
    f"--config.train.steps={STEPS}",
    "--config.train.checkpoint_every=2",
    "--config.train.eval_every=0",
    "--config.train.log_every=1",
    "--config.optim.warmup_steps=1",
    "--config.moe.gate_norm=False",  # a Mixtral-shaped router, which export-hf can write
    "--config.train.progress=False",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def aws():
    """A moto S3 server with one bucket, and the standard AWS environment pointing at it (here and in the processes
    the tests start)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(BUCKET)
        yield env
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def _env(aws):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYMOE_")}
    # One device: the default config's mesh takes what there is, and one device compiles fastest.
    return {**env, **aws, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}


def _train(workdir) -> list[str]:
    return [sys.executable, "-m", "skymoe_jax.cli", "train", f"--workdir={workdir}", *FLAGS]


def _records(workdir) -> list[dict]:
    return [json.loads(line) for line in storage.read_bytes(storage.join(workdir, "metrics.jsonl")).splitlines()]


@pytest.fixture(scope="module")
def trained(aws, tmp_path_factory):
    """(local workdir, s3 workdir, the resumed run's stdout): the same run uninterrupted on a local workdir, and on
    s3 SIGKILLed once checkpoint 4 is complete, then resumed to the end."""
    local = tmp_path_factory.mktemp("object_store") / "local"
    url = f"s3://{BUCKET}/runs/moe"
    subprocess.run(_train(local), check=True, capture_output=True, env=_env(aws), timeout=600)
    killed = subprocess.Popen(_train(url), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(aws))
    try:
        deadline = time.time() + 300
        while not storage.exists(f"{url}/checkpoints/4/commit_success.txt"):
            assert killed.poll() is None and time.time() < deadline, "the run ended before checkpoint 4"
            time.sleep(0.05)
    finally:
        killed.kill()
        killed.wait()
    assert killed.returncode == -9
    assert Checkpointer(url).latest_step() < STEPS  # killed mid-run, not after its end
    resumed = subprocess.run(_train(url), capture_output=True, text=True, env=_env(aws), timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    return local, url, resumed.stdout


def test_a_killed_run_on_s3_resumes_bit_for_bit_like_a_local_run(trained, tmp_path, capsys):
    local, url, resumed = trained
    assert "resuming at step " in resumed
    # The killed run's lock (this host, its process gone) is taken over.
    assert (
        f"took over the workdir lock of a run that ended without releasing it (host {socket.gethostname()}" in resumed
    )
    whole, interrupted = _records(local), _records(url)
    assert whole[-1]["step"] == interrupted[-1]["step"] == STEPS
    assert interrupted[-1]["loss"] == whole[-1]["loss"]  # JSON floats round-trip exactly
    assert not storage.listdir(f"{url}/logs") or all(n.startswith("process_") for n in storage.listdir(f"{url}/logs"))
    assert [n for n in storage.listdir(f"{url}/tensorboard") if n.startswith("events.out.tfevents.")]

    # eval and export-hf read the s3 workdir as they read the local one; the exported fp32 tensors are the params.
    evals = []
    for workdir in (local, url):
        assert main(["eval", f"--workdir={workdir}", "--json"]) == 0
        evals.append(json.loads(capsys.readouterr().out))
    assert evals[0] == evals[1] and evals[1]["step"] == STEPS
    exported = []
    for name, workdir in (("local", local), ("s3", url)):
        assert main(["export-hf", f"--workdir={workdir}", f"--out={tmp_path / name}"]) == 0
        exported.append((tmp_path / name / "model.safetensors").read_bytes())
    assert exported[0] == exported[1]


@pytest.mark.long
def test_a_two_process_run_on_s3_writes_one_checkpoint_that_restores(aws, capsys):
    """Two processes of 4 devices on an expert-parallel mesh: each writes its shards to the store, process 0 the
    commit files, the metrics and the lock; the checkpoint restores on this process's 8 devices with every tensor's
    fingerprint matching."""
    from faults import start_processes

    url = f"s3://{BUCKET}/runs/two-processes"
    mesh = ["--config.parallel.mesh=(1,4,2)", "--config.parallel.layout=edp", "--config.train.steps=4"]
    env = {k: v for k, v in _env(aws).items() if k != "XLA_FLAGS"}
    for proc in start_processes([*_train(url), *mesh], 2, 4, env):
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
    assert [r["step"] for r in _records(url)] == [1, 2, 3, 4]
    assert main(["eval", f"--workdir={url}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4


def test_a_second_run_on_a_live_s3_workdir_is_refused_and_writes_nothing(trained, capsys):
    _, url, _ = trained
    fs = s3fs.S3FileSystem()
    with WorkdirLock(url):
        before = {path: info["ETag"] for path, info in fs.find(url, detail=True).items()}
        assert main(["train", f"--workdir={url}", *FLAGS]) == 2
        assert {path: info["ETag"] for path, info in fs.find(url, detail=True).items()} == before
    line = own_stderr(capsys.readouterr().err).strip()
    assert line.startswith(f"skymoe train: error: {url} is in use by another run (host {socket.gethostname()}, pid ")
    assert "\n" not in line


def test_a_flipped_byte_in_a_checkpoint_object_is_refused(trained, capsys):
    _, url, _ = trained
    fs = s3fs.S3FileSystem()
    damaged = f"s3://{BUCKET}/runs/damaged"
    fs.copy(f"{url}/checkpoints/{STEPS}", f"{damaged}/checkpoints/{STEPS}", recursive=True)
    chunks = fs.find(f"{damaged}/checkpoints/{STEPS}/state/ocdbt.process_0/d", detail=True)
    largest = max(chunks, key=lambda path: chunks[path]["size"])
    data = bytearray(fs.cat_file(largest))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(largest, bytes(data))
    assert main(["eval", f"--workdir={damaged}"]) == 2
    line = own_stderr(capsys.readouterr().err).strip()
    # The chunk still decompresses (float weights are stored as zstd's raw blocks): the fingerprints catch it.
    assert line.startswith(f"skymoe eval: error: checkpoint {damaged}/checkpoints/{STEPS} is damaged: tensor ")
    assert "differs from what was saved (its fingerprint does not match)" in line


@pytest.mark.parametrize(
    "case, words",
    [
        ("bucket", "bucket no-such-bucket of s3://no-such-bucket/run does not exist"),
        ("credentials", "no credentials for s3://"),
        ("endpoint", "cannot be reached (endpoint http://127.0.0.1:"),
        ("package", "needs the s3fs package: pip install 'skymoe-jax[s3]'"),
        ("report", "skymoe report reads local workdirs only; copy s3://"),
        ("gcs-package", "gs://b/run is on object storage, which needs the gcsfs package: pip install 'skymoe-jax[gcs]"),
    ],
)
def test_what_keeps_an_s3_workdir_from_working_is_said_in_one_line(aws, case, words, monkeypatch, capsys):
    workdir, command = f"s3://{BUCKET}/runs/moe", "eval"
    if case == "bucket":
        workdir = "s3://no-such-bucket/run"
    elif case == "credentials":
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(key)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    elif case == "report":
        command = "report"
    elif case == "gcs-package":
        workdir = "gs://b/run"
        monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "gs", raising=False)
        monkeypatch.setitem(sys.modules, "gcsfs", None)  # as when it is not installed (gcsfs is not here anyway)
    elif case == "endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # said at once, not after botocore's retries (9 s)
    else:
        monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3")  # fsspec keeps the classes it imported
        monkeypatch.setitem(sys.modules, "s3fs", None)  # as when it is not installed
    s3fs.S3FileSystem.clear_instance_cache()  # built from the environment it was first made in
    try:
        assert main([command, f"--workdir={workdir}"]) == 2
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    lines = own_stderr(capsys.readouterr().err).strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines


def test_a_stale_lock_on_s3_is_taken_over_once_and_renewed(aws):
    url = f"s3://{BUCKET}/locks/stale"
    stale = Holder(host="node-7", pid=4242, started="2026-12-01T00:00:00+00:00", token="feedc0de")
    storage.write_bytes(storage.join(url, LOCK_NAME), json.dumps(stale.__dict__).encode())
    with WorkdirLock(url, renew_s=0.5, stale_s=2.0) as lock:
        # Aged by the store's clock (seconds): taken over after 2 s without renewal.
        assert "host node-7, pid 4242" in lock.took_over and "it was not renewed for" in lock.took_over
        assert Holder.read(lock.path) == lock.holder
        renewed = storage.modified(lock.path)
        time.sleep(1.6)
        assert storage.modified(lock.path) > renewed
        with pytest.raises(WorkdirError, match="is in use by another run"):
            WorkdirLock(url).acquire()  # this host and a live pid: refused at once
        # A second taker of the same stale lock loses the claim.
        assert not storage.create(f"{lock.path}.claim-{stale.token}", b"other")
    assert storage.listdir(url) == []  # the lock and its claim are gone


def test_a_renewal_the_store_does_not_answer_keeps_the_lock(aws, monkeypatch):
    url = f"s3://{BUCKET}/locks/flaky"
    with WorkdirLock(url, renew_s=0.1) as lock:
        with monkeypatch.context() as m:

            def unreachable(path):
                raise WorkdirError(f"the object store of {path} cannot be reached")

            m.setattr(storage, "read_bytes", unreachable)
            time.sleep(0.5)  # a few renewals fail
        renewed = storage.modified(lock.path)
        time.sleep(1.2)  # last-modified has a resolution of seconds
        assert storage.modified(lock.path) > renewed  # the renewals went on
        lock.check()  # and the lock was not taken for lost
        assert Holder.read(lock.path) == lock.holder
    assert not storage.exists(lock.path)


def test_create_is_exclusive_and_staging_uploads_what_changed(aws, tmp_path):
    url = f"s3://{BUCKET}/files"
    for base in (str(tmp_path), url):
        path = storage.join(base, "once")
        assert storage.create(path, b"first") and not storage.create(path, b"second")
        assert storage.read_bytes(path) == b"first"
    storage.write_bytes(f"{url}/run/metrics.jsonl", b'{"step": 1}\n')
    with Staging(f"{url}/run") as files:
        assert os.path.basename(files.directory) == "run"  # trackers name their run after it
        with open(files.path("metrics.jsonl"), "ab") as f:  # a resumed run appends to what was uploaded
            f.write(b'{"step": 2}\n')
        os.makedirs(files.path("tensorboard"))
        with open(files.path("tensorboard", "events"), "wb") as f:
            f.write(b"event")
        files.push()
        stamp = storage.modified(f"{url}/run/tensorboard/events")
        time.sleep(1.1)  # last-modified has a resolution of seconds
        files.push()  # nothing changed: nothing uploaded
        assert storage.modified(f"{url}/run/tensorboard/events") == stamp
    assert storage.read_bytes(f"{url}/run/metrics.jsonl") == b'{"step": 1}\n{"step": 2}\n'
    assert not os.path.exists(files.directory)


def test_urls_are_joined_and_split_without_the_local_filesystem():
    assert storage.absolute("s3://b/run/") == "s3://b/run"
    assert storage.join("s3://b/run/", "checkpoints", "4") == "s3://b/run/checkpoints/4"
    assert storage.split("gs://b/run/checkpoints") == ("gs://b/run", "checkpoints")
    assert storage.is_url("gs://b") and not storage.is_url("runs/s3:/b") and not storage.is_url("file:///x")


def test_orbax_gets_tensorstore_s3_and_gcs_kvstore_specs(monkeypatch):
    """The specs orbax's array handlers open; a change in how orbax builds them fails here."""
    from orbax.checkpoint._src.serialization import tensorstore_utils

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.delenv("TENSORSTORE_GCS_BACKEND", raising=False)
    build = tensorstore_utils.build_kvstore_tspec
    assert build.skymoe_s3  # installed when checkpoint/manager.py is imported
    coalescing = {
        "experimental_read_coalescing_threshold_bytes": 1000000,
        "experimental_read_coalescing_merged_bytes": 500000000000,
        "experimental_read_coalescing_interval": "1ms",
    }
    s3 = {
        "driver": "s3",
        "bucket": "b",
        "path": "run/checkpoints/4/state",
        "endpoint": "http://127.0.0.1:9000",
        "aws_region": "eu-west-1",
        "context": {"aws_credentials": {"type": "environment"}},
    }
    gcs = {"driver": "gcs", "bucket": "b", "path": "run/checkpoints/4/state"}
    for url, base in (("s3://b/run/checkpoints/4/state", s3), ("gs://b/run/checkpoints/4/state", gcs)):
        assert build(url, "params.w") == {
            "driver": "ocdbt",
            "base": base,
            "path": "params.w",
            "cache_pool": "cache_pool#ocdbt",
            **coalescing,
        }
        assert build(url, "params.w", use_ocdbt=False) == {**base, "path": base["path"] + "/params.w"}
    assert build("/local/run/checkpoints/4/state", use_ocdbt=False) == {
        "driver": "file",
        "path": "/local/run/checkpoints/4/state",
    }
    object_store.install()  # a second install keeps the one wrapper
    assert tensorstore_utils.build_kvstore_tspec is build
