"""The run loop of a GSPO training run: resume, warm start, RL steps, evaluation cadence, checkpoints, logging.

(train.py is the command line and the Python entry point `run(cfg)`; rl_step.py is one RL step as a
function; update.py holds its jitted scoring and update phases.) The loop owns every side effect:
reading the prompt stream, writing metrics, samples and checkpoints. Every array is placed on the
mesh built from `mesh.*`; a one-device mesh is the same code path as a pod slice.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gspo_jax import checkpoint as ckpt
from gspo_jax import losses, metrics, sharding
from gspo_jax.data import PromptBatch, eval_batches, make_prompt_dataset, prompt_encoder, widen
from gspo_jax.evaluation import evaluate
from gspo_jax.plots import plot_metrics
from gspo_jax.policy import build_policy, init_train_state
from gspo_jax.preemption import PreemptionGuard
from gspo_jax.rewards import RewardSet
from gspo_jax.rl_step import RLStep
from gspo_jax.rollout import use_row_compaction
from gspo_jax.sampler import Sampler
from gspo_jax.tokenizer import eos_token_ids, load_tokenizer
from gspo_jax.update import TrainState
from gspo_jax.warmstart import build_supervised_set, run_warmstart


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite updates); the last good checkpoint is intact."""


def config_errors(cfg) -> list[str]:
    """Problems with the keys the run loop reads (steps, workdir, resume, eval, warmstart, log)."""
    checks = (
        (cfg.steps >= 1, "steps", f"must be >= 1, got {cfg.steps}"),
        (bool(cfg.workdir), "workdir", "must name a directory for checkpoints and metrics"),
        (
            cfg.resume in ("auto", "never") or os.path.exists(str(cfg.resume)),
            "resume",
            f"{cfg.resume!r} is neither auto, never, nor an existing checkpoint path",
        ),
        (cfg.eval.every >= 0, "eval.every", "must be >= 0 (0 = off)"),
        (cfg.warmstart.steps >= 0, "warmstart.steps", "must be >= 0 (0 = off)"),
        (
            not (cfg.warmstart.steps and cfg.data.path),
            "warmstart.steps",
            "a supervised warm start needs a built-in task; set it to 0 when training on data.path",
        ),
        (cfg.log.console_every >= 1, "log.console_every", "must be >= 1"),
    )
    return [f"--config.{key}: {problem}" for ok, key, problem in checks if not ok]


