"""Entry points of training: the command line and `run(cfg)`, the Python API.

    python -m gspo_jax.train --config=configs/qwen_moe.py[:preset] [--config.key=value ...]

    from configs.qwen_moe import get_config
    from gspo_jax.train import run
    final_metrics = run(get_config("tiny"))

Both validate the whole config before any work (every problem named with its key and fix), then hand
it to the run loop (trainer.py), which calls one RL step (rl_step.py) at a time.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "qwen_moe.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    _DEFAULT_CONFIG,
    "Training config file, optionally with a preset: configs/qwen_moe.py:tiny",
    lock_config=True,
)


class ConfigError(ValueError):
    """The config cannot run; the message lists every problem with the key to change."""


def validate_config(cfg, num_devices: int | None = None) -> None:
    """Raises ConfigError listing every invalid key; touches no files or devices' memory.

    Each module checks the section it owns against its own registries; this only collects them."""
    from gspo_jax import checkpoint, data, losses, optim, rewards, rl_step, rollout, sharding, trainer
    from gspo_jax.models import config as model_config

    errors = [
        *trainer.config_errors(cfg),
        *model_config.config_errors(cfg.model),
        *data.config_errors(cfg.data),
        *rollout.config_errors(cfg.rollout),
        *losses.config_errors(cfg.algo),
        *rl_step.config_errors(cfg),
        *optim.config_errors(cfg.optim),
        *rewards.config_errors(cfg.reward),
        *checkpoint.config_errors(cfg),
    ]
    rows = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    batch_sizes = {"rollout.prompts_per_step": cfg.rollout.prompts_per_step}
    if cfg.algo.minibatches >= 1 and rows % cfg.algo.minibatches == 0:
        batch_sizes["algo.minibatches"] = rows // cfg.algo.minibatches
        chunks = cfg.algo.minibatches * cfg.algo.grad_accumulation
        if cfg.algo.grad_accumulation > 1 and rows % chunks == 0:
            batch_sizes["algo.grad_accumulation"] = rows // chunks
    errors += sharding.config_errors(cfg.mesh, batch_sizes, num_devices)
    if not errors:
        errors += _placement_errors(cfg)
    if errors:
        raise ConfigError("Invalid config:\n  " + "\n  ".join(errors))


def run(cfg) -> dict[str, Any]:
    """Validates `cfg` (ConfigError lists every problem), trains it to `cfg.steps` (resuming from the
    workdir's checkpoint if there is one) and returns the last step's metrics.

    A multi-process job calls `initialize_distributed(cfg.distributed)` first, as the CLI does."""
    validate_config(cfg)
    from gspo_jax.trainer import Trainer

    return Trainer(cfg).run()


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


def _config_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for name, value in node.items():
        keys.append(prefix + name)
        if hasattr(value, "items"):
            keys += _config_keys(value, f"{prefix}{name}.")
    return keys


def unknown_key_message(cfg, argv: list[str]) -> str | None:
    """ "unknown key --config.x; did you mean y?" for the first --config.x override `cfg` lacks."""
    known = _config_keys(cfg)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config.") :].split("=", 1)[0]
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else "; see configs/qwen_moe.py for the keys"
            return f"unknown key --config.{key}{hint}"
    return None


def _config_of(argv: list[str]):
    """The config file's config named by --config=path[:arg] in argv (or the default file)."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), _DEFAULT_CONFIG)
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_gspo_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, but a bad flag or config key exits with one line instead of a traceback."""
    try:
        args = flags.FLAGS(argv)
        flags.FLAGS["config"].value.get("workdir")  # a config file that failed to load raises here
        return args
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as error:
        try:
            message = unknown_key_message(_config_of(argv), argv)
        except Exception:  # the config file itself is broken: absl's own message says how
            message = None
        sys.exit(f"error: {message or str(error).strip()}")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; progress has its own bar
    cfg = _CONFIG.value
    initialize_distributed(cfg.distributed)
    try:
        final = run(cfg)
    except ConfigError as e:
        sys.exit(str(e))
    if final:
        shown = {
            k: round(v, 4) for k, v in final.items() if k in ("reward/mean", "eval/accuracy", "step_time_s")
        }
        print(f"done: {shown}; outputs in {cfg.workdir}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
