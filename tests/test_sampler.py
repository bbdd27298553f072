"""The sampler against independent references: full forwards without a cache, transformers' greedy
`generate`, numpy softmax / top-k / top-p sets and chi-square tests on sampled frequencies."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import build_hf_model, hf_logits, save_hf_model
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from scipy import stats

import gspo_jax
from gspo_jax.logprobs import completion_logprobs
from gspo_jax.models import attention, dispatch, tiled
from gspo_jax.models.config import ModelConfig
from gspo_jax.models.qwen_moe import QwenMoeForCausalLM
from gspo_jax.rollout import use_row_compaction
from gspo_jax.sampler import SampleOutput, Sampler, row_phases, sample_next

N = 8  # new tokens
PAD = 96  # a pad id no test prompt uses, so padding is visible in completions
PROMPTS = ([5, 17, 42], [7, 3, 88, 12, 60, 1, 33], [21, 9, 70, 4, 50])


def left_pad(prompts, width=None):
    width = width or max(map(len, prompts))
    ids = np.full((len(prompts), width), PAD, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random HF Qwen3-MoE (weights std 0.3, so argmax gaps dwarf float error) and its port."""
    hf = build_hf_model("qwen3", weight_std=0.3)
    path = save_hf_model(hf, tmp_path_factory.mktemp("tiny"))
    model = gspo_jax.from_pretrained(path)
    graphdef, params = nnx.split(model)
    return hf, path, model, graphdef, params


def full_logits(model, ids, valid):
    """Logits [B, W, V] of one forward over whole sequences, no cache (jitted per model)."""
    graphdef, params = nnx.split(model)
    fn = jax.jit(lambda params, ids, valid: nnx.merge(graphdef, params)(ids, attention_mask_bt=valid))
    return np.asarray(fn(params, jnp.asarray(ids), jnp.asarray(valid, bool)))


def stepwise_greedy(model, ids, mask, n):
    """Greedy by re-running the full forward on prompt + tokens so far; the not-yet-generated tail is
    right padding, which causal attention never sees, so every step has the same shape."""
    b, p = ids.shape
    seq = np.concatenate([ids, np.zeros((b, n), np.int32)], axis=1)
    valid = np.concatenate([mask, np.zeros((b, n), np.int32)], axis=1)
    for i in range(n):
        seq[:, p + i] = full_logits(model, seq, valid)[:, p + i - 1].argmax(-1)
        valid[:, p + i] = 1
    return seq[:, p:]