class Trainer:
    """One GSPO run, from a validated config."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.mesh = sharding.make_mesh(cfg.mesh)
        self.tokenizer = load_tokenizer(cfg.model.hf_path or None)
        self.stop_ids = eos_token_ids(self.tokenizer, cfg.model.hf_path or None)
        self.pad_id = self.tokenizer.pad_token_id
        self.policy = build_policy(cfg, self.mesh)
        if len(self.tokenizer) > self.policy.config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is "
                f"{self.policy.config.vocab_size}: use the model's own tokenizer"
            )
        self.data = make_prompt_dataset(
            cfg.data,
            self.tokenizer,
            prompts_per_step=cfg.rollout.prompts_per_step,
            seed=cfg.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            hold_out=cfg.eval.every > 0,
        )
        self.rewards = RewardSet.from_reward_config(cfg.reward)
        self.rewards.check_columns(self.data.columns)
        self.eval_set = eval_batches(
            cfg.data,
            self.tokenizer,
            batch_size=cfg.eval.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            hold_out=cfg.eval.every > 0,
        )
        self.rl = RLStep(cfg, self.policy, self.mesh, self.tokenizer, self.rewards, self.stop_ids)
        self.eval_sampler = sharding.on_mesh(
            Sampler(
                self.policy.graphdef,
                max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                num_samples=1,
                temperature=0.0,
                stop_ids=self.stop_ids,
                pad_id=self.pad_id,
                cache_dtype=cfg.rollout.cache_dtype or None,
                compact_rows=use_row_compaction(
                    cfg.rollout.compact_rows, self.mesh.size, jax.default_backend()
                ),
            ),
            self.mesh,
            cfg.mesh.rules.to_dict(),
        )
        # The KL reference is the policy RL starts from (after any warm start); set in _loop.
        self.ref_params = None
        self.writer = metrics.MetricsWriter(
            cfg.workdir,
            total_steps=cfg.steps,
            enable_tensorboard=cfg.log.tensorboard,
            process_index=jax.process_index(),
            summary_every=cfg.log.console_every,
        )
        self.checkpointer = ckpt.Checkpointer(
            cfg.workdir,
            keep=cfg.checkpoint.keep,
            keep_best_by=cfg.checkpoint.keep_best_by or None,
            best_mode=ckpt.best_mode(cfg),
            async_save=cfg.checkpoint.async_save,
        )
        self.base_key = jax.jit(
            lambda: jax.random.key(cfg.seed), out_shardings=sharding.replicated(self.mesh)
        )()
        self.nonfinite_in_a_row = 0
        self.warned_sampler_gap = False

    def _rows(self, host):
        return sharding.place_batch(host, self.mesh)

    def _prompts(self, batch: PromptBatch) -> tuple[jax.Array, jax.Array]:
        """Global [N, P] prompt ids and mask; P is the widest host's bucket, so all hosts agree on it."""
        batch = widen(batch, sharding.max_over_hosts(batch.prompt_ids.shape[1]), self.pad_id)
        return self._rows(batch.prompt_ids), self._rows(batch.prompt_mask)

    # ---- phases ----

    def initial_state(self) -> TrainState:
        return init_train_state(self.rl.optimizer, self.policy.params)

    def greedy_eval(self, params) -> dict[str, float]:
        rollout_params = self.rl.cast_for_rollout(params)
        is_correct = self.data.task.is_correct if self.data.task is not None else None

        def generate(batch):
            out = self.eval_sampler(rollout_params, *self._prompts(batch), jax.random.key(0))
            return sharding.global_to_host(out.completion_ids, self.mesh), sharding.global_to_host(
                out.completion_mask, self.mesh
            )

        return evaluate(
            generate,
            self.eval_set,
            self.tokenizer,
            self.rewards,
            self.stop_ids,
            is_correct=is_correct,
            correct_threshold=self.cfg.eval.get("correct_threshold", 1.0),
        )

    def warm_start(self, state: TrainState) -> TrainState:
        cfg = self.cfg
        task = self.data.task
        if task is None:
            raise ValueError(
                "warmstart.steps > 0 needs a built-in task (data.task) to supply supervised "
                "examples; set --config.warmstart.steps=0 for file data"
            )
        pairs = task.supervised_examples(cfg.seed, max(cfg.warmstart.batch_size * cfg.warmstart.steps, 1))
        encode = prompt_encoder(cfg.data, self.tokenizer)
        sft = build_supervised_set(pairs, encode, self.tokenizer, self.stop_ids[0], self.pad_id)
        self.writer.log(f"warm start: {cfg.warmstart.steps} supervised steps on {len(pairs)} examples")

        def on_eval(step, params):
            self.writer.write(step, self.greedy_eval(params), phase="warmstart")

        def on_step(step, loss):
            if step % max(cfg.log.console_every, 1) == 0:
                self.writer.write(step, {"warmstart/loss": loss}, phase="warmstart")

        params = run_warmstart(
            state.params,
            self.policy.graphdef,
            sft,
            steps=cfg.warmstart.steps,
            batch_size=cfg.warmstart.batch_size,
            lr=cfg.warmstart.lr,
            seed=cfg.seed,
            logprob_chunk=cfg.model.logprob_chunk,
            place=self._rows,
            on_eval=on_eval,
            eval_every=cfg.warmstart.eval_every,
            on_step=on_step,
        )
        return dataclasses.replace(state, params=params)

    def rl_step(self, state: TrainState, step: int) -> tuple[TrainState, dict[str, Any]]:
        """Runs step `step` on the next prompt batch; writes its samples when due."""
        key = jax.random.fold_in(self.base_key, step)
        state, result = self.rl(state, next(self.data), self.ref_params, key)
        row = result.metrics | self.data.metrics()
        self._count_nonfinite(result.update_skipped, step)
        cfg = self.cfg
        warning = sampler_gap_warning(row["logprob_gap/seq_abs"], cfg.algo)
        if warning and not self.warned_sampler_gap:  # once per run
            self.warned_sampler_gap = True
            self.writer.log(warning)
        if cfg.log.samples_every and (step % cfg.log.samples_every == 0 or step == cfg.steps):
            self.writer.write_samples(step, result.scored.samples(cfg.log.num_samples))
        return state, row

    def _count_nonfinite(self, skipped, step: int):
        for s in skipped:
            self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if s else 0
        if skipped.any():
            self.writer.log(
                f"step {step}: skipped {int(skipped.sum())} update(s) with non-finite loss or gradients"
            )

    def _stop_if_diverged(self, step: int):
        if self.nonfinite_in_a_row >= self.cfg.algo.max_nonfinite_updates:
            raise TrainingStopped(
                f"{self.nonfinite_in_a_row} non-finite updates in a row at step {step}; stopping. The last good "
                f"checkpoint in {self.cfg.workdir}/checkpoints is intact: lower optim.lr or check the rewards"
            )

    # ---- the run ----

    def _checkpoint_tree(self, state: TrainState, ref_params) -> dict[str, Any]:
        """What a checkpoint holds; the KL reference too when beta > 0, so a resumed run keeps it."""
        tree = {"train": state, "rng": self.base_key}
        if self.cfg.algo.beta > 0:
            tree["ref"] = ref_params
        return tree

    def _save(self, state: TrainState, step: int, meta: dict, row: dict | None = None):
        self.checkpointer.save(
            step,
            self._checkpoint_tree(state, self.ref_params),
            self.data.iterator,
            self.cfg.to_dict(),
            meta,
            metrics=row,
        )

    def run(self) -> dict[str, Any]:
        """Trains to cfg.steps (resuming if a checkpoint exists); returns the last step's metrics."""
        try:
            with PreemptionGuard() as guard:
                last = self._loop(guard)
        finally:
            self.checkpointer.wait()  # pending async saves finish even when a step raised
            self.checkpointer.close()
            self.writer.close()
        if jax.process_index() == 0:
            plot_metrics(self.cfg.workdir)
        return last

    def _startup_summary(self) -> None:
        cfg, devices = self.cfg, self.mesh.devices.reshape(-1)
        total, active = parameter_counts(self.policy.params, self.policy.config.num_experts_per_tok)
        self.writer.log(
            f"devices: {len(devices)} x {devices[0].platform} in {jax.process_count()} process(es); "
            f"mesh {dict(self.mesh.shape)}"
        )
        self.writer.log(
            f"policy: {total:,} parameters, {active:,} active per token ({cfg.model.hf_path or cfg.model.preset})"
        )
        eval_count = int(sharding.sum_over_hosts(sum(int(np.sum(b.valid)) for b in self.eval_set)))
        train_count = self.data.num_records * jax.process_count()
        held_out = cfg.data.path and not cfg.data.eval_path and eval_count
        self.writer.log(
            f"records: {train_count:,} train, {eval_count:,} eval"
            + (
                " (held out of data.path: min(data.eval_size, 10%); set data.eval_path to use a file)"
                if held_out
                else ""
            )
        )
        if not cfg.eval.every:
            self.writer.log("evaluation: off (eval.every=0)")
        elif not eval_count:
            self.writer.log(
                "evaluation: off: no eval records (set data.eval_path, or use a training file of >= 10 records)"
            )

    def _loop(self, guard) -> dict[str, Any]:
        cfg = self.cfg
        self._startup_summary()
        state = self.initial_state()
        restored = self.checkpointer.restore(
            self._checkpoint_tree(state, state.params), self.data.iterator, resume=cfg.resume
        )
        start, meta = 0, {"warmstart_done": False}
        if restored is not None:
            tree, meta, start = restored
            state, self.base_key = tree["train"], tree["rng"]
            self.ref_params = tree.get("ref")
            self.writer.log(f"resumed from step {start} in {cfg.workdir}")
            changes = config_changes(self.checkpointer.restored_config, cfg.to_dict())
            if changes:
                self.writer.log(f"config changed since step {start} (old -> new): " + "; ".join(changes))
        # Lines of steps after the checkpoint are redone and logged again; a fresh run starts clean.
        self.writer.truncate_after(
            start if restored is not None else -1,
            keep_phases={"warmstart"} if meta.get("warmstart_done") else set(),
        )
        if cfg.warmstart.steps > 0 and not meta.get("warmstart_done"):
            state = self.warm_start(state)
        if cfg.algo.beta > 0 and self.ref_params is None:
            self.ref_params = jax.tree.map(jnp.copy, state.params)
        meta = {"warmstart_done": True}
        last: dict[str, Any] = {}
        if start >= cfg.steps:
            self.writer.log(
                f"already at step {start} of {cfg.steps}: nothing to do (raise --config.steps to train on)"
            )
            return last
        if start == 0:
            if cfg.eval.every:
                last = self.greedy_eval(state.params)
                self.writer.write(0, last)
            self._save(state, 0, meta, last)
        self.writer.log("compiling the sampler, scoring and update steps (the first step includes it)")
        for step in range(start + 1, cfg.steps + 1):
            state, row = self.rl_step(state, step)
            if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.steps):
                row.update(self.greedy_eval(state.params))
            self.writer.write(step, row)
            self._stop_if_diverged(step)
            last = row
            stopping = guard.should_stop(step)
            if stopping or step % cfg.checkpoint.every == 0 or step == cfg.steps:
                self._save(state, step, meta, row)
            if stopping:
                self.writer.log(f"stop requested: saved step {step}; rerun the same command to resume")
                break
        return last


