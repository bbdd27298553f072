"""Mixture-of-Experts feed-forward: top-k router, interchangeable dispatch strategies, load-balancing loss.

All strategies compute `y_t = sum_j w_tj * expert_{e_tj}(x_t)` over a token's k chosen experts and
agree exactly when nothing is dropped:
  dense     every expert on every token, weighted by the router (the exact reference; small models);
  capacity  assignments scattered into per-expert buffers of fixed capacity, one batched einsum per
            projection (fast on CPU); dropless when capacity_factor <= 0;
  ragged    assignments sorted by expert and multiplied with `jax.lax.ragged_dot` (dropless; GPU/TPU);
  tiled     a loop over the chosen experts only, each one's weights sliced once and its assignments
            (sorted by expert) run in row tiles, so an expert no token chose is never read (dropless;
            the CPU decode path, where reading weights dominates);
  auto      ragged off CPU; on CPU tiled up to TILED_MAX_TOKENS tokens (decode, prefill), else capacity.
An expert function maps (tokens routed to local experts, local expert weights) to outputs, so expert
parallelism can wrap the same functions in a shard_map with all-to-all communication.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from gspo_jax.models.layers import SwiGLU, param


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RouterStats:
    """Routing statistics over real (unmasked) tokens: one layer's, or stacked over the MoE layers
    with a leading [L] dimension on every field (what the model's forward returns).

    expert_counts: [E] top-k assignments per expert; prob_sum: [E] summed router probabilities;
    tokens: scalar count of real tokens; dropped: scalar count of assignments dropped by capacity.
    """

    expert_counts: jax.Array
    prob_sum: jax.Array
    tokens: jax.Array
    dropped: jax.Array


def route(x_td, router_de, top_k: int, norm_topk_prob: bool):
    """Router probabilities [T, E] (fp32 softmax over all experts), top-k ids [T, k] and weights [T, k]."""
    logits = x_td @ router_de.astype(x_td.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, ids, weights.astype(x_td.dtype)


def _swiglu_experts(x_ecd, gate_edi, up_edi, down_eid):
    """Batched per-expert SwiGLU on padded buffers [E, C, D] -> [E, C, D]."""
    h = jax.nn.silu(jnp.einsum("ecd,edi->eci", x_ecd, gate_edi)) * jnp.einsum("ecd,edi->eci", x_ecd, up_edi)
    return jnp.einsum("eci,eid->ecd", h, down_eid)


def _cast(x_td, *weights):
    return [w.astype(x_td.dtype) for w in weights]


def dense_dispatch(x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid, *, capacity_factor):
    """Every expert on every token; returns (y [T, D], dropped=0)."""
    del valid_t, capacity_factor
    gate_edi, up_edi, down_eid = _cast(x_td, gate_edi, up_edi, down_eid)
    num_experts = gate_edi.shape[0]
    combine_te = jnp.sum(
        jax.nn.one_hot(ids_tk, num_experts, dtype=x_td.dtype) * weights_tk[..., None], axis=1
    )
    y_etd = _swiglu_experts(jnp.broadcast_to(x_td, (num_experts, *x_td.shape)), gate_edi, up_edi, down_eid)
    return jnp.einsum("etd,te->td", y_etd, combine_te), jnp.zeros((), jnp.float32)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: all tokens when dropless (a token picks an expert at most once)."""
    if capacity_factor <= 0:
        return num_tokens
    return min(num_tokens, max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def capacity_dispatch(x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid, *, capacity_factor):
    """Per-expert buffers of fixed capacity; first choices claim slots before second choices.

    Masked (padding) tokens take no slots. Returns (y [T, D], number of dropped real assignments).
    """
    t, k = ids_tk.shape
    num_experts = gate_edi.shape[0]
    gate_edi, up_edi, down_eid = _cast(x_td, gate_edi, up_edi, down_eid)
    capacity = expert_capacity(t, k, num_experts, capacity_factor)
    ids_a = ids_tk.T.reshape(-1)  # assignment a = j * T + t: choice-major order gives top-1 priority
    valid_a = jnp.tile(valid_t, k)
    onehot_ae = jax.nn.one_hot(ids_a, num_experts, dtype=jnp.int32) * valid_a[:, None]
    slot_in_expert_a = jnp.sum((jnp.cumsum(onehot_ae, axis=0) - 1) * onehot_ae, axis=1)
    kept_a = valid_a & (slot_in_expert_a < capacity)
    slot_a = jnp.where(kept_a, ids_a * capacity + slot_in_expert_a, num_experts * capacity)
    x_a = jnp.tile(x_td, (k, 1))
    buffers = jnp.zeros((num_experts * capacity, x_td.shape[1]), x_td.dtype).at[slot_a].set(x_a, mode="drop")
    y_buf = _swiglu_experts(buffers.reshape(num_experts, capacity, -1), gate_edi, up_edi, down_eid)
    y_a = y_buf.reshape(num_experts * capacity, -1).at[slot_a].get(mode="fill", fill_value=0)
    y_ktd = y_a.reshape(k, t, -1)
    y = jnp.einsum("ktd,tk->td", y_ktd, weights_tk)
    dropped = jnp.sum(valid_a & ~kept_a).astype(jnp.float32)
    return y, dropped


def ragged_dispatch(x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid, *, capacity_factor):
    """Assignments sorted by expert, grouped GEMMs with `jax.lax.ragged_dot`; dropless."""
    del valid_t, capacity_factor
    t, k = ids_tk.shape
    num_experts = gate_edi.shape[0]
    gate_edi, up_edi, down_eid = _cast(x_td, gate_edi, up_edi, down_eid)
    ids_a = ids_tk.reshape(-1)  # a = t * k + j
    order = jnp.argsort(ids_a, stable=True)
    x_sorted = x_td[order // k]
    group_sizes = jnp.bincount(ids_a, length=num_experts).astype(jnp.int32)
    gate = jax.lax.ragged_dot(x_sorted, gate_edi, group_sizes)
    up = jax.lax.ragged_dot(x_sorted, up_edi, group_sizes)
    y_sorted = jax.lax.ragged_dot(jax.nn.silu(gate) * up, down_eid, group_sizes)
    y_a = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)
    y = jnp.einsum("tkd,tk->td", y_a.reshape(t, k, -1), weights_tk)
    return y, jnp.zeros((), jnp.float32)


# "auto" on CPU uses tiled for calls of up to this many tokens: measured 3-5x faster than dropless
# capacity from 256 to 8192 tokens (decode steps are faster still); larger calls are untested.
TILED_MAX_TOKENS = 1 << 16


def tile_rows(num_assignments: int, num_experts: int) -> int:
    """Rows per tile: the power of two at or above the mean assignments per expert, in [4, 256]."""
    mean = max(1, -(-num_assignments // num_experts))
    return min(256, max(4, 1 << (mean - 1).bit_length()))


def expert_weight(w_e, expert, dtype):
    """w_e[expert] in `dtype`, reading only that expert's slice.

    XLA:CPU widens a bfloat16 array to float32 before slicing it, which reads and converts every
    expert; slicing a uint16 view and widening by a 16-bit shift reads only the slice and is exact
    (a bfloat16 is the top half of a float32).
    """
    if w_e.dtype == jnp.bfloat16 and jnp.dtype(dtype) == jnp.float32 and jax.default_backend() == "cpu":
        bits = jax.lax.bitcast_convert_type(w_e, jnp.uint16)[expert].astype(jnp.uint32) << 16
        return jax.lax.bitcast_convert_type(bits, jnp.float32)
    return w_e[expert].astype(dtype)


def _tiled_forward(x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid, layer=None):
    """layer: None, or the index into stacked [L, E, ...] weights (forward only)."""
    t, k = ids_tk.shape
    num_experts = gate_edi.shape[-3]
    tile = tile_rows(t * k, num_experts)
    valid_a = jnp.repeat(valid_t, k)  # a = t * k + j
    ids_a = jnp.where(valid_a, ids_tk.reshape(-1), num_experts)  # padding sorts after every expert
    order_a = jnp.argsort(ids_a, stable=True)
    sizes_e = jnp.bincount(ids_a, length=num_experts + 1)[:num_experts]
    starts_e = jnp.cumsum(sizes_e) - sizes_e
    chosen = jnp.argsort(sizes_e == 0, stable=True)  # experts with assignments first
    # Sorted rows, padded by one tile so a tile's slice never runs off the end (it would be clamped).
    pad = lambda v: jnp.concatenate([v, jnp.zeros((tile, *v.shape[1:]), v.dtype)])
    token_s = pad(order_a // k)
    x_s = pad(x_td[order_a // k])
    weight_s = pad(weights_tk.reshape(-1)[order_a].astype(x_td.dtype))

    def one_expert(i, y_td):
        expert = chosen[i]
        index = expert if layer is None else (layer, expert)
        gate, up, down = (expert_weight(w, index, x_td.dtype) for w in (gate_edi, up_edi, down_eid))

        def one_tile(j, y_td):
            start = starts_e[expert] + j * tile
            rows = jnp.arange(tile) < sizes_e[expert] - j * tile
            x = jax.lax.dynamic_slice_in_dim(x_s, start, tile)
            y = (jax.nn.silu(x @ gate) * (x @ up)) @ down
            y = jnp.where(rows[:, None], y * jax.lax.dynamic_slice_in_dim(weight_s, start, tile)[:, None], 0)
            return y_td.at[jax.lax.dynamic_slice_in_dim(token_s, start, tile)].add(y)

        return jax.lax.fori_loop(0, -(-sizes_e[expert] // tile), one_tile, y_td)

    return jax.lax.fori_loop(0, jnp.sum(sizes_e > 0), one_expert, jnp.zeros_like(x_td))


@jax.custom_vjp
def _tiled_moe(x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid):
    return _tiled_forward(x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid)


def _tiled_moe_fwd(x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid):
    """Under differentiation the same function runs as dropless capacity, which keeps what its
    backward pass needs (cheaper than the tiled forward plus a recomputation)."""

    def same_function(x_td, weights_tk, gate_edi, up_edi, down_eid):
        return capacity_dispatch(
            x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid, capacity_factor=0.0
        )[0]

    return jax.vjp(same_function, x_td, weights_tk, gate_edi, up_edi, down_eid)


def _tiled_moe_bwd(capacity_vjp, dy_td):
    dx, dweights, dgate, dup, ddown = capacity_vjp(dy_td)
    return dx, None, dweights, None, dgate, dup, ddown


_tiled_moe.defvjp(_tiled_moe_fwd, _tiled_moe_bwd)


def tiled_dispatch(
    x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid, *, capacity_factor, layer=None
):
    """Dropless loop over the chosen experts only: each one's weights are sliced once and its
    assignments (sorted by expert) run through SwiGLU in tiles of `tile_rows` rows.

    An expert no real token chose is never read, which is what a decode step on CPU is bound by.
    Loop bounds depend on the routing, so under differentiation the same function runs as dropless
    capacity (a custom VJP). With `layer`, the weights are whole [L, E, ...] stacks and each chosen
    expert is sliced straight from them (a forward-only path: decode and prefill).
    Returns (y [T, D], dropped=0).
    """
    del capacity_factor
    if layer is not None:
        y = _tiled_forward(x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid, layer)
    else:
        y = _tiled_moe(x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid)
    return y, jnp.zeros((), jnp.float32)


DISPATCH_STRATEGIES = {
    "dense": dense_dispatch,
    "capacity": capacity_dispatch,
    "ragged": ragged_dispatch,
    "tiled": tiled_dispatch,
}


def resolve_dispatch(name: str, num_tokens: int | None = None) -> str:
    """Maps "auto" to the strategy that is fast on the current backend (and token count, if given)."""
    if name == "auto":
        if jax.default_backend() != "cpu":
            return "ragged"
        return "tiled" if num_tokens is not None and num_tokens <= TILED_MAX_TOKENS else "capacity"
    if name not in DISPATCH_STRATEGIES:
        raise ValueError(f"moe_dispatch={name!r}: use one of auto, {', '.join(DISPATCH_STRATEGIES)}")
    return name


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
        self.router = param(rngs, init, (d, e), pdt, ("embed", None))
        self.gate_proj = param(rngs, init, (e, d, i), pdt, ("expert", "embed", "expert_mlp"))
        self.up_proj = param(rngs, init, (e, d, i), pdt, ("expert", "embed", "expert_mlp"))
        self.down_proj = param(rngs, init, (e, i, d), pdt, ("expert", "expert_mlp", "embed"))
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

    def __call__(self, x_btd, valid_bt, layer=None):
        """Returns (y [B, T, D], RouterStats of this layer).

        layer: None, or this layer's index when the expert weights are whole [L, E, ...] stacks (the
        decoder's cache path); the tiled dispatch then slices (layer, expert) inside its loop.
        """
        b, t, d = x_btd.shape
        x_td = x_btd.reshape(b * t, d)
        valid_t = valid_bt.reshape(b * t)
        probs_te, ids_tk, weights_tk = route(x_td, self.router.value, self.top_k, self.norm_topk_prob)
        strategy = resolve_dispatch(self.dispatch, b * t)
        # Weights go in as stored: each strategy casts them to x's dtype where it reads them.
        experts = (self.gate_proj.value, self.up_proj.value, self.down_proj.value)
        extra = {}
        if layer is not None and strategy == "tiled":
            extra = {"layer": layer}
        elif layer is not None:
            experts = tuple(jax.lax.dynamic_index_in_dim(w, layer, keepdims=False) for w in experts)
        y_td, dropped = DISPATCH_STRATEGIES[strategy](
            x_td, ids_tk, weights_tk, valid_t, *experts, capacity_factor=self.capacity_factor, **extra
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
