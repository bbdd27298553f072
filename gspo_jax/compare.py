"""GSPO vs GRPO vs GRPO with routing replay on one MoE policy, one command, one report.

    python -m gspo_jax.compare --config=configs/qwen_moe.py                # cpu setup: 3 seeds, < 60 min on 2 cores
    python -m gspo_jax.compare --config=configs/qwen_moe.py --quick        # 1 seed, fewer steps: < 10 min
    python -m gspo_jax.compare --config=configs/qwen_moe.py --setup=large  # GPU / TPU: longer task, bigger batches
    ... [--seeds=N] [--out=DIR] [--arms=gspo,grpo] [--config.key=value ...]

Arms (same seeds, data, warm start and step budget; only these keys differ):
  gspo          algo.importance_sampling_level=sequence with the config's clip widths
  grpo          algo.importance_sampling_level=token, eps 0.2 / 0.28 (the GRPO/DAPO widths)
  grpo_replay   grpo + algo.routing_replay=True (the paper's Routing Replay); a build whose config has
                no algo.routing_replay key reports this arm as not run.

The routing-volatility and ratio-by-length diagnostics are switched on (DIAGNOSTICS). Setups (SETUPS)
set the task and the budget for the built-in tiny policy: `cpu` (default), `quick`
(--quick) and `large`. A key given as --config.key=value wins over the setup. A config that loads a
checkpoint (model.hf_path) or reads a prompt file (data.path) keeps its own task and budget.

Each arm and seed trains through `gspo_jax.train.run` in its own workdir OUT/<arm>/seed<k>, one after
another in this process. The arms of one seed start RL from the same policy: the first arm runs the
warm start, and the others resume from its step-0 checkpoint (data iterator and PRNG key included),
so they skip the warm start and begin bit-identical. A run's wall time is saved beside it, so
rerunning the command reuses finished runs and only redraws the report.
OUT/report.md, OUT/report.json and OUT/plots/*.png are written at the end (gspo_jax.compare_report).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from absl import app, flags, logging

from gspo_jax import compare_report, train
from gspo_jax.checkpoint import CHECKPOINT_DIR
from gspo_jax.metrics import read_metrics
from gspo_jax.trainer import TrainingStopped

GRPO_CLIP = (0.2, 0.28)
ARMS: dict[str, dict[str, Any]] = {
    "gspo": {"algo.importance_sampling_level": "sequence"},
    "grpo": {
        "algo.importance_sampling_level": "token",
        "algo.eps_low": GRPO_CLIP[0],
        "algo.eps_high": GRPO_CLIP[1],
    },
    "grpo_replay": {
        "algo.importance_sampling_level": "token",
        "algo.eps_low": GRPO_CLIP[0],
        "algo.eps_high": GRPO_CLIP[1],
        "algo.routing_replay": True,
    },
}

# The task (tasks.running_sum: long step-by-step completions) and the budget per setup; measured
# times on a 2-core CPU are in BUILD_NOTES.md ("Comparison"). large is for an accelerator.
_TASK = {
    "data.task": "running_sum",
    "reward.fns": "running_sum",
    "data.eval_size": 200,
    "eval.batch_size": 200,
    "checkpoint.every": 1000,
    "log.tensorboard": False,
    "log.samples_every": 50,
}
SETUPS: dict[str, dict[str, Any]] = {
    "cpu": _TASK
    | {
        "seeds": 3,
        "data.task_kwargs": {"num_terms": 6},
        "rollout.max_new_tokens": 24,
        "rollout.prompts_per_step": 16,
        "rollout.group_size": 8,
        "steps": 200,
        "eval.every": 25,
        "warmstart.steps": 250,
        "warmstart.eval_every": 125,
    },
    "quick": _TASK
    | {
        "seeds": 1,
        "data.task_kwargs": {"num_terms": 6},
        "rollout.max_new_tokens": 24,
        "rollout.prompts_per_step": 16,
        "rollout.group_size": 8,
        "steps": 40,
        "eval.every": 20,
        "data.eval_size": 100,
        "eval.batch_size": 100,
        "warmstart.steps": 250,
        "warmstart.eval_every": 125,
    },
    "large": _TASK
    | {
        "seeds": 5,
        "data.task_kwargs": {"num_terms": 16},
        "rollout.max_new_tokens": 64,
        "rollout.prompts_per_step": 64,
        "rollout.group_size": 16,
        "steps": 1000,
        "eval.every": 50,
        "data.eval_size": 500,
        "eval.batch_size": 500,
        "warmstart.steps": 1000,
        "warmstart.eval_every": 250,
    },
}
# Switched on for every config that has them (a comparison is a measurement): one forward per update.
DIAGNOSTICS = {"log.routing_volatility": True, "log.ratio_by_length": True}
_TASK_OPTIONS = ("data.task_kwargs", "reward.fns")  # follow data.task
RUN_FILE = "compare_run.json"  # beside a finished run's metrics.jsonl: its wall time and outcome


def define_flags() -> None:
    """Defines this CLI's flags (at run time, so the CLI modules can be imported together).
    --config and its --config.key=value overrides are gspo_jax.train's flag."""
    if "seeds" in flags.FLAGS:
        return
    flags.DEFINE_enum("setup", "cpu", list(SETUPS), "Task and budget for the built-in tiny policy.")
    flags.DEFINE_bool("quick", False, "Shorthand for --setup=quick (1 seed, < 10 min on a 2-core CPU).")
    flags.DEFINE_integer("seeds", None, "Seeds per arm (default: the setup's); seed k is config.seed + k.")
    flags.DEFINE_string(
        "out", "runs/compare", "Output directory: one workdir per arm and seed, and the report."
    )
    flags.DEFINE_list("arms", list(ARMS), f"Arms to run, from {list(ARMS)}.")


