"""Routing replay: a forward given cached expert ids routes through exactly those experts, weighted by the
current router (numpy reference, finite differences), under every dispatch strategy and expert parallelism."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_moe import numpy_moe

from gspo_jax import diagnostics, sharding
from gspo_jax.models import dispatch, expert_parallel, moe
from gspo_jax.models.config import ModelConfig
from gspo_jax.models.qwen_moe import QwenMoeForCausalLM

# Layers 0 and 2 MoE, 1 dense: two scanned MoE runs around a dense one, so replay ids are split per run.
CFG = ModelConfig(
    vocab_size=50,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=3,
    mlp_only_layers=(1,),
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=8,
    norm_topk_prob=True,
    initializer_range=0.3,
)
STRATEGIES = sorted(dispatch.DISPATCH_STRATEGIES)


def _tokens(rows=2, steps=9, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (rows, steps)))
    valid = jnp.asarray(np.arange(steps)[None, :] >= (np.arange(rows) % 3)[:, None])  # left padding
    return tokens, valid


def _forward(graphdef, params, tokens, valid, replay=None):
    """(logits [B, T, V], expert ids [L_moe, B, T, k]) of one jitted forward."""

    def run(params, replay):
        model = nnx.merge(graphdef, params)
        out = model.forward(tokens, valid_bt=valid, replay_expert_ids=replay)
        return model.logits(out.hidden), out.router_stats.expert_ids

    return jax.jit(run)(params, replay)


def _perturb_routers(params, seed=1, scale=2.0):
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        if any(getattr(p, "key", None) == "router" for p in path):
            return x + scale * jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
        return x

    return jax.tree_util.tree_map_with_path(perturb, params)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_replay_with_unchanged_params_equals_the_normal_forward(strategy):
    graphdef, params = nnx.split(QwenMoeForCausalLM(CFG.replace(moe_dispatch=strategy), rngs=nnx.Rngs(0)))
    tokens, valid = _tokens()
    logits, ids = _forward(graphdef, params, tokens, valid)
    assert ids.shape == (2, 2, 9, 2) and ids.dtype == jnp.int32
    replayed_logits, replayed_ids = _forward(graphdef, params, tokens, valid, ids)
    np.testing.assert_allclose(np.asarray(replayed_logits), np.asarray(logits), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(replayed_ids), np.asarray(ids))
    assert float(jnp.max(diagnostics.routing_volatility(ids, replayed_ids, valid))) == 0


def test_replay_with_changed_params_differs_only_through_routing():
    graphdef, params = nnx.split(QwenMoeForCausalLM(CFG.replace(moe_dispatch="dense"), rngs=nnx.Rngs(0)))
    tokens, valid = _tokens(rows=4)
    _, old_ids = _forward(graphdef, params, tokens, valid)
    moved = _perturb_routers(params)
    logits, ids = _forward(graphdef, moved, tokens, valid)
    assert float(jnp.min(diagnostics.routing_volatility(old_ids, ids, valid))) > 0.1  # routing moved
    replayed_logits, replayed_ids = _forward(graphdef, moved, tokens, valid, old_ids)
    np.testing.assert_array_equal(np.asarray(replayed_ids), np.asarray(old_ids))
    assert float(jnp.max(jnp.abs(replayed_logits - logits))) > 1e-3  # other experts, other outputs
    # Given the moved policy's own choices, replay is the moved policy's normal forward.
    same_logits, _ = _forward(graphdef, moved, tokens, valid, ids)
    np.testing.assert_allclose(np.asarray(same_logits), np.asarray(logits), rtol=0, atol=1e-6)


def _replay_problem(seed=2):
    rng = np.random.default_rng(seed)
    b, t, d, e, k = 2, 5, CFG.hidden_size, CFG.num_experts, CFG.num_experts_per_tok
    x = rng.normal(size=(b, t, d)).astype(np.float32)
    valid = rng.random((b, t)) > 0.25
    replay = np.stack([rng.permutation(e)[:k] for _ in range(b * t)]).reshape(b, t, k).astype(np.int32)
    return x, valid, replay


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_replayed_block_matches_numpy_with_the_given_experts(strategy):
    block = moe.MoeBlock(CFG.replace(moe_dispatch=strategy), rngs=nnx.Rngs(3))
    x, valid, replay = _replay_problem()
    y, stats = block(jnp.asarray(x), jnp.asarray(valid), replay_ids_btk=jnp.asarray(replay))
    natural = np.asarray(block(jnp.asarray(x), jnp.asarray(valid))[1].expert_ids)
    assert np.mean(np.sort(natural, -1) != np.sort(replay, -1)) > 0.5  # replay really overrides routing
    np.testing.assert_array_equal(np.asarray(stats.expert_ids), replay)
    # Reference: softmax router probabilities at the given ids, renormalised (norm_topk_prob).
    x_td, ids_tk = x.reshape(-1, x.shape[-1]), replay.reshape(-1, replay.shape[-1])
    logits = x_td @ np.asarray(block.router.value)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    weights = np.take_along_axis(probs, ids_tk, axis=-1)
    weights /= weights.sum(-1, keepdims=True)
    experts = (block.gate_proj.value, block.up_proj.value, block.down_proj.value)
    expected, _ = numpy_moe(x_td, ids_tk, weights, valid.reshape(-1), *experts)
    keep = valid.reshape(-1)
    np.testing.assert_allclose(
        np.asarray(y).reshape(-1, x.shape[-1])[keep], expected[keep], rtol=1e-5, atol=1e-5
    )


def test_replay_keeps_the_router_gradient():
    block = moe.MoeBlock(CFG, rngs=nnx.Rngs(3))
    x, valid, replay = _replay_problem()
    x_td, valid_t = jnp.asarray(x.reshape(-1, x.shape[-1])), jnp.asarray(valid.reshape(-1))
    replay_tk = jnp.asarray(replay.reshape(-1, replay.shape[-1]))
    experts = (block.gate_proj.value, block.up_proj.value, block.down_proj.value)

    def loss(router):
        _, ids, weights = moe.route(x_td, router, CFG.num_experts_per_tok, True, replay_tk)
        y, _ = dispatch.capacity_dispatch(x_td, ids, weights, valid_t, *experts, capacity_factor=0.0)
        return jnp.sum(jnp.where(valid_t[:, None], jnp.sin(y), 0.0))

    router = block.router.value
    grad = jax.grad(loss)(router)
    assert float(jnp.max(jnp.abs(grad))) > 1e-3
    # Central differences along a random direction (the ids are fixed, so the loss is smooth).
    direction = jnp.asarray(np.random.default_rng(4).normal(size=router.shape).astype(np.float32))
    eps = 1e-2
    numeric = (loss(router + eps * direction) - loss(router - eps * direction)) / (2 * eps)
    assert float(jnp.sum(grad * direction)) == pytest.approx(float(numeric), rel=2e-3, abs=1e-4)


def test_replay_under_expert_parallelism_equals_the_normal_forward():
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}))
    graphdef, params = nnx.split(QwenMoeForCausalLM(CFG.replace(moe_dispatch="capacity"), rngs=nnx.Rngs(0)))
    tokens, valid = _tokens(rows=8)
    with sharding.use_mesh(mesh):
        assert expert_parallel.expert_parallel_layout(8, (CFG.num_experts, 16, 8), (CFG.num_experts, 8, 16)) is not None
        logits, ids = _forward(graphdef, params, tokens, valid)
        replayed_logits, replayed_ids = _forward(graphdef, params, tokens, valid, ids)
    single_logits, single_ids = _forward(graphdef, params, tokens, valid)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(single_ids))
    np.testing.assert_array_equal(np.asarray(replayed_ids), np.asarray(ids))
    np.testing.assert_allclose(np.asarray(replayed_logits), np.asarray(logits), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(single_logits), rtol=0, atol=1e-5)


def test_replay_ids_of_the_wrong_shape_name_the_expected_one():
    graphdef, params = nnx.split(QwenMoeForCausalLM(CFG, rngs=nnx.Rngs(0)))
    tokens, valid = _tokens()
    with pytest.raises(ValueError, match=r"expected \(2, 2, 9, 2\)"):
        _forward(graphdef, params, tokens, valid, jnp.zeros((3, 2, 9, 2), jnp.int32))