def sampled_logprobs_reference(model, ids, mask, out: SampleOutput, temperature):
    """log_softmax(full-forward logits / T) of each sampled token, from one forward without cache."""
    p = ids.shape[1]
    g = out.completion_ids.shape[0] // ids.shape[0]
    seq = np.concatenate([np.repeat(ids, g, 0), np.asarray(out.completion_ids)], axis=1)
    valid = np.concatenate([np.repeat(mask, g, 0), np.asarray(out.completion_mask)], axis=1)
    logits = full_logits(model, seq, valid)[:, p - 1 : -1] / temperature
    logp = (
        logits
        - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    return np.take_along_axis(logp, np.asarray(out.completion_ids)[..., None], -1)[..., 0]


def hf_greedy(hf, prompt, n):
    """transformers' greedy generate on one unpadded prompt, with the smallest top-1 vs top-2 gap."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            eos_token_id=None,
            pad_token_id=PAD,
            output_scores=True,
            return_dict_in_generate=True,
        )
    top2 = torch.stack(out.scores)[:, 0].topk(2, dim=-1).values
    return out.sequences[0, len(prompt) :].tolist(), float((top2[:, 0] - top2[:, 1]).min())


def test_greedy_equals_stepwise_full_forward_and_transformers(tiny):
    hf, _, model, graphdef, params = tiny
    ids, mask = left_pad(PROMPTS)
    out = Sampler(graphdef, max_new_tokens=N, temperature=0.0, pad_id=PAD)(
        params, ids, mask, jax.random.key(0)
    )
    got = np.asarray(out.completion_ids)
    np.testing.assert_array_equal(got, stepwise_greedy(model, ids, mask, N))
    for row, prompt in enumerate(PROMPTS):
        expected, gap = hf_greedy(hf, prompt, N)
        assert gap > 1e-3, "argmax ties would make this comparison meaningless"
        assert got[row].tolist() == expected
    np.testing.assert_array_equal(np.asarray(out.completion_mask), 1)
    np.testing.assert_array_equal(np.asarray(out.lengths), N)
    # Greedy reports log-probs under temperature 1.
    np.testing.assert_allclose(
        np.asarray(out.logprobs), sampled_logprobs_reference(model, ids, mask, out, 1.0), atol=1e-4
    )


def test_prompt_alone_or_batched_with_longer_and_shorter_gives_same_completion(tiny):
    _, _, _, graphdef, params = tiny
    sampler = Sampler(graphdef, max_new_tokens=N, temperature=0.0, pad_id=PAD)
    alone = sampler(params, *left_pad(PROMPTS[2:]), jax.random.key(0)).completion_ids
    batched = sampler(params, *left_pad(PROMPTS, width=9), jax.random.key(0)).completion_ids
    np.testing.assert_array_equal(np.asarray(batched)[2], np.asarray(alone)[0])


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_equal_full_forward_log_softmax(tiny, temperature):
    _, _, model, graphdef, params = tiny
    ids, mask = left_pad(PROMPTS)
    sampler = Sampler(graphdef, max_new_tokens=N, num_samples=2, temperature=temperature, pad_id=PAD)
    out = sampler(params, ids, mask, jax.random.key(3))
    assert out.completion_ids.shape == (6, N) and out.logprobs.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(out.logprobs), sampled_logprobs_reference(model, ids, mask, out, temperature), atol=1e-4
    )
    if temperature == 1.0:  # the same compiled sampler: a fixed key repeats, another key differs
        again = sampler(params, ids, mask, jax.random.key(3))
        other = sampler(params, ids, mask, jax.random.key(4))
        np.testing.assert_array_equal(np.asarray(again.completion_ids), np.asarray(out.completion_ids))
        assert np.any(np.asarray(other.completion_ids) != np.asarray(out.completion_ids))
        # Rows are prompt-major and the G samples of a prompt are independent draws.
        assert np.any(np.asarray(out.completion_ids)[0] != np.asarray(out.completion_ids)[1])


def _first_stop_lengths(completions, stop_ids):
    hits = np.isin(completions, stop_ids)
    return np.where(hits.any(1), hits.argmax(1) + 1, completions.shape[1])


def test_stop_ids_end_rows_with_mask_and_padding(tiny):
    _, _, _, graphdef, params = tiny
    ids, mask = left_pad(PROMPTS)
    free = np.asarray(
        Sampler(graphdef, max_new_tokens=N, temperature=0.0, pad_id=PAD)(
            params, ids, mask, jax.random.key(0)
        ).completion_ids
    )
    stop = int(free[0, 2])  # row 0's greedy token at step 3
    out = Sampler(graphdef, max_new_tokens=N, temperature=0.0, stop_ids=(stop, 1000), pad_id=PAD)(
        params, ids, mask, jax.random.key(0)
    )
    lengths = _first_stop_lengths(free, [stop])
    assert lengths[0] <= 3
    np.testing.assert_array_equal(np.asarray(out.lengths), lengths)
    completion, keep = np.asarray(out.completion_ids), np.asarray(out.completion_mask)
    logp = np.asarray(out.logprobs)
    for row, length in enumerate(lengths):
        assert completion[row, :length].tolist() == free[row, :length].tolist()  # the stop id is kept
        assert keep[row].tolist() == [1] * length + [0] * (N - length)
        assert np.all(completion[row, length:] == PAD) and np.all(logp[row, length:] == 0)
        assert np.all(logp[row, :length] < 0)


class CountingModel(QwenMoeForCausalLM):
    """Records the [rows, width] of every forward that runs, from inside the compiled program."""

    calls: list = []

    def forward(self, input_ids_bt, **kwargs):
        shape = tuple(input_ids_bt.shape)
        jax.debug.callback(lambda: CountingModel.calls.append(shape))
        return super().forward(input_ids_bt, **kwargs)


def test_one_prefill_for_g_samples_and_early_exit_when_all_rows_stop(tiny):
    _, _, model, _, params = tiny
    counting_graphdef = nnx.split(CountingModel(model.config, rngs=nnx.Rngs(0)))[0]
    ids, mask = left_pad(PROMPTS)
    n, g = 12, 3
    free = Sampler(counting_graphdef, max_new_tokens=n, num_samples=g, temperature=0.0, pad_id=PAD)
    CountingModel.calls.clear()
    completions = np.asarray(free(params, ids, mask, jax.random.key(0)).completion_ids)
    jax.effects_barrier()
    # One prefill over the B prompts, then B*G-row decode steps: N - 1 of them without stops.
    assert CountingModel.calls == [(3, ids.shape[1])] + [(3 * g, 1)] * (n - 1)
    # Greedy G samples of one prompt are identical (they share the prefill's logits).
    np.testing.assert_array_equal(completions[0::g], completions[1::g])

    stops = tuple(int(t) for t in completions[::g, 1])  # every row stops by its second token
    last_stop = int(_first_stop_lengths(completions, stops).max()) - 1
    stopping = Sampler(
        counting_graphdef, max_new_tokens=n, num_samples=g, temperature=0.0, stop_ids=stops, pad_id=PAD
    )
    CountingModel.calls.clear()
    out = stopping(params, ids, mask, jax.random.key(0))
    jax.effects_barrier()
    assert last_stop <= 1 and int(np.asarray(out.lengths).max()) == last_stop + 1
    assert len(CountingModel.calls) == 1 + last_stop  # the loop ran no step after the last stop


def test_heterogeneous_layer_runs_decode_like_full_forward_and_transformers(tmp_path):
    """Dense and sparse layers in three scanned runs share one stacked cache: the greedy tokens are the
    argmax of one cache-free forward over [prompt | completion] and equal transformers' generate."""
    hf = build_hf_model(
        "qwen3", weight_std=0.3, num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3]
    )
    model = gspo_jax.from_pretrained(save_hf_model(hf, tmp_path / "m"))
    assert model.runs == ((0, 1), (1, 1), (2, 2))
    graphdef, params = nnx.split(model)
    ids, mask = left_pad(PROMPTS)
    out = Sampler(graphdef, max_new_tokens=N, temperature=0.0, pad_id=PAD)(
        params, ids, mask, jax.random.key(0)
    )
    got = np.asarray(out.completion_ids)
    seq, valid = np.concatenate([ids, got], axis=1), np.concatenate([mask, np.ones_like(got)], axis=1)
    np.testing.assert_array_equal(got, full_logits(model, seq, valid)[:, ids.shape[1] - 1 : -1].argmax(-1))
    np.testing.assert_allclose(
        np.asarray(out.logprobs), sampled_logprobs_reference(model, ids, mask, out, 1.0), atol=1e-4
    )
    expected, gap = hf_greedy(hf, PROMPTS[1], N)
    assert gap > 1e-3 and got[1].tolist() == expected


