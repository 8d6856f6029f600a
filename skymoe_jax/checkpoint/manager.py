"""Checkpoints under WORKDIR/checkpoints with orbax: the train state, the data
iterator position (grain) and the run's config, saved together.

Saves are asynchronous (training continues while tensorstore writes) and atomic:
orbax writes into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoints as they were, and an unfinished
one is never picked as the latest. Restores take target shardings, so each process
reads only the shards its devices hold, on whatever mesh the run uses now.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from skymoe_jax.config import base_config, validate
from skymoe_jax.errors import CheckpointError
from skymoe_jax.parallel.mesh import with_shardings


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def split_checkpoint_path(path: str) -> tuple[str, int | None]:
    """A workdir, or one of its checkpoints (WORKDIR/checkpoints/STEP) -> (workdir, step or None for latest)."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if name.isdigit() and os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent), int(name)
    return path, None


class Checkpointer:
    """Save every `every` steps; keep the last `keep` plus every checkpoint at a multiple of `keep_every`."""

    def __init__(self, workdir: str, every: int = 0, keep: int = 0, keep_every: int = 0, *, create: bool = False):
        """create: make WORKDIR/checkpoints (a writer); readers leave a mistyped workdir uncreated."""
        self.directory = checkpoint_dir(workdir)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep or None, keep_period=keep_every or None,
                                               enable_async_checkpointing=True, create=create)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self.every = every

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state, config: ml_collections.ConfigDict, data_iter=None) -> None:
        """Start an asynchronous save of state, config and (if given) data position at `step`."""
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config.to_dict())}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(DataPosition(data_iter))
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state, data_iter=None):
        """State (placed like abstract_state's shardings) and, if given and saved, the data iterator's position.

        A checkpoint without a data position (e.g. written by `skymoe upcycle`) leaves the iterator at its start.
        """
        where = self.path(step)
        if not os.path.isdir(os.path.join(where, "state")):
            raise CheckpointError(f"checkpoint {where} has no saved state (partial or deleted); remove the "
                                  "directory to resume from an earlier checkpoint")
        self._check_shapes(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None and os.path.isdir(os.path.join(where, "data")):
            items["data"] = grain.checkpoint.CheckpointRestore(DataPosition(data_iter))
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items)).state
        except Exception as e:  # tensorstore and orbax raise many types for damaged files
            raise CheckpointError(f"checkpoint {where} is damaged and cannot be read ({_first_line(e)}); remove "
                                  "it to resume from an earlier checkpoint") from None

    def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """{'params/embed/table': shape, ...} of the train state saved at step, from its metadata."""
        try:
            # The handler reads the item's tree metadata; a Checkpointer would also look for (and warn
            # about) step-level metadata inside the item directory.
            saved = ocp.StandardCheckpointHandler().metadata(epath.Path(self.path(step)) / "state")
        except Exception as e:
            raise CheckpointError(f"checkpoint {self.path(step)} has unreadable metadata ({_first_line(e)}); "
                                  "remove it to resume from an earlier checkpoint") from None
        return {tree_path_name(path): tuple(leaf.shape) for path, leaf in _leaves(saved) if hasattr(leaf, "shape")}

    def restore_params(self, step: int, abstract_params, shardings):
        """Only the parameters of the state saved at step, placed by `shardings` (each process reads its shards)."""
        restore_args = with_shardings(abstract_params, shardings, lambda v, s: ocp.ArrayRestoreArgs(
            sharding=s, global_shape=v.shape, dtype=v.dtype))
        item = with_shardings(abstract_params, shardings)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item={"params": item}, restore_args={"params": restore_args}, partial_restore=True)))
        except Exception as e:
            raise CheckpointError(f"checkpoint {self.path(step)} cannot be read ({_first_line(e)})") from None
        return restored.state["params"]

    def _check_shapes(self, step: int, abstract_state) -> None:
        """Name the first tensor whose shape differs between the checkpoint and this run's model."""
        saved_shapes = self.saved_shapes(step)
        for path, leaf in _leaves(abstract_state):
            name = tree_path_name(path)
            if leaf is None:  # a dense model's alpha: nothing saved, nothing to restore
                continue
            if name not in saved_shapes:
                raise CheckpointError(f"checkpoint {self.path(step)} has no tensor {name} that this config's "
                                      "model needs; it was written by another model")
            if saved_shapes[name] != tuple(leaf.shape):
                raise CheckpointError(f"parameter {name} has shape {saved_shapes[name]} in checkpoint "
                                      f"{self.path(step)} but {tuple(leaf.shape)} in the config")

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


class DataPosition:
    """A grain iterator's position as the checkpoint stores it: read when the save starts, restored with its tuples.

    grain's checkpoint handler keeps iterator states as JSON, which turns tuples into lists, and grain's packer
    (ConcatThenSplit) tells "no partial document pending" by comparing its slices with the tuple (-1, -1). Restored
    as lists, every packing stream whose window started at a document boundary took its next document for a
    pending one: it skipped that document and re-packed the rest, so a run resumed with the default shuffle window
    saw other sequences than the uninterrupted run. Lists are turned back into tuples wherever a fresh iterator's
    state has a tuple (checkpoints written before this fix restore exactly too). The state is read when the save is
    requested, so an asynchronous save cannot record a later position.
    """

    def __init__(self, iterator):
        self._iterator = iterator
        self._state = json.dumps(iterator.get_state(), indent=1).encode()

    def get_state(self) -> bytes:
        return self._state

    def set_state(self, raw: bytes) -> None:
        self._iterator.set_state(_with_tuples(json.loads(raw), self._iterator.get_state()))

    def start_prefetch(self) -> None:
        """grain's handler calls this after a restore; the training loop reads batches in-process."""


def _with_tuples(saved, template):
    """saved, with each list that stands where template has a tuple of its length made a tuple again."""
    if isinstance(saved, dict) and isinstance(template, dict):
        return {k: _with_tuples(v, template[k]) if k in template else v for k, v in saved.items()}
    if isinstance(saved, list) and isinstance(template, (list, tuple)) and len(saved) == len(template):
        items = [_with_tuples(s, t) for s, t in zip(saved, template)]
        return tuple(items) if isinstance(template, tuple) else items
    return saved


def _leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: x is None)


def tree_path_name(path) -> str:
    """'params/stacks/0/.../w_up' from a key path (attribute, dict and sequence keys; Variable '.value' dropped)."""
    parts = []
    for key in path:
        part = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        if part not in ("value", "raw_value"):
            parts.append(str(part))
    return "/".join(parts)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def saved_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config saved with a checkpoint (the latest one by default), on top of today's defaults."""
    manager = Checkpointer(workdir)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {manager.directory}; train first with "
                              f"`skymoe train --workdir={workdir}`")
    try:
        saved: dict[str, Any] = manager._manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore())).config
    except Exception as e:
        raise CheckpointError(f"checkpoint {manager.path(step)} has no readable config ({_first_line(e)})") \
            from None
    finally:
        manager.close()
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
        elif isinstance(config[key], tuple):
            config[key] = tuple(value)
        else:
            config[key] = type(config[key])(value) if isinstance(config[key], float) else value
