"""One GSPO step as a function: prompts -> sample -> rewards -> group advantages -> minibatch updates.

`RLStep(state, batch, ref_params, key)` returns the new train state and the step's metrics. It reads
no files, writes none and keeps no counters (only the packed row counts it has compiled for, which
change shapes, never results): the run loop (trainer.py) feeds it prompt batches and owns resume,
evaluation cadence, checkpoints and logging. Shape letters: BUILD_NOTES.md, "Shapes".
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gspo_jax import diagnostics, losses, metrics, packing, rollout, sharding
from gspo_jax.data import PromptBatch, widen
from gspo_jax.optim import make_optimizer
from gspo_jax.policy import Policy, total_updates, train_state_shardings
from gspo_jax.rewards import RewardSet
from gspo_jax.sampler import Sampler
from gspo_jax.update import RolloutBatch, TrainState, UpdateSettings, make_score_fn, make_train_fn

OLD_LOGPROB_SOURCES = ("trainer", "sampler")


def config_errors(cfg) -> list[str]:
    """Problems with the keys the step itself reads (algo.minibatches, iterations, old_logprobs, ...)."""
    a, rows = cfg.algo, cfg.rollout.prompts_per_step * cfg.rollout.group_size
    errors = []
    if a.old_logprobs not in OLD_LOGPROB_SOURCES:
        errors.append(
            f"--config.algo.old_logprobs: {a.old_logprobs!r}: use trainer (one extra forward pass) "
            "or sampler (the sampler's log-probs)"
        )
    if a.minibatches < 1 or a.iterations < 1 or a.grad_accumulation < 1:
        errors.append(
            "--config.algo.minibatches: algo.minibatches, algo.iterations and algo.grad_accumulation "
            "must be >= 1"
        )
    elif rows % a.minibatches:
        errors.append(
            f"--config.algo.minibatches: {a.minibatches} does not divide the {rows} completions of a step "
            f"(prompts_per_step x group_size); pick a divisor of {rows}"
        )
    elif rows % (a.minibatches * a.grad_accumulation):
        per_update = rows // a.minibatches
        errors.append(
            f"--config.algo.grad_accumulation: {a.grad_accumulation} does not divide the {per_update} "
            f"completions of a minibatch update ({rows} / algo.minibatches); pick a divisor of {per_update}"
        )
    if a.max_nonfinite_updates < 1:
        errors.append("--config.algo.max_nonfinite_updates: must be >= 1")
    for key, value in (
        ("algo.routing_replay", a.routing_replay),
        ("algo.pack_sequences", a.pack_sequences),
        ("log.routing_volatility", cfg.log.routing_volatility),
        ("log.ratio_by_length", cfg.log.ratio_by_length),
    ):
        if not isinstance(value, bool):
            errors.append(f"--config.{key}: {value!r}: use True or False")
    return errors


def host_rng(key: jax.Array) -> np.random.Generator:
    """A numpy generator seeded by a jax PRNG key: host-side randomness that a resumed run repeats."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(jax.device_get(key)).reshape(-1))


def _cast_params(params, dtype):
    return jax.tree.map(lambda x: x.astype(dtype), params)


@dataclasses.dataclass
class StepResult:
    """metrics: the step's metrics row; scored: its rollout on the host (for samples);
    update_skipped: [iterations * minibatches] bool, updates dropped for a non-finite loss or gradient."""

    metrics: dict[str, Any]
    scored: rollout.ScoredRollout
    update_skipped: np.ndarray


