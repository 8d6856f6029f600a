"""The arguments of jax.distributed.initialize for a process started by srun.

JAX's own SLURM detection passes local_device_ids=[SLURM_LOCALID]: right for one process per
GPU, but with one process per node (launch/slurm.sbatch's default) every process then owns GPU 0
of its node only (jax issue 16788). So all four arguments are computed here; with none left
unset, JAX's detection does not run and cannot override them.

Which GPUs a process owns, from what SLURM tells it:
- its task sees fewer GPUs than the node has (CUDA_VISIBLE_DEVICES narrowed by --gpus-per-task
  or --gpu-bind): all it sees;
- it sees all of the node's GPUs: an equal, disjoint share by SLURM_LOCALID (8 GPUs: one task
  owns 0..7; 8 tasks own one each).
`local_device_ids` index the GPUs the process sees (CUDA_VISIBLE_DEVICES order), as JAX reads them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from skymoe_jax.errors import ConfigError


def detected(env: Mapping[str, str]) -> bool:
    """Whether this process is one task of a multi-task srun step."""
    return bool(env.get("SLURM_JOB_ID") and env.get("SLURM_PROCID") and _nodelist(env)) and _num_tasks(env) > 1


def arguments(env: Mapping[str, str], on_cpu: bool = False) -> dict:
    """coordinator_address, num_processes, process_id, local_device_ids (None on CPU, where JAX ignores them)."""
    return {
        "coordinator_address": f"{first_host(_nodelist(env))}:{_port(env)}",
        "num_processes": _num_tasks(env),
        "process_id": _int(env, "SLURM_PROCID"),
        "local_device_ids": None if on_cpu else local_device_ids(env),
    }


def local_device_ids(env: Mapping[str, str]) -> list[int]:
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    on_node = _int(env, "SLURM_GPUS_ON_NODE") if env.get("SLURM_GPUS_ON_NODE") else len(visible)
    if not visible and not on_node:
        raise ConfigError(
            "under SLURM this process cannot tell which GPUs it owns: neither SLURM_GPUS_ON_NODE "
            "nor CUDA_VISIBLE_DEVICES is set; request GPUs with --gpus-per-node (launch/slurm.sbatch "
            "does), or set JAX_PLATFORMS=cpu for a CPU job"
        )
    if visible and len(visible) < on_node:  # the task was bound to its own GPUs
        return list(range(len(visible)))
    gpus, tasks, local = len(visible) or on_node, tasks_on_this_node(env), _int(env, "SLURM_LOCALID")
    if gpus % tasks:
        raise ConfigError(
            f"the {gpus} GPUs of this node do not split evenly over its {tasks} SLURM tasks; use "
            f"--ntasks-per-node=1 (one process owns all) or --ntasks-per-node={gpus} (one per GPU)"
        )
    share = gpus // tasks
    return list(range(local * share, (local + 1) * share))


def tasks_on_this_node(env: Mapping[str, str]) -> int:
    """From SLURM's compressed per-node task counts, e.g. '8(x2),4', at SLURM_NODEID."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(name):
            counts = []
            for part in env[name].split(","):
                m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
                if not m:
                    raise ConfigError(f"{name}={env[name]!r} is not SLURM's task-count format, e.g. '8(x2),4'")
                counts += [int(m.group(1))] * int(m.group(2) or 1)
            node = _int(env, "SLURM_NODEID") if env.get("SLURM_NODEID") else 0
            if node >= len(counts):
                raise ConfigError(f"SLURM_NODEID={node} is past the {len(counts)} nodes of {name}={env[name]!r}")
            return counts[node]
    if env.get("SLURM_NTASKS_PER_NODE"):
        return _int(env, "SLURM_NTASKS_PER_NODE")
    raise ConfigError(
        "under SLURM this process cannot tell how many tasks share its node: SLURM_STEP_TASKS_PER_NODE, "
        "SLURM_TASKS_PER_NODE and SLURM_NTASKS_PER_NODE are unset; start it with srun"
    )


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: 'gpu[07-08,10],login1' -> 'gpu07', 'a-[3-4]-ib' -> 'a-3-ib'."""
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\]([^,]*))?", nodelist.strip())
    prefix, ranges, suffix = m.group(1), m.group(2), m.group(3) or ""
    return prefix + (re.split(r"[,-]", ranges)[0] + suffix if ranges is not None else "")


def _nodelist(env: Mapping[str, str]) -> str:
    return env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""


def _num_tasks(env: Mapping[str, str]) -> int:
    name = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
    return _int(env, name) if env.get(name) else 1


def _port(env: Mapping[str, str]) -> int:
    """JAX's rule, so a job's processes agree without talking: JAX_COORDINATOR_PORT, else from the job id."""
    if env.get("JAX_COORDINATOR_PORT"):
        return _int(env, "JAX_COORDINATOR_PORT")
    return _int(env, "SLURM_JOB_ID") % 2**12 + 65535 - 2**12 + 1


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        raise ConfigError(f"{name}={env.get(name)!r} must be an integer (it is set by SLURM's srun)") from None
