"""Mixture-of-Experts feed-forward (Qwen3-MoE / Qwen2-MoE): top-k router, the MoE block, the
load-balancing loss. The block hands its routed tokens to a dispatch strategy (models/dispatch.py,
models/tiled.py), or to explicit expert parallelism over the mesh (models/expert_parallel.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from gspo_jax import sharding
from gspo_jax.models.dispatch import DISPATCH_STRATEGIES, resolve_dispatch
from gspo_jax.models.expert_parallel import (
    EXPERT_IN_AXES,
    EXPERT_OUT_AXES,
    expert_parallel_dispatch,
    expert_parallel_layout,
)
from gspo_jax.models.layers import SwiGLU, param


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RouterStats:
    """Routing statistics over real (unmasked) tokens: one layer's, or stacked over the MoE layers
    with a leading [L] dimension on every field (what the model's forward returns).

    expert_counts: [E] top-k assignments per expert; prob_sum: [E] summed router probabilities;
    tokens: scalar count of real tokens; dropped: scalar count of assignments dropped by capacity;
    expert_ids: [B, T, k] int32, the experts each position was routed to (padding included), which
    routing replay feeds back and the routing-volatility diagnostic compares.
    """

    expert_counts: jax.Array
    prob_sum: jax.Array
    tokens: jax.Array
    dropped: jax.Array
    expert_ids: jax.Array


def _top_k_ids(probs_te, k: int):
    """[T, k] ids of the k largest entries per row, largest first, ties to the lower id (as top_k).

    k argmax passes rather than `jax.lax.top_k`: XLA's TopK custom call is not split over rows by
    GSPMD, which all-gathers every token's probabilities to every device to run it.
    """
    ids = []
    for _ in range(k):
        ids.append(jnp.argmax(probs_te, axis=-1))
        probs_te = jnp.where(jax.nn.one_hot(ids[-1], probs_te.shape[-1], dtype=bool), -jnp.inf, probs_te)
    return jnp.stack(ids, axis=-1).astype(jnp.int32)


def route(x_td, router_de, top_k: int, norm_topk_prob: bool, replay_ids_tk=None):
    """Router probabilities [T, E] (fp32 softmax over all experts), top-k ids [T, k] and weights [T, k].

    replay_ids_tk: [T, k] int32 expert choices to use instead of this router's top-k (routing replay);
    the weights are still the current probabilities at those ids, so the router keeps its gradient.
    """
    # Tokens (flattened batch rows) stay split like the batch, so top-k runs where its rows are, and
    # x's cotangent keeps x's layout (else it takes the FSDP-split router's and is resharded).
    x_td = sharding.constrain(x_td, ("batch", "embed"))
    logits = sharding.constrain(x_td @ router_de.astype(x_td.dtype), ("batch", None))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if replay_ids_tk is None:
        ids = _top_k_ids(jax.lax.stop_gradient(probs), top_k)
    else:
        ids = sharding.constrain(replay_ids_tk.astype(jnp.int32), ("batch", None))
    weights = jnp.einsum("te,tke->tk", probs, jax.nn.one_hot(ids, probs.shape[-1], dtype=probs.dtype))
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, ids, weights.astype(x_td.dtype)


class MoeBlock(nnx.Module):
    """Sparse MoE feed-forward (Qwen3-MoE), plus the sigmoid-gated shared expert of Qwen2-MoE."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        e, d, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        pdt = jnp.dtype(cfg.param_dtype)
        init = jax.nn.initializers.normal(cfg.initializer_range)
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.dtype = jnp.dtype(cfg.dtype)
        self.dispatch = cfg.moe_dispatch
        self.capacity_factor = cfg.capacity_factor
        self.expert_parallel = cfg.expert_parallel
        self.router = param(rngs, init, (d, e), pdt, ("embed", None))
        self.gate_proj = param(rngs, init, (e, d, i), pdt, EXPERT_IN_AXES)
        self.up_proj = param(rngs, init, (e, d, i), pdt, EXPERT_IN_AXES)
        self.down_proj = param(rngs, init, (e, i, d), pdt, EXPERT_OUT_AXES)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SwiGLU(
                d,
                cfg.shared_expert_intermediate_size,
                param_dtype=pdt,
                dtype=cfg.dtype,
                init_std=cfg.initializer_range,
                rngs=rngs,
            )
            self.shared_expert_gate = param(rngs, init, (d, 1), pdt, ("embed", None))

    def __call__(self, x_btd, valid_bt, replay_ids_btk=None):
        """Returns (y [B, T, D], RouterStats of this layer).

        replay_ids_btk: None, or [B, T, k] expert ids to route with instead of the router's top-k.
        """
        b, t, d = x_btd.shape
        x_td = x_btd.reshape(b * t, d)
        valid_t = valid_bt.reshape(b * t)
        replay_ids_tk = None if replay_ids_btk is None else replay_ids_btk.reshape(b * t, -1)
        probs_te, ids_tk, weights_tk = route(
            x_td, self.router.value, self.top_k, self.norm_topk_prob, replay_ids_tk
        )
        # Weights go in as stored: each strategy casts them to x's dtype where it reads them.
        experts = (self.gate_proj.value, self.up_proj.value, self.down_proj.value)
        layout = None
        if self.expert_parallel == "auto":
            layout = expert_parallel_layout(b, experts[0].shape, experts[2].shape)
        if layout is not None:
            y_btd, dropped = expert_parallel_dispatch(
                x_btd,
                ids_tk.reshape(b, t, -1),
                weights_tk.reshape(b, t, -1),
                valid_bt,
                *experts,
                layout=layout,
                capacity_factor=self.capacity_factor,
                inner=resolve_dispatch(self.dispatch),
            )
            y_td = y_btd.reshape(b * t, d)
        else:
            y_td, dropped = DISPATCH_STRATEGIES[resolve_dispatch(self.dispatch)](
                x_td, ids_tk, weights_tk, valid_t, *experts, capacity_factor=self.capacity_factor
            )
        if hasattr(self, "shared_expert"):
            gate = jax.nn.sigmoid(x_td @ self.shared_expert_gate.value.astype(self.dtype))
            y_td = y_td + gate * self.shared_expert(x_td)
        mask_t = valid_t.astype(jnp.float32)
        num_experts = probs_te.shape[-1]
        counts = jnp.einsum("tke,t->e", jax.nn.one_hot(ids_tk, num_experts, dtype=jnp.float32), mask_t)
        stats = RouterStats(
            expert_counts=counts,
            prob_sum=jnp.einsum("te,t->e", probs_te, mask_t),
            tokens=jnp.sum(mask_t),
            dropped=dropped,
            expert_ids=ids_tk.reshape(b, t, -1),
        )
        return y_td.reshape(b, t, d), stats


def load_balancing_loss(stats: RouterStats | None):
    """HF's auxiliary loss: E * sum_e f_e * P_e over all MoE layers' real tokens.

    stats: RouterStats stacked over the MoE layers (expert_counts [L, E], ...), None for a dense model.
    f_e: share of top-k assignments to expert e (assignment counts / (layers * tokens));
    P_e: mean router probability of e over the same rows.
    """
    if stats is None:
        return jnp.zeros((), jnp.float32)
    rows = jnp.maximum(jnp.sum(stats.tokens), 1.0)
    f = jnp.sum(stats.expert_counts, axis=0) / rows
    p = jnp.sum(stats.prob_sum, axis=0) / rows
    return f.shape[-1] * jnp.sum(f * p)
