"""CLI: python -m gspo_jax.train --config=configs/qwen_moe.py[:preset] [--config.key=value ...]

Parses the config, validates all of it before any work (every problem named with its key and fix),
then runs the trainer.
"""

from __future__ import annotations

import math
import os
import sys

from absl import app, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "configs", "qwen_moe.py"),
    "Training config file, optionally with a preset: configs/qwen_moe.py:tiny",
    lock_config=True,
)

LEVELS = ("sequence", "sequence_token", "token")
AGGREGATIONS = ("seq-mean-token-mean", "token-mean")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """The config cannot run; the message lists every problem with the key to change."""


def _check(errors: list[str], ok: bool, key: str, problem: str) -> None:
    if not ok:
        errors.append(f"--config.{key}: {problem}")


def validate_config(cfg, num_devices: int | None = None) -> None:
    """Raises ConfigError listing every invalid key of the config; touches no files or devices' memory."""
    from gspo_jax import sharding
    from gspo_jax.models.config import PRESETS
    from gspo_jax.rewards import RewardSet

    errors: list[str] = []
    r, a, o = cfg.rollout, cfg.algo, cfg.optim
    _check(errors, cfg.steps >= 1, "steps", f"must be >= 1, got {cfg.steps}")
    _check(errors, bool(cfg.workdir), "workdir", "must name a directory for checkpoints and metrics")
    _check(
        errors,
        cfg.resume in ("auto", "never") or os.path.exists(str(cfg.resume)),
        "resume",
        f"{cfg.resume!r} is neither auto, never, nor an existing checkpoint path",
    )
    if cfg.model.hf_path:
        _check(
            errors,
            os.path.isfile(os.path.join(cfg.model.hf_path, "config.json")),
            "model.hf_path",
            f"{cfg.model.hf_path!r} has no config.json: point it at a local Hugging Face model directory",
        )
    else:
        _check(
            errors,
            cfg.model.preset == "tiny",
            "model.hf_path",
            f"preset {cfg.model.preset!r} needs its released weights: set --config.model.hf_path=/path/to/hf_dir "
            f"(a fresh init is only offered for 'tiny'; known presets: {sorted(PRESETS)})",
        )
    for key in ("dtype", "param_dtype"):
        _check(errors, cfg.model[key] in DTYPES, f"model.{key}", f"{cfg.model[key]!r}: use one of {DTYPES}")
    _check(
        errors,
        cfg.model.rollout_dtype in ("",) + DTYPES,
        "model.rollout_dtype",
        f"{cfg.model.rollout_dtype!r}: use '' (same as param_dtype) or one of {DTYPES}",
    )
    _check(errors, cfg.model.logprob_chunk >= 1, "model.logprob_chunk", "must be >= 1")
    _check(
        errors,
        r.group_size >= 2,
        "rollout.group_size",
        f"must be >= 2 (group advantages compare responses to the same prompt), got {r.group_size}",
    )
    _check(errors, r.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1")
    _check(errors, r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    _check(
        errors,
        r.temperature > 0,
        "rollout.temperature",
        f"must be > 0 for RL (greedy rollouts make all G samples identical), got {r.temperature}",
    )
    _check(errors, 0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    _check(errors, r.top_k >= 0, "rollout.top_k", "must be >= 0 (0 = off)")
    _check(
        errors,
        a.importance_sampling_level in LEVELS,
        "algo.importance_sampling_level",
        f"{a.importance_sampling_level!r}: use one of {LEVELS}",
    )
    _check(
        errors,
        a.aggregation in AGGREGATIONS,
        "algo.aggregation",
        f"{a.aggregation!r}: use one of {AGGREGATIONS}",
    )
    _check(
        errors,
        a.advantage_scale in ("group", "batch", "none"),
        "algo.advantage_scale",
        f"{a.advantage_scale!r}: use group, batch or none",
    )
    _check(
        errors,
        a.old_logprobs in ("trainer", "sampler"),
        "algo.old_logprobs",
        f"{a.old_logprobs!r}: use trainer (one extra forward pass) or sampler (the sampler's log-probs)",
    )
    for key in ("eps_low", "eps_high"):
        _check(errors, a[key] is None or a[key] >= 0, f"algo.{key}", f"must be >= 0, got {a[key]}")
    _check(errors, a.beta >= 0, "algo.beta", f"must be >= 0, got {a.beta}")
    _check(
        errors,
        a.minibatches >= 1 and a.iterations >= 1,
        "algo.minibatches",
        "algo.minibatches and algo.iterations must be >= 1",
    )
    _check(errors, a.max_nonfinite_updates >= 1, "algo.max_nonfinite_updates", "must be >= 1")
    rows = r.prompts_per_step * r.group_size
    _check(
        errors,
        a.minibatches >= 1 and rows % a.minibatches == 0,
        "algo.minibatches",
        f"{a.minibatches} does not divide the {rows} completions of a step "
        f"(prompts_per_step x group_size); pick a divisor of {rows}",
    )
    _check(errors, o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _check(
        errors,
        o.schedule in ("constant", "cosine"),
        "optim.schedule",
        f"{o.schedule!r}: use constant or cosine",
    )
    _check(errors, o.grad_clip > 0, "optim.grad_clip", "must be > 0")
    _check(errors, cfg.eval.every >= 0, "eval.every", "must be >= 0 (0 = off)")
    _check(errors, cfg.checkpoint.every >= 1, "checkpoint.every", "must be >= 1")
    _check(errors, cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    _check(errors, cfg.warmstart.steps >= 0, "warmstart.steps", "must be >= 0 (0 = off)")
    _check(
        errors,
        bool(cfg.data.path) or bool(cfg.data.task),
        "data.task",
        "set data.task to a built-in task (sort_digits, addition) or data.path to a JSONL/Parquet file",
    )
    _check(
        errors,
        not (cfg.warmstart.steps and cfg.data.path),
        "warmstart.steps",
        "a supervised warm start needs a built-in task; set it to 0 when training on data.path",
    )
    try:
        RewardSet.from_reward_config(cfg.reward)
    except (ValueError, ImportError) as e:
        errors.append(f"--config.reward.fns / reward.weights / reward.fn_kwargs: {e}")
    try:
        devices = num_devices or len(sharding.mesh_devices(cfg.mesh))
        mesh_shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(cfg.mesh, devices)))
        batch_ways = math.prod(mesh_shape[a] for a in sharding.BATCH_AXES)
        _check(
            errors,
            r.prompts_per_step % batch_ways == 0,
            "rollout.prompts_per_step",
            f"{r.prompts_per_step} prompts cannot be split over {batch_ways} batch shards "
            f"(mesh data x fsdp x expert = {batch_ways}); use a multiple of {batch_ways}",
        )
        if a.minibatches >= 1 and rows % a.minibatches == 0:
            _check(
                errors,
                (rows // a.minibatches) % batch_ways == 0,
                "algo.minibatches",
                f"a minibatch of {rows // a.minibatches} rows cannot be split over {batch_ways} batch shards",
            )
    except ValueError as e:
        errors.append(f"--config.mesh: {e}")
    if not errors:
        errors += _placement_errors(cfg)
    if errors:
        raise ConfigError("Invalid config:\n  " + "\n  ".join(errors))


def _placement_errors(cfg) -> list[str]:
    """Every parameter must split evenly over the mesh (e.g. experts over mesh.expert); checked on the
    abstract model, so nothing is allocated."""
    from gspo_jax import sharding
    from gspo_jax.models.hf import abstract_model
    from gspo_jax.policy import model_config

    try:
        _, abstract = abstract_model(model_config(cfg))
        sharding.param_shardings(abstract, sharding.make_mesh(cfg.mesh), cfg.mesh.rules.to_dict())
    except ValueError as e:
        return [f"--config.mesh: {e}"]
    return []


def _in_cluster_environment() -> bool:
    env = os.environ
    return bool(
        env.get("JAX_COORDINATOR_ADDRESS")
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    )


def initialize_distributed(dist) -> None:
    """Joins a multi-process JAX job before any device is touched (see configs/qwen_moe.py: distributed)."""
    import jax

    if dist.initialize == "never" or (
        dist.initialize == "auto" and not dist.coordinator_address and not _in_cluster_environment()
    ):
        return
    if dist.coordinator_address:
        if jax.config.jax_platforms in (None, "", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            dist.coordinator_address, num_processes=dist.num_processes, process_id=dist.process_id
        )
    else:
        jax.distributed.initialize()  # TPU pod slices and SLURM describe the job in the environment


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; progress has its own bar
    cfg = _CONFIG.value
    initialize_distributed(cfg.distributed)
    try:
        validate_config(cfg)
    except ConfigError as e:
        sys.exit(str(e))
    from gspo_jax.trainer import Trainer

    final = Trainer(cfg).run()
    if final:
        shown = {
            k: round(v, 4) for k, v in final.items() if k in ("reward/mean", "eval/accuracy", "step_time_s")
        }
        print(f"done: {shown}; outputs in {cfg.workdir}")


if __name__ == "__main__":
    app.run(main)
