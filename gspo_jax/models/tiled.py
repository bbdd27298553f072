"""The tiled MoE dispatch: a loop over the experts that real tokens chose, each one's rows in tiles of
plain 2-D matmuls, so an expert no token chose is never read and no work or memory scales with
experts x tokens.

Forward-only calls (decode, prefill, scoring) run `_tiled_forward`: assignments sorted by expert,
each chosen expert's weights sliced once, its rows in tiles of `tile_rows`; with few rows per expert
(decode) `_batched_forward` instead fills padded per-expert buffers of about twice the mean rows,
runs one batched product per projection, reading every expert's weights in place, and sends what
overflows a busy expert's buffer through the tile loop.

Under differentiation a custom VJP runs a padded layout (`tile_layout`: each expert's run padded to
whole tiles of `training_tile_rows`, so every tile has one expert); the forward keeps each row's gate
and up pre-activations and the backward does six matmuls per tile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gspo_jax.models.expert_buffers import experts_in_buffers
from gspo_jax.models.matmul import einsum


def tile_rows(num_assignments: int, num_experts: int) -> int:
    """Rows per tile: the power of two at or above the mean assignments per expert, in [4, 256]."""
    mean = max(1, -(-num_assignments // num_experts))
    return min(256, max(4, 1 << (mean - 1).bit_length()))


def _swiglu_rows(x_rd, gate_di, up_di, down_id):
    """One expert's SwiGLU on a tile of rows [R, D] -> [R, D]."""
    h = jax.nn.silu(einsum("rd,di->ri", x_rd, gate_di)) * einsum("rd,di->ri", x_rd, up_di)
    return einsum("ri,id->rd", h, down_id)


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


