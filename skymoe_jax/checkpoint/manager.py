"""Checkpoints under WORKDIR/checkpoints with orbax: the train state, the data
iterator position (grain) and the run's config, saved together.

Saves are asynchronous (training continues while tensorstore writes) and atomic:
orbax writes into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoints as they were, and an unfinished
one is never picked as the latest. Restores take target shardings, so each process
reads only the shards its devices hold, on whatever mesh the run uses now.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import types
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from skymoe_jax.checkpoint import object_store, storage
from skymoe_jax.checkpoint.fingerprint import fingerprints
from skymoe_jax.config import base_config, validate
from skymoe_jax.errors import CheckpointError, ConfigError, RunFailure, first_line, write_failed
from skymoe_jax.parallel.mesh import with_shardings

_failed_save = False  # set once a save failed: its abandoned writes may still end (see _drop_abandoned_io)


def _drop_abandoned_io(hook):
    """Errors of orbax's reads and writes that nothing waits for any more, which Python would print with a
    traceback each, after the run's one-line error.

    When one tensorstore read fails (a damaged file), orbax closes its event loop while reads it started still run;
    each one finishing later calls back into the closed loop. When a save fails, the writes of its other arrays are
    abandoned, and at exit Python closes each of their coroutines, which fail in cleanup that imports a module."""

    def quiet(unraisable):
        error, obj = unraisable.exc_value, unraisable.object
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        if _failed_save and isinstance(obj, types.CoroutineType) and "orbax" in obj.cr_code.co_filename:
            return
        hook(unraisable)

    return quiet


sys.unraisablehook = _drop_abandoned_io(sys.unraisablehook)
object_store.install()

# On object storage orbax writes a checkpoint in place and marks it complete with this file last (there is no
# atomic rename); one without it is an unfinished save.
_COMMITTED = "commit_success.txt"


def checkpoint_dir(workdir: str) -> str:
    return storage.join(storage.absolute(workdir), "checkpoints")


def has_checkpoint(workdir: str) -> bool:
    """The workdir holds a finished save."""
    directory = checkpoint_dir(workdir)
    return any(name.isdigit() and not _unfinished(directory, name) for name in storage.listdir(directory))


def _unfinished(directory: str, name: str) -> bool:
    """The entry `name` of a checkpoint directory is a save that did not finish."""
    if storage.is_url(directory):
        return name.isdigit() and not storage.exists(storage.join(directory, name, _COMMITTED))
    return ".orbax-checkpoint-tmp" in name


def split_checkpoint_path(path: str) -> tuple[str, int | None]:
    """A workdir, or one of its checkpoints (WORKDIR/checkpoints/STEP) -> (workdir, step or None for latest)."""
    path = storage.absolute(path)
    parent, name = storage.split(path)
    if name.isdigit() and storage.split(parent)[1] == "checkpoints":
        return storage.split(parent)[0], int(name)
    return path, None


class Checkpointer:
    """Save every `every` steps; keep the last `keep` plus every checkpoint at a multiple of `keep_every`."""

    def __init__(
        self,
        workdir: str,
        every: int = 0,
        keep: int = 0,
        keep_every: int = 0,
        *,
        create: bool = False,
        asynchronous: bool = True,
        failure_log: str = "",
    ):
        """create: make WORKDIR/checkpoints (a writer); readers leave a mistyped workdir uncreated.
        asynchronous: a save returns once the state is copied to the host, and a thread writes it.
        failure_log: where the run keeps the libraries' own report of a failed write (named in the failure)."""
        storage.check(workdir)
        self.directory = checkpoint_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None,
            keep_period=keep_every or None,
            enable_async_checkpointing=asynchronous,
            create=create,
            atomicity_options=(
                ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)
                if storage.is_url(self.directory)
                else None
            ),
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self.every = every
        self._in_flight: int | None = None  # the step an asynchronous save is writing
        self._failure: RunFailure | None = None  # said once: orbax raises a failed save again at each wait
        self.failure_log = failure_log

    def remove_partial(self) -> list[str]:
        """Remove the unfinished saves a killed or failed run left (orbax's *.orbax-checkpoint-tmp*; on object
        storage, a step without its commit file); their names. Only the workdir's one writer may call this: another
        run's save in progress looks the same."""
        names = [name for name in storage.listdir(self.directory) if _unfinished(self.directory, name)]
        for name in names:
            storage.remove_tree(storage.join(self.directory, name))
        return names

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def path(self, step: int) -> str:
        return storage.join(self.directory, str(step))

    def save(self, step: int, state, config: ml_collections.ConfigDict, data_iter=None) -> None:
        """Save state, config and (if given) data position at `step`: start it, when asynchronous."""
        saved = config.to_dict()
        # orbax checks no bytes of a JSON item: the checksum keeps a changed byte from changing the resumed run.
        items = {
            "state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave({**saved, "sha256": _sha256(saved)}),
            "fingerprints": ocp.args.JsonSave(fingerprints(_named(state))),
        }
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(DataPosition(data_iter))
        self.wait()  # the previous save's failure is its own, and named so
        self._orbax(step, lambda: self._manager.save(step, args=ocp.args.Composite(**items), force=True))
        self._in_flight = step  # an asynchronous save's failure surfaces at the next wait

    def _orbax(self, step: int | None, call) -> None:
        """call() (a save, or the wait for one), its failure a RunFailure naming step. It is raised outside the
        handler, so it holds no reference to orbax's failed writes (their tasks are collected, and their errors
        logged, while the run's library log is open)."""
        failure = None
        try:
            call()
        except Exception as e:
            failure = self._failed(step, e)
        if failure is not None:
            raise failure

    def kept(self) -> str:
        """What a failed run leaves to resume from, for its last line."""
        step = self.latest_step()
        return f"checkpoint {step} ({self.path(step)}) is intact" if step is not None else "no checkpoint was kept"

    def _failed(self, step: int | None, e: Exception) -> RunFailure:
        """The RunFailure of a save that failed: its step and path, the reason, the checkpoint kept."""
        global _failed_save
        _failed_save = True
        self._in_flight = None
        kept = self.kept()
        if self.failure_log and os.path.exists(self.failure_log):
            kept += f" (the libraries' report is in {self.failure_log})"
        what = f"saving checkpoint {step} to {self.path(step)}" if step is not None else f"a save in {self.directory}"
        self._failure = write_failed(what, e, kept)
        return self._failure

    def restore(self, step: int, abstract_state, data_iter=None):
        """State (placed like abstract_state's shardings) and, if given and saved, the data iterator's position.

        A checkpoint without a data position (e.g. written by `skymoe upcycle`) leaves the iterator at its start.
        """
        where = self.path(step)
        if not storage.isdir(storage.join(where, "state")):
            raise CheckpointError(
                f"checkpoint {where} has no saved state (partial or deleted); remove the "
                "directory to resume from an earlier checkpoint"
            )
        self._check_shapes(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state), **self._fingerprint_item(step)}
        if data_iter is not None and storage.isdir(storage.join(where, "data")):
            items["data"] = grain.checkpoint.CheckpointRestore(DataPosition(data_iter))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # tensorstore and orbax raise many types for damaged files
            raise CheckpointError(
                f"checkpoint {where} is damaged and cannot be read ({first_line(e, limit=300)}); remove "
                "it to resume from an earlier checkpoint"
            ) from None
        self._check_fingerprints(step, restored, restored.state)
        return restored.state

    def _fingerprint_item(self, step: int) -> dict[str, Any]:
        """The fingerprints to restore with the state; none for checkpoints written before they were saved."""
        return (
            {"fingerprints": ocp.args.JsonRestore()}
            if storage.isdir(storage.join(self.path(step), "fingerprints"))
            else {}
        )

    def _check_fingerprints(self, step: int, restored, tree, prefix: str = "") -> None:
        """Refuse a restored tree whose arrays differ from what was saved (see checkpoint/fingerprint.py)."""
        saved = restored.get("fingerprints")
        if saved is None:
            return
        got = fingerprints(_named(tree, prefix))
        changed = sorted(name for name, value in got.items() if saved.get(name) != value)
        if changed:
            more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
            raise CheckpointError(
                f"checkpoint {self.path(step)} is damaged: tensor {changed[0]}{more} differs from "
                "what was saved (its fingerprint does not match); remove it to resume from an "
                "earlier checkpoint"
            )

    def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """{'params/embed/table': shape, ...} of the train state saved at step, from its metadata."""
        try:
            # The handler reads the item's tree metadata; a Checkpointer would also look for (and warn
            # about) step-level metadata inside the item directory.
            saved = ocp.StandardCheckpointHandler().metadata(epath.Path(self.path(step)) / "state")
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {self.path(step)} has unreadable metadata ({first_line(e, limit=300)}); "
                "remove it to resume from an earlier checkpoint"
            ) from None
        return {tree_path_name(path): tuple(leaf.shape) for path, leaf in _leaves(saved) if hasattr(leaf, "shape")}

    def saved_config_fields(self, step: int) -> dict[str, Any]:
        """The config saved at step as written: nested JSON fields, with its sha256 (saved_config checks and
        merges them)."""
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def restore_params(self, step: int, abstract_params, shardings):
        """Only the parameters of the state saved at step, placed by `shardings` (each process reads its shards)."""
        return self.restore_part(step, "params", abstract_params, shardings)

    def restore_part(self, step: int, part: str, abstract, shardings):
        """Only one field of the train state saved at step ('params', or 'bias': the selection bias), placed by
        `shardings`."""
        restore_args = with_shardings(
            abstract,
            shardings,
            lambda v, s: ocp.ArrayRestoreArgs(sharding=s, global_shape=v.shape, dtype=v.dtype),
        )
        item = with_shardings(abstract, shardings)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item={part: item}, restore_args={part: restore_args}, partial_restore=True
                    ),
                    **self._fingerprint_item(step),
                ),
            )
        except Exception as e:
            raise CheckpointError(f"checkpoint {self.path(step)} cannot be read ({first_line(e, limit=300)})") from None
        self._check_fingerprints(step, restored, {part: restored.state[part]})
        return restored.state[part]

    def _check_shapes(self, step: int, abstract_state) -> None:
        """Name the first tensor whose shape differs between the checkpoint and this run's model."""
        saved_shapes = self.saved_shapes(step)
        for path, leaf in _leaves(abstract_state):
            name = tree_path_name(path)
            if leaf is None:  # a dense model's alpha: nothing saved, nothing to restore
                continue
            if name == "bias" and name not in saved_shapes:
                raise CheckpointError(
                    f"checkpoint {self.path(step)} holds no expert selection bias (its run had moe.balance=aux); "
                    "resume it with moe.balance=aux"
                )
            if name not in saved_shapes:
                raise CheckpointError(
                    f"checkpoint {self.path(step)} has no tensor {name} that this config's "
                    "model needs; it was written by another model"
                )
            if saved_shapes[name] != tuple(leaf.shape):
                raise CheckpointError(
                    f"parameter {name} has shape {saved_shapes[name]} in checkpoint "
                    f"{self.path(step)} but {tuple(leaf.shape)} in the config"
                )

    def wait(self) -> None:
        """Wait for the save in flight; a RunFailure if it failed."""
        if self._failure is not None:
            return
        self._orbax(self._in_flight, self._manager.wait_until_finished)
        self._in_flight = None

    def saving(self) -> bool:
        """An asynchronous save is still being written."""
        return self._manager.is_saving_in_progress()

    def close(self) -> None:
        """Finish the save in flight and close; after a failed save, close without raising it again."""
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:
                if self._failure is None:
                    raise


