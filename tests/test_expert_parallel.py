"""Explicit expert parallelism (all-to-all over the `expert` mesh axis) on 8 simulated devices: outputs,
gradients and drop counts against single-device references, and the collectives XLA compiles."""

import collections
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_moe import numpy_moe

from gspo_jax import plan, sharding
from gspo_jax.models import dispatch, expert_parallel, moe
from gspo_jax.models.config import ModelConfig
from gspo_jax.models.hf import abstract_model
from gspo_jax.update import TrainState, UpdateSettings, make_train_fn

E, K, D, I = 8, 2, 16, 12
B, T = 8, 5


def make_mesh(**sizes):
    sizes = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1} | sizes
    return sharding.make_mesh(ml_collections.ConfigDict(sizes))


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape, scale=1.0: jnp.asarray(scale * rng.normal(size=shape).astype(np.float32))
    x = normal(B, T, D)
    router = normal(D, E)
    experts = (normal(E, D, I, scale=0.3), normal(E, D, I, scale=0.3), normal(E, I, D, scale=0.3))
    valid = jnp.asarray(rng.random((B, T)) > 0.2)
    return x, router, experts, valid


def _block(x, router, experts, valid, *, capacity_factor=0.0, inner="capacity", parallel=True):
    """Routing, then expert-parallel dispatch under the active mesh, or the dense single-device reference."""
    _, ids, weights = moe.route(x.reshape(B * T, D), router, K, norm_topk_prob=False)
    if not parallel:
        y, dropped = dispatch.dense_dispatch(
            x.reshape(B * T, D), ids, weights, valid.reshape(-1), *experts, capacity_factor=0.0
        )
        return y.reshape(B, T, D), dropped
    layout = expert_parallel.expert_parallel_layout(B, experts[0].shape, experts[2].shape)
    assert layout is not None and layout.expert_axis == "expert" and layout.ways == 4
    return expert_parallel.expert_parallel_dispatch(
        x,
        ids.reshape(B, T, K),
        weights.reshape(B, T, K),
        valid,
        *experts,
        layout=layout,
        capacity_factor=capacity_factor,
        inner=inner,
    )


def _loss(args, valid, **kw):
    y, dropped = _block(*args, valid, **kw)
    return jnp.sum(jnp.sin(y) * valid[..., None]), (y, dropped)


@pytest.mark.parametrize(
    "mesh_sizes, inner",
    [
        ({"data": 2, "expert": 4}, "capacity"),
        ({"fsdp": 2, "expert": 4}, "capacity"),
        ({"fsdp": 2, "expert": 4}, "ragged"),
        ({"expert": 4, "tensor": 2}, "tiled"),
    ],
)
def test_dropless_outputs_and_gradients_equal_dense_reference(mesh_sizes, inner):
    x, router, experts, valid = _problem()
    args = (x, router, experts)
    grad = jax.value_and_grad(_loss, has_aux=True)
    (_, (y_ref, _)), g_ref = jax.jit(lambda a: grad(a, valid, parallel=False))(args)
    with sharding.use_mesh(make_mesh(**mesh_sizes)):
        (_, (y, dropped)), g = jax.jit(lambda a: grad(a, valid, inner=inner))(args)
        # Without differentiation "tiled" runs its own loop (under it, capacity's VJP).
        y_forward, _ = jax.jit(lambda a: _block(*a, valid, inner=inner))(args)
    mask = np.asarray(valid)
    for out in (y, y_forward):
        np.testing.assert_allclose(np.asarray(out)[mask], np.asarray(y_ref)[mask], rtol=1e-5, atol=1e-5)
    assert float(dropped) == 0
    for name, a, b in zip(("x", "router", "gate", "up", "down"), jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=name)


