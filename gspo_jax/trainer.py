"""The GSPO RL loop: rollout -> reward -> group advantage -> minibatch updates -> sync -> log / checkpoint.

Owns the run and calls downward only: data (prompts), sampler (completions from the frozen old policy),
rewards (host Python), losses.group_advantages, the jitted scoring and update phases (update.py),
checkpoint and metrics. Every array is placed on the mesh built from `mesh.*`; a one-device mesh is
the same code path as a pod slice.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gspo_jax import checkpoint as ckpt
from gspo_jax import losses, metrics, rollout, sharding
from gspo_jax.data import PromptBatch, eval_batches, make_prompt_dataset, widen
from gspo_jax.evaluation import evaluate
from gspo_jax.optim import make_optimizer
from gspo_jax.plots import plot_metrics
from gspo_jax.policy import build_policy, init_train_state, total_updates, train_state_shardings
from gspo_jax.preemption import PreemptionGuard
from gspo_jax.rewards import RewardSet
from gspo_jax.sampler import Sampler
from gspo_jax.tokenizer import eos_token_ids, load_tokenizer
from gspo_jax.update import RolloutBatch, TrainState, UpdateSettings, make_score_fn, make_train_fn
from gspo_jax.warmstart import build_supervised_set, run_warmstart


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite updates); the last good checkpoint is intact."""


def _cast_params(params, dtype):
    return jax.tree.map(lambda x: x.astype(dtype), params)


