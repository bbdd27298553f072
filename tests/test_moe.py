"""MoE dispatch strategies agree with each other and with a numpy reference; preset sizes match releases."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gspo_jax.models import dispatch, moe, tiled
from gspo_jax.models.config import PRESETS, ModelConfig
from gspo_jax.models.hf import abstract_model
from gspo_jax.models.qwen_moe import QwenMoeForCausalLM

E, K, D, I = 6, 2, 8, 5


def _experts(seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in ((E, D, I), (E, D, I), (E, I, D))]


def _routing(t, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(t, D)).astype(np.float32)
    router = rng.normal(size=(D, E)).astype(np.float32)
    _, ids, weights = moe.route(jnp.asarray(x), jnp.asarray(router), K, norm_topk_prob=False)
    return jnp.asarray(x), ids, weights


def numpy_moe(x, ids, weights, valid, gate, up, down, capacity=None):
    """Loop reference: assignment (t, j) is served unless its expert already has `capacity` real
    assignments of higher priority (all first choices in token order, then all second choices)."""
    x, ids, weights = map(np.asarray, (x, ids, weights))
    gate, up, down = map(np.asarray, (gate, up, down))
    y = np.zeros_like(x)
    used = np.zeros(gate.shape[0], int)
    dropped = 0
    for j in range(ids.shape[1]):
        for t in range(ids.shape[0]):
            if not valid[t]:
                continue
            e = ids[t, j]
            if capacity is not None and used[e] >= capacity:
                dropped += 1
                continue
            used[e] += 1
            h = x[t] @ gate[e]
            h = h / (1 + np.exp(-h)) * (x[t] @ up[e])
            y[t] += weights[t, j] * (h @ down[e])
    return y, dropped


@pytest.mark.parametrize("strategy", sorted(dispatch.DISPATCH_STRATEGIES))
def test_dropless_strategies_match_numpy(strategy):
    x, ids, weights = _routing(13)
    valid = np.ones(13, bool)
    valid[[2, 7]] = False
    gate, up, down = _experts()
    y, dropped = dispatch.DISPATCH_STRATEGIES[strategy](
        x, ids, weights, jnp.asarray(valid), gate, up, down, capacity_factor=0.0
    )
    ref, _ = numpy_moe(x, ids, weights, np.ones(13, bool), gate, up, down)
    # Masked tokens may be computed or not; only real tokens must match.
    np.testing.assert_allclose(np.asarray(y)[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert float(dropped) == 0


@pytest.mark.parametrize(
    "tokens, skew, batched",
    [(12, 0.0, True), (12, 0.9, True), (40, 1.0, True), (60, 0.5, False)],
)
def test_forward_only_tiled_paths_match_numpy(tokens, skew, batched):
    """Forward-only `tiled` (decode, prefill, scoring): padded per-expert buffers with the overflow of
    busy experts through the tile loop when experts get few rows on average, else the tile loop alone.
    Skewed routing sends most tokens to expert 0 (more than its buffer holds; 1.0: every token),
    expert 5 is never chosen, padding tokens take no rows."""
    rng = np.random.default_rng(tokens)
    first = np.where(rng.random(tokens) < skew, 0, rng.integers(1, 3, tokens))
    ids = np.stack([first, rng.integers(3, 5, tokens)], 1)
    x, weights = rng.normal(size=(tokens, D)), rng.random((tokens, K))
    valid = rng.random(tokens) > 0.2
    gate, up, down = _experts()
    assert (tokens * K <= tiled.BATCHED_MAX_MEAN_ROWS * E) == batched
    busiest = np.bincount(ids[valid].reshape(-1), minlength=E).max()
    if skew and batched:
        assert busiest > tiled.batched_capacity(tokens * K, E, tokens), busiest  # some rows overflow
    y, _ = tiled.tiled_dispatch(
        *map(jnp.asarray, (x.astype(np.float32), ids, weights.astype(np.float32), valid)),
        gate,
        up,
        down,
        capacity_factor=0.0,
    )
    ref, _ = numpy_moe(x, ids, weights, valid, gate, up, down)
    np.testing.assert_allclose(np.asarray(y)[valid], ref[valid], rtol=1e-5, atol=1e-5)


def test_capacity_drops_exactly_like_reference():
    x, ids, weights = _routing(20, seed=3)
    valid = np.ones(20, bool)
    valid[5] = False
    gate, up, down = _experts()
    factor = 0.6
    capacity = dispatch.expert_capacity(20, K, E, factor)
    assert capacity == 4  # ceil(0.6 * 20 * 2 / 6)
    y, dropped = dispatch.capacity_dispatch(
        x, ids, weights, jnp.asarray(valid), gate, up, down, capacity_factor=factor
    )
    ref, ref_dropped = numpy_moe(x, ids, weights, valid, gate, up, down, capacity=capacity)
    assert ref_dropped > 0 and float(dropped) == ref_dropped
    np.testing.assert_allclose(np.asarray(y)[valid], ref[valid], rtol=1e-5, atol=1e-5)


def test_strategies_give_same_gradients():
    x, ids, weights = _routing(11, seed=4)
    valid = jnp.ones(11, bool)
    experts = _experts(5)

    def loss(strategy, x, weights, *experts):
        y, _ = dispatch.DISPATCH_STRATEGIES[strategy](x, ids, weights, valid, *experts, capacity_factor=0.0)
        return jnp.sum(jnp.sin(y))

    grads = {
        s: jax.grad(loss, argnums=(1, 2, 3, 4, 5))(s, x, weights, *experts)
        for s in dispatch.DISPATCH_STRATEGIES
    }
    for s in ("capacity", "ragged", "tiled"):
        for g, g_ref in zip(grads[s], grads["dense"]):
            np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiled_backward_with_skewed_routing_matches_numpy_gradients(dtype):
    """The tiled dispatch's own backward (padded expert-sorted tiles) against float64 numpy gradients
    of the loop reference: one expert spans several tiles, one is never chosen, padding tokens. In
    bf16, the compiled gradient also never widens a whole row buffer to fp32 to update one tile
    (XLA:CPU's handling of a bf16 dynamic-update-slice, which made the bf16 update 2x slower)."""
    rng = np.random.default_rng(3)
    t, e, k = 150, 5, 2
    ids = np.stack([np.where(rng.random(t) < 0.6, 0, rng.integers(1, 3, t)), rng.integers(3, 4, (t,))], 1)
    x = rng.normal(size=(t, D))
    weights = rng.random((t, k))
    valid = rng.random(t) > 0.25
    gate, up, down = (rng.normal(size=s) * 0.5 for s in ((e, D, I), (e, D, I), (e, I, D)))
    dy = rng.normal(size=(t, D))
    tile = tiled.training_tile_rows(t * k, e)
    assert tile < np.sum((ids == 0) & valid[:, None])  # expert 0 spans tiles; expert 4 has none

    def loss(x, weights, gate, up, down):
        y, _ = tiled.tiled_dispatch(
            x, jnp.asarray(ids), weights, jnp.asarray(valid), gate, up, down, capacity_factor=0.0
        )
        return jnp.sum(y * dy)

    inputs = [jnp.asarray(v, dtype) for v in (x, weights, gate, up, down)]
    x, weights, gate, up, down = (
        np.asarray(v, np.float64) for v in inputs
    )  # the reference sees the rounding
    grad_fn = jax.jit(jax.grad(loss, argnums=range(5)))
    grads = grad_fn(*inputs)
    if dtype == "bfloat16":
        hlo = grad_fn.lower(*inputs).compile().as_text()
        assert not re.search(r"f32\[\d+,\d+\]\{1,0\} dynamic-update-slice\(%convert", hlo)
    expected = [np.zeros_like(v) for v in (x, weights, gate, up, down)]
    for token, j in zip(*np.nonzero(valid[:, None] & np.ones((1, k), bool))):
        ex, w = ids[token, j], weights[token, j]
        g, u = x[token] @ gate[ex], x[token] @ up[ex]
        sig = 1 / (1 + np.exp(-g))
        h = g * sig * u
        dz = down[ex] @ dy[token]  # d(unweighted expert output) pulled back through down: [I]
        dh = w * dz
        dg, du = dh * u * sig * (1 + g * (1 - sig)), dh * g * sig
        expected[0][token] += gate[ex] @ dg + up[ex] @ du
        expected[1][token, j] += h @ dz
        expected[2][ex] += np.outer(x[token], dg)
        expected[3][ex] += np.outer(x[token], du)
        expected[4][ex] += np.outer(h, w * dy[token])
    assert not np.any(expected[2][4]) and np.all(np.asarray(grads[2])[4] == 0)
    for got, want in zip(grads, expected):
        got = np.asarray(got, np.float64)
        if dtype == "float32":
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
        else:  # bf16 intermediates (pre-activations, h, cotangents): a few roundings of 2^-8
            np.testing.assert_allclose(got, want, rtol=0, atol=3e-2 * np.abs(want).max())


def test_tiled_backward_memory_grows_with_routed_rows_not_experts_times_tokens():
    """Compiled temporaries of a tiled forward + backward against byte counts from the shapes: the
    padded routed rows (x, y, gate, up, their cotangents) fit; the dropless capacity layout's
    experts x tokens slots would not."""
    t, d, i, e, k = 4096, 64, 64, 32, 2
    x = jax.ShapeDtypeStruct((t, d), jnp.float32)
    router = jax.ShapeDtypeStruct((d, e), jnp.float32)
    experts = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((e, d, i), (e, d, i), (e, i, d))]

    def loss(x, router, gate, up, down, strategy):
        _, ids, weights = moe.route(x, router, k, norm_topk_prob=True)
        valid = jnp.ones(t, bool)
        y, _ = dispatch.DISPATCH_STRATEGIES[strategy](
            x, ids, weights, valid, gate, up, down, capacity_factor=0.0
        )
        return jnp.sum(y * y)

    def temp_bytes(strategy):
        step = jax.jit(jax.grad(loss, argnums=range(5)), static_argnums=5)
        return step.lower(x, router, *experts, strategy).compile().memory_analysis().temp_size_in_bytes

    tile = tiled.training_tile_rows(t * k, e)
    rows = (-(-t * k // tile) + e) * tile  # padded routed rows: 10240 here, vs E x T = 131072 slots
    # Four [rows, D + I] f32 sets (x with gate, up, outputs and cotangents), f32 weight gradients and
    # a few [T, E] router arrays.
    routed = 4 * (4 * rows * (d + i) + 3 * e * d * i + 4 * t * e)
    assert temp_bytes("tiled") < routed  # measured 17.3 MiB vs 23.5 MiB
    assert temp_bytes("capacity") > 4 * routed  # measured 261 MiB


TINY = ModelConfig(
    vocab_size=50,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=8,
    shared_expert_intermediate_size=12,
    model_type="qwen2_moe",
    qkv_bias=True,
    qk_norm=False,
    initializer_range=0.3,
)


def test_model_outputs_and_gradients_agree_across_strategies():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 9)))
    valid = jnp.asarray(np.arange(9)[None, :] >= np.array([[0], [3]]))

    def loss_and_grad(strategy):
        model = QwenMoeForCausalLM(TINY.replace(moe_dispatch=strategy), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)

        def loss(params):
            out = nnx.merge(graphdef, params).forward(ids, valid_bt=valid)
            logits = nnx.merge(graphdef, params).logits(out.hidden)
            return jnp.sum(jnp.where(valid[..., None], jax.nn.log_softmax(logits), 0.0)) + out.aux_loss

        return jax.jit(jax.value_and_grad(loss))(params)

    ref_value, ref_grad = loss_and_grad("dense")
    for strategy in ("capacity", "ragged", "tiled"):
        value, grad = loss_and_grad(strategy)
        np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
        # fp32 sums in a different order: compare relative to each gradient's scale.
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * max(1.0, float(jnp.abs(b).max()))
            ),
            grad,
            ref_grad,
        )


