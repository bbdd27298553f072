"""The Flax port reproduces Hugging Face's Qwen3-MoE / Qwen2-MoE logits, aux loss and checkpoint files."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from flax import nnx
from transformers import AutoModelForCausalLM

import gspo_jax
from gspo_jax import sharding
from gspo_jax.models.hf import CheckpointKeyError, abstract_model, load_params
from hf_models import build_hf_model, hf_logits, rewrite_config, save_hf_model

TOL = 1e-4


def _ids(vocab, shape=(2, 11), seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape)


QWEN3_CASES = {
    "norm_topk_on": dict(norm_topk_prob=True),
    "norm_topk_off": dict(norm_topk_prob=False),
    "sparse_step2_mlp_only": dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3]),
    "tied_embeddings": dict(tie_word_embeddings=True),
    "rope_theta_1e6": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "attention_bias": dict(attention_bias=True),
    "sliding_window": dict(use_sliding_window=True, sliding_window=4),
    "sliding_window_chunked": dict(use_sliding_window=True, sliding_window=4),
}


@pytest.mark.parametrize("case", sorted(QWEN3_CASES))
def test_qwen3_logits_match_transformers(tmp_path, case):
    hf = build_hf_model("qwen3", **QWEN3_CASES[case])
    path = save_hf_model(hf, tmp_path / case)
    ids = _ids(hf.config.vocab_size, (2, 40) if case == "rope_theta_1e6" else (2, 11))
    model = gspo_jax.from_pretrained(path, attention_chunk=4 if case.endswith("chunked") else 0)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(hf, ids), atol=TOL, rtol=0)


def test_head_dim_is_read_not_derived(tmp_path):
    hf = build_hf_model("qwen3")
    assert hf.config.head_dim != hf.config.hidden_size // hf.config.num_attention_heads
    model = gspo_jax.from_pretrained(save_hf_model(hf, tmp_path / "m"))
    assert model.config.head_dim == 12


def test_qwen2_shared_expert_and_qkv_bias_match_transformers(tmp_path):
    hf = build_hf_model("qwen2")
    model = gspo_jax.from_pretrained(save_hf_model(hf, tmp_path / "q2"))
    assert model.config.qkv_bias and model.config.shared_expert_intermediate_size == 24
    ids = _ids(hf.config.vocab_size)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(hf, ids), atol=TOL, rtol=0)


def test_sharded_and_fused_files_load(tmp_path):
    hf = build_hf_model("qwen3")
    ids = _ids(hf.config.vocab_size)
    ref = hf_logits(hf, ids)
    sharded = save_hf_model(hf, tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    fused = save_hf_model(hf, tmp_path / "fused", save_original_format=False)
    keys = load_file(os.path.join(fused, "model.safetensors")).keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys
    for path in (sharded, fused):
        got = np.asarray(gspo_jax.from_pretrained(path)(jnp.asarray(ids)))
        np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


def test_both_config_spellings(tmp_path):
    hf = build_hf_model("qwen3", rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    path = save_hf_model(hf, tmp_path / "m")
    experts = hf.config.num_experts
    rewrite_config(path, num_local_experts=None, num_experts=experts, rope_parameters=None, rope_theta=1e6)
    model_a = gspo_jax.from_pretrained(path)
    rewrite_config(
        path,
        num_experts=None,
        num_local_experts=experts,
        rope_theta=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    model_b = gspo_jax.from_pretrained(path)
    for model in (model_a, model_b):
        assert model.config.num_experts == experts and model.config.rope_theta == 1e6
    ids = _ids(hf.config.vocab_size, (1, 30))
    np.testing.assert_allclose(np.asarray(model_a(jnp.asarray(ids))), hf_logits(hf, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_aux_loss_matches_transformers_with_and_without_padding(tmp_path, kind):
    hf = build_hf_model(kind, weight_std=0.2)
    model = gspo_jax.from_pretrained(save_hf_model(hf, tmp_path / kind))
    ids = _ids(hf.config.vocab_size, (3, 9))
    mask = np.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :2] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    for attention_mask in (None, mask):
        with torch.no_grad():
            out = hf(
                torch.as_tensor(ids),
                output_router_logits=True,
                attention_mask=None if attention_mask is None else torch.as_tensor(attention_mask),
                position_ids=None if attention_mask is None else torch.as_tensor(positions),
            )
        ours = model.forward(jnp.asarray(ids), valid_bt=None if attention_mask is None else jnp.asarray(mask))
        np.testing.assert_allclose(float(ours.aux_loss), float(out.aux_loss), atol=1e-6, rtol=1e-5)
    # Padding really is excluded: the masked value differs from the unmasked one.
    unmasked = model.forward(jnp.asarray(ids)).aux_loss
    masked = model.forward(jnp.asarray(ids), valid_bt=jnp.asarray(mask)).aux_loss
    assert abs(float(unmasked) - float(masked)) > 1e-4


@pytest.mark.parametrize("attention_chunk", [0, 3])
def test_left_padded_rows_match_unpadded(tmp_path, attention_chunk):
    """attention_chunk=3: query chunks that split the padding and the prompt (with its key prefix)."""
    hf = build_hf_model("qwen3", weight_std=0.2)
    model = gspo_jax.from_pretrained(save_hf_model(hf, tmp_path / "m"), attention_chunk=attention_chunk)
    ids = _ids(hf.config.vocab_size, (1, 7))
    padded = np.concatenate([np.zeros((1, 3), ids.dtype), ids], axis=1)
    mask = np.array([[0, 0, 0] + [1] * 7])
    alone = np.asarray(model(jnp.asarray(ids)))
    together = np.asarray(model(jnp.asarray(padded), attention_mask_bt=jnp.asarray(mask)))
    np.testing.assert_allclose(together[:, 3:], alone, atol=TOL, rtol=0)
    np.testing.assert_allclose(alone, hf_logits(hf, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "kind,kwargs", [("qwen3", {}), ("qwen3", {"tie_word_embeddings": True}), ("qwen2", {})]
)
def test_save_pretrained_loads_in_transformers_with_same_logits(tmp_path, kind, kwargs):
    hf = build_hf_model(kind, **kwargs)
    model = gspo_jax.from_pretrained(save_hf_model(hf, tmp_path / "src"))
    out = tmp_path / "out"
    gspo_jax.save_pretrained(model, str(out))
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = _ids(hf.config.vocab_size)
    np.testing.assert_allclose(
        hf_logits(reloaded, ids), np.asarray(model(jnp.asarray(ids))), atol=TOL, rtol=0
    )


def test_save_pretrained_sharded_and_fused_round_trip(tmp_path):
    hf = build_hf_model("qwen3")
    model = gspo_jax.from_pretrained(save_hf_model(hf, tmp_path / "src"))
    ids = jnp.asarray(_ids(hf.config.vocab_size))
    ref = np.asarray(model(ids))
    gspo_jax.save_pretrained(model, str(tmp_path / "sharded"), max_shard_bytes=30_000)
    gspo_jax.save_pretrained(model, str(tmp_path / "fused"), fused_experts=True)
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    for name in ("sharded", "fused"):
        np.testing.assert_array_equal(np.asarray(gspo_jax.from_pretrained(str(tmp_path / name))(ids)), ref)
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / name)).eval()
        np.testing.assert_allclose(hf_logits(reloaded, np.asarray(ids)), ref, atol=TOL, rtol=0)


def test_bad_checkpoint_keys_are_listed_in_one_error(tmp_path):
    hf = build_hf_model("qwen3")
    path = save_hf_model(hf, tmp_path / "m")
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.self_attn.q_norm.weight"]
    tensors["model.layers.0.mlp.gate.weight"] = np.zeros((7, 32), np.float32)
    tensors["model.layers.9.extra.weight"] = np.zeros((2,), np.float32)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointKeyError) as err:
        gspo_jax.from_pretrained(path)
    message = str(err.value)
    assert "missing" in message and "model.layers.1.self_attn.q_norm.weight" in message
    assert (
        "mis-shaped" in message
        and "model.layers.0.mlp.gate.weight: file (7, 32) vs expected (6, 32)" in message
    )
    assert "unexpected" in message and "model.layers.9.extra.weight" in message


def test_missing_files_and_unsupported_configs_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        gspo_jax.from_pretrained(str(tmp_path))
    hf = build_hf_model("qwen3")
    path = save_hf_model(hf, tmp_path / "m")
    rewrite_config(path, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0})
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        gspo_jax.from_pretrained(path)
    rewrite_config(path, model_type="llama")
    with pytest.raises(ValueError, match="model_type='llama'"):
        gspo_jax.from_pretrained(path)


def test_bf16_compute_is_close_to_fp32(tmp_path):
    hf = build_hf_model("qwen3", weight_std=0.1)
    path = save_hf_model(hf, tmp_path / "m")
    ids = jnp.asarray(_ids(hf.config.vocab_size))
    fp32 = np.asarray(gspo_jax.from_pretrained(path)(ids))
    mixed = gspo_jax.from_pretrained(path, dtype="bfloat16", param_dtype="float32")
    assert mixed.embed_tokens.value.dtype == jnp.float32
    out = mixed(ids)
    assert out.dtype == jnp.float32
    assert np.abs(np.asarray(out) - fp32).max() < 0.05 * np.abs(fp32).max()


# Layers 0 and 2 dense, 1 sparse, 3 dense (mlp_only): three scanned runs, of 1, 1 and 2 layers.
HETEROGENEOUS = dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3])


def _torch_grads_in_our_layout(hf, ids, path):
    """d(sum of next-token log-probs + aux loss)/d(weights) by torch autograd, converted to our
    parameter layout by writing the gradients as a checkpoint and loading it (layout of load_params)."""
    out = hf(torch.as_tensor(ids), output_router_logits=True)
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    target = torch.as_tensor(ids[:, 1:])[..., None]
    loss = logp.gather(-1, target).sum() + out.aux_loss
    hf.zero_grad()
    loss.backward()
    os.makedirs(path, exist_ok=True)
    hf.config.save_pretrained(path)
    grads = {name: p.grad.numpy().copy() for name, p in hf.named_parameters()}
    save_file(grads, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    cfg = gspo_jax.ModelConfig.from_hf_path(path)
    return loss.item(), {p: np.asarray(v) for p, v in load_params(path, cfg).items()}


@pytest.mark.parametrize(
    "remat_policy, scan_unroll, attention_chunk",
    [(None, 1, 0), ("nothing_saveable", 1, 0), ("dots_saveable", 1, 0), (None, 0, 0), (None, 1, 4)],
)
def test_scanned_heterogeneous_stack_gradients_match_torch(tmp_path, remat_policy, scan_unroll, attention_chunk):
    """attention_chunk=4 over 9 tokens: three query chunks (the last one short), each seeing only
    its causal key prefix, recomputed in the backward pass."""
    hf = build_hf_model("qwen3", weight_std=0.2, **HETEROGENEOUS)
    path = save_hf_model(hf, tmp_path / "m")
    ids = _ids(hf.config.vocab_size, (2, 9))
    ref_loss, ref_grads = _torch_grads_in_our_layout(hf, ids, str(tmp_path / "grads"))
    runtime = {"remat": True, "remat_policy": remat_policy} if remat_policy else {}
    model = gspo_jax.from_pretrained(path, scan_unroll=scan_unroll, attention_chunk=attention_chunk, **runtime)
    assert model.runs == ((0, 1), (1, 1), (2, 2))
    graphdef, params = nnx.split(model)

    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        out = model.forward(jnp.asarray(ids))
        logp = jax.nn.log_softmax(model.logits(out.hidden)[:, :-1])
        return jnp.sum(jnp.take_along_axis(logp, jnp.asarray(ids[:, 1:])[..., None], -1)) + out.aux_loss

    jaxpr = str(jax.make_jaxpr(jax.grad(loss_fn))(params))
    assert ("checkpoint" in jaxpr or "remat" in jaxpr) == bool(remat_policy or attention_chunk)
    assert jaxpr.count("scan[") >= 3  # one scan per run (unrolled inside when scan_unroll=0)
    assert ("unroll=2" in jaxpr) == (scan_unroll == 0)  # the two-layer run
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    ours = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    assert ours.keys() == ref_grads.keys()
    for p, ref in ref_grads.items():
        scale = max(1e-3, float(np.abs(ref).max()))
        np.testing.assert_allclose(ours[p], ref, rtol=0, atol=1e-5 * scale, err_msg=str(p))


def test_sharded_load_and_export_of_stacked_layers(tmp_path):
    """Loading onto a data x fsdp x expert mesh fills each stacked parameter layer by layer in its
    own sharding; exporting it again gathers the slices back into HF's per-layer tensors."""
    hf = build_hf_model("qwen3", **HETEROGENEOUS)
    path = save_hf_model(hf, tmp_path / "src", max_shard_size="20KB")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "expert": 2, "tensor": 1})
    cfg = gspo_jax.ModelConfig.from_hf_path(path)
    wanted = sharding.param_shardings(abstract_model(cfg)[1], mesh)
    flat = {p: s.get_value() for p, s in nnx.to_flat_state(wanted)}
    model = gspo_jax.from_pretrained(path, shardings=flat)
    loaded = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for p, value in loaded.items():
        assert value.sharding.is_equivalent_to(flat[p], value.ndim), p
    gate = loaded[("layers", 1, "mlp", "gate_proj")]
    assert gate.shape == (1, 6, 32, 16) and tuple(gate.sharding.spec[:3]) == (None, "expert", "fsdp")
    ids = _ids(hf.config.vocab_size)
    ref = hf_logits(hf, ids)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref, atol=TOL, rtol=0)
    gspo_jax.save_pretrained(model, str(tmp_path / "out"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    np.testing.assert_allclose(hf_logits(reloaded, ids), ref, atol=TOL, rtol=0)