class DataPosition:
    """A grain iterator's position as the checkpoint stores it: read when the save starts, restored with its tuples.

    grain's checkpoint handler keeps iterator states as JSON, which turns tuples into lists, and grain's packer
    (ConcatThenSplit) tells "no partial document pending" by comparing its slices with the tuple (-1, -1). Restored
    as lists, every packing stream whose window started at a document boundary took its next document for a
    pending one: it skipped that document and re-packed the rest, so a run resumed with the default shuffle window
    saw other sequences than the uninterrupted run. Lists are turned back into tuples wherever a fresh iterator's
    state has a tuple (checkpoints written before this fix restore exactly too). The state is read when the save is
    requested, so an asynchronous save cannot record a later position. It is saved with its sha256: a changed digit
    would otherwise resume the run at another position without a word.
    """

    def __init__(self, iterator):
        self._iterator = iterator
        state = iterator.get_state()
        self._state = json.dumps({"iterator": state, "sha256": _sha256(state)}, indent=1).encode()

    def get_state(self) -> bytes:
        return self._state

    def set_state(self, raw: bytes) -> None:
        saved = json.loads(raw)
        if isinstance(saved, dict) and ("iterator" in saved or "sha256" in saved):  # else written before checksums
            if saved.get("sha256") != _sha256(saved.get("iterator")):
                raise CheckpointError("the data position does not match the sha256 saved with it")
            saved = saved["iterator"]
        self._iterator.set_state(_with_tuples(saved, self._iterator.get_state()))

    def start_prefetch(self) -> None:
        """grain's handler calls this after a restore; the training loop reads batches in-process."""