@pytest.mark.parametrize("slots,filled", [(7, None), (600, 600), (600, 300), (700, 1)])
def test_one_token_attention_matches_numpy_softmax(slots, filled):
    """Decode attention (the cache as before the step's write, the new key and value apart) against a
    numpy softmax over [cached slots | new token]: masked slots, a row that sees only its new token,
    a row whose new token is masked, and kv-head groups of 1, 2 and 4 query heads. Caches of 512+
    slots are read in 128-slot chunks below `filled` (600 slots: the last chunk is clamped back over
    slots already read)."""
    assert (slots >= attention.DECODE_CHUNKED_MIN_SLOTS) == (filled is not None)
    rng = np.random.default_rng(0)
    b, s, d = 3, slots, 8
    for kv, g in ((2, 2), (1, 4), (4, 1)):
        q = rng.normal(size=(b, kv * g, d)).astype(np.float32)
        new_k, new_v = (rng.normal(size=(b, kv, d)).astype(np.float32) for _ in range(2))
        cached_k, cached_v = (rng.normal(size=(b, s, kv, d)).astype(np.float32) for _ in range(2))
        cached_mask = rng.uniform(size=(b, s)) < 0.6
        cached_mask[0], cached_mask[2, 0] = False, True
        if filled is not None:
            cached_mask[:, filled:] = False  # the caller's promise: nothing written at or past `filled`
            cached_k[:, filled:] = 1e4  # so a read past it would show
        new_valid = np.array([True, True, False])
        got = attention.one_token_attention(
            *map(jnp.asarray, (q, new_k, new_v, cached_k, cached_v, cached_mask, new_valid)),
            filled_slots=None if filled is None else jnp.int32(filled),
        )
        keys = np.concatenate([cached_k, new_k[:, None]], axis=1)
        values = np.concatenate([cached_v, new_v[:, None]], axis=1)
        visible = np.concatenate([cached_mask, new_valid[:, None]], axis=1)
        expected = np.zeros((b, kv * g, d))
        for row in range(b):
            for head in range(kv * g):
                scores = keys[row, :, head // g] @ q[row, head] / np.sqrt(d)
                scores = np.where(visible[row], scores, -np.inf)
                weights = np.exp(scores - scores.max())
                expected[row, head] = weights @ values[row, :, head // g] / weights.sum()
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=1e-5)


def test_decode_loop_writes_each_layer_cache_in_place(tiny):
    """No copy of a KV-cache buffer in the compiled sampler. Decode attention reads the cache before the
    step's in-place write; without a data dependency from those reads to the write, XLA:CPU copied
    every layer's K and V cache at every step (16 x 17 MB per step at 512-token rollouts)."""
    _, _, model, graphdef, params = tiny
    ids, mask = left_pad(PROMPTS)
    sampler = Sampler(graphdef, max_new_tokens=N, num_samples=2, temperature=1.0, pad_id=PAD)
    hlo = sampler._generate.lower(params, ids, mask, jax.random.key(0)).compile().as_text()
    cache = rf"f32\[{2 * len(PROMPTS)},{ids.shape[1] + N - 1},{model.config.num_key_value_heads},{model.config.head_dim}\]"
    assert re.search(cache, hlo), "no cache buffer of the expected shape: the test no longer looks at it"
    assert not re.findall(cache + r"\{[^}]*\} copy\(", hlo)


def test_compacted_rows_sample_what_the_full_batch_samples(tiny):
    """With compact_rows the loop continues on the running rows once half have stopped (32 -> 16 -> 8
    rows here): the same tokens as without, log-probs equal to a cache-free forward's."""
    _, _, model, graphdef, params = tiny
    ids, mask = left_pad([PROMPTS[i % 3] for i in range(8)])
    n = 32
    # Stop on a ninth of the vocabulary at T = 1.5: rows end at scattered steps.
    settings = dict(
        max_new_tokens=n, num_samples=4, temperature=1.5, stop_ids=tuple(range(1, 97, 9)), pad_id=PAD
    )
    full = Sampler(graphdef, **settings)(params, ids, mask, jax.random.key(3))
    compacting = Sampler(graphdef, **settings, compact_rows=True)
    out = compacting(params, ids, mask, jax.random.key(3))
    lengths = np.asarray(full.lengths)
    running = [(lengths > step).sum() for step in range(1, n - 1)]
    assert any(0 < r <= 8 for r in running), "no row ran into the last phase: nothing was compacted"
    np.testing.assert_array_equal(np.asarray(out.completion_ids), np.asarray(full.completion_ids))
    np.testing.assert_array_equal(np.asarray(out.completion_mask), np.asarray(full.completion_mask))
    generated = np.asarray(out.completion_mask, bool)
    reference = sampled_logprobs_reference(model, ids, mask, out, 1.5)
    np.testing.assert_allclose(np.asarray(out.logprobs)[generated], reference[generated], atol=1e-4)
    assert np.all(np.asarray(out.logprobs)[~generated] == 0)
    hlo = compacting._generate.lower(params, ids, mask, jax.random.key(3)).compile().as_text()
    for rows in (32, 16, 8):  # one decode loop per row count, each carrying its own cache
        cache = rf"f32\[{rows},{ids.shape[1] + n - 1},{model.config.num_key_value_heads},{model.config.head_dim}\]"
        assert re.search(cache, hlo), rows


def test_row_compaction_phases_and_setting():
    assert row_phases(64, 128, compact=True) == [64, 32, 16]
    assert row_phases(20, 32, compact=True) == [20, 10]
    assert row_phases(12, 128, compact=True) == [12]
    assert row_phases(64, 31, compact=True) == [64]  # too few steps to repay the compiles
    assert row_phases(64, 128, compact=False) == [64]
    assert use_row_compaction("auto", 1, "cpu") and use_row_compaction("on", 1, "gpu")
    assert not use_row_compaction("auto", 1, "gpu") and not use_row_compaction("auto", 8, "cpu")
    assert not use_row_compaction("off", 1, "cpu")
    with pytest.raises(ValueError, match="compact_rows=on needs the rollout rows on one device"):
        use_row_compaction("on", 8, "cpu")


def test_sliding_window_decode_equals_stepwise_full_forward(tmp_path):
    """The window masks cached slots in decode as the cache-free forward masks keys."""
    hf = build_hf_model("qwen3", weight_std=0.3, use_sliding_window=True, sliding_window=4)
    model = gspo_jax.from_pretrained(save_hf_model(hf, tmp_path / "m"))
    graphdef, params = nnx.split(model)
    ids, mask = left_pad(PROMPTS)
    out = Sampler(graphdef, max_new_tokens=N, temperature=0.0, pad_id=PAD)(
        params, ids, mask, jax.random.key(0)
    )
    np.testing.assert_array_equal(np.asarray(out.completion_ids), stepwise_greedy(model, ids, mask, N))
    np.testing.assert_allclose(
        np.asarray(out.logprobs), sampled_logprobs_reference(model, ids, mask, out, 1.0), atol=1e-4
    )


def test_every_dispatch_strategy_gives_the_same_greedy_completion(tiny):
    _, path, _, graphdef, params = tiny
    ids, mask = left_pad(PROMPTS)
    reference = Sampler(graphdef, max_new_tokens=N, temperature=0.0)(params, ids, mask, jax.random.key(0))
    assert dispatch.resolve_dispatch("auto") == ("tiled" if jax.default_backend() == "cpu" else "ragged")
    for strategy in ("dense", "capacity", "ragged"):
        g, p = nnx.split(gspo_jax.from_pretrained(path, moe_dispatch=strategy))
        out = Sampler(g, max_new_tokens=N, temperature=0.0)(p, ids, mask, jax.random.key(0))
        np.testing.assert_array_equal(np.asarray(out.completion_ids), np.asarray(reference.completion_ids))
        np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(reference.logprobs), atol=1e-4)


