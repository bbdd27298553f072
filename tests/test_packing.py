"""Sequence packing (gspo_jax/packing.py): the host plan's invariants, a packed forward against
transformers run on each sequence alone, and packed updates against unpacked ones on the plan's
minibatches."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hf_models import build_hf_model, hf_logits, save_hf_model
from test_routing_replay import CFG  # MoE, dense, MoE layers: two scanned MoE runs

import gspo_jax
from gspo_jax import packing
from gspo_jax.models import attention
from gspo_jax.models.qwen_moe import QwenMoeForCausalLM
from gspo_jax.update import RolloutBatch, TrainState, UpdateSettings, make_score_fn, make_train_fn


def test_row_buckets_and_first_fit():
    assert packing.row_buckets(3) == (1, 2, 3)
    assert packing.row_buckets(64) == tuple(range(4, 65, 4))
    assert packing.row_buckets(20)[:3] == (2, 4, 6) and packing.row_buckets(20)[-1] == 20
    rows = packing.first_fit_decreasing([5, 5, 4, 3, 3], 10)
    assert sorted(sorted(r) for r in rows) == [[0, 1], [2, 3, 4]]
    lengths = np.random.default_rng(0).integers(1, 11, 50)
    rows = packing.first_fit_decreasing(list(lengths), 10)
    assert sorted(i for r in rows for i in r) == list(range(50))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) <= 2 * -(-lengths.sum() // 10)  # first fit never leaves two rows half empty


@pytest.mark.parametrize("shards,minibatches,passes", [(1, 1, 1), (2, 3, 2)])
def test_plan_places_every_input_token_once(shards, minibatches, passes):
    p, c, b = 6, 9, 24
    rng = np.random.default_rng(1)
    prompt_lens = rng.integers(1, p + 1, b)
    completion_lens = rng.integers(1, c + 1, b)
    plan = packing.plan_packing(
        prompt_lens,
        completion_lens,
        prompt_width=p,
        completion_width=c,
        shards=shards,
        minibatches=minibatches,
        passes=passes,
        rng=np.random.default_rng(2),
    )
    per_shard, n, width = b // shards, b // (shards * minibatches), p + c - 1
    assert plan.sequences.shape == (passes, minibatches, shards, n)
    assert plan.row_seq.shape[-1] == width and plan.hidden_index.shape[-1] == c
    assert plan.rows in packing.row_buckets(n)
    total = (prompt_lens + np.minimum(completion_lens, c - 1)).reshape(shards, per_shard)
    for i, s in np.ndindex(passes, shards):
        # the minibatches of a pass split the shard's rows
        assert sorted(plan.sequences[i, :, s].reshape(-1)) == list(range(per_shard))
        assert sum(np.sum(plan.segments[i, m, s] > 0) for m in range(minibatches)) == total[s].sum()
    for i, m, s in np.ndindex(passes, minibatches, shards):
        seg, seq, t, pos = (x[i, m, s] for x in (plan.segments, plan.row_seq, plan.row_t, plan.positions))
        for j, local in enumerate(plan.sequences[i, m, s]):
            g = s * per_shard + local
            plen, clen = prompt_lens[g], completion_lens[g]
            r, w = np.nonzero((seq == j) & (seg > 0))
            assert len(set(r)) == 1 and np.all(np.diff(w) == 1)  # one contiguous span in one row
            assert len(set(seg[r, w])) == 1
            np.testing.assert_array_equal(t[r, w], np.arange(p - plen, p + min(clen, c - 1)))
            np.testing.assert_array_equal(pos[r, w], np.arange(plen + min(clen, c - 1)))
            # the hidden state predicting completion token k is the input at rollout column p - 1 + k
            idx = plan.hidden_index[i, m, s, j, :clen]
            rr, ww = idx // width, idx % width
            np.testing.assert_array_equal(seq[rr, ww], j)
            np.testing.assert_array_equal(t[rr, ww], p - 1 + np.arange(clen))
            assert np.all(seg[rr, ww] > 0)
        # segment ids are distinct per row: each span has its own
        for r in range(plan.rows):
            used = seg[r][seg[r] > 0]
            assert len(set(used)) == len({(int(a), int(b)) for a, b in zip(seq[r][seg[r] > 0], used)})


def test_rows_only_grow_when_asked_and_hosts_agree():
    lens = {
        "prompt_width": 8,
        "completion_width": 9,
        "shards": 1,
        "minibatches": 1,
        "passes": 1,
    }  # rows of 16
    short = packing.plan_packing([1] * 8, [1] * 8, rng=np.random.default_rng(0), **lens)
    assert short.rows == 1
    assert packing.plan_packing([1] * 8, [1] * 8, rng=np.random.default_rng(0), min_rows=5, **lens).rows == 5
    synced = packing.plan_packing(
        [1] * 8, [1] * 8, rng=np.random.default_rng(0), sync_rows=lambda r: 3, **lens
    )
    assert synced.rows == 3
    with pytest.raises(ValueError, match="do not split"):
        packing.plan_packing([1] * 6, [1] * 6, rng=np.random.default_rng(0), **{**lens, "minibatches": 4})


@pytest.mark.parametrize("flash", [False, True])
def test_packed_forward_matches_transformers_on_each_sequence(tmp_path, monkeypatch, flash):
    if flash:  # rows this narrow take the masked chunked path unless the flash threshold is lowered
        monkeypatch.setattr(attention, "PACKED_FLASH_MIN_COLUMNS", 0)
    hf = build_hf_model("qwen3")
    model = gspo_jax.from_pretrained(save_hf_model(hf, tmp_path / "m"), attention_chunk=4)
    rng = np.random.default_rng(3)
    lengths = (5, 3, 7)
    sequences = [rng.integers(0, hf.config.vocab_size, n) for n in lengths]
    width = sum(lengths) + 2  # two padding slots at the end
    tokens = np.zeros((1, width), np.int64)
    positions = np.zeros((1, width), np.int32)
    segments = np.zeros((1, width), np.int32)
    start = 0
    for k, seq in enumerate(sequences):
        tokens[0, start : start + len(seq)] = seq
        positions[0, start : start + len(seq)] = np.arange(len(seq))
        segments[0, start : start + len(seq)] = k + 1
        start += len(seq)
    out = model.forward(
        jnp.asarray(tokens),
        valid_bt=jnp.asarray(segments > 0),
        positions_bt=jnp.asarray(positions),
        segments_bt=jnp.asarray(segments),
    )
    logits = np.asarray(model.logits(out.hidden))[0]
    start = 0
    for seq in sequences:
        expected = hf_logits(hf, seq[None])[0]
        np.testing.assert_allclose(logits[start : start + len(seq)], expected, atol=1e-4, rtol=0)
        start += len(seq)


def _dense_packed_attention(q, k, v, pos, valid, seg, window):
    """Masked softmax over every key at once (no chunks), in plain jnp: the reference."""
    _, _, heads, d = q.shape
    g = heads // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    visible = valid[:, None, :] & (pos[:, None, :] <= pos[:, :, None]) & (seg[:, None, :] == seg[:, :, None])
    if window:
        visible &= (pos[:, :, None] - pos[:, None, :]) < window
    scores = jnp.where(visible[:, None], jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d), -jnp.inf)
    weights = jnp.where(visible[:, None], jax.nn.softmax(scores, axis=-1), 0.0)
    return jnp.einsum("bhts,bshd->bthd", weights, v)


def _packed_layout(lengths, width):
    pos, seg = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
    start = 0
    for i, n in enumerate(lengths):
        pos[0, start : start + n], seg[0, start : start + n] = np.arange(n), i + 1
        start += n
    return jnp.asarray(pos), jnp.asarray(seg > 0), jnp.asarray(seg)


@pytest.mark.parametrize("window", [None, 3])
def test_packed_flash_attention_value_and_gradients_match_dense_softmax(window):
    """The flash path over packed rows (chunks of 4, a segment longer than a chunk, padding at the
    end) against one masked softmax over all keys: outputs at valid queries and the gradients of
    q, k and v. A key chunk that no query chunk shares a segment with is never read: NaN values
    there leave every other query finite, which the masked chunked path would not."""
    rng = np.random.default_rng(0)
    lengths, width, chunk = (7, 3, 9, 2, 6), 30, 4
    pos, valid, seg = _packed_layout(lengths, width)
    q = jnp.asarray(rng.normal(size=(1, width, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(1, width, 2, 8)), jnp.float32) for _ in range(2))
    flash = attention.packed_flash_attention(window, chunk)
    mask = valid[..., None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(mask, fn(q, k, v), 0.0) ** 2)

    ours = loss(lambda q, k, v: flash(q, k, v, pos, valid, seg))
    reference = loss(lambda q, k, v: _dense_packed_attention(q, k, v, pos, valid, seg, window))
    got = np.where(mask, flash(q, k, v, pos, valid, seg), 0.0)
    expected = np.where(mask, _dense_packed_attention(q, k, v, pos, valid, seg, window), 0.0)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    for ours_grad, expected_grad in zip(
        jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(reference, (0, 1, 2))(q, k, v), strict=True
    ):
        np.testing.assert_allclose(ours_grad, expected_grad, atol=1e-4, rtol=1e-4)

    # Columns 20-23 hold only the fourth sequence's keys (columns 19-20) and the fifth's (21-26):
    # queries of columns 0-15 (sequences 1-3) never need that key chunk.
    poisoned = v.at[:, 20:24].set(jnp.nan)
    out = np.asarray(flash(q, k, poisoned, pos, valid, seg))
    assert np.isfinite(out[:, :16]).all() and np.isnan(out[:, 21:24]).any()


def _rollout(rows=8, prompt=5, completion=6, seed=0):
    """Rows of [left-padded prompt | completion] with random lengths, and the lengths."""
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(1, prompt + 1, rows)
    completion_lens = rng.integers(1, completion + 1, rows)
    completion_lens[::2] = 1  # short rows that packing can pair up
    cols = np.arange(prompt + completion)
    valid = (cols[None] >= prompt - prompt_lens[:, None]) & (cols[None] < prompt + completion_lens[:, None])
    tokens = np.where(valid, rng.integers(1, CFG.vocab_size, valid.shape), 0)
    return jnp.asarray(tokens), jnp.asarray(valid), prompt_lens, completion_lens


def _settings(minibatches, replay=False):
    return UpdateSettings(
        level="sequence",
        eps_low=0.05,
        eps_high=0.08,
        aggregation="seq-mean-token-mean",
        beta=0.0,
        aux_loss_coef=0.01,
        temperature=1.0,
        logprob_chunk=4,
        minibatches=minibatches,
        iterations=1,
        routing_replay=replay,
    )


@pytest.mark.parametrize("replay", [False, True])
def test_packed_update_equals_unpacked_updates_on_the_plan_minibatches(replay):
    """Two packed minibatch updates give the parameters and metrics of two unpacked single-minibatch
    updates on the same sequences (the unpacked forward is checked against transformers elsewhere)."""
    graphdef, params = nnx.split(QwenMoeForCausalLM(CFG, rngs=nnx.Rngs(0)))
    tokens, valid, prompt_lens, completion_lens = _rollout()
    prompt = 5
    mask = valid[:, prompt:].astype(jnp.float32)
    # old log-probs from slightly different parameters, so ratios differ from 1 and some clip
    old_params = jax.tree.map(lambda x: x * 1.05, params)
    old_logp, old_ids = make_score_fn(graphdef, _settings(1), with_expert_ids=True)(
        old_params, tokens, valid, mask
    )
    batch = RolloutBatch(
        tokens=tokens,
        valid=valid,
        completion_mask=mask,
        advantages=jnp.asarray(np.random.default_rng(4).normal(size=8), jnp.float32),
        old_logp=old_logp,
        sampler_logp=old_logp,
        ref_logp=old_logp,
        expert_ids=old_ids if replay else None,
    )
    plan = packing.plan_packing(
        prompt_lens,
        completion_lens,
        prompt_width=prompt,
        completion_width=6,
        shards=1,
        minibatches=2,
        passes=1,
        rng=np.random.default_rng(5),
    )
    assert plan.rows < 4  # the 4 rows of a minibatch fit in fewer packed rows
    # Large steps, so the second minibatch sees moved weights; eps 1e-3 instead of 1e-8 keeps a
    # near-zero gradient's step proportional to it (at 1e-8 a rounding difference in a 1e-9 gradient
    # flipped one weight's step by ~1e-4 when XLA's backend optimisation changed).
    optimizer = optax.adam(0.05, eps=1e-3)

    def start():  # a fresh copy: the train step donates its state
        fresh = jax.tree.map(jnp.array, params)
        return TrainState(params=fresh, opt_state=optimizer.init(fresh), step=jnp.zeros((), jnp.int32))

    packed = dataclasses.replace(batch, packing=jax.tree.map(jnp.asarray, plan))
    state, metrics = make_train_fn(graphdef, optimizer, _settings(2, replay))(
        start(), packed, jax.random.key(0)
    )

    one = make_train_fn(graphdef, optimizer, _settings(1, replay))
    ref_state, ref_losses = start(), []
    for m in range(2):
        members = jnp.asarray(plan.sequences[0, m, 0])
        sub = jax.tree.map(lambda x, rows=members: x[rows], batch)
        ref_state, ref_metrics = one(ref_state, sub, jax.random.key(m))
        ref_losses.append(float(ref_metrics["loss"][0, 0]))
        if replay:
            assert float(ref_metrics["routing/replay_volatility"][0, 0]) == 0
    np.testing.assert_allclose(np.asarray(metrics["loss"][0]), ref_losses, rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    if replay:
        np.testing.assert_array_equal(np.asarray(metrics["routing/replay_volatility"]), 0)


def test_packed_scoring_matches_unpacked_rows():
    graphdef, params = nnx.split(QwenMoeForCausalLM(CFG, rngs=nnx.Rngs(0)))
    tokens, valid, prompt_lens, completion_lens = _rollout()
    mask = valid[:, 5:].astype(jnp.float32)
    score = make_score_fn(graphdef, _settings(2))
    # two shards x two chunks, in row order: each shard's rows come back in place
    plan = packing.plan_packing(
        prompt_lens,
        completion_lens,
        prompt_width=5,
        completion_width=6,
        shards=2,
        minibatches=2,
        passes=1,
        rng=None,
    )
    want = np.asarray(score(params, tokens, valid, mask))
    got = np.asarray(score(params, tokens, valid, mask, jax.tree.map(jnp.asarray, plan)))
    assert np.count_nonzero(want) == int(mask.sum())
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("mesh_sizes", [{"fsdp": 2, "expert": 4}, {"data": 2, "expert": 4}])
def test_packed_train_step_gathers_no_packed_activation_across_devices(mesh_sizes):
    """Compiled on 8 devices, the packed step's gathers stay inside each batch shard: no collective
    carries an array shaped by the packed width W or the completion width C (tokens, hidden states,
    log-probs); the expert exchange (all-to-all over the expert axis) is the dispatch's own."""
    from test_expert_parallel import MODEL, collectives, compiled_train_step, make_mesh

    prompt, new = 6, 9  # W = 14 and C = 9: sizes no model dimension has
    width = prompt + new - 1
    mesh = make_mesh(**mesh_sizes)
    found = collectives(
        compiled_train_step(mesh, MODEL.replace(num_hidden_layers=1), prompt=prompt, new=new, packed=True)
    )
    assert any(op == "all-to-all" for op, _, _ in found)
    shaped_by_tokens = [
        (op, shape)
        for op, shapes, _ in found
        if op != "all-to-all"
        for shape in shapes
        if width in shape or new in shape
    ]
    assert not shaped_by_tokens, shaped_by_tokens