class RLStep:
    """The jitted phases of a step (sampler, scoring, updates) and the host work between them."""

    def __init__(self, cfg, policy: Policy, mesh, tokenizer, rewards: RewardSet, stop_ids):
        self.cfg = cfg
        self.mesh = mesh
        self.tokenizer = tokenizer
        self.rewards = rewards
        self.stop_ids = stop_ids
        self.group = cfg.rollout.group_size
        self._packed_rows: dict[tuple, int] = {}  # (scoring?, completion width) -> packed rows compiled for
        self.settings = UpdateSettings.from_config(cfg, policy.config.router_aux_loss_coef)
        self.optimizer = make_optimizer(cfg.optim, total_updates(cfg))
        # Jitted phases trace under the mesh context: model code reads it for expert parallelism and
        # activation sharding constraints.
        on_mesh = functools.partial(sharding.on_mesh, mesh=mesh, rules=cfg.mesh.rules.to_dict())
        state_shardings = train_state_shardings(self.optimizer, policy.params)
        self.train_fn = on_mesh(
            make_train_fn(policy.graphdef, self.optimizer, self.settings, state_shardings)
        )
        self.score_fn = on_mesh(make_score_fn(policy.graphdef, self.settings))
        if self.settings.routing_replay:
            if not any(policy.config.is_moe_layer(i) for i in range(policy.config.num_hidden_layers)):
                raise ValueError("algo.routing_replay needs a MoE policy; set it to False for a dense model")
            # The old-policy forward that also returns its expert ids (for the replayed update).
            self.score_with_ids_fn = on_mesh(
                make_score_fn(policy.graphdef, self.settings, with_expert_ids=True)
            )
        rollout_dtype = jnp.dtype(cfg.model.rollout_dtype or cfg.model.param_dtype)
        self.cast_for_rollout = jax.jit(
            lambda p: _cast_params(p, rollout_dtype), out_shardings=state_shardings.params
        )
        self.sampler = on_mesh(
            Sampler(
                policy.graphdef,
                max_new_tokens=cfg.rollout.max_new_tokens,
                num_samples=self.group,
                temperature=cfg.rollout.temperature,
                top_k=cfg.rollout.top_k,
                top_p=cfg.rollout.top_p,
                stop_ids=stop_ids,
                pad_id=tokenizer.pad_token_id,
                cache_dtype=cfg.rollout.cache_dtype or None,
                compact_rows=rollout.use_row_compaction(
                    cfg.rollout.compact_rows, mesh.size, jax.default_backend()
                ),
            )
        )

    def _packing(self, prompt_mask_np, completion_lens, width: int, key=None) -> packing.PackedRows | None:
        """A sequence-packing plan for this host's rows, placed on the mesh, or None when
        algo.pack_sequences is off or packing would remove too little padding (packing.saves_rows).
        With `key`: the update's (passes of shuffled micro-batches, settings.chunks per pass); without:
        scoring's (one pass, micro-batch-sized chunks in row order). Every process packs its own rows
        with one shared row count."""
        if not self.cfg.algo.pack_sequences:
            return None
        # Row counts only grow per (plan, completion width): a step whose packing would fit fewer
        # rows than an earlier one reuses that one's compiled program instead of compiling another.
        seen = (key is None, width)
        plan = packing.plan_packing(
            np.repeat(np.asarray(prompt_mask_np).sum(axis=1), self.group),
            np.minimum(completion_lens, width),
            prompt_width=prompt_mask_np.shape[1],
            completion_width=width,
            shards=sharding.batch_divisor(self.mesh) // jax.process_count(),
            minibatches=self.settings.chunks,
            passes=1 if key is None else self.settings.iterations,
            rng=None if key is None else host_rng(key),
            min_rows=self._packed_rows.get(seen, 1),
            sync_rows=sharding.max_over_hosts,
        )
        if not packing.saves_rows(plan):
            return None
        self._packed_rows[seen] = plan.rows
        shard_dim = NamedSharding(self.mesh, PartitionSpec(None, None, sharding.BATCH_AXES))
        return jax.tree.map(lambda x: sharding.host_to_global(x, shard_dim), plan)

    def __call__(
        self, state: TrainState, batch: PromptBatch, ref_params, key: jax.Array
    ) -> tuple[TrainState, StepResult]:
        """One step on this host's prompt rows; `ref_params` is the KL reference (None when beta == 0)."""
        cfg = self.cfg
        t_start = time.perf_counter()
        sample_key, train_key = jax.random.split(key)
        # P is the widest host's bucket, so every host builds the same global shape.
        batch = widen(batch, sharding.max_over_hosts(batch.prompt_ids.shape[1]), self.tokenizer.pad_token_id)
        prompt_ids = sharding.place_batch(batch.prompt_ids, self.mesh)  # [N, P]
        prompt_mask = sharding.place_batch(batch.prompt_mask, self.mesh)
        out = self.sampler(self.cast_for_rollout(state.params), prompt_ids, prompt_mask, sample_key)
        ids_bc = sharding.global_to_host(out.completion_ids, self.mesh)
        mask_bc = sharding.global_to_host(out.completion_mask, self.mesh)
        t_rollout = time.perf_counter()

        scored = rollout.score_rollout(
            self.tokenizer, self.rewards, batch, self.group, ids_bc, mask_bc, self.stop_ids
        )
        # Rewards of this host's rows -> one global array (groups never straddle hosts: rows are prompt-major).
        advantages_b, adv_metrics = losses.group_advantages(
            sharding.place_batch(scored.rewards, self.mesh), self.group, scale=cfg.algo.advantage_scale
        )
        t_reward = time.perf_counter()

        longest = sharding.max_over_hosts(scored.lengths.max())  # every host trains the same global width
        width = rollout.completion_bucket(longest, cfg.rollout.max_new_tokens)
        layout = rollout.training_layout(prompt_ids, prompt_mask, out, self.group, width)
        expert_ids = None
        score_old = cfg.algo.old_logprobs == "trainer" and not self.settings.routing_replay
        score_plan = None
        if score_old or ref_params is not None:
            score_plan = self._packing(batch.prompt_mask, scored.lengths, width)
        if self.settings.routing_replay:
            # The policy before the first update routes the batch once: its log-probs are pi_old's
            # with old_logprobs=trainer, and its expert ids are what the updates replay.
            old_logp_bc, expert_ids = self.score_with_ids_fn(
                state.params, layout.tokens_bt, layout.valid_bt, layout.completion_mask_bc
            )
        elif score_old:
            old_logp_bc = self.score_fn(
                state.params, layout.tokens_bt, layout.valid_bt, layout.completion_mask_bc, score_plan
            )
        if cfg.algo.old_logprobs == "sampler":
            old_logp_bc = layout.sampler_logp_bc
        ref_logp_bc = (
            self.score_fn(
                ref_params, layout.tokens_bt, layout.valid_bt, layout.completion_mask_bc, score_plan
            )
            if ref_params is not None
            else jnp.zeros_like(layout.sampler_logp_bc)
        )
        rollout_batch = RolloutBatch(
            packing=self._packing(batch.prompt_mask, scored.lengths, width, key=train_key),
            tokens=layout.tokens_bt,
            valid=layout.valid_bt,
            completion_mask=layout.completion_mask_bc,
            advantages=advantages_b,
            old_logp=old_logp_bc,
            sampler_logp=layout.sampler_logp_bc,
            ref_logp=ref_logp_bc,
            expert_ids=expert_ids,
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
        row.update(summarize_updates(update_metrics, self.settings.ratio_length_edges))
        row.update(
            {
                "tokens_per_s": generated / (t_end - t_start),
                "rollout/tokens_per_s": generated / (t_rollout - t_start),
                "step_time_s": t_end - t_start,
                "time/rollout_s": t_rollout - t_start,
                "time/reward_s": t_reward - t_rollout,
                "time/update_s": t_end - t_reward,
                "train/completion_bucket": float(width),
                # packed rows per minibatch and shard / rollout rows there (1: the update ran unpacked)
                "train/packed_row_frac": (
                    1.0
                    if rollout_batch.packing is None
                    else rollout_batch.packing.rows / rollout_batch.packing.sequences.shape[-1]
                ),
            }
        )
        skipped = np.asarray(update_metrics["update_skipped"]).reshape(-1).astype(bool)
        return state, StepResult(row, scored, skipped)


def summarize_updates(m: dict[str, np.ndarray], length_edges: tuple[int, ...] = ()) -> dict[str, Any]:
    """Means over all updates, plus per-minibatch-index series of the metrics that show off-policy drift;
    ratio-by-length bins (upper edges `length_edges`) pooled over the updates."""
    row: dict[str, Any] = diagnostics.combine_length_bins(m, length_edges)
    for key, value in m.items():
        value = np.asarray(value)  # [iterations, minibatches, ...]
        if key.startswith("ratio_len/"):
            continue
        if key == "moe/expert_load":
            row.update(metrics.expert_load_metrics(value.mean(axis=(0, 1))))
        else:
            row[key] = float(value.mean())
    # The first update's gap: the policy still equals the sampling policy, so only numerics differ.
    for key in ("logprob_gap/token_abs", "logprob_gap/seq_abs"):
        row[key] = float(np.asarray(m[key])[0, 0])
    for key in ("log_ratio_seq/abs_mean", "clip_frac/seq", "clip_frac/token"):
        if key in m:
            per_mb = np.asarray(m[key]).mean(axis=0)
            row.update({f"{key}/mb{i}": float(v) for i, v in enumerate(per_mb)})
    return row