def test_capacity_drops_equal_numpy_count_per_device():
    """Each of the 8 devices gives each expert ceil(f * tokens * k / E) slots for its own rows
    (first choices before second choices): the total drop count and the outputs follow that rule."""
    x, router, experts, valid = _problem(seed=2)
    factor = 1.0
    with sharding.use_mesh(make_mesh(data=2, expert=4)):
        y, dropped = jax.jit(lambda *a: _block(*a, capacity_factor=factor))(x, router, experts, valid)
    _, ids, weights = moe.route(x.reshape(B * T, D), router, K, norm_topk_prob=False)
    rows_per_device = B // 8
    tokens = rows_per_device * T
    capacity = int(np.ceil(factor * tokens * K / E))
    assert capacity == 2
    ref_y, ref_dropped = [], 0
    for dev in range(8):  # batch rows are split over data x fsdp x expert in device-block order
        rows = slice(dev * tokens, (dev + 1) * tokens)
        y_dev, n = numpy_moe(
            np.asarray(x).reshape(B * T, D)[rows],
            np.asarray(ids)[rows],
            np.asarray(weights)[rows],
            np.asarray(valid).reshape(-1)[rows],
            *experts,
            capacity=capacity,
        )
        ref_y.append(y_dev)
        ref_dropped += n
    assert ref_dropped > 0 and float(dropped) == ref_dropped
    mask = np.asarray(valid).reshape(-1)
    np.testing.assert_allclose(
        np.asarray(y).reshape(B * T, D)[mask], np.concatenate(ref_y)[mask], rtol=1e-5, atol=1e-5
    )


def test_no_expert_parallelism_without_mesh_or_when_off():
    assert expert_parallel.expert_parallel_layout(B, (E, D, I), (E, I, D)) is None  # no mesh context
    with sharding.use_mesh(make_mesh(data=8)):
        assert expert_parallel.expert_parallel_layout(B, (E, D, I), (E, I, D)) is None  # experts not split
    with sharding.use_mesh(make_mesh(data=2, expert=4)):
        assert (
            expert_parallel.expert_parallel_layout(2, (E, D, I), (E, I, D)) is None
        )  # 2 rows over 8 devices
    with pytest.raises(ValueError, match="expert_parallel='on'"):
        ModelConfig(expert_parallel="on")


# ---- the compiled train step ----

MODEL = ModelConfig(
    vocab_size=32,
    hidden_size=D,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts=E,
    num_experts_per_tok=K,
    moe_intermediate_size=I,
    norm_topk_prob=True,
)
_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?%\S+ = (.*?) (all-to-all|all-gather|reduce-scatter|all-reduce)(?:-start)?\("
)
_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")
_GROUPS = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")


def collectives(hlo: str) -> list[tuple[str, list[tuple[int, ...]], str]]:
    """(op, result shapes, replica groups text) of every collective in optimised HLO text."""
    found = []
    for line in hlo.splitlines():
        match = _COLLECTIVE.search(line)
        if match:
            shapes = [tuple(int(d) for d in s.split(",") if d) for s in _SHAPE.findall(match.group(1))]
            groups = _GROUPS.search(line)
            found.append((match.group(2), shapes, groups.group(1) if groups else ""))
    return found


def compiled_train_step(mesh, model_cfg=MODEL, rows=16, prompt=6, new=4, packed=False):
    """Optimised HLO of update.make_train_fn's step for `rows` sequences, traced under the mesh
    (packed: with the widest sequence-packing plan)."""
    return compile_train_step(mesh, model_cfg, rows, prompt, new, packed).as_text()


def compile_train_step(
    mesh, model_cfg=MODEL, rows=16, prompt=6, new=4, packed=False, accumulation=1, pin_state=False
):
    """update.make_train_fn's step compiled for `rows` sequences in 2 minibatches, each accumulated over
    `accumulation` micro-batches, traced under the mesh (packed: with the widest sequence-packing
    plan; pin_state: the new state's shardings pinned to the old one's, as the trainer does)."""
    graphdef, abstract = abstract_model(model_cfg)
    param_sh = sharding.param_shardings(abstract, mesh)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, param_sh)
    optimizer = optax.adamw(1e-3)
    replicated = sharding.replicated(mesh)
    opt_state = optax.tree_map_params(  # moments laid out like their parameters, counters replicated
        optimizer,
        lambda m, p: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=p.sharding),
        jax.eval_shape(optimizer.init, params),
        params,
        transform_non_params=lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
    )
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)

    batch = plan.abstract_rollout_batch(
        mesh, rows, prompt, new, packed_as=(2 * accumulation, 1) if packed else None
    )
    settings = UpdateSettings(
        level="sequence",
        eps_low=3e-4,
        eps_high=4e-4,
        aggregation="seq-mean-token-mean",
        beta=0.0,
        aux_loss_coef=1e-3,
        temperature=1.0,
        logprob_chunk=4,
        minibatches=2,
        iterations=1,
        accumulation=accumulation,
    )
    key = jax.eval_shape(lambda: jax.random.key(0))
    state = TrainState(params, opt_state, step)
    state_shardings = jax.tree.map(lambda a: a.sharding, state) if pin_state else None
    with sharding.use_mesh(mesh):
        train = make_train_fn(graphdef, optimizer, settings, state_shardings)
        return train.lower(state, batch, key).compile()


