"""Orbax checkpoints of a run: train state + data-iterator position + config + meta.

Layout: `<workdir>/checkpoints/<step>/` (Orbax step dirs), each holding the items
  state/      the caller's pytree of arrays (params, optimizer state, step, RNG keys...), OCDBT.
              Typed PRNG keys (jax.random.key) are stored as their key_data and wrapped back.
  data/       the grain iterator position, one JSON file per process (grain's handler).
  config/     the run config as JSON.   meta/  the caller's JSON (step, phase, metrics...).
  integrity/  JSON: a 64-bit checksum per state array and the PRNG impl of each key.
  commit_success.txt, _CHECKPOINT_METADATA   written by Orbax when the step is committed.

Saves are async: Orbax writes `<step>.orbax-checkpoint-tmp/` and renames it when complete, so a
killed save never looks complete. A step dir counts as a checkpoint only if Orbax committed it
(commit marker, or a commit time in _CHECKPOINT_METADATA); anything else is ignored.

Restore picks the newest committed step. If it cannot be read, or an array's checksum differs
(Orbax does not notice garbage bytes inside an array file), it warns, names the step, and tries
the next older one. Nothing on disk is deleted or moved on failure. A checkpoint whose tree does
not fit the target (other shapes or keys) raises CheckpointMismatchError at once: older steps of
the same run would not fit either.

Keep-N policy: garbage collection (keep the newest `keep`, plus the best one by a metric)
happens when a save commits and only ever counts committed, readable steps; steps found corrupt
at restore are invisible to it, so they can never push a good older checkpoint out. A corrupt or
uncommitted dir stays untouched until this run saves the same step number again; it is then
renamed to `<step>.corrupt-<time>` / `<step>.uncommitted-<time>` (never deleted) with a warning.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from gspo_jax.integrity import leaf_path, leaves_by_path, state_checksums
from gspo_jax.sharding import all_processes_agree

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
BEST_MODES = ("max", "min")
# Orbax writes this file into a step dir as the last act of committing it.
_COMMIT_MARKER = "commit_success.txt"
_NEVER_HINT = (
    "Fix: use a new workdir, or pass --config.resume=never to start fresh here (the existing "
    "checkpoints/ is then renamed to checkpoints.replaced-<time>/, nothing is deleted)."
)


class CheckpointMismatchError(ValueError):
    """The checkpoint's array tree does not fit the target (another model shape or structure)."""


class CheckpointCorruptError(RuntimeError):
    """No readable checkpoint was found where one was asked for."""


class _ChecksumMismatch(Exception):
    """Restored arrays differ from what was saved (garbage bytes in a data file)."""


def _utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _is_primary() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# ----- PRNG keys ---------------------------------------------------------------------------
def _is_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _untype_keys(state: Any) -> tuple[Any, dict[str, str]]:
    """Replaces typed PRNG key arrays by their key_data; returns {path: impl name}."""
    impls = {}

    def convert(path, leaf):
        if _is_key(leaf):
            impls[leaf_path(path)] = str(jax.random.key_impl(leaf))
            return jax.random.key_data(leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(convert, state), impls


def _jsonable(obj: Any) -> Any:
    def default(o):
        if isinstance(o, (np.ndarray, np.generic, jax.Array)):
            return np.asarray(o).tolist()
        return str(o)

    return json.loads(json.dumps(obj, default=default))


# ----- step discovery -----------------------------------------------------------------------
class _CommittedSteps(ocp.step.NameFormat):
    """Orbax's standard step names, but only committed steps not marked as corrupt are seen."""

    def __init__(self):
        self._standard = ocp.step.standard_name_format()
        self.corrupt: set[int] = set()

    def build_name(self, step: int) -> str:
        return self._standard.build_name(step)

    def _visible(self, metadata) -> bool:
        if metadata.step in self.corrupt:
            return False
        return (metadata.path / _COMMIT_MARKER).exists() or _commit_time(metadata) is not None

    def find_all(self, base_path):
        return (m for m in self._standard.find_all(base_path) if self._visible(m))

    def find_step(self, base_path, step: int):
        metadata = self._standard.find_step(base_path, step)
        if not self._visible(metadata):
            raise ValueError(f"step {step} under {base_path} is not a committed checkpoint")
        return metadata


def _commit_time(metadata) -> int | None:
    try:
        return metadata.commit_timestamp_nsecs
    except Exception:  # an unreadable _CHECKPOINT_METADATA means: not committed
        return None


def _item_handlers() -> dict[str, Any]:
    return {
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
        "integrity": ocp.JsonCheckpointHandler(),
    }


class _IteratorSnapshot:
    """The iterator's state captured now; async saves call get_state() later, in a thread."""

    def __init__(self, iterator: Any):
        state = iterator.get_state()
        self._state = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

    def get_state(self) -> bytes:
        return self._state


# ----- restore targets and tree comparison --------------------------------------------------
def _restore_struct(leaf: Any) -> Any:
    """ShapeDtypeStruct (with sharding) that Orbax restores `leaf` into; keys as key_data."""
    if isinstance(leaf, jax.Array) and not _is_key(leaf):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.Array) or isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding
        if _is_key(leaf):
            leaf = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    return leaf


