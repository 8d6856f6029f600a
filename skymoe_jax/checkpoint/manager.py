"""Checkpoints under WORKDIR/checkpoints with orbax: the train state, the data
iterator position (grain) and the run's config, saved together every N steps."""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from skymoe_jax.config import base_config, validate
from skymoe_jax.errors import CheckpointError


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    def __init__(self, workdir: str, every: int, keep: int):
        options = ocp.CheckpointManagerOptions(save_interval_steps=max(every, 1), max_to_keep=keep or None,
                                               enable_async_checkpointing=True, create=True)
        self._manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options)
        self.every = every

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, data_iter, config: ml_collections.ConfigDict, *, force: bool = False) -> bool:
        """Asynchronous save when step is due (or forced); returns whether a save started."""
        if not force and (not self.every or step % self.every):
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iter),
                                  config=ocp.args.JsonSave(config.to_dict()))
        return self._manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state, data_iter=None):
        """State (placed like abstract_state's shardings) and, if given, the data iterator's position."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"checkpoint step {step} in {self._manager.directory} cannot be restored into "
                                  f"this model: {str(e).splitlines()[0]}") from None
        return restored.state

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def saved_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config saved with a checkpoint (the latest one by default), on top of today's defaults."""
    directory = checkpoint_dir(workdir)
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []
    if not steps:
        raise CheckpointError(f"no checkpoint in {directory}; train first with `skymoe train --workdir={workdir}`")
    step = steps[-1] if step is None else step
    path = os.path.join(directory, str(step), "config", "metadata")
    try:
        with open(path, encoding="utf-8") as f:
            saved: dict[str, Any] = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {os.path.join(directory, str(step))} has no readable config ({e})") \
            from None
    config = base_config()
    with config.unlocked():
        _merge(config, saved, "")
    validate(config)
    return config


def _merge(config: ml_collections.ConfigDict, saved: dict[str, Any], prefix: str) -> None:
    for key, value in saved.items():
        if key not in config:
            raise CheckpointError(f"checkpoint config has field '{prefix}{key}' that this version does not know")
        if isinstance(value, dict):
            _merge(config[key], value, f"{prefix}{key}.")
        else:
            config[key] = type(config[key])(value) if isinstance(config[key], float) else value