def test_a_plan_that_removes_little_padding_is_not_worth_packing():
    shape = {"prompt_width": 4, "completion_width": 8, "shards": 1, "minibatches": 1, "passes": 1}
    full = packing.plan_packing([4] * 8, [8] * 8, rng=None, **shape)  # every sequence fills its row
    assert full.rows == 8 and not packing.saves_rows(full)
    half = packing.plan_packing([2] * 8, [3] * 8, rng=None, **shape)  # two per row of 11
    assert half.rows == 4 and packing.saves_rows(half)


# The RLStep comparisons run with the load-balancing loss off (gradient accumulation makes it a mean
# over micro-batches); the packed unit tests above keep it on.
NO_AUX = {"model.aux_loss_coef": 0.0}


@functools.cache  # test_accumulation compares against the same packed step
def _one_rl_step(pack: bool, **overrides):
    """One RLStep of the micro config (plus dotted-key `overrides`) on two batch shards (old-policy and
    reference scoring on), from the same parameters, prompts and key: (new params, metrics, packed row
    counts it compiled for, completion lengths)."""
    import micro_config

    from gspo_jax import sharding
    from gspo_jax.data import make_prompt_dataset
    from gspo_jax.models.hf import abstract_model
    from gspo_jax.policy import Policy, init_params, init_train_state, model_config
    from gspo_jax.rewards import RewardSet
    from gspo_jax.rl_step import RLStep
    from gspo_jax.tokenizer import eos_token_ids, load_tokenizer

    cfg = micro_config.override(
        micro_config.get_config(),
        **{"mesh.num_devices": 2, "mesh.data": 2, "algo.minibatches": 1, "algo.beta": 0.1, **overrides},
    )
    cfg.algo.pack_sequences = pack
    cfg.rollout.max_new_tokens = 12
    mesh = sharding.make_mesh(cfg.mesh)
    mcfg = model_config(cfg)
    graphdef, abstract = abstract_model(mcfg)
    params = init_params(mcfg, sharding.param_shardings(abstract, mesh, {}), 0)
    policy = Policy(mcfg, graphdef, params)
    tokenizer = load_tokenizer(None)
    # Half the vocabulary stops a completion: short, uneven completions that leave padding to pack.
    stop_ids = sorted(set(eos_token_ids(tokenizer)) | set(range(0, mcfg.vocab_size, 2)))
    rl = RLStep(cfg, policy, mesh, tokenizer, RewardSet.from_reward_config(cfg.reward), stop_ids)
    batch = next(make_prompt_dataset(cfg.data, tokenizer, prompts_per_step=4, seed=0))
    ref = jax.tree.map(jnp.array, params)
    state, result = rl(init_train_state(rl.optimizer, policy.params), batch, ref, jax.random.key(7))
    return state.params, result.metrics, dict(rl._packed_rows), result.scored.lengths


