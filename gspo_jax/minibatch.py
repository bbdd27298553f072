"""One minibatch update's gradient and metrics (update.py's train step calls these per optimizer update).

A minibatch arrives as K micro-batches: RolloutBatch leaves [K, b, ...] and, when packed, its
packing.PackedRows leaves [K, S, ...] (K = UpdateSettings.accumulation; K = 1 is the whole minibatch).
`gradients` sums the micro-batches' gradients, each policy loss weighted by the micro-batch's share of
the minibatch's aggregation denominator (`micro_weights`), so the sum is the whole minibatch's
gradient; the load-balancing loss is the micro-batches' mean (E * sum_e f_e P_e is not linear in the
tokens). `metrics` and `volatility` are computed once over the whole minibatch from what the
micro-batches' forwards return.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from gspo_jax import diagnostics, losses, packing
from gspo_jax.logprobs import completion_logprobs, packed_completion_logprobs
from gspo_jax.models.moe import load_balancing_loss

if TYPE_CHECKING:
    from gspo_jax.update import RolloutBatch, UpdateSettings


def replay_layout(mb: RolloutBatch, rows):
    """mb's routing-replay ids as the forward takes them: [L_moe, b, T - 1, k], or packed
    ([L_moe, S * R, W, k]) when `rows` is the minibatch's packing."""
    if rows is None:
        return jnp.swapaxes(mb.expert_ids, 0, 1)
    return packing.packed_replay_ids(mb.expert_ids, rows.row_seq, rows.row_t)


def routed_valid(mb: RolloutBatch, rows):
    """The real tokens of the training forward's positions: [b, T - 1], or [S * R, W] packed."""
    return mb.valid[:, :-1] if rows is None else packing.valid_slots(rows)


def routed_ids(model, mb: RolloutBatch, rows):
    """The experts `model` routes the training forward's inputs to: [L_moe, b, T - 1, k] (or the
    packed [L_moe, S * R, W, k])."""
    if rows is None:
        return model.forward(mb.tokens[:, :-1], valid_bt=mb.valid[:, :-1]).router_stats.expert_ids
    ids, inputs = packing.forward_inputs(mb.tokens, rows)
    return model.forward(ids, **inputs).router_stats.expert_ids


def micro_weights(completion_mask_kbc, aggregation) -> jax.Array:
    """[K] each micro-batch's share of its minibatch's aggregation denominator (0 for all when the
    minibatch has no completion token): the weights that make the summed micro-batch gradients the
    minibatch's gradient."""
    counts = jax.vmap(lambda m: losses.aggregation_denominator(aggregation, m))(completion_mask_kbc)
    return counts / jnp.maximum(jnp.sum(counts), 1.0)


def _per_micro(fn, xs, micro: int):
    """fn over the leading [K] micro-batch dim of xs, stacked ([K, ...] outputs); K = 1 runs no loop."""
    if micro == 1:
        return jax.tree.map(lambda x: x[None], fn(jax.tree.map(lambda x: x[0], xs)))
    return jax.lax.map(fn, xs)


