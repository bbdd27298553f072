"""Gradient accumulation (algo.grad_accumulation): the aggregation identity in numpy, accumulated updates
against one update on the whole minibatch (unpacked, packed, routing replay, token-mean), the
load-balancing loss as the micro-batches' mean, config errors, the planner, and the accumulating step
compiled on 8 devices (accumulator sharded like the parameters, no expert weight gathered)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_packing import _rollout
from test_routing_replay import CFG

from gspo_jax import losses, packing
from gspo_jax.models.qwen_moe import QwenMoeForCausalLM
from gspo_jax.update import RolloutBatch, TrainState, UpdateSettings, make_score_fn, make_train_fn

SETTINGS = UpdateSettings(
    level="sequence",
    eps_low=0.05,
    eps_high=0.08,
    aggregation="seq-mean-token-mean",
    beta=0.0,
    aux_loss_coef=0.0,
    temperature=1.0,
    logprob_chunk=4,
    minibatches=1,
    iterations=1,
)


def np_seq_mean_token_mean(values, mask):
    lengths = mask.sum(axis=1)
    used = lengths > 0
    return float((values * mask).sum(axis=1)[used].dot(1 / lengths[used]) / max(used.sum(), 1))


def np_token_mean(values, mask):
    return float((values * mask).sum() / max(mask.sum(), 1))


@pytest.mark.parametrize(
    "aggregation, np_aggregate",
    [("seq-mean-token-mean", np_seq_mean_token_mean), ("token-mean", np_token_mean)],
)
def test_weighted_parts_make_the_whole_batch_aggregate(aggregation, np_aggregate):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(12, 7))
    mask = (rng.uniform(size=(12, 7)) < 0.6).astype(np.float32)
    mask[3] = 0  # a sequence with no token
    mask[8:] = 0  # a whole part with no token
    denominators = [float(losses.aggregation_denominator(aggregation, mask[i : i + 4])) for i in (0, 4, 8)]
    total = float(losses.aggregation_denominator(aggregation, mask))
    parts = sum(
        d / total * np_aggregate(values[i : i + 4], mask[i : i + 4]) for d, i in zip(denominators, (0, 4, 8))
    )
    assert parts == pytest.approx(np_aggregate(values, mask), rel=1e-6)
    assert denominators[2] == 0
    jax_whole = float(losses.AGGREGATIONS[aggregation](jnp.asarray(values), jnp.asarray(mask) != 0))
    assert jax_whole == pytest.approx(np_aggregate(values, mask), rel=1e-5)


def _batch(graphdef, params, expert_ids=False, rows=8):
    tokens, valid, prompt_lens, completion_lens = _rollout(rows=rows)
    # Three rows whose completions the trainer ignores (as if truncated away): micro-batches then hold
    # different numbers of sequences that count, and equal weights would be wrong.
    mask = valid[:, 5:].astype(jnp.float32).at[jnp.array([1, 2, 6])].set(0.0)
    old_params = jax.tree.map(lambda x: x * 1.05, params)  # ratios away from 1: some sequences clip
    old_logp, old_ids = make_score_fn(graphdef, SETTINGS, with_expert_ids=True)(
        old_params, tokens, valid, mask
    )
    batch = RolloutBatch(
        tokens=tokens,
        valid=valid,
        completion_mask=mask,
        advantages=jnp.asarray(np.random.default_rng(4).normal(size=rows), jnp.float32),
        old_logp=old_logp,
        sampler_logp=old_logp + 0.01,
        ref_logp=old_logp,
        expert_ids=old_ids if expert_ids else None,
    )
    return batch, prompt_lens, completion_lens


def _train(graphdef, params, settings, batch, optimizer=None):
    # SGD: a second update's metrics and the parameters depend linearly on the gradients, whose float
    # rounding differs between the two groupings (Adam's first step moves a weight by ~lr whatever
    # its gradient's size, so rounding in tiny gradients would show at ~lr)
    optimizer = optimizer or optax.sgd(1.0)
    fresh = jax.tree.map(jnp.array, params)  # the train step donates its state
    state = TrainState(params=fresh, opt_state=optimizer.init(fresh), step=jnp.zeros((), jnp.int32))
    return make_train_fn(graphdef, optimizer, settings)(state, batch, jax.random.key(3))


def _assert_same_update(got, want, skip=()):
    (state, metrics), (ref_state, ref_metrics) = got, want
    assert set(metrics) == set(ref_metrics)
    for name in sorted(set(ref_metrics) - set(skip)):
        np.testing.assert_allclose(
            np.asarray(metrics[name]), np.asarray(ref_metrics[name]), rtol=2e-5, atol=2e-6, err_msg=name
        )
    for got_leaf, want_leaf in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(got_leaf), np.asarray(want_leaf), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "level, aggregation, replay",
    [
        ("sequence", "seq-mean-token-mean", False),
        ("token", "token-mean", False),
        ("sequence", "seq-mean-token-mean", True),
    ],
)
def test_accumulated_update_is_the_whole_minibatch_update(level, aggregation, replay):
    """Two minibatches of 8 rows, each accumulated over 4 micro-batches of 2, against the same two
    updates computed on the whole minibatches: losses, every metric and the parameters agree (the
    load-balancing loss is off here: it is a per-micro-batch mean by design, tested below)."""
    graphdef, params = nnx.split(QwenMoeForCausalLM(CFG, rngs=nnx.Rngs(0)))
    batch, _, _ = _batch(graphdef, params, expert_ids=replay, rows=16)
    settings = dataclasses.replace(
        SETTINGS,
        level=level,
        aggregation=aggregation,
        eps_low=None if level == "token" else 0.05,
        eps_high=None if level == "token" else 0.08,
        minibatches=2,
        routing_replay=replay,
        routing_volatility=True,
        beta=0.05,
    )
    whole = _train(graphdef, params, settings, batch)
    accumulated = _train(graphdef, params, dataclasses.replace(settings, accumulation=4), batch)
    assert float(jnp.max(whole[1]["clip_frac/seq"])) > 0  # the clipped branch is exercised
    assert float(jnp.min(whole[1]["routing/volatility"])) > 0  # routing moved: the metric is not trivially 0
    _assert_same_update(accumulated, whole, skip=("moe/aux_loss",))


def test_packed_accumulated_update_is_the_whole_minibatch_update():
    """Packed micro-batches (a plan of minibatches x accumulation chunks) against one unpacked update on
    the same 8 sequences."""
    graphdef, params = nnx.split(QwenMoeForCausalLM(CFG, rngs=nnx.Rngs(0)))
    batch, prompt_lens, completion_lens = _batch(graphdef, params)
    plan = packing.plan_packing(
        prompt_lens,
        completion_lens,
        prompt_width=5,
        completion_width=6,
        shards=1,
        minibatches=2,  # one minibatch update x 2 micro-batches
        passes=1,
        rng=np.random.default_rng(5),
    )
    assert plan.rows < 4
    packed = dataclasses.replace(batch, packing=jax.tree.map(jnp.asarray, plan))
    accumulated = _train(graphdef, params, dataclasses.replace(SETTINGS, accumulation=2), packed)
    whole = _train(graphdef, params, SETTINGS, batch)
    _assert_same_update(accumulated, whole, skip=("moe/aux_loss",))
    with pytest.raises(ValueError, match="algo.minibatches x algo.grad_accumulation"):
        _train(graphdef, params, dataclasses.replace(SETTINGS, accumulation=4), packed)


def test_load_balancing_loss_is_the_micro_batches_mean():
    graphdef, params = nnx.split(QwenMoeForCausalLM(CFG, rngs=nnx.Rngs(0)))
    batch, _, _ = _batch(graphdef, params)
    settings = dataclasses.replace(SETTINGS, aux_loss_coef=0.5)
    optimizer = optax.sgd(0.0)  # parameters stay put, so each half can be scored alone
    _, metrics = _train(graphdef, params, dataclasses.replace(settings, accumulation=2), batch, optimizer)
    order = np.asarray(jax.random.permutation(jax.random.split(jax.random.key(3), 1)[0], 8))
    halves = []
    for rows in (order[:4], order[4:]):
        half = jax.tree.map(lambda x, rows=rows: x[rows], batch)
        halves.append(_train(graphdef, params, settings, half, optimizer)[1])
    aux = np.mean([float(h["moe/aux_loss"][0, 0]) for h in halves])
    assert float(metrics["moe/aux_loss"][0, 0]) == pytest.approx(aux, rel=1e-5)
    _, whole = _train(graphdef, params, settings, batch, optimizer)
    assert abs(float(whole["moe/aux_loss"][0, 0]) - aux) > 1e-4  # not the whole batch's own aux loss
    policy = float(metrics["loss/policy"][0, 0])
    assert policy == pytest.approx(float(whole["loss/policy"][0, 0]), rel=1e-5)
    assert float(metrics["loss"][0, 0]) == pytest.approx(policy + 0.5 * aux, rel=1e-5)


def test_config_errors_name_the_key_and_the_fix():
    import micro_config

    from gspo_jax.train import ConfigError, validate_config

    cfg = micro_config.get_config()  # 16 rows, 2 minibatches of 8
    cfg.algo.grad_accumulation = 3
    with pytest.raises(ConfigError, match=r"grad_accumulation: 3 does not divide the 8 completions"):
        validate_config(cfg)
    cfg.algo.grad_accumulation = 0
    with pytest.raises(ConfigError, match="must be >= 1"):
        validate_config(cfg)
    cfg = micro_config.override(micro_config.get_config(), **{"mesh.num_devices": 8, "mesh.data": 8})
    cfg.algo.grad_accumulation = 2  # micro-batches of 4 rows over 8 batch shards
    with pytest.raises(
        ConfigError, match=r"algo.grad_accumulation: 4 rows cannot be split over 8 batch shards"
    ):
        validate_config(cfg, num_devices=8)


def test_planner_divides_activations_and_adds_the_accumulator():
    from configs.qwen_moe import get_config
    from gspo_jax import plan

    cfg = get_config("qwen3_30b_a3b")
    one = plan.plan(cfg, 64, "tpu-v5p")["bytes_per_device"]
    cfg.algo.grad_accumulation = 4
    four = plan.plan(cfg, 64, "tpu-v5p")["bytes_per_device"]
    assert one["grad_accumulator"] == 0
    assert four["grad_accumulator"] == pytest.approx(one["params"] * 4 / 4)  # fp32 params: one more copy
    assert four["activations"] < 0.3 * one["activations"]
    assert four["train_peak"] - one["train_peak"] == pytest.approx(
        four["grad_accumulator"] + four["activations"] - one["activations"]
    )


@pytest.mark.parametrize("packed", [False, True])
def test_accumulating_step_on_8_devices_gathers_nothing_new_and_keeps_experts_split(packed):
    """fsdp 2 x expert 4, 2 minibatch updates of 16 rows: accumulated over 2 micro-batches the step
    all-gathers exactly what the plain step does (FSDP's weight shards, never a whole expert stack),
    no device holds an fp32 array of all experts' weights (the accumulator is split like them), and
    the temporaries shrink."""
    import re

    from test_expert_parallel import MODEL, D, E, I, collectives, compile_train_step, make_mesh

    mesh = make_mesh(fsdp=2, expert=4)
    model = MODEL.replace(num_hidden_layers=1)
    plain, accumulated = (
        compile_train_step(mesh, model, rows=32, packed=packed, accumulation=k, pin_state=True)
        for k in (1, 2)
    )

    def gathered(compiled):
        return {
            tuple(s)
            for op, shapes, _ in collectives(compiled.as_text())
            if op == "all-gather"
            for s in shapes
        }

    assert gathered(accumulated) == gathered(plain)
    assert not {s for s in gathered(accumulated) if s[-3:] in {(E, D, I), (E, I, D)}}
    whole_stack = re.compile(rf"f32\[(?:1,)?(?:{E},{D},{I}|{E},{I},{D})\]")
    assert not whole_stack.search(accumulated.as_text())
    plain_mem, acc_mem = plain.memory_analysis(), accumulated.memory_analysis()
    assert acc_mem.argument_size_in_bytes == plain_mem.argument_size_in_bytes
    assert acc_mem.temp_size_in_bytes < plain_mem.temp_size_in_bytes


def test_rl_step_with_accumulation_equals_one_update():
    """A whole RLStep on two batch shards with packing, old-policy and reference scoring: the update
    accumulated over 2 micro-batches gives the parameters and metrics of the plain one (load-balancing
    loss off: it is a per-micro-batch mean)."""
    from test_packing import NO_AUX, _one_rl_step

    params, metrics, rows, lengths = _one_rl_step(True, **NO_AUX, **{"algo.grad_accumulation": 2})
    ref_params, ref_metrics, ref_rows, ref_lengths = _one_rl_step(True, **NO_AUX)  # cached: test_packing
    np.testing.assert_array_equal(lengths, ref_lengths)
    assert rows and ref_rows  # both packed their update and scoring
    for key in ("loss", "entropy", "kl_ref", "clip_frac/seq", "logprob_gap/token_abs", "grad_norm"):
        name = next(k for k in ref_metrics if k == key or k.startswith(key + "/"))
        assert metrics[name] == pytest.approx(ref_metrics[name], rel=1e-4, abs=1e-6), name
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
