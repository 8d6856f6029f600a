"""Launching on clusters without one: SLURM allocations simulated by their environment variables
(what reaches jax.distributed.initialize is intercepted: on a CPU JAX ignores local device ids, so
a run alone would prove nothing), launch/slurm.sbatch requeued and resubmitted with fake srun /
scancel / scontrol, launch/local.sh's exit status, the Kubernetes manifest, the container recipe
and the declared dependencies."""

import ast
import importlib.metadata
import os
import pathlib
import re
import signal
import stat
import subprocess
import sys
import time

import jax
import pytest
import yaml

from skymoe_jax.args import Args
from skymoe_jax.checkpoint.manager import Checkpointer
from skymoe_jax.cli import TRAIN_ABOUT, TRAIN_FLAGS, main
from skymoe_jax.config import load_config
from skymoe_jax.errors import ConfigError
from skymoe_jax.metrics.writers import read_jsonl
from skymoe_jax.parallel import distributed, slurm
from skymoe_jax.parallel.mesh import check_fits, make_mesh, mesh_shape

ROOT = pathlib.Path(__file__).resolve().parent.parent
NODES, GPUS = ("gpu07", "gpu08"), 8


def _allocation(tasks_per_node: int, bound: bool = False) -> list[dict[str, str]]:
    """The SLURM variables of every task of `srun` in `sbatch --nodes=2 --gpus-per-node=8
    --ntasks-per-node=T` (bound: with --gpus-per-task=1, each task sees only its own GPU)."""
    n = len(NODES) * tasks_per_node
    envs = []
    for node in range(len(NODES)):
        for local in range(tasks_per_node):
            env = {
                "SLURM_JOB_ID": "4242",
                "SLURM_JOB_NAME": "moe-a",
                "SLURM_JOB_NUM_NODES": "2",
                "SLURM_JOB_NODELIST": "gpu[07-08]",
                "SLURM_STEP_NODELIST": "gpu[07-08]",
                "SLURM_NNODES": "2",
                "SLURM_NTASKS": str(n),
                "SLURM_STEP_NUM_TASKS": str(n),
                "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
                "SLURM_TASKS_PER_NODE": f"{tasks_per_node}(x2)",
                "SLURM_STEP_TASKS_PER_NODE": f"{tasks_per_node}(x2)",
                "SLURM_NODEID": str(node),
                "SLURMD_NODENAME": NODES[node],
                "SLURM_PROCID": str(node * tasks_per_node + local),
                "SLURM_LOCALID": str(local),
                "SLURM_GPUS_ON_NODE": str(GPUS),
                "SLURM_GPUS_PER_NODE": str(GPUS),
                "SLURM_STEP_GPUS": ",".join(map(str, range(GPUS))),
                "CUDA_VISIBLE_DEVICES": str(local) if bound else ",".join(map(str, range(GPUS))),
            }
            envs.append(env)
    return envs


def _gpu_environment(monkeypatch, env: dict[str, str]) -> None:
    """This process's environment becomes `env` on a (pretended) GPU node."""
    for name in [k for k in os.environ if k.startswith(("SLURM", "SKYMOE_", "CUDA_", "JOB_COMPLETION"))]:
        monkeypatch.delenv(name)
    for name, value in {**env, "JAX_PLATFORMS": "cuda"}.items():
        monkeypatch.setenv(name, value)


def _intercepted(monkeypatch, env: dict[str, str]) -> dict:
    """What skymoe hands jax.distributed.initialize in this environment (nothing is started)."""
    calls = []
    _gpu_environment(monkeypatch, env)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    assert distributed.initialize() == "slurm"
    (kwargs,) = calls
    return kwargs