def set_key(cfg, dotted: str, value: Any) -> None:
    """cfg.a.b = value for dotted "a.b"; a dict value replaces a ConfigDict section's contents."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for name in parents:
        node = node[name]
    with node.unlocked():
        node[leaf] = value


def has_key(cfg, dotted: str) -> bool:
    node = cfg
    for name in dotted.split("."):
        if not hasattr(node, "keys") or name not in node:
            return False
        node = node[name]
    return True


def apply_setup(cfg, setup: str, user_keys: set[str]) -> list[str]:
    """Applies DIAGNOSTICS and SETUPS[setup] to `cfg` except the keys the user set; returns the keys
    applied. A config with its own checkpoint or prompt file keeps its task and budget."""
    applied = []
    for key, value in DIAGNOSTICS.items():
        if has_key(cfg, key) and key not in user_keys:
            set_key(cfg, key, value)
            applied.append(key)
    if cfg.model.hf_path or cfg.data.path:
        return applied
    if "data.task" in user_keys:  # the user's own task: the setup's task options would not fit it
        user_keys = user_keys | set(_TASK_OPTIONS)
    for key, value in SETUPS[setup].items():
        if key == "seeds" or any(k == key or k.startswith(key + ".") for k in user_keys):
            continue
        set_key(cfg, key, value)
        applied.append(key)
    return applied


def arm_config(base, arm: str, seed: int, out: Path):
    """The config of one arm and seed: the base config plus the arm's keys, its seed and workdir."""
    cfg = base.copy_and_resolve_references()
    for key, value in ARMS[arm].items():
        set_key(cfg, key, value)
    cfg.seed = base.seed + seed
    cfg.workdir = str(out / arm / f"seed{seed}")
    return cfg


def missing_arm_keys(cfg, arm: str) -> list[str]:
    """The arm's keys this build's config does not have (e.g. algo.routing_replay before it existed)."""
    return [key for key in ARMS[arm] if not has_key(cfg, key)]


def run_arm(cfg) -> dict[str, Any]:
    """Trains one arm and seed (or reuses its finished run); returns {"wall_s", "stopped"}."""
    record_path = Path(cfg.workdir) / RUN_FILE
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("steps") == cfg.steps:
            return record
    start = time.perf_counter()
    stopped = None
    try:
        train.run(cfg)
    except TrainingStopped as error:  # too many non-finite updates in a row: a collapse, reported
        stopped = str(error).splitlines()[0]
    record = {"wall_s": time.perf_counter() - start, "stopped": stopped, "steps": cfg.steps}
    record_path.write_text(json.dumps(record))
    return record


