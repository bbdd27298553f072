"""Explicit expert parallelism (`expert_parallel_dispatch`, on by default wherever it applies).

When the mesh context (sharding.use_mesh) splits the experts over a mesh axis of size > 1 and the
batch rows over that axis too, a `jax.shard_map` takes each device's own rows and its own experts.
Each device packs its assignments into one fixed-size block per device of the expert axis, swaps
blocks with `all_to_all`, runs what it received through its local experts with one of the
single-device strategies (same interface: rows, routing, local weights), and swaps the outputs back.
Expert weights stay where they are: with FSDP their D dimension is gathered for the local experts only
([E / ways, D, I], never a full [E, D, I]; the gradient is reduce-scattered back), with tensor
parallelism each device computes its slice of I and the partial outputs are summed. capacity_factor
> 0 gives each device's rows capacity_dispatch's per-expert room (drops counted over all devices);
otherwise blocks are sized for the worst case and nothing drops. Routing and the router statistics
stay outside, split by rows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gspo_jax import sharding
from gspo_jax.models.dispatch import DISPATCH_STRATEGIES
from gspo_jax.models.expert_buffers import expert_capacity, rank_in_group

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