@pytest.mark.parametrize(
    "tasks_per_node,bound",
    [(1, False), (8, False), (8, True)],
    ids=["one-process-per-node", "one-process-per-gpu", "one-process-per-gpu-bound"],
)
def test_slurm_processes_of_a_node_own_all_its_gpus(monkeypatch, tasks_per_node, bound):
    envs = _allocation(tasks_per_node, bound)
    owned = {node: [] for node in NODES}
    args = []
    for env in envs:
        kwargs = _intercepted(monkeypatch, env)
        args.append(kwargs)
        # All four given: JAX's own SLURM detection (which would set [SLURM_LOCALID]) does not run.
        assert None not in kwargs.values()
        visible = env["CUDA_VISIBLE_DEVICES"].split(",")
        owned[env["SLURMD_NODENAME"]] += [int(visible[i]) for i in kwargs["local_device_ids"]]
    assert {a["coordinator_address"] for a in args} == {f"gpu07:{4242 % 4096 + 61440}"}
    assert {a["num_processes"] for a in args} == {2 * tasks_per_node}
    assert {a["heartbeat_timeout_seconds"] for a in args} == {30}  # train.peer_timeout_s's default
    assert sorted(a["process_id"] for a in args) == list(range(2 * tasks_per_node))
    for node, gpus in owned.items():
        assert sorted(gpus) == list(range(GPUS)), node  # every GPU of the node, each once
    if tasks_per_node == 1:
        assert args[0]["local_device_ids"] == list(range(GPUS))


def test_the_peer_timeout_reaches_jax_as_its_heartbeat_timeout(monkeypatch, tmp_path):
    """`skymoe train` joins the run with train.peer_timeout_s from its command line, before anything else."""
    monkeypatch.setenv("SKYMOE_COORDINATOR", "127.0.0.1:1")
    monkeypatch.setenv("SKYMOE_NUM_PROCESSES", "2")
    monkeypatch.setenv("SKYMOE_PROCESS_ID", "0")
    calls = []

    def joined(**kwargs):
        calls.append(kwargs)
        raise ConfigError("joined")  # stop here: this process cannot really join a run

    monkeypatch.setattr(jax.distributed, "initialize", joined)
    monkeypatch.setattr(distributed, "_use_gloo_on_cpu", lambda: None)
    assert main(["train", f"--workdir={tmp_path}"]) == 2
    assert main(["train", f"--workdir={tmp_path}", "--config.train.peer_timeout_s=12"]) == 2
    assert [c["heartbeat_timeout_seconds"] for c in calls] == [30, 12]
    assert not os.listdir(tmp_path)


def test_slurm_mistakes_are_one_sentence(monkeypatch, capsys):
    env = _allocation(8)[3]
    env.update(SLURM_STEP_TASKS_PER_NODE="3(x2)", SLURM_LOCALID="1")
    with pytest.raises(ConfigError, match="the 8 GPUs of this node do not split evenly over its 3 SLURM tasks"):
        _intercepted(monkeypatch, env)
    _gpu_environment(
        monkeypatch,
        {k: v for k, v in _allocation(1)[0].items() if k not in ("SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES")},
    )
    assert main(["train"]) == 2  # refused before anything starts
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "skymoe train: error: under SLURM this process cannot tell which GPUs it owns: neither SLURM_GPUS_ON_NODE "
        "nor CUDA_VISIBLE_DEVICES is set; request GPUs with --gpus-per-node (launch/slurm.sbatch does), or set "
        "JAX_PLATFORMS=cpu for a CPU job"
    ]