def test_auto_dispatch_picks_tiled_on_cpu():
    assert dispatch.resolve_dispatch("auto") == ("tiled" if jax.default_backend() == "cpu" else "ragged")
    with pytest.raises(ValueError, match="moe_dispatch='grouped'"):
        dispatch.resolve_dispatch("grouped")


RELEASED = {  # total, active parameters (shared/QWEN_MOE.md)
    "qwen3_30b_a3b": (30_532_122_624, 3_353_032_704),
    "qwen3_235b_a22b": (235_093_634_560, 22_190_763_520),
    "qwen1_5_moe_a2_7b": (14_315_784_192, 2_689_173_504),
}


@pytest.mark.parametrize("preset", sorted(RELEASED))
def test_abstract_parameter_count_equals_release(preset):
    cfg = PRESETS[preset]
    _, state = abstract_model(cfg)
    leaves = {path: v.get_value() for path, v in nnx.to_flat_state(state)}
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in leaves.values())  # nothing allocated
    total = sum(int(np.prod(v.shape)) for v in leaves.values())
    # Expert weights are stacked [layers, E, ...]: one expert's share is the total over E.
    per_expert = sum(
        int(np.prod(v.shape)) // cfg.num_experts
        for p, v in leaves.items()
        if p[-1] in ("gate_proj", "up_proj", "down_proj") and "mlp" in p and len(v.shape) == 4
    )
    inactive = per_expert * (cfg.num_experts - cfg.num_experts_per_tok)
    assert (total, total - inactive) == RELEASED[preset]


def test_invalid_config_names_the_fix():
    with pytest.raises(ValueError, match="num_experts_per_tok=9 must be in"):
        TINY.replace(num_experts_per_tok=9)
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        TINY.replace(num_key_value_heads=3)
    with pytest.raises(ValueError, match="scan_unroll=-1: use an int >= 0"):
        TINY.replace(scan_unroll=-1)


def test_remat_gives_the_same_loss_and_gradients():
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 50, (2, 7)))

    def loss_and_grad(remat):
        graphdef, params = nnx.split(QwenMoeForCausalLM(TINY.replace(remat=remat), rngs=nnx.Rngs(0)))

        def loss(params):
            return jnp.sum(jax.nn.log_softmax(nnx.merge(graphdef, params)(ids))[..., 3])

        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
        assert ("checkpoint" in jaxpr or "remat" in jaxpr) == remat  # layers really are rematerialised
        return jax.jit(jax.value_and_grad(loss))(params)

    (value, grad), (value_remat, grad_remat) = loss_and_grad(False), loss_and_grad(True)
    np.testing.assert_allclose(float(value_remat), float(value), rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
        grad_remat,
        grad,
    )