def _mismatches(stored: Mapping[str, Any], target: Mapping[str, Any]) -> list[str]:
    lines = []
    for path in sorted(set(stored) | set(target)):
        if path not in target:
            lines.append(f"  {path}: only in the checkpoint, shape {tuple(stored[path].shape)}")
        elif path not in stored:
            lines.append(
                f"  {path}: missing in the checkpoint (target shape {tuple(np.shape(target[path]))})"
            )
        else:
            saved_shape = tuple(getattr(stored[path], "shape", ()))
            target_shape = tuple(np.shape(target[path]))
            if saved_shape != target_shape:
                lines.append(f"  {path}: checkpoint {saved_shape} vs target {target_shape}")
    return lines


def _resolve_resume_path(path: Path) -> tuple[Path, int | None]:
    """(checkpoints root, step or None) for a workdir, a checkpoints dir, or one step dir."""
    if not path.exists():
        raise ValueError(
            f"resume path {path} does not exist; pass a workdir, its checkpoints/ dir, "
            "a step dir inside it, 'auto' or 'never'"
        )
    if (path / CHECKPOINT_DIR).is_dir():
        return path / CHECKPOINT_DIR, None
    if path.name.isdigit() and (path / "_CHECKPOINT_METADATA").exists():
        return path.parent, int(path.name)
    return path, None