def test_bf16_cache_and_bf16_rollout_params_run(tiny):
    _, _, _, graphdef, params = tiny
    ids, mask = left_pad(PROMPTS)
    fp32 = Sampler(graphdef, max_new_tokens=N, temperature=0.0)(params, ids, mask, jax.random.key(0))
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    sampler = Sampler(graphdef, max_new_tokens=N, temperature=0.0, cache_dtype="bfloat16")
    for p in (params, bf16_params):
        out = sampler(p, ids, mask, jax.random.key(0))
        assert np.all(np.isfinite(np.asarray(out.logprobs))) and np.all(np.asarray(out.logprobs) <= 0)
        # Low precision moves logits by far less than this model's top-1 margins at the first step.
        np.testing.assert_array_equal(
            np.asarray(out.completion_ids)[:, 0], np.asarray(fp32.completion_ids)[:, 0]
        )


def test_tiled_dispatch_with_several_tiles_per_expert_matches_numpy():
    """The decode MoE path: skewed routing (one expert takes several tiles, one expert none) and
    padding tokens, against a per-assignment numpy loop."""
    rng = np.random.default_rng(0)
    t, d, i, e, k = 40, 6, 5, 6, 2  # expert 5 is never chosen
    x = rng.normal(size=(t, d)).astype(np.float32)
    ids = np.stack([np.where(rng.random(t) < 0.7, 0, rng.integers(1, 3, t)), rng.integers(3, 5, t)], 1)
    weights = rng.random((t, k)).astype(np.float32)
    valid = rng.random(t) > 0.2
    gate, up, down = (rng.normal(size=s).astype(np.float32) for s in ((e, d, i), (e, d, i), (e, i, d)))
    assert tiled.tile_rows(t * k, e) < np.sum((ids == 0) & valid[:, None])  # expert 0 spans tiles
    y, _ = tiled.tiled_dispatch(
        *map(jnp.asarray, (x, ids, weights, valid, gate, up, down)), capacity_factor=0.0
    )
    expected = np.zeros_like(x)
    for token, j in zip(*np.nonzero(valid[:, None] & np.ones((1, k), bool))):
        h = x[token] @ gate[ids[token, j]]
        h = h / (1 + np.exp(-h)) * (x[token] @ up[ids[token, j]])
        expected[token] += weights[token, j] * (h @ down[ids[token, j]])
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_bf16_expert_slice_is_exact():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 5)), jnp.bfloat16)
    for e in range(4):
        got = tiled.expert_weight(w, jnp.int32(e), jnp.float32)
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), np.asarray(w[e].astype(jnp.float32)))


