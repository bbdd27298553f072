"""Device mesh from config, and logical-axis rules that turn parameter axis names into NamedShardings.

Model code names each parameter dimension ("embed", "expert", "q_heads", ...) and each activation
dimension it constrains ("batch", "seq", ...); this module is the only place that knows which mesh axis
("data", "fsdp", "expert", "tensor") serves which logical name. Jitted phases run under `use_mesh`
(JAX's mesh context plus the run's parameter rules), which model code reads at trace time through
`activation_spec` / `param_spec`, so the model never holds a mesh object.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
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


# logical activation axis -> mesh axes, for constraints at layer boundaries. The batch is split like
# the data; the residual stream's hidden dim is not split (FSDP splits weights, not activations).
# Activation dims named like a parameter dim ("q_heads", "kv_heads", "mlp", ...) follow that
# parameter's rule, so the output of a head-sharded projection stays head-sharded over `tensor`.
ACTIVATION_RULES: dict[str, Any] = {"batch": BATCH_AXES, "seq": None, "embed": None}

_PARAM_RULES: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar(
    "param_rules", default=DEFAULT_RULES
)


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


def place_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """This process's rows [n, ...] -> the global batch array, rows split over BATCH_AXES."""
    return host_to_global(local, batch_sharding(mesh, np.ndim(local)))


def global_to_host(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """This process's rows of a batch-sharded global array (the inverse of host_to_global)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    spec = PartitionSpec(BATCH_AXES, *([None] * (x.ndim - 1)))
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec))


def shardings_of(tree):
    """The tree of its leaves' shardings (arrays, or ShapeDtypeStructs that carry one)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def _gathered(x) -> np.ndarray:
    """[process_count, ...]: `x` from every process, in process order ([1, ...] with one process)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x))


def sum_over_hosts(x) -> np.ndarray:
    """Element-wise sum of a small host array over all processes (identity with one process)."""
    return _gathered(np.asarray(x, np.float64)).sum(axis=0)


def all_processes_agree(ok: bool) -> bool:
    """True iff `ok` holds on every process, so all processes take the same branch."""
    return bool(np.all(_gathered(bool(ok))))


def config_errors(mesh_cfg, batch_sizes: dict[str, int], num_devices: int | None = None) -> list[str]:
    """Problems with the `mesh.*` keys: the axis sizes fit the devices, and every global batch size
    (config key -> rows) splits evenly over the batch shards."""
    try:
        devices = num_devices or len(mesh_devices(mesh_cfg))
        shape = dict(zip(MESH_AXES, mesh_shape(mesh_cfg, devices)))
    except ValueError as e:
        return [f"--config.mesh: {e}"]
    ways = math.prod(shape[a] for a in BATCH_AXES)
    return [
        f"--config.{key}: {rows} rows cannot be split over {ways} batch shards "
        f"(mesh data x fsdp x expert = {ways}); use a multiple of {ways}"
        for key, rows in batch_sizes.items()
        if rows % ways
    ]


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: dict[str, Any] | None = None):
    """JAX's mesh context (`jax.set_mesh`) plus the run's parameter rules, for tracing model code."""
    token = _PARAM_RULES.set(DEFAULT_RULES | dict(rules or {}))
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _PARAM_RULES.reset(token)


def on_mesh(fn, mesh: Mesh, rules: dict[str, Any] | None = None):
    """`fn` called (and so traced) under use_mesh(mesh, rules)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with use_mesh(mesh, rules):
            return fn(*args, **kwargs)

    if hasattr(fn, "lower"):  # a jitted fn stays inspectable: .lower(...).compile() traces the same way

        def lower(*args, **kwargs):
            with use_mesh(mesh, rules):
                return fn.lower(*args, **kwargs)

        call.lower = lower
    return call


def _mesh_axes(mapped) -> tuple[str, ...]:
    return () if mapped is None else ((mapped,) if isinstance(mapped, str) else tuple(mapped))


def _spec_entry(axes) -> Any:
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def param_spec(logical_axes, shape) -> PartitionSpec | None:
    """The PartitionSpec of a parameter under the active use_mesh context (None outside one), with
    mesh axes of size 1 left out: the same layout, and no no-op collectives over them."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    spec = logical_to_spec(logical_axes, shape, mesh, _PARAM_RULES.get())
    return PartitionSpec(*(_spec_entry([a for a in _mesh_axes(e) if mesh.shape[a] > 1]) for e in spec))


def activation_spec(logical_axes, shape) -> PartitionSpec | None:
    """PartitionSpec of an activation under the active mesh (None outside one).

    Names map by ACTIVATION_RULES, else by the parameter rules. Mesh axes of size 1, that the mesh
    lacks, that an earlier dim already uses, or that do not divide the dim evenly are left out (the
    dim stays replicated over them rather than padded).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    rules = _PARAM_RULES.get() | ACTIVATION_RULES
    used: set[str] = set()
    spec = []
    for logical, size in zip(logical_axes, shape):
        axes: list[str] = []
        for axis in _mesh_axes(rules.get(logical) if logical else None):
            if mesh.shape.get(axis, 1) > 1 and axis not in used:
                if size % math.prod(mesh.shape[a] for a in (*axes, axis)) == 0:
                    axes.append(axis)
        used.update(axes)
        spec.append(_spec_entry(axes))
    return PartitionSpec(*spec)


def constrain(x, logical_axes):
    """x with a sharding constraint by logical axis names under the active mesh; x itself outside one."""
    spec = activation_spec(logical_axes, x.shape)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def max_over_hosts(x: int) -> int:
    """The largest of a host-local integer over all processes, for sizes decided from local data (a
    bucket width): every process must build the same global shape, or collectives mismatch or hang."""
    return int(np.max(_gathered(int(x))))