def sampler_gap_warning(seq_gap: float, algo) -> str | None:
    """A warning when algo.old_logprobs=sampler and the sampler-vs-trainer sequence gap exceeds the clip
    width: the first, on-policy update would then clip sequences the policy never moved."""
    width = min(losses.clip_widths(algo.importance_sampling_level, algo.eps_low, algo.eps_high))
    if algo.old_logprobs != "sampler" or seq_gap <= width:
        return None
    return (
        f"warning: logprob_gap/seq_abs={seq_gap:.2e} between the sampler's and the trainer's log-probs "
        f"exceeds the clip width {width:g}, so algo.old_logprobs=sampler clips on-policy sequences: set "
        "algo.old_logprobs=trainer (or compute in float32)"
    )


def parameter_counts(params, experts_per_token: int) -> tuple[int, int]:
    """(total, active per token): an array with an "expert" logical axis counts k/E of itself as active."""
    total = active = 0
    for _, variable in nnx.to_flat_state(params):
        shape = variable.get_value().shape
        size = math.prod(shape)
        axes = variable.get_metadata().get("logical_axes") or ()
        total += size
        active += size
        if "expert" in axes:
            active -= size - size // shape[axes.index("expert")] * experts_per_token
    return total, active


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_changes(saved: dict | None, current: dict) -> list[str]:
    """'key: old -> new' for each config key whose value differs from the saved config (JSON-compared)."""
    if saved is None:
        return []
    old = _flatten(saved)
    new = _flatten(json.loads(json.dumps(current, default=str)))
    return [
        f"{k}: {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