def test_batch_sharded_over_a_mesh_matches_unsharded(tiny):
    _, _, _, graphdef, params = tiny
    prompts = [list(PROMPTS[i % 3][: 3 + i % 4]) for i in range(8)]
    ids, mask = left_pad(prompts)
    settings = dict(max_new_tokens=4, num_samples=2, temperature=1.0)
    expected = Sampler(graphdef, **settings)(params, ids, mask, jax.random.key(0))
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    sampler = Sampler(graphdef, **settings, out_shardings=rows)
    sharded = sampler(
        jax.device_put(params, NamedSharding(mesh, PartitionSpec())),
        jax.device_put(ids, rows),
        jax.device_put(mask, rows),
        jax.random.key(0),
    )
    assert sharded.completion_ids.sharding.is_equivalent_to(rows, 2)
    np.testing.assert_array_equal(np.asarray(sharded.completion_ids), np.asarray(expected.completion_ids))
    np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(expected.logprobs), atol=1e-5)


# ---- the sampling distribution itself ----

TINY_VOCAB = ModelConfig(
    vocab_size=8,
    hidden_size=16,
    intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=8,
    initializer_range=0.3,
)


def chi_square_ok(tokens, probs, alpha=1e-3):
    """Pearson chi-square of token counts against probs (>= 5 expected per bin), at level alpha."""
    expected = len(tokens) * probs
    assert expected.min() >= 5, f"too few samples for a chi-square test: {expected}"
    observed = np.bincount(tokens, minlength=len(probs))
    statistic = np.sum((observed - expected) ** 2 / expected)
    return statistic < stats.chi2.ppf(1 - alpha, df=len(probs) - 1), statistic


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_first_token_frequencies_match_softmax(temperature):
    model = QwenMoeForCausalLM(TINY_VOCAB, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model)
    ids, mask = np.array([[3, 1, 6, 2]], np.int32), np.ones((1, 4), np.int32)
    probs = softmax(full_logits(model, ids, mask)[0, -1].astype(np.float64) / temperature)
    g = 4000
    out = Sampler(graphdef, max_new_tokens=1, num_samples=g, temperature=temperature)(
        params, ids, mask, jax.random.key(7)
    )
    ok, statistic = chi_square_ok(np.asarray(out.completion_ids)[:, 0], probs)
    assert ok, f"chi-square {statistic:.1f} for {g} samples of {probs}"


