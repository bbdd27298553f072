"""Device mesh from config, and logical-axis rules that turn parameter axis names into NamedShardings.

Model code names each parameter dimension ("embed", "expert", "q_heads", ...); this module is the only
place that knows which mesh axis ("data", "fsdp", "expert", "tensor") serves which logical name.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# The batch is split over every axis that does not split the model's matmuls.
BATCH_AXES = ("data", "fsdp", "expert")

# logical parameter axis -> mesh axes (None = replicated). FSDP shards the hidden ("embed") dimension.
DEFAULT_RULES: dict[str, Any] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "norm": None,
    "expert": "expert",
    "expert_mlp": "tensor",
    "layers": None,  # the stacked decoder layers' leading axis (scanned over, so never split)
}


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
    """Resolves the configured axis sizes (one may be -1: all remaining devices)."""
    sizes = [int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if num_devices % rest:
            raise ValueError(
                f"mesh: {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices "
                f"({num_devices} is not divisible by {rest}); change the fixed axis sizes"
            )
        sizes[sizes.index(-1)] = num_devices // rest
    if math.prod(sizes) != num_devices or min(sizes) < 1:
        raise ValueError(
            f"mesh: {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices but {num_devices} are "
            f"available; set --config.mesh.data=-1 (or make the axis sizes multiply to {num_devices})"
        )
    return tuple(sizes)


def mesh_devices(mesh_cfg) -> list:
    """All devices, or the first `mesh.num_devices` of them when that is set (> 0)."""
    devices = jax.devices()
    wanted = int(mesh_cfg.get("num_devices", 0) or 0)
    if wanted > len(devices):
        raise ValueError(
            f"mesh.num_devices={wanted} but only {len(devices)} devices exist; lower it or set 0 (all)"
        )
    return devices[:wanted] if wanted > 0 else devices


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A mesh over `devices` (default: mesh_devices), axes named MESH_AXES, in auto (GSPMD) sharding mode."""
    devices = list(devices if devices is not None else mesh_devices(mesh_cfg))
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(logical_axes, shape, mesh: Mesh, rules: dict[str, Any], name: str = "") -> PartitionSpec:
    """PartitionSpec for one array; an axis the mesh cannot divide evenly is an error naming the fix."""
    spec = []
    for logical, size in zip(logical_axes, shape):
        mesh_axes = rules.get(logical) if logical else None
        if mesh_axes is None:
            spec.append(None)
            continue
        axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        ways = math.prod(mesh.shape[a] for a in axes)
        if size % ways:
            hint = (
                "num_experts must be divisible by mesh.expert"
                if logical == "expert"
                else f"choose mesh sizes that divide {size}, or map '{logical}' to None in mesh.rules"
            )
            raise ValueError(
                f"{name or 'array'}: dimension '{logical}' of size {size} cannot be split "
                f"{ways} ways over mesh axes {axes}; {hint}"
            )
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def param_shardings(state: nnx.State, mesh: Mesh, rules: dict[str, Any] | None = None) -> nnx.State:
    """A State of NamedShardings parallel to a (possibly abstract) parameter State."""
    rules = DEFAULT_RULES | dict(rules or {})

    def one(path, variable):
        value = variable.get_value()
        axes = variable.get_metadata().get("logical_axes") or (None,) * len(value.shape)
        name = "/".join(str(p) for p in path)
        return NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh, rules, name))

    flat = nnx.to_flat_state(state)
    return nnx.from_flat_state([(path, variable.replace(one(path, variable))) for path, variable in flat])


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension split over BATCH_AXES, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh) -> int:
    """Global batch sizes must be multiples of this (the number of batch shards)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def host_to_global(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Assembles per-process rows into one global array (single- and multi-process alike)."""
    return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def global_to_host(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """This process's rows of a batch-sharded global array (the inverse of host_to_global)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    spec = PartitionSpec(BATCH_AXES, *([None] * (x.ndim - 1)))
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec))


def commit_to_mesh(tree, mesh: Mesh):
    """Places leaves not yet laid out on `mesh` (e.g. optimizer step counters) replicated on it, so a
    jitted step sees the same input shardings on its first call as on later ones (no recompilation).
    Goes through jit, which (unlike device_put) can target devices of other processes."""
    leaves, treedef = jax.tree.flatten(tree)
    on_mesh = [
        isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        for x in leaves
    ]
    moving = [x for x, ok in zip(leaves, on_mesh) if not ok]
    if moving:
        moved = iter(jax.jit(lambda xs: xs, out_shardings=replicated(mesh))(moving))
        leaves = [x if ok else next(moved) for x, ok in zip(leaves, on_mesh)]
    return jax.tree.unflatten(treedef, leaves)


def sum_over_hosts(x) -> np.ndarray:
    """Element-wise sum of a small host array over all processes (identity with one process)."""
    x = np.asarray(x, np.float64)
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x)).sum(axis=0)


def all_processes_agree(ok: bool) -> bool:
    """True iff `ok` holds on every process, so all processes take the same branch."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))