def machine() -> str:
    import jax

    device = jax.devices()[0]
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{jax.device_count()} x {device.platform} ({device.device_kind}), jax {jax.__version__}"
    )


def setup_table(cfg, setup: str, seeds: int, wall_s: float) -> dict[str, Any]:
    task = cfg.data.path or f"{cfg.data.task} {dict(cfg.data.task_kwargs)}"
    return {
        "setup": setup,
        "model": cfg.model.hf_path or f"{cfg.model.preset} (random init)",
        "task": task,
        "warm start": f"{cfg.warmstart.steps} supervised steps",
        "RL steps": cfg.steps,
        "batch": f"{cfg.rollout.prompts_per_step} prompts x {cfg.rollout.group_size} completions, "
        f"{cfg.algo.minibatches} minibatch updates per step, max {cfg.rollout.max_new_tokens} new tokens",
        "optimizer": f"lr {cfg.optim.lr}",
        "eval": f"greedy, every {cfg.eval.every} steps",
        "eval problems": cfg.data.eval_size,
        "seeds": seeds,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "total wall time": f"{wall_s / 60:.1f} min",
    }


def compare(base, *, setup: str, seeds: int, arms: list[str], out: Path, log=print) -> dict:
    """Runs every arm x seed (seeds 0..seeds-1) and writes the report; returns the report dict."""
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        raise ValueError(f"unknown arms {unknown}: choose from {list(ARMS)}, e.g. --arms=gspo,grpo")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    start = time.perf_counter()
    results: dict[str, dict] = {}
    for arm in arms:
        settings = dict(ARMS[arm])
        if arm == "gspo":
            settings |= {"algo.eps_low": base.algo.eps_low, "algo.eps_high": base.algo.eps_high}
        results[arm] = {"settings": settings, "runs": []}
        missing = missing_arm_keys(base, arm)
        if missing:
            results[arm]["note"] = f"not run: this build's config has no {', '.join(missing)}"
            log(f"{arm}: {results[arm]['note']}")
    runnable = [arm for arm in arms if "note" not in results[arm]]
    todo, done = len(runnable) * seeds, 0
    for seed in range(seeds):
        warm = None  # the first arm's step-0 checkpoint: the policy every arm of this seed starts RL from
        for arm in runnable:
            cfg = arm_config(base, arm, seed, out)
            if warm is not None and warm.exists() and not (Path(cfg.workdir) / CHECKPOINT_DIR).exists():
                cfg.resume = str(warm)
            record = run_arm(cfg)
            warm = warm or Path(cfg.workdir) / CHECKPOINT_DIR / "0"
            done += 1
            elapsed = time.perf_counter() - start
            log(
                f"{arm} seed {seed}: {record['wall_s']:.0f} s ({done}/{todo} runs, "
                f"{elapsed / 60:.1f} min so far, ~{elapsed / done * (todo - done) / 60:.1f} min left)"
            )
            results[arm]["runs"].append(
                {
                    "seed": seed,
                    "records": read_metrics(cfg.workdir),
                    "wall_s": record["wall_s"],
                    "stopped": record["stopped"],
                }
            )
    table = setup_table(base, setup, seeds, time.perf_counter() - start)
    return compare_report.write_report(results, table, out)


def user_config_keys(argv: list[str]) -> set[str]:
    """The keys set on the command line as --config.key=value (they win over the setup)."""
    return {a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    setup = "quick" if f.quick else f.setup
    base = f.config.copy_and_resolve_references()
    apply_setup(base, setup, user_config_keys(sys.argv))
    seeds = f.seeds or SETUPS[setup]["seeds"]
    try:
        train.validate_config(base)
        report = compare(base, setup=setup, seeds=seeds, arms=f.arms, out=Path(f.out))
    except (train.ConfigError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"report: {Path(f.out) / 'report.md'} ({report['setup']['total wall time']})")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=train.parse_flags)