class Trainer:
    """One GSPO run, from a validated config."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.mesh = sharding.make_mesh(cfg.mesh)
        self.batch_rows = sharding.batch_sharding(self.mesh, 2)
        self.batch_vec = sharding.batch_sharding(self.mesh, 1)
        self.tokenizer = load_tokenizer(cfg.model.hf_path or None)
        self.stop_ids = eos_token_ids(self.tokenizer, cfg.model.hf_path or None)
        self.pad_id = self.tokenizer.pad_token_id
        self.policy = build_policy(cfg, self.mesh)
        if len(self.tokenizer) > self.policy.config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is "
                f"{self.policy.config.vocab_size}: use the model's own tokenizer"
            )
        self.group = cfg.rollout.group_size
        self.data = make_prompt_dataset(
            cfg.data,
            self.tokenizer,
            prompts_per_step=cfg.rollout.prompts_per_step,
            seed=cfg.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        self.rewards = RewardSet.from_config(cfg.reward.fns, cfg.reward.weights or None)
        self.rewards.check_columns(self.data.columns)
        self.eval_set = eval_batches(
            cfg.data,
            self.tokenizer,
            batch_size=cfg.eval.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        self.optimizer = make_optimizer(cfg.optim, total_updates(cfg))
        self.settings = UpdateSettings.from_config(cfg, self.policy.config.router_aux_loss_coef)
        state_shardings = train_state_shardings(self.optimizer, self.policy.params)
        self.train_fn = make_train_fn(self.policy.graphdef, self.optimizer, self.settings, state_shardings)
        self.score_fn = make_score_fn(self.policy.graphdef, self.settings)
        self.rollout_dtype = jnp.dtype(cfg.model.rollout_dtype or cfg.model.param_dtype)
        self.cast_for_rollout = jax.jit(
            lambda p: _cast_params(p, self.rollout_dtype), out_shardings=state_shardings.params
        )
        self.sampler = Sampler(
            self.policy.graphdef,
            max_new_tokens=cfg.rollout.max_new_tokens,
            num_samples=self.group,
            temperature=cfg.rollout.temperature,
            top_k=cfg.rollout.top_k,
            top_p=cfg.rollout.top_p,
            stop_ids=self.stop_ids,
            pad_id=self.pad_id,
            cache_dtype=cfg.rollout.cache_dtype or None,
        )
        self.eval_sampler = Sampler(
            self.policy.graphdef,
            max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
            num_samples=1,
            temperature=0.0,
            stop_ids=self.stop_ids,
            pad_id=self.pad_id,
            cache_dtype=cfg.rollout.cache_dtype or None,
        )
        self.ref_params = None
        if cfg.algo.beta > 0:
            self.ref_params = jax.tree.map(jnp.copy, self.policy.params)
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
            async_save=cfg.checkpoint.async_save,
        )
        self.base_key = jax.jit(
            lambda: jax.random.key(cfg.seed), out_shardings=sharding.replicated(self.mesh)
        )()
        self.nonfinite_in_a_row = 0

    # ---- placement helpers ----

    def _rows(self, host: np.ndarray) -> jax.Array:
        return sharding.host_to_global(host, self.batch_rows if host.ndim == 2 else self.batch_vec)

    def _host(self, x: jax.Array) -> np.ndarray:
        return sharding.global_to_host(x, self.mesh)

    def _prompts(self, batch: PromptBatch) -> tuple[jax.Array, jax.Array]:
        """Global [N, P] prompt ids and mask; P is the widest host's bucket, so all hosts agree on it."""
        batch = widen(batch, sharding.max_over_hosts(batch.prompt_ids.shape[1]), self.pad_id)
        return self._rows(batch.prompt_ids), self._rows(batch.prompt_mask)

    # ---- phases ----

    def initial_state(self) -> TrainState:
        return init_train_state(self.optimizer, self.policy.params)

    def greedy_eval(self, params) -> dict[str, float]:
        rollout_params = self.cast_for_rollout(params)
        is_correct = self.data.task.is_correct if self.data.task is not None else None

        def generate(batch):
            out = self.eval_sampler(rollout_params, *self._prompts(batch), jax.random.key(0))
            return self._host(out.completion_ids), self._host(out.completion_mask)

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
        sft = build_supervised_set(pairs, self.tokenizer, self.stop_ids[0], self.pad_id)
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
        cfg = self.cfg
        t_start = time.perf_counter()
        batch = next(self.data)
        sample_key, train_key = jax.random.split(jax.random.fold_in(self.base_key, step))
        prompt_ids, prompt_mask = self._prompts(batch)
        out = self.sampler(self.cast_for_rollout(state.params), prompt_ids, prompt_mask, sample_key)
        ids, mask = self._host(out.completion_ids), self._host(out.completion_mask)
        t_rollout = time.perf_counter()

        scored = rollout.score_rollout(
            self.tokenizer, self.rewards, batch.prompts, batch.fields, self.group, ids, mask, self.stop_ids
        )
        # Rewards of this host's rows -> one global array (groups never straddle hosts: rows are prompt-major).
        advantages, adv_metrics = losses.group_advantages(
            self._rows(scored.rewards), self.group, scale=cfg.algo.advantage_scale
        )
        t_reward = time.perf_counter()

        longest = sharding.max_over_hosts(scored.lengths.max())  # every host trains the same global width
        width = rollout.completion_bucket(longest, cfg.rollout.max_new_tokens)
        completion_ids = out.completion_ids[:, :width]
        completion_mask = out.completion_mask[:, :width].astype(jnp.float32)
        tokens = jnp.concatenate([jnp.repeat(prompt_ids, self.group, axis=0), completion_ids], axis=1)
        valid = jnp.concatenate(
            [jnp.repeat(prompt_mask, self.group, axis=0), out.completion_mask[:, :width]], axis=1
        ).astype(bool)
        sampler_logp = out.logprobs[:, :width]
        if cfg.algo.old_logprobs == "trainer":
            old_logp = self.score_fn(state.params, tokens, valid, completion_mask)
        else:
            old_logp = sampler_logp
        ref_logp = (
            self.score_fn(self.ref_params, tokens, valid, completion_mask)
            if self.ref_params is not None
            else jnp.zeros_like(sampler_logp)
        )
        rollout_batch = RolloutBatch(
            tokens=tokens,
            valid=valid,
            completion_mask=completion_mask,
            advantages=advantages,
            old_logp=old_logp,
            sampler_logp=sampler_logp,
            ref_logp=ref_logp,
        )
        state, update_metrics = self.train_fn(state, rollout_batch, train_key)
        update_metrics = jax.device_get(update_metrics)
        t_end = time.perf_counter()

        generated = float(scored.lengths.sum())
        row = scored.metrics()
        row.update(
            {
                (k if k == "frac_reward_zero_std" or k.startswith("reward/") else f"rollout/{k}"): float(v)
                for k, v in jax.device_get(adv_metrics).items()
            }
        )
        row.update(summarize_updates(update_metrics))
        row.update(
            {
                "tokens_per_s": generated / (t_end - t_start),
                "rollout/tokens_per_s": generated / (t_rollout - t_start),
                "step_time_s": t_end - t_start,
                "time/rollout_s": t_rollout - t_start,
                "time/reward_s": t_reward - t_rollout,
                "time/update_s": t_end - t_reward,
                "train/completion_bucket": float(width),
            }
        )
        row.update(self.data.metrics())
        self._count_nonfinite(update_metrics, step)
        if cfg.log.samples_every and step % cfg.log.samples_every == 0:
            self.writer.write_samples(step, scored.samples(cfg.log.num_samples))
        return state, row

    def _count_nonfinite(self, update_metrics, step: int):
        skipped = np.asarray(update_metrics["update_skipped"]).reshape(-1)
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

    def _save(self, state: TrainState, step: int, meta: dict, row: dict | None = None, force: bool = False):
        self.checkpointer.save(
            step,
            {"train": state, "rng": self.base_key},
            self.data.iterator,
            self.cfg.to_dict(),
            meta,
            metrics=row,
            force=force,
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

    def _loop(self, guard) -> dict[str, Any]:
        cfg = self.cfg
        state = self.initial_state()
        restored = self.checkpointer.restore(
            {"train": state, "rng": self.base_key}, self.data.iterator, resume=cfg.resume
        )
        start, meta = 0, {"warmstart_done": False}
        if restored is not None:
            tree, meta, start = restored
            state, self.base_key = tree["train"], tree["rng"]
            self.writer.log(f"resumed from step {start} in {cfg.workdir}")
        # Lines of steps after the checkpoint are redone and logged again; a fresh run starts clean.
        self.writer.truncate_after(
            start if restored is not None else -1,
            keep_phases={"warmstart"} if meta.get("warmstart_done") else set(),
        )
        if cfg.warmstart.steps > 0 and not meta.get("warmstart_done"):
            state = self.warm_start(state)
        meta = {"warmstart_done": True}
        last: dict[str, Any] = {}
        if start == 0:
            if cfg.eval.every:
                last = self.greedy_eval(state.params)
                self.writer.write(0, last)
            self._save(state, 0, meta, last)
        for step in range(start + 1, cfg.steps + 1):
            state, row = self.rl_step(state, step)
            if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.steps):
                row.update(self.greedy_eval(state.params))
            self.writer.write(step, row)
            self._stop_if_diverged(step)
            last = row
            stopping = guard.should_stop(step)
            if stopping or step % cfg.checkpoint.every == 0 or step == cfg.steps:
                self._save(state, step, meta, row, force=stopping)
            if stopping:
                self.writer.log(f"stop requested: saved step {step}; rerun the same command to resume")
                break
        return last


def summarize_updates(m: dict[str, np.ndarray]) -> dict[str, Any]:
    """Means over all updates, plus per-minibatch-index series of the metrics that show off-policy drift."""
    row: dict[str, Any] = {}
    for key, value in m.items():
        value = np.asarray(value)  # [iterations, minibatches, ...]
        if key == "moe/expert_load":
            row.update(metrics.expert_load_metrics(value.mean(axis=(0, 1))))
        else:
            row[key] = float(value.mean())
    row["logprob_gap/token_abs"] = float(np.asarray(m["logprob_gap/token_abs"])[0, 0])
    for key in ("log_ratio_seq/abs_mean", "clip_frac/seq", "clip_frac/token"):
        if key in m:
            per_mb = np.asarray(m[key]).mean(axis=0)
            row.update({f"{key}/mb{i}": float(v) for i, v in enumerate(per_mb)})
    return row