def allowed_tokens(logits, temperature, top_k, top_p):
    """numpy: the tokens top-k then top-p may emit, and their renormalised probabilities."""
    p = softmax(logits.astype(np.float64) / temperature)
    order = np.argsort(-p)
    if top_k:
        order = order[:top_k]
    kept = p[order] / p[order].sum()
    before = np.cumsum(kept) - kept
    order, kept = order[before < top_p], kept[before < top_p]
    probs = np.zeros_like(p)
    probs[order] = kept / kept.sum()
    return set(order.tolist()), probs


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.6), (4, 0.8)])
def test_top_k_top_p_sample_only_allowed_tokens_with_renormalised_frequencies(top_k, top_p):
    logits = np.array([1.2, -0.3, 2.0, 0.1, 1.9, -2.0, 0.7, 1.0, -0.9, 0.4], np.float32)
    allowed, probs = allowed_tokens(logits, 0.8, top_k, top_p)
    rows = 6000
    sample = jax.jit(lambda key, x: sample_next(key, x, temperature=0.8, top_k=top_k, top_p=top_p))
    tokens, logp = sample(jax.random.key(11), jnp.tile(jnp.asarray(logits), (rows, 1)))
    tokens = np.asarray(tokens)
    assert set(tokens.tolist()) == allowed  # only allowed tokens, and every one of them
    support = np.flatnonzero(probs)  # chi-square over the allowed tokens only
    ok, statistic = chi_square_ok(np.searchsorted(support, tokens), probs[support])
    assert ok, f"chi-square {statistic:.1f}"
    # Log-probs are under the untruncated temperature-scaled distribution.
    full = np.log(softmax(logits.astype(np.float64) / 0.8))
    np.testing.assert_allclose(np.asarray(logp), full[tokens], atol=1e-5)


