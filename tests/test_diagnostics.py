"""gspo_jax.diagnostics against loops over hand-made inputs, and a trainer run that logs them."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_routing_replay import CFG

import micro_config as micro
from gspo_jax import diagnostics
from gspo_jax.models.qwen_moe import QwenMoeForCausalLM
from gspo_jax.rl_step import summarize_updates
from gspo_jax.train import ConfigError, validate_config
from gspo_jax.update import RolloutBatch, TrainState, UpdateSettings, make_score_fn, make_train_fn
from gspo_jax.trainer import Trainer


def np_volatility(before, after, valid):
    """Per layer: positions with valid != 0 whose expert sets differ, over the valid positions."""
    layers, rows, steps, _ = before.shape
    out = []
    for l in range(layers):
        changed = sum(
            set(before[l, b, t]) != set(after[l, b, t])
            for b in range(rows)
            for t in range(steps)
            if valid[b, t]
        )
        out.append(changed / max(int(np.sum(valid != 0)), 1))
    return np.asarray(out)


def test_volatility_compares_sets_over_valid_positions():
    before = np.array(  # [L=2, B=2, T=3, k=2]
        [
            [[[0, 1], [2, 3], [4, 5]], [[1, 2], [3, 0], [5, 4]]],
            [[[0, 1], [2, 3], [4, 5]], [[1, 2], [3, 0], [5, 4]]],
        ]
    )
    after = before.copy()
    after[0, 0, 0] = [1, 0]  # same set, other order: unchanged
    after[0, 0, 1] = [2, 7]  # changed
    after[0, 1, 2] = [6, 7]  # changed, but a padding position
    after[1, 1, 0] = [2, 1]  # same set
    after[1, 1, 1] = [0, 6]  # changed
    after[1, 0, 2] = [4, 0]  # changed
    valid = np.array([[1, 1, 1], [1, 1, 0]])
    per_layer = np.asarray(diagnostics.routing_volatility(before, after, valid))
    np.testing.assert_allclose(per_layer, [1 / 5, 2 / 5], rtol=1e-6)
    np.testing.assert_allclose(per_layer, np_volatility(before, after, valid), rtol=1e-6)
    metrics = diagnostics.volatility_metrics(before, after, valid)
    assert float(metrics["routing/volatility"]) == pytest.approx(3 / 10)
    assert float(metrics["routing/volatility_layer1"]) == pytest.approx(2 / 5)


def test_volatility_on_random_ids_matches_the_loop():
    rng = np.random.default_rng(0)
    before = np.stack([rng.permutation(8)[:3] for _ in range(3 * 4 * 6)]).reshape(3, 4, 6, 3)
    after = before.copy()
    redraw = rng.random((3, 4, 6)) < 0.3
    after[redraw] = [rng.permutation(8)[:3] for _ in range(int(redraw.sum()))]
    after = np.where(rng.random((3, 4, 6, 1)) < 0.3, after[..., ::-1], after)  # reorder some
    valid = rng.random((4, 6)) < 0.7
    np.testing.assert_allclose(
        np.asarray(diagnostics.routing_volatility(before, after, valid)),
        np_volatility(before, after, valid),
        rtol=1e-6,
    )


def test_length_bin_edges_split_one_to_max_new_tokens():
    assert diagnostics.length_bin_edges(8) == (2, 4, 6, 8)
    assert diagnostics.length_bin_edges(10) == (3, 5, 8, 10)
    assert diagnostics.length_bin_edges(3) == (1, 2, 3, 3)  # the last bin can never hold a length


def test_ratio_by_length_matches_numpy_variances():
    rng = np.random.default_rng(1)
    lengths = np.array([1, 2, 2, 8, 7, 0, 8, 5, 2, 8])  # bins (edges 2, 4, 6, 8): 4, 0, 1, 4; one empty row
    mask = (np.arange(8)[None, :] < lengths[:, None]).astype(np.float32)
    old = -rng.uniform(0.1, 3.0, mask.shape).astype(np.float32)
    logp = np.where(mask != 0, old + rng.normal(0, 0.3, mask.shape), 1e6).astype(
        np.float32
    )  # garbage on padding
    edges = diagnostics.length_bin_edges(8)
    got = {k: float(v) for k, v in diagnostics.ratio_by_length(logp, old, mask, edges).items()}
    lower = 0
    for j, upper in enumerate(edges):
        rows = [i for i, n in enumerate(lengths) if lower < n <= upper]
        sums = np.array(
            [np.sum(logp[i, : lengths[i]].astype(np.float64) - old[i, : lengths[i]]) for i in rows]
        )
        means = sums / lengths[rows] if rows else sums
        assert got[f"ratio_len/bin{j}_count"] == len(rows)
        for stat, values in (("var_token_logratio_sum", sums), ("var_seq_logratio", means)):
            expected = np.var(values) if rows else 0.0  # an empty bin logs count 0 and variance 0
            assert got[f"ratio_len/bin{j}_{stat}"] == pytest.approx(expected, rel=1e-5, abs=1e-9)
        lower = upper
    assert got["ratio_len/bin1_count"] == 0 and got["ratio_len/bin1_var_seq_logratio"] == 0
    # Long sequences: the sum's variance grows with length, the normalised one's shrinks.
    assert got["ratio_len/bin3_var_token_logratio_sum"] > got["ratio_len/bin3_var_seq_logratio"]


def test_step_row_pools_bin_variances_over_updates():
    per_update = {  # [iterations=2, minibatches=2]
        "ratio_len/bin0_count": np.array([[2.0, 0.0], [1.0, 1.0]]),
        "ratio_len/bin0_var_token_logratio_sum": np.array([[0.5, 0.0], [2.0, 1.0]]),
        "ratio_len/bin0_var_seq_logratio": np.array([[0.25, 0.0], [1.0, 0.5]]),
        "loss": np.array([[1.0, 2.0], [3.0, 4.0]]),
        "logprob_gap/token_abs": np.zeros((2, 2)),
        "logprob_gap/seq_abs": np.zeros((2, 2)),
    }
    row = summarize_updates(per_update, (4,))
    assert row["ratio_len/bin0_max_len"] == 4
    assert row["ratio_len/bin0_count"] == 2  # 4 sequence-updates over 2 iterations
    assert row["ratio_len/bin0_var_token_logratio_sum"] == pytest.approx((2 * 0.5 + 2.0 + 1.0) / 4)
    assert row["ratio_len/bin0_var_seq_logratio"] == pytest.approx((2 * 0.25 + 1.0 + 0.5) / 4)
    assert row["loss"] == 2.5 and not any(k.startswith("ratio_len/") and "mb" in k for k in row)


# The second case replays sampler-run batches on a data x expert x tensor mesh (expert parallelism).
SHARDED = {"mesh.num_devices": 8, "mesh.data": 2, "mesh.expert": 2, "mesh.tensor": 2}


@pytest.mark.parametrize("old_logprobs, mesh", [("trainer", {}), ("sampler", SHARDED)])
def test_trainer_logs_diagnostics_and_replay_routes_exactly(tmp_path, old_logprobs, mesh):
    cfg = micro.override(
        micro.get_config(),
        workdir=str(tmp_path / "run"),
        **mesh,
        **{
            "algo.importance_sampling_level": "token",
            "algo.routing_replay": True,
            "algo.old_logprobs": old_logprobs,
            "log.routing_volatility": True,
            "eval.every": 0,
            "warmstart.steps": 0,
            "log.samples_every": 0,
            "log.tensorboard": False,
        },
    )
    Trainer(cfg).run()
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if "reward/mean" in line]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["routing/replay_volatility"] == 0
        assert 0 <= row["routing/volatility"] <= 1
        layers = [row[f"routing/volatility_layer{i}"] for i in range(2)]
        assert row["routing/volatility"] == pytest.approx(np.mean(layers))
        assert [row[f"ratio_len/bin{j}_max_len"] for j in range(4)] == [2, 4, 6, 8]
        counts = [row[f"ratio_len/bin{j}_count"] for j in range(4)]
        assert sum(counts) <= 16 and all(
            np.isfinite(row[f"ratio_len/bin{j}_var_seq_logratio"]) for j in range(4)
        )
        assert {"clip_frac/seq", "clip_frac/token"} <= set(row)


def test_switches_must_be_booleans():
    cfg = micro.override(micro.get_config(), **{"algo.routing_replay": None, "log.routing_volatility": None})
    with pytest.raises(ConfigError) as error:
        validate_config(cfg)
    assert "--config.algo.routing_replay: None: use True or False" in str(error.value)
    assert "--config.log.routing_volatility: None: use True or False" in str(error.value)


@pytest.mark.parametrize("replay", [False, True])
def test_update_volatility_equals_loop_over_separate_forwards(replay):
    """One jitted update's routing/volatility against the loop applied to the expert ids of two
    independent forwards: the parameters before the update and the ones it returns."""
    graphdef, params = nnx.split(QwenMoeForCausalLM(CFG, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(5)
    rows, prompt, width = 4, 5, 4
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (rows, prompt + width)))
    valid_np = np.ones((rows, prompt + width), bool)
    valid_np[1, :2] = False  # left padding
    valid_np[2, -1:] = False  # a shorter completion
    valid = jnp.asarray(valid_np)
    mask = valid[:, prompt:].astype(jnp.float32)
    settings = UpdateSettings(
        level="token",
        eps_low=0.2,
        eps_high=0.28,
        aggregation="seq-mean-token-mean",
        beta=0.0,
        aux_loss_coef=0.0,
        temperature=1.0,
        logprob_chunk=width,
        minibatches=1,
        iterations=1,
        routing_replay=replay,
        routing_volatility=True,
    )
    old_logp, old_ids = make_score_fn(graphdef, settings, with_expert_ids=True)(params, tokens, valid, mask)
    batch = RolloutBatch(
        tokens=tokens,
        valid=valid,
        completion_mask=mask,
        advantages=jnp.asarray([1.0, -1.0, 0.5, -0.5]),
        old_logp=old_logp,
        sampler_logp=old_logp,
        ref_logp=old_logp,
        expert_ids=old_ids if replay else None,
    )
    optimizer = optax.adam(0.1)
    state = TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
    before = _expert_ids(graphdef, params, tokens, valid)
    state, metrics = make_train_fn(graphdef, optimizer, settings)(state, batch, jax.random.key(0))
    after = _expert_ids(graphdef, state.params, tokens, valid)
    expected = np_volatility(before, after, valid_np[:, :-1])
    assert expected.min() > 0  # the update moved some routing
    assert float(metrics["routing/volatility"][0, 0]) == pytest.approx(expected.mean(), rel=1e-6)
    for i, value in enumerate(expected):
        assert float(metrics[f"routing/volatility_layer{i}"][0, 0]) == pytest.approx(value, rel=1e-6)
    assert ("routing/replay_volatility" in metrics) == replay
    if replay:
        assert float(metrics["routing/replay_volatility"][0, 0]) == 0


def _expert_ids(graphdef, params, tokens, valid):
    """[L_moe, B, T - 1, k] numpy ids of the forward over tokens[:, :-1] (the log-prob forward's inputs)."""
    out = jax.jit(lambda p: nnx.merge(graphdef, p).forward(tokens[:, :-1], valid_bt=valid[:, :-1]))(params)
    return np.asarray(out.router_stats.expert_ids)
