"""Joining a multi-process (multi-host) run, from the environment.

- SKYMOE_COORDINATOR=host:port, SKYMOE_NUM_PROCESSES=N, SKYMOE_PROCESS_ID=i: explicit
  (launch/local.sh and the Kubernetes manifest set these; on an Indexed Job the
  process id may come from JOB_COMPLETION_INDEX instead).
- Under srun with more than one task: detected; the arguments come from the SLURM variables
  (parallel/slurm.py), so that the processes of a node own all of its GPUs in either layout.
- Otherwise: a single process, nothing to do.
On CPU the collectives between processes go through gloo.
"""

from __future__ import annotations

import os

import jax

from skymoe_jax.errors import ConfigError
from skymoe_jax.parallel import slurm

_EXPLICIT = ("SKYMOE_COORDINATOR", "SKYMOE_NUM_PROCESSES", "SKYMOE_PROCESS_ID")


def initialize(peer_timeout_s: int = 30) -> str:
    """Join the run the environment describes; returns how ('single', 'explicit' or 'slurm'). A process not heard
    from for peer_timeout_s seconds is taken for dead, which ends the others (JAX's default waits 100 s)."""
    env = dict(os.environ)
    if "SKYMOE_PROCESS_ID" not in env and "JOB_COMPLETION_INDEX" in env:
        env["SKYMOE_PROCESS_ID"] = env["JOB_COMPLETION_INDEX"]
    given = [k for k in _EXPLICIT if env.get(k)]
    if given:
        missing = [k for k in _EXPLICIT if not env.get(k)]
        if missing:
            raise ConfigError(
                f"multi-process launch: {', '.join(given)} set but {', '.join(missing)} missing; "
                "set all three (see launch/local.sh)"
            )
        try:
            num, pid = int(env["SKYMOE_NUM_PROCESSES"]), int(env["SKYMOE_PROCESS_ID"])
        except ValueError:
            raise ConfigError("SKYMOE_NUM_PROCESSES and SKYMOE_PROCESS_ID must be integers") from None
        if not 0 <= pid < num:
            raise ConfigError(f"SKYMOE_PROCESS_ID={pid} must be in [0, SKYMOE_NUM_PROCESSES={num})")
        _use_gloo_on_cpu()
        jax.distributed.initialize(
            coordinator_address=env["SKYMOE_COORDINATOR"],
            num_processes=num,
            process_id=pid,
            heartbeat_timeout_seconds=peer_timeout_s,
        )
        return "explicit"
    if slurm.detected(env):
        arguments = slurm.arguments(env, on_cpu=_on_cpu())
        _use_gloo_on_cpu()
        jax.distributed.initialize(**arguments, heartbeat_timeout_seconds=peer_timeout_s)
        return "slurm"
    return "single"


def _on_cpu() -> bool:
    return os.environ.get("JAX_PLATFORMS", "").startswith("cpu")


def _use_gloo_on_cpu() -> None:
    if _on_cpu():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