def test_top_k_and_top_p_end_to_end_stay_in_the_allowed_set(tiny):
    _, _, model, graphdef, params = tiny
    ids, mask = left_pad(PROMPTS)
    for top_k, top_p in ((3, 1.0), (0, 0.5)):
        out = Sampler(graphdef, max_new_tokens=N, num_samples=2, temperature=1.0, top_k=top_k, top_p=top_p)(
            params, ids, mask, jax.random.key(5)
        )
        seq = np.concatenate([np.repeat(ids, 2, 0), np.asarray(out.completion_ids)], axis=1)
        valid = np.concatenate([np.repeat(mask, 2, 0), np.ones_like(out.completion_ids)], axis=1)
        logits = full_logits(model, seq, valid)[:, ids.shape[1] - 1 : -1]
        for row in range(seq.shape[0]):
            for step in range(N):
                allowed, _ = allowed_tokens(logits[row, step], 1.0, top_k, top_p)
                assert int(out.completion_ids[row, step]) in allowed


def test_bad_settings_and_shapes_name_the_fix(tiny):
    _, _, _, graphdef, params = tiny
    with pytest.raises(ValueError, match="max_new_tokens=0 must be >= 1"):
        Sampler(graphdef, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"top_p=0.0 must be in \(0, 1\]"):
        Sampler(graphdef, max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="temperature=-1"):
        Sampler(graphdef, max_new_tokens=4, temperature=-1)
    ids, mask = left_pad(PROMPTS)
    with pytest.raises(ValueError, match="left-pad prompts"):
        Sampler(graphdef, max_new_tokens=4)(params, ids, mask[:, 1:], jax.random.key(0))


def test_sampled_logprobs_match_transformers_and_the_trainer_with_stops_and_masked_columns(tiny):
    hf, _, model, graphdef, params = tiny
    ids, mask = left_pad(PROMPTS)
    g, temperature, n = 3, 0.8, 12
    stop_ids = tuple(range(0, 97, 6))  # 17 of 97 ids: most rows stop early at this temperature
    out = Sampler(
        graphdef, max_new_tokens=n, num_samples=g, temperature=temperature, stop_ids=stop_ids, pad_id=PAD
    )(params, ids, mask, jax.random.key(5))
    completion, keep = np.asarray(out.completion_ids), np.asarray(out.completion_mask)
    logp = np.asarray(out.logprobs)
    lengths = keep.sum(1)
    assert lengths.min() < n and lengths.max() > 1, "want both early stops and longer rows"

    # transformers: one forward over [left-padded prompt | completion]; log_softmax(logits / T).
    seq = np.concatenate([np.repeat(ids, g, 0), completion], axis=1)
    valid = np.concatenate([np.repeat(mask, g, 0), keep], axis=1)
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    logits = torch.as_tensor(hf_logits(hf, seq, valid, positions)[:, ids.shape[1] - 1 : -1]) / temperature
    hf_logp = torch.log_softmax(logits.double(), -1).numpy()
    hf_logp = np.take_along_axis(hf_logp, completion[..., None], -1)[..., 0]
    real = keep == 1
    np.testing.assert_allclose(logp[real], hf_logp[real], atol=1e-4)
    assert np.all(logp[~real] == 0) and np.all(completion[~real] == PAD)  # masked columns
    for row, length in enumerate(lengths):  # a row ends at its first stop id, which is kept
        stops = np.isin(completion[row, :length], stop_ids)
        assert not stops[:-1].any() and (stops[-1] or length == n)

    # The trainer's own log-probs (update.completion_logprobs) of the same tokens.
    trainer, _, _ = completion_logprobs(model, seq, valid.astype(bool), n, temperature=temperature, chunk=5)
    np.testing.assert_allclose(logp[real], np.asarray(trainer)[real], atol=1e-5)