def _rows_of_micro(x):
    """[K, b, ...] per-micro-batch rows -> the minibatch's [b * K, ...], row-major in b: b is split over
    the batch shards, and merged this way it stays split (K-major would gather it on every device)."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _layers_of_micro(x):
    """[K, L, b, ...] per-micro-batch, layer-major (expert ids) -> [L, b * K, ...]."""
    return jax.vmap(_rows_of_micro, in_axes=1)(x)


def _policy_loss(settings: UpdateSettings, logp, mb: RolloutBatch):
    return losses.policy_loss(
        logp,
        mb.old_logp,
        mb.advantages,
        mb.completion_mask,
        level=settings.level,
        eps_low=settings.eps_low,
        eps_high=settings.eps_high,
        aggregation=settings.aggregation,
        ref_logp=mb.ref_logp if settings.beta > 0 else None,
        beta=settings.beta,
    )


def training_forward(model, settings: UpdateSettings, mb: RolloutBatch, rows: packing.PackedRows | None):
    """One micro-batch's forward: (logp [b, C], entropy [b, C], router stats or None). rows: its packed
    layout ([S, ...] leaves) or None (mb's rows as they are)."""
    replay_ids = None
    if settings.routing_replay:
        if mb.expert_ids is None:
            raise ValueError("routing_replay needs the old policy's expert ids in RolloutBatch.expert_ids")
        replay_ids = replay_layout(mb, rows)
    kwargs = {
        "temperature": settings.temperature,
        "chunk": settings.logprob_chunk,
        "with_entropy": True,
        "replay_expert_ids": replay_ids,
    }
    if rows is None:
        return completion_logprobs(model, mb.tokens, mb.valid, mb.completion_len, **kwargs)
    return packed_completion_logprobs(model, mb.tokens, rows, mb.completion_len, **kwargs)


def _micro_loss(params, mb: RolloutBatch, rows, weight, *, graphdef, settings: UpdateSettings):
    """weight x the micro-batch's policy loss + its load-balancing loss / K, and what the minibatch's
    metrics need from its forward."""
    logp, entropy, stats = training_forward(nnx.merge(graphdef, params), settings, mb, rows)
    policy, _ = _policy_loss(settings, logp, mb)
    aux = load_balancing_loss(stats)
    out = {"logp": logp, "entropy": entropy, "aux": aux}
    if stats is not None:
        out |= {"counts": stats.expert_counts, "dropped": stats.dropped, "routed_ids": stats.expert_ids}
    loss = weight * policy + settings.aux_loss_coef * aux / settings.accumulation
    return loss, jax.lax.stop_gradient(out)


def gradients(
    graphdef, settings: UpdateSettings, params, micro_mb: RolloutBatch, micro_rows, param_shardings=None
):
    """(gradient, loss, forward outputs with leading [K]) of one minibatch given as K micro-batches.
    param_shardings lays the fp32 accumulator out like the parameters instead of leaving it to GSPMD."""
    grad_fn = jax.value_and_grad(
        lambda *a: _micro_loss(*a, graphdef=graphdef, settings=settings), has_aux=True
    )
    if settings.accumulation == 1:
        # the K = 1 loss is the minibatch's own: no weighting (a batch without tokens has loss 0)
        first = jax.tree.map(lambda x: x[0], (micro_mb, micro_rows))
        (loss, out), grads = grad_fn(params, *first, 1.0)
        return grads, loss, jax.tree.map(lambda x: x[None], out)

    def one(summed, xs):
        (loss, out), grads = grad_fn(params, *xs)
        return jax.tree.map(lambda s, g: s + g.astype(s.dtype), summed, grads), (loss, out)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    if param_shardings is not None:
        zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
    weights = micro_weights(micro_mb.completion_mask, settings.aggregation)
    summed, (loss_k, out) = jax.lax.scan(one, zeros, (micro_mb, micro_rows, weights))
    return jax.tree.map(lambda g, p: g.astype(p.dtype), summed, params), jnp.sum(loss_k), out


def metrics(settings: UpdateSettings, micro_mb: RolloutBatch, micro_rows, out) -> dict:
    """The update's metrics over the whole minibatch, from its micro-batches' forward outputs."""
    mb = jax.tree.map(_rows_of_micro, micro_mb)
    logp, entropy, mask = _rows_of_micro(out["logp"]), _rows_of_micro(out["entropy"]), mb.completion_mask
    found = dict(_policy_loss(settings, logp, mb)[1])
    found["moe/aux_loss"] = jnp.mean(out["aux"])
    found["entropy"] = losses.token_mean(entropy, mask)
    found |= losses.logprob_gap_metrics(logp, mb.sampler_logp, mask)
    if settings.ratio_length_edges:
        found |= diagnostics.ratio_by_length(logp, mb.old_logp, mask, settings.ratio_length_edges)
    if "counts" in out:
        counts = jnp.sum(out["counts"], axis=0)  # [MoE layers, E]
        found["moe/expert_load"] = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
        found["moe/dropped_frac"] = jnp.sum(out["dropped"]) / jnp.maximum(jnp.sum(counts), 1.0)
        if settings.routing_replay:
            # What the replayed forward routed with against the old policy's choices: 0 unless the
            # replay failed to reach a layer.
            found["routing/replay_volatility"] = jnp.mean(
                diagnostics.routing_volatility(
                    _layers_of_micro(jax.vmap(replay_layout)(micro_mb, micro_rows)),
                    _layers_of_micro(out["routed_ids"]),
                    _rows_of_micro(jax.vmap(routed_valid)(micro_mb, micro_rows)),
                )
            )
    return found


def volatility(
    graphdef, settings: UpdateSettings, params_before, params_after, trained_ids, micro_mb, micro_rows
) -> dict:
    """Routing volatility of one update over the minibatch's tokens. The training forward's own routing
    (trained_ids [K, L_moe, ...]) is the "before" one unless it was replayed; one more forward per
    micro-batch (two with replay) without grads."""

    def ids_of(params):
        model = nnx.merge(graphdef, params)
        return _per_micro(lambda xs: routed_ids(model, *xs), (micro_mb, micro_rows), settings.accumulation)

    before = ids_of(params_before) if settings.routing_replay else trained_ids
    valid = jax.vmap(routed_valid)(micro_mb, micro_rows)
    return diagnostics.volatility_metrics(
        _layers_of_micro(before), _layers_of_micro(ids_of(params_after)), _rows_of_micro(valid)
    )
