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

import jax
import jax.numpy as jnp

from gspo_jax.models.expert_buffers import expert_capacity, experts_in_buffers, swiglu_experts
from gspo_jax.models.tiled import tiled_dispatch


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
    y_etd = swiglu_experts(jnp.broadcast_to(x_td, (num_experts, *x_td.shape)), gate_edi, up_edi, down_eid)
    return jnp.einsum("etd,te->td", y_etd, combine_te), jnp.zeros((), jnp.float32)


def capacity_dispatch(x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid, *, capacity_factor):
    """Per-expert buffers of fixed capacity; first choices claim slots before second choices.

    Masked (padding) tokens take no slots. Returns (y [T, D], number of dropped real assignments).
    """
    t, k = ids_tk.shape
    capacity = expert_capacity(t, k, gate_edi.shape[0], capacity_factor)
    experts = _cast(x_td, gate_edi, up_edi, down_eid)
    y, dropped_tk = experts_in_buffers(x_td, ids_tk, weights_tk, valid_t, *experts, capacity)
    return y, jnp.sum(dropped_tk).astype(jnp.float32)


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