def _tiled_forward(x_td, ids_tk, weights_tk, valid_tk, gate_edi, up_edi, down_eid):
    """Forward only: a loop over the chosen experts, each one's weights sliced once, rows in tiles.
    valid_tk [T, k]: the assignments to serve (others add nothing)."""
    t, k = ids_tk.shape
    num_experts = gate_edi.shape[0]
    tile = tile_rows(t * k, num_experts)
    valid_a = valid_tk.reshape(-1)  # a = t * k + j
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
        gate, up, down = (expert_weight(w, expert, x_td.dtype) for w in (gate_edi, up_edi, down_eid))

        def one_tile(j, y_td):
            start = starts_e[expert] + j * tile
            rows = jnp.arange(tile) < sizes_e[expert] - j * tile
            x = jax.lax.dynamic_slice_in_dim(x_s, start, tile)
            y = _swiglu_rows(x, gate, up, down)
            y = jnp.where(rows[:, None], y * jax.lax.dynamic_slice_in_dim(weight_s, start, tile)[:, None], 0)
            return y_td.at[jax.lax.dynamic_slice_in_dim(token_s, start, tile)].add(y)

        return jax.lax.fori_loop(0, -(-sizes_e[expert] // tile), one_tile, y_td)

    return jax.lax.fori_loop(0, jnp.sum(sizes_e > 0), one_expert, jnp.zeros_like(x_td))


# Forward-only calls with at most this many assignments per expert on average run `_batched_forward`.
# Measured on XLA:CPU (8 layers, 16 experts top-2, D = I = 512, per-layer weights): 64 rows 34 ms vs
# 44 ms for the tile loop (which copies each expert's slice before its matmuls); 8 rows 22 vs 22;
# 256 rows 85 vs 82; 1024 rows 244 vs 197.
BATCHED_MAX_MEAN_ROWS = 16


def batched_capacity(num_assignments: int, num_experts: int, num_tokens: int) -> int:
    """Slots per expert in `_batched_forward`'s buffers: twice the power of two at or above the mean
    assignments per expert (at least 4, at most num_tokens). Measured on the decode bench's model
    (64 rows, 16 experts top-2: mean 8), in one process with alternating calls: 16 slots 87 ms per
    decode step, 8 slots 92 ms (more rows overflow into the tile loop), 32 slots 126 ms."""
    mean = max(1, -(-num_assignments // num_experts))
    return min(num_tokens, max(4, 2 * (1 << (mean - 1).bit_length())))


def _batched_forward(x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid):
    """Forward only, dropless: per-expert buffers [E, C, D] (`experts_in_buffers`) of C =
    `batched_capacity` slots, one batched product per projection that reads every expert's weights
    once, which is what a decode step with every expert chosen is bound by. The assignments that
    overflow a busy expert's buffer run through the tile loop (`_tiled_forward`), which touches only
    those experts: buffers sized for the busiest expert cost up to E/k times the useful work.

    On CPU the buffered products run on each expert's matrices transposed (`swiglu_experts_out_in`).
    Flattened to [E, out * in] behind a barrier, the transposed copies are real arrays (XLA would
    otherwise fold the transposes into layouts and copy inside the loop) that depend only on the
    weights, so in a decode loop XLA's loop-invariant code motion moves them out of the loop: one copy
    per generation, not per step (tests/test_scan.py checks the compiled loop). A call outside a loop
    pays that copy itself."""
    t, k = ids_tk.shape
    num_experts = gate_edi.shape[0]
    capacity = batched_capacity(t * k, num_experts, t)
    experts = (gate_edi, up_edi, down_eid)
    out_in = jax.default_backend() == "cpu"
    if out_in:
        flat = jax.lax.optimization_barrier(
            tuple(jnp.swapaxes(w, 1, 2).reshape(num_experts, -1) for w in experts)
        )
        experts = tuple(f.reshape(num_experts, w.shape[2], w.shape[1]) for f, w in zip(flat, experts))
    y_td, overflow_tk = experts_in_buffers(
        x_td, ids_tk, weights_tk, valid_t, *experts, capacity, weights_out_in=out_in
    )
    return y_td + _tiled_forward(x_td, ids_tk, weights_tk, overflow_tk, gate_edi, up_edi, down_eid)


def _forward_only(x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid):
    """`_batched_forward` when experts get few rows on average and the weights need no cast (casting
    a whole [E, ...] stack every call would read and write every expert), else `_tiled_forward`."""
    few_rows = ids_tk.size <= BATCHED_MAX_MEAN_ROWS * gate_edi.shape[0]
    same_dtype = all(w.dtype == x_td.dtype for w in (gate_edi, up_edi, down_eid))
    if few_rows and same_dtype:
        return _batched_forward(x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid)
    valid_tk = jnp.broadcast_to(valid_t[:, None], ids_tk.shape)
    return _tiled_forward(x_td, ids_tk, weights_tk, valid_tk, gate_edi, up_edi, down_eid)


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
    assignment_r = (
        jnp.full(tiles * tile, num_assignments, jnp.int32)
        .at[row_sorted]
        .set(order_a.astype(jnp.int32), mode="drop")
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


def _storage(dtype):
    """How the tile loops carry row buffers of `dtype`: XLA:CPU runs a 16-bit float
    dynamic-update-slice as widen, update, narrow of the whole buffer at every loop iteration (8.3 of
    14.8 thread-seconds of the bf16 medium gradient), but updates a uint16 buffer in place."""
    low = jnp.dtype(dtype).itemsize == 2 and jnp.issubdtype(dtype, jnp.floating)
    return jnp.uint16 if low and jax.default_backend() == "cpu" else jnp.dtype(dtype)


def _zeros_like_rows(x_r, shape, dtype):
    """Zeros of `shape` and `dtype` "like" the rows x_r: under shard_map they vary over the rows' mesh axes."""
    return jnp.zeros_like(x_r, shape=shape, dtype=dtype)


def _row_buffer(x_r, *width: int):
    """Zeros for one value ([R]) or one [width] vector per row of x_r, in the loops' storage dtype."""
    return _zeros_like_rows(x_r, (x_r.shape[0], *width), _storage(x_r.dtype))


def _put(buf, value, start):
    """buf[start : start + len(value)] = value, bit-cast into buf's storage dtype."""
    if buf.dtype != value.dtype:
        value = jax.lax.bitcast_convert_type(value, buf.dtype)
    return jax.lax.dynamic_update_slice_in_dim(buf, value, start, 0)


def _take(buf, start, size: int, dtype):
    """buf[start : start + size] read back as `dtype`."""
    return _stored_as(jax.lax.dynamic_slice_in_dim(buf, start, size), dtype)


def _stored_as(buf, dtype):
    return buf if buf.dtype == dtype else jax.lax.bitcast_convert_type(buf, dtype)


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
            g, u = einsum("rd,di->ri", x, gate), einsum("rd,di->ri", x, up)
            y = einsum("ri,id->rd", jax.nn.silu(g) * u, down)
            return tuple(_put(buf, v, n * tile) for buf, v in ((y_r, y), (g_r, g), (u_r, u)))

        return jax.lax.fori_loop(first, first + count, one_tile, carry)

    inner = gate_edi.shape[-1]
    init = (_row_buffer(x_r, x_r.shape[1]), _row_buffer(x_r, inner), _row_buffer(x_r, inner))
    y_r, g_r, u_r = _over_tiles(layout, per_expert, init)
    y_r = _stored_as(y_r, x_td.dtype)
    y_td = jnp.zeros_like(x_td).at[layout.token_r].add(y_r * w_r[:, None].astype(x_td.dtype))
    return y_td, (g_r, u_r, w_r)


def _tiled_train_backward(x_td, weights_tk, gate_edi, up_edi, down_eid, layout, tile, g_r, u_r, w_r, dy_td):
    """Cotangents (x, weights, gate, up, down): six matmuls per tile; each chosen expert's weight
    gradients are summed over its tiles in the inner loop's carry and written once."""
    num_assignments = weights_tk.size
    x_r = x_td[layout.token_r]
    dy_r = dy_td[layout.token_r] * (layout.assignment_r < num_assignments)[:, None].astype(dy_td.dtype)
    like_rows = lambda shape, dtype: _zeros_like_rows(x_r, shape, dtype)
    acc = jnp.float32

    def per_expert(expert, first, count, carry):
        gate, up, down = _tile_weights(gate_edi, up_edi, down_eid, expert, x_td.dtype)

        def one_tile(n, carry):
            dx_r, dw_r, dgate, dup, ddown = carry
            take = lambda v: _take(v, n * tile, tile, x_td.dtype)
            x, g, u, w, dy = take(x_r), take(g_r), take(u_r), take(w_r)[:, None], take(dy_r)
            sig = jax.nn.sigmoid(g)
            act = g * sig
            h = act * u
            dz = einsum("rd,id->ri", dy, down)  # d(unweighted expert output) @ down^T
            dh = w * dz
            du = dh * act
            dg = dh * u * sig * (1 + g * (1 - sig))
            return (
                _put(dx_r, einsum("ri,di->rd", dg, gate) + einsum("ri,di->rd", du, up), n * tile),
                _put(dw_r, jnp.sum(dz * h, axis=-1), n * tile),
                dgate + einsum("rd,ri->di", x, dg, acc),
                dup + einsum("rd,ri->di", x, du, acc),
                ddown + einsum("ri,rd->id", h, w * dy, acc),
            )

        dx_r, dw_r, *sums = carry
        local = tuple(like_rows(w.shape[1:], acc) for w in (gate_edi, up_edi, down_eid))
        dx_r, dw_r, *local = jax.lax.fori_loop(first, first + count, one_tile, (dx_r, dw_r, *local))
        return (
            dx_r,
            dw_r,
            *(jax.lax.dynamic_update_index_in_dim(s, v, expert, 0) for s, v in zip(sums, local)),
        )

    carry = (
        _row_buffer(x_r, x_r.shape[1]),
        _row_buffer(x_r),
        *(like_rows(w.shape, acc) for w in (gate_edi, up_edi, down_eid)),
    )
    dx_r, dw_r, dgate, dup, ddown = _over_tiles(layout, per_expert, carry)
    dx_r, dw_r = _stored_as(dx_r, x_td.dtype), _stored_as(dw_r, x_td.dtype)
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
    return _forward_only(x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid)


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


def tiled_dispatch(x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid, *, capacity_factor):
    """Dropless loop over the chosen experts only: each one's weights are sliced once and its
    assignments (sorted by expert) run through SwiGLU in tiles of `tile_rows` rows.

    An expert no real token chose is never read. Forward-only calls with few rows per expert run
    `_batched_forward` instead (see `_forward_only`). Loop bounds depend on the routing, so
    differentiation goes through a custom VJP: padded expert-sorted row tiles forward and backward
    (`tile_layout`), work and memory in routed rows.
    Returns (y [T, D], dropped=0).
    """
    del capacity_factor
    y = _tiled_moe(x_td, ids_tk, weights_tk, valid_t, gate_edi, up_edi, down_eid)
    return y, jnp.zeros((), jnp.float32)