def test_slurm_hostlists_and_single_task():
    assert slurm.first_host("gpu[07-08,10],login1") == "gpu07"
    assert slurm.first_host("node001,node002") == "node001"
    assert slurm.first_host("a-[3-4]-ib") == "a-3-ib"
    assert slurm.first_host("solo") == "solo"
    assert slurm.tasks_on_this_node({"SLURM_STEP_TASKS_PER_NODE": "8(x2),4", "SLURM_NODEID": "2"}) == 4
    # One task (e.g. `sbatch --nodes=1`, or the batch script itself): a single process, no distributed init.
    one = {**_allocation(1)[0], "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}
    assert not slurm.detected(one)


def test_mesh_refusal_and_header_name_the_device_count():
    c = load_config("configs/default.py", ["--config.parallel.mesh=(1,4,8)"])
    with pytest.raises(ConfigError) as err:
        make_mesh(c)
    assert str(err.value).startswith(
        "parallel.mesh=(1, 4, 8) needs 32 devices but 8 are available (1 process x 8 local devices, cpu); "
    )
    from skymoe_jax.run.loop import whoami
    from skymoe_jax.training import runtime as runtime_lib

    c = load_config("configs/default.py", ["--config.parallel.mesh=(1,4,2)"])
    assert whoami(runtime_lib.build(c)) == (
        "devices: cpu (cpu), process 0 of 1, 8 local / 8 global; mesh 1x4x2 (pipeline x data x expert, layout gshard)"
    )


TINY = [
    "--config.model.d_model=32",
    "--config.model.num_layers=2",
    "--config.model.num_heads=2",
    "--config.model.num_kv_heads=1",
    "--config.model.ffn_dim=64",
    "--config.moe.expert_ffn_dim=32",
    "--config.moe.num_experts=4",
    "--config.moe.group_size=0",
    "--config.data.seq_len=32",
    "--config.data.batch_size=8",
    "--config.data.shuffle_window=64",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.checkpoint_every=0",
    "--config.optim.warmup_steps=2",
    "--config.train.progress=False",
    "--config.metrics.tensorboard=False",
    "--config.metrics.similarity_every=0",
]

FAKE_SLURM = {  # one task on this machine, with the variables srun sets; the calls are recorded
    "srun": """while [[ $1 == --* ]]; do shift; done
echo "srun $*" >> "$FAKE_SLURM/calls"
echo $$ > "$FAKE_SLURM/task.pid"
export SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_STEP_NODELIST=localhost SLURM_STEP_NUM_TASKS=1 \\
    SLURM_STEP_TASKS_PER_NODE=1
exec "$@"
""",
    "scancel": """echo "scancel $*" >> "$FAKE_SLURM/calls"
kill -TERM "$(cat "$FAKE_SLURM/task.pid")"
""",
    "scontrol": """echo "scontrol $*" >> "$FAKE_SLURM/calls"
""",
}


def _sbatch(tmp_path, job_id: str, flags: list[str]) -> subprocess.Popen:
    """launch/slurm.sbatch as SLURM's batch step runs it: in the submission directory, with its variables."""
    fake = tmp_path / "fake-slurm"
    fake.mkdir(exist_ok=True)
    for name, body in FAKE_SLURM.items():
        (fake / name).write_text("#!/usr/bin/env bash\n" + body)
        (fake / name).chmod((fake / name).stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "SKYMOE_", "XLA_FLAGS"))}
    env.update(
        PATH=f"{fake}:{pathlib.Path(sys.executable).parent}:{env['PATH']}",
        FAKE_SLURM=str(fake),
        JAX_PLATFORMS="cpu",
        SLURM_JOB_ID=job_id,
        SLURM_JOB_NAME="moe-a",
        SLURM_NTASKS="1",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_CPUS_ON_NODE="2",
        SLURM_JOB_NODELIST="localhost",
    )
    return subprocess.Popen(
        ["bash", str(ROOT / "launch" / "slurm.sbatch"), *TINY, *flags],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sbatch_requeued_at_the_time_limit_then_resubmitted_resumes(tmp_path):
    workdir = tmp_path / "runs" / "moe-a"  # the default: from the job name, stable across submissions
    first = _sbatch(tmp_path, "101", ["--config.train.steps=100000"])
    try:
        deadline = time.time() + 300
        while not ((workdir / "metrics.jsonl").exists() and len(read_jsonl(workdir / "metrics.jsonl")) >= 2):
            assert first.poll() is None and time.time() < deadline, first.communicate()[0][-3000:]
            time.sleep(0.05)
        first.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@600 sends 10 minutes before the time limit
        out = first.communicate(timeout=300)[0]
    finally:
        first.kill()
    assert first.returncode == 0, out[-3000:]
    step = Checkpointer(workdir).latest_step()
    assert f"stopped by SIGTERM after step {step}; saved checkpoint" in out
    assert "devices: cpu (cpu), process 0 of 1, 1 local / 1 global; mesh 1x1x1" in out
    calls = (tmp_path / "fake-slurm" / "calls").read_text().splitlines()
    assert calls[0].startswith(f"srun skymoe train --workdir=runs/moe-a {TINY[0]}")
    assert calls[1:] == ["scancel --signal=TERM 101", "scontrol requeue 101"]

    # The requeued job (or a resubmission with the same --job-name, as here) continues from that checkpoint.
    second = _sbatch(tmp_path, "102", [f"--config.train.steps={step + 2}"])
    out = second.communicate(timeout=300)[0]
    assert second.returncode == 0, out[-3000:]
    assert f"resuming at step {step}" in out and f"done: {step + 2} steps" in out
    assert [r["step"] for r in read_jsonl(workdir / "metrics.jsonl")][-2:] == [step + 1, step + 2]
    assert "requeue" not in (tmp_path / "fake-slurm" / "calls").read_text().splitlines()[-1]  # finished: no requeue


def _local(*command: str, n: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ROOT / "launch" / "local.sh"), str(n), "--", *command], capture_output=True, text=True, timeout=60
    )


