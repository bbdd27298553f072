"""Padded per-expert buffers: assignments scattered into [E, C, D], one batched SwiGLU per projection,
results gathered back. The core of the `capacity` dispatch (models/dispatch.py) and of the tiled
dispatch's few-rows forward (models/tiled.py), which picks C large enough that nothing drops.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gspo_jax.models.matmul import einsum


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: all tokens when dropless (a token picks an expert at most once)."""
    if capacity_factor <= 0:
        return num_tokens
    return min(num_tokens, max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def rank_in_group(group_a, num_groups: int, valid_a):
    """[A] int: how many valid assignments before a (in order) share a's group."""
    onehot_ag = jax.nn.one_hot(group_a, num_groups, dtype=jnp.int32) * valid_a[:, None]
    return jnp.sum((jnp.cumsum(onehot_ag, axis=0) - 1) * onehot_ag, axis=1)


def swiglu_experts(x_ecd, gate_edi, up_edi, down_eid):
    """Batched per-expert SwiGLU on padded buffers [E, C, D] -> [E, C, D]."""
    h = jax.nn.silu(einsum("ecd,edi->eci", x_ecd, gate_edi)) * einsum("ecd,edi->eci", x_ecd, up_edi)
    return einsum("eci,eid->ecd", h, down_eid)


def experts_in_buffers(x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid, capacity: int):
    """y [T, D] through buffers of `capacity` slots per expert, and the number of dropped real
    assignments. First choices claim slots before second choices; padding tokens take none."""
    t, k = ids_tk.shape
    num_experts = gate_edi.shape[0]
    ids_a = ids_tk.T.reshape(-1)  # assignment a = j * T + t: choice-major order gives top-1 priority
    valid_a = jnp.tile(valid_t, k)
    slot_in_expert_a = rank_in_group(ids_a, num_experts, valid_a)
    kept_a = valid_a & (slot_in_expert_a < capacity)
    slot_a = jnp.where(kept_a, ids_a * capacity + slot_in_expert_a, num_experts * capacity)
    x_a = jnp.tile(x_td, (k, 1))
    # zeros "like" the rows: under shard_map the buffers then vary over the rows' mesh axes
    rows = jnp.zeros_like(x_a, shape=(num_experts * capacity, x_td.shape[1]))
    buffers = rows.at[slot_a].set(x_a, mode="drop")
    y_buf = swiglu_experts(buffers.reshape(num_experts, capacity, -1), gate_edi, up_edi, down_eid)
    y_a = y_buf.reshape(num_experts * capacity, -1).at[slot_a].get(mode="fill", fill_value=0)
    y = jnp.einsum("ktd,tk->td", y_a.reshape(k, t, -1), weights_tk.astype(x_td.dtype))
    return y, jnp.sum(valid_a & ~kept_a).astype(jnp.float32)