def test_rl_step_packed_equals_unpacked():
    packed_params, packed, rows, lengths = _one_rl_step(True, **NO_AUX)
    params, unpacked, no_rows, same_lengths = _one_rl_step(False, **NO_AUX)
    np.testing.assert_array_equal(lengths, same_lengths)  # the same rollout
    assert len(rows) == 2 and not no_rows, (rows, lengths)  # the update and the scoring both packed
    assert packed["train/packed_row_frac"] < 7 / 8 and unpacked["train/packed_row_frac"] == 1.0
    for key in ("loss", "entropy", "completion_len/mean", "moe/aux_loss", "logprob_gap/token_abs"):
        name = next(k for k in unpacked if k == key or k.startswith(key + "/"))
        assert packed[name] == pytest.approx(unpacked[name], rel=1e-4, abs=1e-6), name
    for got, want in zip(jax.tree.leaves(packed_params), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_packed_update_runs_every_pass_and_checks_the_plan_shape():
    graphdef, params = nnx.split(QwenMoeForCausalLM(CFG, rngs=nnx.Rngs(0)))
    tokens, valid, prompt_lens, completion_lens = _rollout()
    mask = valid[:, 5:].astype(jnp.float32)
    logp = make_score_fn(graphdef, _settings(1))(params, tokens, valid, mask)
    batch = RolloutBatch(tokens, valid, mask, jnp.linspace(-1.0, 1.0, 8), logp, logp, logp)
    shape = {"prompt_width": 5, "completion_width": 6, "shards": 1, "minibatches": 2}
    plan = packing.plan_packing(prompt_lens, completion_lens, passes=2, rng=np.random.default_rng(0), **shape)
    assert not np.array_equal(plan.sequences[0], plan.sequences[1])  # each pass shuffles anew
    optimizer = optax.adam(1e-3)
    state = TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
    settings = dataclasses.replace(_settings(2), iterations=2)
    train = make_train_fn(graphdef, optimizer, settings)
    packed = dataclasses.replace(batch, packing=jax.tree.map(jnp.asarray, plan))
    state, metrics = train(state, packed, jax.random.key(0))
    assert metrics["loss"].shape == (2, 2) and np.all(np.isfinite(np.asarray(metrics["loss"])))
    assert int(state.step) == 4
    one_pass = packing.plan_packing(prompt_lens, completion_lens, passes=1, rng=None, **shape)
    with pytest.raises(ValueError, match="passes, micro-batches"):
        train(
            state, dataclasses.replace(batch, packing=jax.tree.map(jnp.asarray, one_pass)), jax.random.key(1)
        )