class Checkpointer:
    """Saves and restores a run's state, data position, config and meta with Orbax.

    save():     async by default; `wait()` blocks until the last save is committed.
    restore():  resume="auto" (newest good checkpoint here, or None), "never" (None), or a path
                (a workdir, a checkpoints dir, or one step dir).
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        keep: int = 3,
        keep_best_by: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
    ):
        if keep < 1:
            raise ValueError(f"Checkpointer needs keep >= 1, got {keep}")
        if best_mode not in BEST_MODES:
            raise ValueError(f"best_mode must be one of {BEST_MODES}, got {best_mode!r}")
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR  # Orbax needs absolute paths
        self.keep_best_by = keep_best_by
        self.restored_config: dict | None = None  # the run config saved with the step last restored
        self._name_format = _CommittedSteps()
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        best_fn = None
        if keep_best_by is not None:
            # Steps saved without the metric rank worst, so only LatestN keeps them.
            worst = -np.inf if best_mode == "max" else np.inf
            best_fn = lambda metrics: metrics.get(keep_best_by, worst)  # noqa: E731
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        self._options = ocp.CheckpointManagerOptions(
            step_name_format=self._name_format,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=best_fn,
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=False,
        )
        self._manager = self._open_manager()

    def _open_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=self._options, item_handlers=_item_handlers())

    # ----- queries ---------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Committed steps that are not known to be corrupt, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        return self._manager.best_step()

    # ----- save ------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        state: Any,
        data_iterator: Any,
        config_dict: Mapping[str, Any],
        meta: Mapping[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
    ) -> bool:
        """Starts saving a checkpoint of `step`; returns whether one is being written (False when
        this step is saved already). `metrics[keep_best_by]` ranks checkpoints for keep-best. The
        iterator's position is captured now, so it may be advanced while the save runs.
        """
        step = int(step)
        latest = self.latest_step()
        if latest is not None and step == latest:
            logger.info("checkpoint for step %d exists already; not saving it again", step)
            return False
        if latest is not None and step < latest:
            raise ValueError(
                f"cannot save step {step}: {self.directory} already holds the newer step "
                f"{latest}. Checkpoints are written in increasing step order; resume from the "
                f"latest one, or use a new workdir"
            )
        self._move_aside_stale_dir(step)
        arrays, key_impls = _untype_keys(state)
        items = {
            "state": ocp.args.StandardSave(arrays),
            "config": ocp.args.JsonSave(_jsonable(dict(config_dict))),
            "meta": ocp.args.JsonSave(_jsonable(dict(meta))),
            "integrity": ocp.args.JsonSave({"checksums": state_checksums(arrays), "key_impls": key_impls}),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
        return self._manager.save(
            step, args=ocp.args.Composite(**items), metrics=self._rank_metrics(metrics), force=True
        )

    def _rank_metrics(self, metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
        """What Orbax stores to rank this step; {} (ranks worst) when the metric is absent."""
        if self.keep_best_by is None:
            return None
        if not metrics or self.keep_best_by not in metrics:
            return {}
        value = float(np.asarray(jax.device_get(metrics[self.keep_best_by])))
        return {self.keep_best_by: value} if np.isfinite(value) else {}

    def _move_aside_stale_dir(self, step: int) -> None:
        """Renames an uncommitted or corrupt dir that holds this step's name (never deletes)."""
        stale = self.directory / self._name_format.build_name(step)
        if stale.exists():
            reason = "corrupt" if step in self._name_format.corrupt else "uncommitted"
            target = stale.with_name(f"{stale.name}.{reason}-{_utc_stamp()}")
            if _is_primary():
                stale.rename(target)
                logger.warning(
                    "moved the %s checkpoint dir %s aside to %s before saving step %d",
                    reason,
                    stale,
                    target,
                    step,
                )
            _sync(f"gspo_checkpoint_move_aside_{step}")
        self._name_format.corrupt.discard(step)

    def wait(self) -> None:
        """Blocks until pending async saves are committed (raises if one failed)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- restore ---------------------------------------------------------------------------
    def restore(
        self, target_state: Any, data_iterator: Any, *, resume: str = "auto"
    ) -> tuple[Any, dict, int] | None:
        """Restores (state, meta, step) and the iterator's position in place, or returns None.

        `target_state`: pytree of jax.ShapeDtypeStruct (with .sharding) or concrete arrays;
        arrays come back with its shardings and dtypes. resume:
          "auto"   newest good checkpoint of this workdir; None when there is none.
          "never"  None; existing checkpoints here are renamed to checkpoints.replaced-<time>/.
          a path   a workdir, checkpoints dir or step dir. A step dir of this workdir must be its
                   newest step. A path elsewhere is used only while this workdir has no
                   checkpoint of its own (so a restarted job continues its own progress).
        """
        self.wait()
        if resume == "never":
            self._archive_existing()
            return None
        if not resume:
            raise ValueError("resume must be 'auto', 'never' or a checkpoint path, got ''")
        if resume == "auto":
            return self._restore_from(self._manager, self._name_format, None, target_state, data_iterator)
        root, step = _resolve_resume_path(Path(resume).expanduser())
        if root.resolve() == self.directory.resolve():
            if step is not None and step != self.latest_step():
                raise ValueError(
                    f"resume={resume} is step {step}, but this workdir also holds newer steps "
                    f"{[s for s in self.all_steps() if s > step]}, which a later auto-resume "
                    "would pick up. Copy the step dir into a new workdir and resume from it there"
                )
            return self._restore_from(self._manager, self._name_format, step, target_state, data_iterator)
        if self.latest_step() is not None:
            logger.warning(
                "resume=%s ignored: this workdir already has its own checkpoints (latest step "
                "%d), which are resumed instead. To restart from %s, use a new workdir.",
                resume,
                self.latest_step(),
                resume,
            )
            return self.restore(target_state, data_iterator, resume="auto")
        name_format = _CommittedSteps()
        options = ocp.CheckpointManagerOptions(step_name_format=name_format, read_only=True, create=False)
        with ocp.CheckpointManager(root, options=options, item_handlers=_item_handlers()) as other:
            return self._restore_from(other, name_format, step, target_state, data_iterator)

    def _existing_step(self, step: int | None) -> int:
        """`step` (default: the newest), checked to be a committed step of this workdir."""
        self.wait()
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {self.directory}: run training first or check the workdir")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; steps that exist: {steps}")
        return steps[-1] if step is None else step

    def read(self, target_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """(state, meta, step) of one committed step of this workdir (default: the newest good one),
        for tools that only read a run (export, tests); the data position and resume rules are not involved."""
        step = self._existing_step(step)
        return self._restore_from(self._manager, self._name_format, step, target_state, None)

    def read_config(self, step: int | None = None) -> dict:
        """The run config saved with `step` (default: the newest step)."""
        step = self._existing_step(step)
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def _archive_existing(self) -> None:
        if not self.directory.exists() or not any(self.directory.iterdir()):
            return
        self._manager.close()
        target = self.directory.with_name(f"{CHECKPOINT_DIR}.replaced-{_utc_stamp()}")
        if _is_primary():
            self.directory.rename(target)
            logger.warning("resume=never: moved the existing checkpoints to %s", target)
        _sync("gspo_checkpoint_archive")
        self._name_format.corrupt.clear()
        self._manager = self._open_manager()

    def _restore_from(self, manager, name_format, step, target_state, data_iterator):
        root = Path(manager.directory)
        if step is None:
            candidates = sorted(manager.all_steps(), reverse=True)
            self._warn_uncommitted(manager, name_format)
        else:
            if step not in manager.all_steps():
                raise CheckpointCorruptError(
                    f"{root / name_format.build_name(step)} is not a committed checkpoint "
                    "(its save never finished); pick another step dir"
                )
            candidates = [step]
        if not candidates:
            return None
        target = jax.tree.map(_restore_struct, target_state)
        errors = []
        for candidate in candidates:
            step_dir = root / name_format.build_name(candidate)
            reason = None
            try:
                state, meta = self._restore_step(manager, candidate, target, data_iterator)
            except CheckpointMismatchError:
                raise
            except Exception as error:  # any read failure means: this step is unusable
                reason = f"{type(error).__name__}: {str(error)[:300]}"
            if not all_processes_agree(reason is None):
                reason = reason or "another process could not read it"
                errors.append(f"  step {candidate} ({step_dir}): {reason}")
                name_format.corrupt.add(candidate)
                manager.reload()
                if len(candidates) > 1:
                    logger.warning(
                        "checkpoint step %d at %s is unreadable or corrupt (%s); falling back "
                        "to the previous checkpoint. Nothing was deleted: inspect or remove it "
                        "by hand.",
                        candidate,
                        step_dir,
                        reason,
                    )
                continue
            logger.info("restored checkpoint step %d from %s", candidate, step_dir)
            return state, meta, candidate
        raise CheckpointCorruptError(
            "no readable checkpoint in " + str(root) + ":\n" + "\n".join(errors) + "\n"
            "Nothing was deleted. " + _NEVER_HINT
        )

    @staticmethod
    def _warn_uncommitted(manager, name_format: _CommittedSteps) -> None:
        root = Path(manager.directory)
        if not root.exists():
            return
        known = {name_format.build_name(s) for s in [*manager.all_steps(), *name_format.corrupt]}
        ignored = sorted(
            p.name
            for p in root.iterdir()
            if p.is_dir() and p.name not in known and (p.name.isdigit() or ".orbax-checkpoint-tmp" in p.name)
        )
        if ignored:
            logger.warning(
                "ignoring uncommitted checkpoint dirs in %s (saves that never finished): %s",
                root,
                ", ".join(ignored),
            )

    def _restore_step(self, manager, step, target, data_iterator):
        """(state, meta) of `step`; raises if it is unreadable, corrupt or does not fit."""
        stored_tree = manager.item_metadata(step)["state"]
        if stored_tree is None:
            raise FileNotFoundError("no array metadata (state/_METADATA)")
        stored = leaves_by_path(getattr(stored_tree, "tree", stored_tree))
        flat_target = leaves_by_path(target)
        mismatched = _mismatches(stored, flat_target)
        if mismatched:
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {manager.directory} does not fit the target state:\n"
                + "\n".join(mismatched)
                + "\nIt was written by a run with another model or "
                "optimizer config. " + _NEVER_HINT
            )
        items = {
            "state": ocp.args.StandardRestore(target),
            "meta": ocp.args.JsonRestore(),
            "config": ocp.args.JsonRestore(),
            "integrity": ocp.args.JsonRestore(),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = manager.restore(step, args=ocp.args.Composite(**items))
        integrity = restored["integrity"]
        # Arrays restored into another dtype are cast, so their checksums cannot be compared.
        same_dtype = {
            path
            for path, leaf in flat_target.items()
            if getattr(stored[path], "dtype", None) is not None
            and hasattr(leaf, "dtype")
            and np.dtype(leaf.dtype) == np.dtype(stored[path].dtype)
        }
        actual = state_checksums(restored["state"])
        bad = [p for p, sums in integrity["checksums"].items() if p in same_dtype and actual.get(p) != sums]
        if bad:
            raise _ChecksumMismatch("array data does not match its checksum: " + ", ".join(sorted(bad)))
        impls = integrity["key_impls"]

        def wrap(path, leaf):
            impl = impls.get(leaf_path(path))
            return leaf if impl is None else jax.random.wrap_key_data(leaf, impl=impl)

        state = jax.tree_util.tree_map_with_path(wrap, restored["state"])
        self.restored_config = restored["config"]
        return state, restored["meta"]


def config_errors(cfg) -> list[str]:
    """Problems with the `checkpoint.*` keys; keep_best_by must name a metric the run logs."""
    from gspo_jax import metrics
    from gspo_jax.rewards import RewardSet

    c, errors = cfg.checkpoint, []
    if c.every < 1:
        errors.append("--config.checkpoint.every: must be >= 1")
    if c.keep < 1:
        errors.append("--config.checkpoint.keep: must be >= 1")
    if c.keep_best_mode not in ("",) + BEST_MODES:
        errors.append(f"--config.checkpoint.keep_best_mode: {c.keep_best_mode!r}: use '' (the metric's own), max or min")
    if c.keep_best_by:
        try:
            reward_names = RewardSet.from_config(cfg.reward.fns, cfg.reward.weights or None).names
        except (ValueError, ImportError):
            reward_names = ()  # reported by the reward section
        known = metrics.rankable_metrics(reward_names, with_eval=cfg.eval.every > 0)
        if c.keep_best_by not in known:
            why = " (evaluation is off: eval.every=0)" if c.keep_best_by.startswith("eval/") else ""
            errors.append(
                f"--config.checkpoint.keep_best_by: {c.keep_best_by!r} is not a metric this run logs{why}; "
                f"use one of {sorted(known)}"
            )
    return errors


def best_mode(cfg) -> str:
    """Whether a larger or smaller `checkpoint.keep_best_by` is better: keep_best_mode, else the metric's own."""
    from gspo_jax import metrics

    c = cfg.checkpoint
    if c.keep_best_mode:
        return c.keep_best_mode
    return metrics.RANKABLE.get(c.keep_best_by, "max")