def _sha256(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _with_tuples(saved, template):
    """saved, with each list that stands where template has a tuple of its length made a tuple again."""
    if isinstance(saved, dict) and isinstance(template, dict):
        return {k: _with_tuples(v, template[k]) if k in template else v for k, v in saved.items()}
    if isinstance(saved, list) and isinstance(template, (list, tuple)) and len(saved) == len(template):
        items = [_with_tuples(s, t) for s, t in zip(saved, template)]
        return tuple(items) if isinstance(template, tuple) else items
    return saved


def _named(tree, prefix: str = "") -> dict[str, jax.Array]:
    """{'params/embed/table': array, ...}: the names saved_shapes and the fingerprints use."""
    return {prefix + tree_path_name(path): leaf for path, leaf in _leaves(tree) if leaf is not None}


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


def saved_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config saved with a checkpoint (the latest one by default), on top of today's defaults."""
    manager = Checkpointer(workdir)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(
            f"no checkpoint in {manager.directory}; train first with `skymoe train --workdir={workdir}`"
        )
    where = manager.path(step)
    try:
        saved = manager.saved_config_fields(step)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {where} has no readable config ({first_line(e, limit=300)}); remove it to resume "
            "from an earlier checkpoint"
        ) from None
    finally:
        manager.close()
    digest = saved.pop("sha256", None)  # configs saved before checksums have none
    if digest is not None and digest != _sha256(saved):
        raise CheckpointError(
            f"checkpoint {where} has a config that differs from the one saved (its sha256 does not "
            "match); remove it to resume from an earlier checkpoint"
        )
    config = base_config()
    with config.unlocked():
        _merge(config, saved, "", where)
    try:
        validate(config)
    except ConfigError as e:
        raise CheckpointError(
            f"checkpoint {where} has a config that does not validate ({e}); remove it to resume "
            "from an earlier checkpoint"
        ) from None
    return config


def _fits(default, value) -> bool:
    """A JSON value can stand for the field's default: ints pass for floats, lists for tuples."""
    if isinstance(default, ml_collections.ConfigDict):
        return isinstance(value, dict)
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, tuple):
        return isinstance(value, list) and all(type(v) in (int, str) for v in value)
    return isinstance(value, type(default))


def _merge(config: ml_collections.ConfigDict, saved: dict[str, Any], prefix: str, where: str) -> None:
    for key, value in saved.items():
        if key not in config:
            raise CheckpointError(
                f"checkpoint {where} has config field '{prefix}{key}' that this version does not "
                "know; use the version that wrote it, or remove it to resume from an earlier "
                "checkpoint"
            )
        if not _fits(config[key], value):
            raise CheckpointError(
                f"checkpoint {where} has config field '{prefix}{key}' = {value!r}, not a "
                f"{type(config[key]).__name__}; remove it to resume from an earlier checkpoint"
            )
        if isinstance(value, dict):
            _merge(config[key], value, f"{prefix}{key}.", where)
        elif isinstance(config[key], tuple):
            config[key] = tuple(value)
        else:
            config[key] = type(config[key])(value) if isinstance(config[key], float) else value
