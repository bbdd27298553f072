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
  auto      ragged off CPU, tiled on CPU (decode, prefill and training: measured fastest there).

Expert parallelism (`expert_parallel_dispatch`, on by default wherever it applies): when the mesh
context (sharding.use_mesh) splits the experts over a mesh axis of size > 1 and the batch rows over
that axis too, a `jax.shard_map` takes each device's own rows and its own experts. Each device packs
its assignments into one fixed-size block per device of the expert axis, swaps blocks with
`all_to_all`, runs what it received through its local experts with one of the strategies above
(same interface: rows, routing, local weights), and swaps the outputs back. Expert weights stay where
they are: with FSDP their D dimension is gathered for the local experts only ([E / ways, D, I], never a
full [E, D, I]; the gradient is reduce-scattered back), with tensor parallelism each device computes
its slice of I and the partial outputs are summed. capacity_factor > 0 gives each device's rows
capacity_dispatch's per-expert room (drops counted over all devices); otherwise blocks are sized for
the worst case and nothing drops. Routing and the router statistics stay outside, split by rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from gspo_jax import sharding
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


def training_tile_rows(num_assignments: int, num_experts: int) -> int:
    """Rows per tile of the differentiated tiled dispatch: the power of two at or below half the mean
    assignments per expert, in [32, 256]. Each expert's run is padded to whole tiles (about a quarter
    of the rows at most sizes); smaller tiles pad less but pay more per-tile overhead (measured: 128
    rows fastest at the bench's small shape, 64 and 256 slower)."""
    half = max(1, num_assignments // (2 * num_experts))
    return min(256, max(32, 1 << (half.bit_length() - 1)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TileLayout:
    """Assignments sorted by expert into row tiles, each expert's run padded to whole tiles.

    R = tiles * tile rows. token_r [R]: the token a row reads (0 on padding); assignment_r [R]: its
    assignment a = t * k + j (A on padding); first_tile_e, tiles_e [E]: where each expert's tiles start
    and how many it has; chosen: the experts with tiles first (in id order); num_chosen: how many.
    """

    token_r: jax.Array
    assignment_r: jax.Array
    first_tile_e: jax.Array
    tiles_e: jax.Array
    chosen: jax.Array
    num_chosen: jax.Array


def tile_layout(ids_tk, valid_t, num_experts: int, tile: int) -> TileLayout:
    """The TileLayout of the valid tokens' assignments (padding tokens take no rows)."""
    t, k = ids_tk.shape
    num_assignments = t * k
    tiles = -(-num_assignments // tile) + num_experts  # padding adds less than one tile per expert
    key_a = jnp.where(jnp.repeat(valid_t, k), ids_tk.reshape(-1), num_experts)
    sizes_e = jnp.bincount(key_a, length=num_experts + 1)[:num_experts]
    tiles_e = -(-sizes_e // tile)
    first_tile_e = jnp.cumsum(tiles_e) - tiles_e
    order_a = jnp.argsort(key_a, stable=True)
    sorted_key = key_a[order_a]
    run_start = jnp.concatenate([jnp.zeros(1, sizes_e.dtype), jnp.cumsum(sizes_e)])[sorted_key]
    first_row = jnp.concatenate([first_tile_e * tile, jnp.zeros(1, tiles_e.dtype)])[sorted_key]
    row_sorted = jnp.where(
        sorted_key < num_experts, first_row + jnp.arange(num_assignments) - run_start, tiles * tile
    )
    assignment_r = jnp.full(tiles * tile, num_assignments, jnp.int32).at[row_sorted].set(
        order_a.astype(jnp.int32), mode="drop"
    )
    return TileLayout(
        token_r=jnp.minimum(assignment_r, num_assignments - 1) // k,
        assignment_r=assignment_r,
        first_tile_e=first_tile_e,
        tiles_e=tiles_e,
        chosen=jnp.argsort(tiles_e == 0, stable=True),
        num_chosen=jnp.sum(tiles_e > 0),
    )


def _over_tiles(layout: TileLayout, per_expert, carry):
    """fori over the chosen experts: per_expert(expert, first_tile, num_tiles, carry) -> carry."""

    def one_expert(i, carry):
        expert = layout.chosen[i]
        return per_expert(expert, layout.first_tile_e[expert], layout.tiles_e[expert], carry)

    return jax.lax.fori_loop(0, layout.num_chosen, one_expert, carry)


def _tile_weights(gate_edi, up_edi, down_eid, expert, dtype):
    return tuple(expert_weight(w, expert, dtype) for w in (gate_edi, up_edi, down_eid))


def _tiled_train_forward(x_td, weights_tk, gate_edi, up_edi, down_eid, layout: TileLayout, tile: int):
    """(y [T, D], gate and up pre-activations [R, I] of every row); each chosen expert's weights are
    sliced once and its tiles run in an inner loop."""
    num_assignments = weights_tk.size
    live_r = layout.assignment_r < num_assignments
    x_r = x_td[layout.token_r]
    w_r = jnp.where(live_r, weights_tk.reshape(-1)[jnp.minimum(layout.assignment_r, num_assignments - 1)], 0)

    def per_expert(expert, first, count, carry):
        gate, up, down = _tile_weights(gate_edi, up_edi, down_eid, expert, x_td.dtype)

        def one_tile(n, carry):
            y_r, g_r, u_r = carry
            x = jax.lax.dynamic_slice_in_dim(x_r, n * tile, tile)
            g, u = x @ gate, x @ up
            put = lambda buf, v: jax.lax.dynamic_update_slice_in_dim(buf, v, n * tile, 0)
            return put(y_r, (jax.nn.silu(g) * u) @ down), put(g_r, g), put(u_r, u)

        return jax.lax.fori_loop(first, first + count, one_tile, carry)

    # Carries are zeros "like" the rows: under shard_map they then vary over the rows' mesh axes.
    inner = gate_edi.shape[-1]
    init = (jnp.zeros_like(x_r), *(jnp.zeros_like(x_r, shape=(x_r.shape[0], inner)) for _ in range(2)))
    y_r, g_r, u_r = _over_tiles(layout, per_expert, init)
    y_td = jnp.zeros_like(x_td).at[layout.token_r].add(y_r * w_r[:, None].astype(x_td.dtype))
    return y_td, (g_r, u_r, w_r)


def _tiled_train_backward(x_td, weights_tk, gate_edi, up_edi, down_eid, layout, tile, g_r, u_r, w_r, dy_td):
    """Cotangents (x, weights, gate, up, down): six matmuls per tile; each chosen expert's weight
    gradients are summed over its tiles in the inner loop's carry and written once."""
    num_assignments = weights_tk.size
    x_r = x_td[layout.token_r]
    dy_r = dy_td[layout.token_r] * (layout.assignment_r < num_assignments)[:, None].astype(dy_td.dtype)
    like_rows = lambda shape, dtype: jnp.zeros_like(x_r, shape=shape, dtype=dtype)
    acc = jnp.float32

    def per_expert(expert, first, count, carry):
        gate, up, down = _tile_weights(gate_edi, up_edi, down_eid, expert, x_td.dtype)

        def one_tile(n, carry):
            dx_r, dw_r, dgate, dup, ddown = carry
            take = lambda v: jax.lax.dynamic_slice_in_dim(v, n * tile, tile)
            x, g, u, w, dy = take(x_r), take(g_r), take(u_r), take(w_r)[:, None], take(dy_r)
            sig = jax.nn.sigmoid(g)
            act = g * sig
            h = act * u
            dz = dy @ down.T  # d(unweighted expert output) @ down^T
            dh = w * dz
            du = dh * act
            dg = dh * u * sig * (1 + g * (1 - sig))
            put = lambda buf, v: jax.lax.dynamic_update_slice_in_dim(buf, v, n * tile, 0)
            return (
                put(dx_r, dg @ gate.T + du @ up.T),
                put(dw_r, jnp.sum(dz * h, axis=-1)),
                dgate + (x.T @ dg).astype(acc),
                dup + (x.T @ du).astype(acc),
                ddown + (h.T @ (w * dy)).astype(acc),
            )

        dx_r, dw_r, *sums = carry
        local = tuple(like_rows(w.shape[1:], acc) for w in (gate_edi, up_edi, down_eid))
        dx_r, dw_r, *local = jax.lax.fori_loop(first, first + count, one_tile, (dx_r, dw_r, *local))
        return dx_r, dw_r, *(jax.lax.dynamic_update_index_in_dim(s, v, expert, 0) for s, v in zip(sums, local))

    carry = (
        jnp.zeros_like(x_r),
        like_rows(x_r.shape[:1], x_td.dtype),
        *(like_rows(w.shape, acc) for w in (gate_edi, up_edi, down_eid)),
    )
    dx_r, dw_r, dgate, dup, ddown = _over_tiles(layout, per_expert, carry)
    dx_td = jnp.zeros_like(x_td).at[layout.token_r].add(dx_r)
    dweights = like_rows((num_assignments,), dw_r.dtype).at[layout.assignment_r].set(dw_r, mode="drop")
    # Under shard_map the sums above vary over the rows' mesh axes; an input that varies over fewer
    # (the experts' weights, replicated weights_tk) takes its cotangent summed over the rest, which
    # is the transpose of widening it to the rows' type.
    widen = lambda *inputs: tuple(v + like_rows(v.shape, v.dtype) for v in inputs)
    _, narrow = jax.vjp(widen, weights_tk, gate_edi, up_edi, down_eid)
    return dx_td, *narrow(
        (
            dweights.reshape(weights_tk.shape).astype(weights_tk.dtype),
            dgate.astype(gate_edi.dtype),
            dup.astype(up_edi.dtype),
            ddown.astype(down_eid.dtype),
        )
    )


@jax.custom_vjp
def _tiled_moe(x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid):
    return _tiled_forward(x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid)


def _tiled_moe_fwd(x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid):
    """Under differentiation: tiles of the expert-sorted assignments (each expert's run padded to
    whole tiles, so a tile has one expert), keeping each row's gate and up pre-activations: memory
    and work grow with the routed assignments, never with experts x tokens."""
    tile = training_tile_rows(ids_tk.size, gate_edi.shape[0])
    layout = tile_layout(ids_tk, valid_t, gate_edi.shape[0], tile)
    y_td, (g_r, u_r, w_r) = _tiled_train_forward(x_td, weights_tk, gate_edi, up_edi, down_eid, layout, tile)
    return y_td, (x_td, weights_tk, gate_edi, up_edi, down_eid, layout, g_r, u_r, w_r)


def _tiled_moe_bwd(residuals, dy_td):
    x_td, weights_tk, gate_edi, up_edi, down_eid, layout, g_r, u_r, w_r = residuals
    tile = training_tile_rows(weights_tk.size, gate_edi.shape[0])
    dx, dweights, dgate, dup, ddown = _tiled_train_backward(
        x_td, weights_tk, gate_edi, up_edi, down_eid, layout, tile, g_r, u_r, w_r, dy_td
    )
    return dx, None, dweights, None, dgate, dup, ddown


_tiled_moe.defvjp(_tiled_moe_fwd, _tiled_moe_bwd)


def tiled_dispatch(
    x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid, *, capacity_factor, layer=None
):
    """Dropless loop over the chosen experts only: each one's weights are sliced once and its
    assignments (sorted by expert) run through SwiGLU in tiles of `tile_rows` rows.

    An expert no real token chose is never read, which is what a decode step on CPU is bound by.
    Loop bounds depend on the routing, so differentiation goes through a custom VJP: padded
    expert-sorted row tiles forward and backward (`tile_layout`), work and memory in routed rows. With `layer`, the weights are whole [L, E, ...] stacks and each chosen
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


def resolve_dispatch(name: str) -> str:
    """Maps "auto" to the strategy that is fast on the current backend."""
    if name == "auto":
        return "tiled" if jax.default_backend() == "cpu" else "ragged"
    if name not in DISPATCH_STRATEGIES:
        raise ValueError(f"moe_dispatch={name!r}: use one of auto, {', '.join(DISPATCH_STRATEGIES)}")
    return name


# Logical axes of the stacked expert weights (sharding.py maps them to mesh axes).
EXPERT_IN_AXES = ("expert", "embed", "expert_mlp")  # gate_proj, up_proj [E, D, I]
EXPERT_OUT_AXES = ("expert", "expert_mlp", "embed")  # down_proj [E, I, D]


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


@dataclasses.dataclass(frozen=True)
class ExpertParallelLayout:
    """Where expert parallelism runs on the active mesh.

    expert_axis: the mesh axis splitting experts (ways: its size); token_spec: [B, ...] rows split over
    the batch axes, which include expert_axis; in_spec/out_spec: the expert weights' own specs;
    embed_axes: mesh axes splitting the weights' D dim (fsdp: gathered per local expert inside the
    block); mlp_axes: mesh axes splitting I (tensor: partial outputs summed).
    """

    expert_axis: str
    ways: int
    token_spec: PartitionSpec
    in_spec: PartitionSpec
    out_spec: PartitionSpec
    embed_axes: tuple[str, ...]
    mlp_axes: tuple[str, ...]

    @property
    def batch_axes(self) -> tuple[str, ...]:
        return _axes(self.token_spec[0])


def expert_parallel_layout(batch: int, gate_shape, down_shape) -> ExpertParallelLayout | None:
    """The layout under the active mesh context, or None where the single-device dispatch applies:
    no mesh, experts not split over exactly one mesh axis of size > 1, or `batch` rows that cannot
    be split over the expert axis."""
    in_spec = sharding.param_spec(EXPERT_IN_AXES, gate_shape)
    if in_spec is None or len(_axes(in_spec[0])) != 1:
        return None
    (expert_axis,) = _axes(in_spec[0])
    mesh = jax.sharding.get_abstract_mesh()
    token_spec = sharding.activation_spec(("batch",), (batch,))
    batch_axes = _axes(token_spec[0])
    mlp_axes = _axes(in_spec[2])
    # Rows must differ across the expert axis (they are exchanged over it) and be the same across
    # the axes splitting I (those devices sum partial outputs of the same rows).
    if mesh.shape[expert_axis] == 1 or expert_axis not in batch_axes or set(mlp_axes) & set(batch_axes):
        return None
    return ExpertParallelLayout(
        expert_axis=expert_axis,
        ways=mesh.shape[expert_axis],
        token_spec=token_spec,
        in_spec=in_spec,
        out_spec=sharding.param_spec(EXPERT_OUT_AXES, down_shape),
        embed_axes=_axes(in_spec[1]),
        mlp_axes=mlp_axes,
    )


def _exchange_and_run(
    x_btd,
    ids_btk,
    weights_btk,
    valid_bt,
    gate_ldi,
    up_ldi,
    down_lid,
    *,
    layout,
    num_experts,
    capacity_factor,
    inner,
):
    """Per-device body of expert_parallel_dispatch: local tokens [b, t, ...], local experts [L, ...]."""
    b, t, d = x_btd.shape
    k = ids_btk.shape[-1]
    tokens, ways = b * t, layout.ways
    local = num_experts // ways
    x_td, weights_tk = x_btd.reshape(tokens, d), weights_btk.reshape(tokens, k)
    ids_a = ids_btk.reshape(tokens, k).T.reshape(-1)  # a = j * T + t: first choices claim room first
    valid_a = jnp.tile(valid_bt.reshape(tokens), k)
    dest_a, local_a = ids_a // local, ids_a % local
    if capacity_factor > 0:  # per-expert room of `capacity` slots, as in capacity_dispatch
        capacity = expert_capacity(tokens, k, num_experts, capacity_factor)
        slot_in_expert_a = rank_in_group(ids_a, num_experts, valid_a)
        kept_a = valid_a & (slot_in_expert_a < capacity)
        row_a, rows = local_a * capacity + slot_in_expert_a, local * capacity
    else:  # a token picks each expert at most once, so at most min(k, L) of its choices live on one device
        kept_a = valid_a
        row_a, rows = rank_in_group(dest_a, ways, valid_a), tokens * min(k, local)
    slot_a = jnp.where(kept_a, dest_a * rows + row_a, ways * rows)
    send_x = jnp.zeros((ways * rows, d), x_td.dtype).at[slot_a].set(jnp.tile(x_td, (k, 1)), mode="drop")
    send_e = jnp.full((ways * rows,), local, jnp.int32).at[slot_a].set(local_a, mode="drop")

    def exchange(v):  # row block i goes to device i of the expert axis; block j comes from device j
        blocks = v.reshape(ways, rows, *v.shape[1:])
        return jax.lax.all_to_all(blocks, layout.expert_axis, 0, 0, tiled=True).reshape(v.shape)

    recv_x, recv_e = exchange(send_x), exchange(send_e)
    recv_valid = recv_e < local
    if layout.mlp_axes:  # the rows meet I-split weights: mark them so (loop carries must match)
        recv_x = jax.lax.pcast(recv_x, layout.mlp_axes, to="varying")
    if layout.embed_axes:  # FSDP: gather D of the local experts only (the transpose reduce-scatters)
        gate_ldi = jax.lax.all_gather(gate_ldi, layout.embed_axes, axis=1, tiled=True)
        up_ldi = jax.lax.all_gather(up_ldi, layout.embed_axes, axis=1, tiled=True)
        down_lid = jax.lax.all_gather(down_lid, layout.embed_axes, axis=2, tiled=True)
    # A local expert receives at most `room` rows (capacity, or every token once, from each device):
    # the inner capacity strategy is given exactly that room (its slots are factor * rows / experts).
    room = ways * (capacity if capacity_factor > 0 else tokens)
    y_r, _ = DISPATCH_STRATEGIES[inner](
        recv_x,
        jnp.where(recv_valid, recv_e, 0)[:, None],
        jnp.ones((ways * rows, 1), x_td.dtype),
        recv_valid,
        gate_ldi,
        up_ldi,
        down_lid,
        capacity_factor=room * local / (ways * rows),
    )
    if layout.mlp_axes:  # tensor parallel: each device summed over its slice of I
        y_r = jax.lax.psum(y_r, layout.mlp_axes)
    y_a = exchange(y_r).at[slot_a].get(mode="fill", fill_value=0)
    y_td = jnp.einsum("ktd,tk->td", y_a.reshape(k, tokens, d), weights_tk)
    dropped = jax.lax.psum(jnp.sum(valid_a & ~kept_a).astype(jnp.float32), layout.batch_axes)
    return y_td.reshape(b, t, d), dropped


def expert_parallel_dispatch(
    x_btd, ids_btk, weights_btk, valid_bt, gate_edi, up_edi, down_eid, *, layout, capacity_factor, inner
):
    """Explicit expert parallelism: returns (y [B, T, D], dropped assignments over all devices).

    Each device routes its own rows' assignments into one block of rows per device of the expert
    axis, swaps blocks with `all_to_all`, runs the received rows through its local experts with the
    per-device `inner` strategy, and swaps the outputs back. Expert weights never leave their
    devices: FSDP-split D is gathered for the local experts only. With capacity_factor > 0 each
    device gives each expert capacity_dispatch's room for its own rows (same priority, drops
    counted); otherwise blocks are sized for the worst case and nothing drops.
    """
    body = functools.partial(
        _exchange_and_run,
        layout=layout,
        num_experts=gate_edi.shape[0],
        capacity_factor=capacity_factor,
        inner=inner,
    )
    rows = layout.token_spec
    return jax.shard_map(
        body,
        in_specs=(rows, rows, rows, rows, layout.in_spec, layout.in_spec, layout.out_spec),
        out_specs=(rows, PartitionSpec()),
    )(x_btd, ids_btk, weights_btk, valid_bt, gate_edi, up_edi, down_eid)


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

    def __call__(self, x_btd, valid_bt, layer=None, replay_ids_btk=None):
        """Returns (y [B, T, D], RouterStats of this layer).

        layer: None, or this layer's index when the expert weights are whole [L, E, ...] stacks (the
        decoder's cache path); the tiled dispatch then slices (layer, expert) inside its loop.
        replay_ids_btk: None, or [B, T, k] expert ids to route with instead of the router's top-k.
        """
        b, t, d = x_btd.shape
        x_td = x_btd.reshape(b * t, d)
        valid_t = valid_bt.reshape(b * t)
        replay_ids_tk = None if replay_ids_btk is None else replay_ids_btk.reshape(b * t, -1)
        probs_te, ids_tk, weights_tk = route(
            x_td, self.router.value, self.top_k, self.norm_topk_prob, replay_ids_tk
        )
        # Weights go in as stored: each strategy casts them to x's dtype where it reads them. On the
        # cache path they arrive as whole [L, E, ...] stacks with this layer's index.
        experts = (self.gate_proj.value, self.up_proj.value, self.down_proj.value)
        sliced = experts
        if layer is not None:
            sliced = tuple(jax.lax.dynamic_index_in_dim(w, layer, keepdims=False) for w in experts)
        layout = None
        if self.expert_parallel == "auto":
            layout = expert_parallel_layout(b, sliced[0].shape, sliced[2].shape)
        if layout is not None:
            y_btd, dropped = expert_parallel_dispatch(
                x_btd,
                ids_tk.reshape(b, t, -1),
                weights_tk.reshape(b, t, -1),
                valid_bt,
                *sliced,
                layout=layout,
                capacity_factor=self.capacity_factor,
                inner=resolve_dispatch(self.dispatch),
            )
            y_td = y_btd.reshape(b * t, d)
        else:
            strategy = resolve_dispatch(self.dispatch)
            # tiled slices (layer, expert) inside its loop, so a stack is never copied per layer
            args, extra = (
                (experts, {"layer": layer}) if layer is not None and strategy == "tiled" else (sliced, {})
            )
            y_td, dropped = DISPATCH_STRATEGIES[strategy](
                x_td, ids_tk, weights_tk, valid_t, *args, capacity_factor=self.capacity_factor, **extra
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