@pytest.mark.parametrize("mesh_sizes", [{"fsdp": 2, "expert": 4}, {"data": 2, "expert": 4}])
def test_train_step_exchanges_tokens_and_never_gathers_an_expert_weight(mesh_sizes):
    mesh = make_mesh(**mesh_sizes)
    found = collectives(compiled_train_step(mesh, MODEL.replace(num_hidden_layers=1)))
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    expert_axis_groups = {frozenset(map(int, g)) for g in np.moveaxis(ids, 2, -1).reshape(-1, 4)}
    all_to_all = [groups for op, _, groups in found if op == "all-to-all"]
    # The forward exchanges tokens and outputs, the backward their cotangents: over the expert axis only.
    assert len(all_to_all) >= 4
    for groups in all_to_all:
        used = {frozenset(map(int, g.split(","))) for g in re.findall(r"\{([\d,]+)\}", groups)}
        assert used == expert_axis_groups
    expert_shapes = {(E, D, I), (E, I, D)}
    gathered = [shape for op, shapes, _ in found if op == "all-gather" for shape in shapes]
    # Stacked layers hold [L, E, D, I]: a gather of a whole stack or of one layer's experts counts.
    assert not [shape for shape in gathered if tuple(shape[-3:]) in expert_shapes], gathered
    if mesh.shape["fsdp"] > 1:  # FSDP gathers D of the 2 local experts (the case the check is about)
        assert {(2, D, I), (2, I, D)} <= set(gathered), gathered


# ---- activation sharding constraints ----


def test_activation_specs_follow_the_rules():
    residual = ("batch", "seq", "embed")
    q_axes = ("batch", "seq", "q_heads", "head_dim")
    x = jnp.ones((8, 5, 16))
    assert sharding.activation_spec(residual, x.shape) is None and sharding.constrain(x, residual) is x
    with sharding.use_mesh(make_mesh(data=2, expert=4)):
        assert sharding.activation_spec(residual, (8, 5, 16)) == P(("data", "expert"), None, None)
        assert sharding.activation_spec(residual, (4, 5, 16)) == P("data", None, None)  # 4 rows: not 8 ways
    mesh = make_mesh(fsdp=2, expert=2, tensor=2)
    with sharding.use_mesh(mesh):
        assert sharding.activation_spec(q_axes, (8, 5, 4, 8)) == P(("fsdp", "expert"), None, "tensor", None)
        assert sharding.activation_spec(q_axes, (8, 5, 1, 8)) == P(("fsdp", "expert"), None, None, None)
        mlp_spec = sharding.activation_spec(("batch", "seq", "mlp"), (8, 5, 24))
        assert mlp_spec == P(("fsdp", "expert"), None, "tensor")
    with sharding.use_mesh(mesh, {"q_heads": None}):  # run rules reach activations named like parameters
        assert sharding.activation_spec(q_axes, (8, 5, 4, 8)) == P(("fsdp", "expert"), None, None, None)


def all_eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in it (scan bodies over layer stacks)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from all_eqns(inner)


def test_layer_boundaries_carry_the_constraints():
    graphdef, params = abstract_model(MODEL.replace(mlp_only_layers=(0,)))
    forward = lambda params, ids: nnx.merge(graphdef, params).forward(ids).hidden
    with sharding.use_mesh(make_mesh(fsdp=2, expert=2, tensor=2)):
        jaxpr = jax.make_jaxpr(forward)(params, jax.ShapeDtypeStruct((8, 5), jnp.int32))
    specs = collections.Counter(
        e.params["sharding"].spec for e in all_eqns(jaxpr.jaxpr) if e.primitive.name == "sharding_constraint"
    )
    rows = ("fsdp", "expert")
    assert specs == {
        P(rows, None, None): 3 * 2,  # residual stream: layer input, after attention, layer output
        P(rows, None, "tensor", None): 4 * 2,  # q, k, v and attention output: heads over tensor
        P(rows, None, "tensor"): 1,  # the dense layer's MLP hidden
        P(rows, None): 2,  # the MoE layer's router input and logits (tokens split like rows)
    }
