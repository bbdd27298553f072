"""Single-device MoE dispatch strategies: (x [T, D], ids [T, k], weights [T, k], valid [T], expert
weights [E, D, I], [E, D, I], [E, I, D]) -> (y [T, D], dropped assignments).

All compute `y_t = sum_j w_tj * expert_{e_tj}(x_t)` over a token's k chosen experts and agree exactly
when nothing is dropped:
  dense     every expert on every token, weighted by the router (the exact reference; small models);
  capacity  assignments scattered into per-expert buffers of fixed capacity, one batched einsum per
            projection; dropless when capacity_factor <= 0;
  ragged    assignments sorted by expert and multiplied with `jax.lax.ragged_dot` (dropless; GPU/TPU);
  tiled     a loop over the chosen experts only, in row tiles of plain matmuls, with its own backward
            (dropless; models/tiled.py);
  auto      ragged off CPU, tiled on CPU (decode, prefill and training: measured fastest there).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gspo_jax.models.tiled import tiled_dispatch


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


def rank_in_group(group_a, num_groups: int, valid_a):
    """[A] int: how many valid assignments before a (in order) share a's group."""
    onehot_ag = jax.nn.one_hot(group_a, num_groups, dtype=jnp.int32) * valid_a[:, None]
    return jnp.sum((jnp.cumsum(onehot_ag, axis=0) - 1) * onehot_ag, axis=1)


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
    slot_in_expert_a = rank_in_group(ids_a, num_experts, valid_a)
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


DISPATCH_STRATEGIES = {
    "dense": dense_dispatch,
    "capacity": capacity_dispatch,
    "ragged": ragged_dispatch,
    "tiled": tiled_dispatch,
}


def resolve_dispatch(name: str) -> str:
    """Maps "auto" to the strategy that is fast on the current backend."""
    if name == "auto":
        return "tiled" if jax.default_backend() == "cpu" else "ragged"
    if name not in DISPATCH_STRATEGIES:
        raise ValueError(f"moe_dispatch={name!r}: use one of auto, {', '.join(DISPATCH_STRATEGIES)}")
    return name