def test_local_sh_returns_the_first_failing_process_status():
    assert _local("false").returncode == 1
    start = time.perf_counter()
    # Process 1 fails while process 0 would wait for 60 s (as for a dead peer): the launch fails with 3 at once.
    failed = _local("sh", "-c", 'if [ "$SKYMOE_PROCESS_ID" = 1 ]; then exit 3; fi; exec sleep 60')
    assert failed.returncode == 3, failed.stderr
    assert time.perf_counter() - start < 30
    assert "a process exited with status 3; stopping the others" in failed.stderr
    assert _local("sh", "-c", 'test "$SKYMOE_NUM_PROCESSES" = 3', n=3).returncode == 0


def _manifest() -> dict[str, dict]:
    docs = list(yaml.safe_load_all((ROOT / "launch" / "kubernetes.yaml").read_text()))
    return {d["kind"]: d for d in docs}


def test_kubernetes_manifest():
    docs = _manifest()
    claim, jobset = docs["PersistentVolumeClaim"], docs["JobSet"]
    assert jobset["apiVersion"].startswith("jobset.x-k8s.io/")
    (rjob,) = jobset["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    pods = int(env["SKYMOE_NUM_PROCESSES"])
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == pods * rjob["replicas"]
    # Pod 0 by the DNS name JobSet gives it: <jobset>-<replicated job>-<job index>-<pod index>.<jobset>.
    assert jobset["spec"]["network"]["enableDNSHostnames"]
    assert env["SKYMOE_COORDINATOR"].startswith(
        f"{jobset['metadata']['name']}-{rjob['name']}-0-0.{jobset['metadata']['name']}:"
    )

    # Restart and resume: a stopped process exits non-zero, which fails its Job (no retries of a single
    # pod), which restarts the whole group; a user mistake (status 2) fails the JobSet instead.
    args = Args(container["command"][2:], "train", TRAIN_ABOUT, TRAIN_FLAGS, config=True)
    assert container["command"][:2] == ["skymoe", "train"] and args.stop_exit_code not in (0, 2)
    assert pod["restartPolicy"] == "Never" and job["backoffLimit"] == 0
    assert jobset["spec"]["failurePolicy"]["maxRestarts"] >= 10
    (fail_fast,) = job["podFailurePolicy"]["rules"]
    assert fail_fast["action"] == "FailJob" and fail_fast["onExitCodes"]["values"] == [2]
    assert jobset["spec"]["failurePolicy"]["rules"] == [
        {"action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}
    ]
    assert pod["terminationGracePeriodSeconds"] >= 300  # ten steps and one checkpoint save

    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["dshm"] == "/dev/shm" and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod writes and reads the checkpoints
    assert args.workdir.startswith(mounts["checkpoints"] + "/")

    # The image is the one the Dockerfile's build line makes, at the package's version.
    build = re.search(r"docker build -t (\S+) \.", (ROOT / "Dockerfile").read_text()).group(1)
    version = re.search(r'version="([^"]+)"', (ROOT / "setup.py").read_text()).group(1)
    assert container["image"] == build == f"skymoe-jax:{version}"

    # The flags are a valid config whose mesh fits pods x 8 GPUs.
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    config = load_config(args.config, args.overrides)
    check_fits(config, mesh_shape(config, pods * gpus))


def _setup_requirements() -> dict[str, list[str]]:
    """install_requires and every extra of setup.py, as written."""
    call = next(
        n
        for n in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
        if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup"
    )
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    return {"install_requires": kw["install_requires"], **kw["extras_require"]}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_imported_package_is_declared_and_cuda_is_an_extra():
    reqs = _setup_requirements()
    declared = {_name(r) for rs in reqs.values() for r in rs}
    modules = set()
    for path in (ROOT / "skymoe_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - {"skymoe_jax"}
    dists = importlib.metadata.packages_distributions()
    undeclared = {m: dists.get(m) for m in third_party if not {_name(d) for d in dists.get(m, [m])} & declared}
    assert not undeclared
    assert {"etils", "array-record"} <= {_name(r) for r in reqs["install_requires"]}
    assert reqs["cuda"] == ["jax[cuda12]>=0.10.2"]
    assert not [r for r in reqs["install_requires"] if _name(r) == "jax" and "<" in r]  # no upper bound
    assert "pip install '.[cuda]'" in (ROOT / "Dockerfile").read_text()
