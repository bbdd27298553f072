"""Scanned decoder layers, checked on what XLA compiles: the train step's program does not grow with
depth, and the decode loop (layers unrolled) neither copies weights nor cache buffers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gspo_jax.lowering import lower_train_step
from gspo_jax.models.config import ModelConfig
from gspo_jax.models.qwen_moe import QwenMoeForCausalLM
from gspo_jax.sampler import Sampler

SMALL = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
)


def test_train_step_program_size_does_not_grow_with_depth():
    """With unrolled layers this lowered train step was 3.0x longer at 8 layers than at 2 (measured
    before the scan); one scan over stacked layers keeps it flat."""
    sizes = {
        depth: len(lower_train_step(SMALL.replace(num_hidden_layers=depth, remat=True)).as_text())
        for depth in (2, 8)
    }
    assert sizes[8] < 1.5 * sizes[2], sizes


def _loop_computations(hlo: str, op_name_suffix: str, carries: str) -> list[list[str]]:
    """The instruction lines of the while loop whose op_name ends with op_name_suffix and whose state
    holds an array matching the regex `carries`: its body and condition, and the loops and
    conditionals nested in them (fusion internals excluded)."""
    computations = {}
    for block in hlo.split("\n\n"):
        lines = block.strip().splitlines()
        match = re.match(r"(?:ENTRY )?%(\S+) ", lines[0]) if lines else None
        if match:
            computations[match.group(1)] = lines
    (loop,) = [
        line
        for line in hlo.splitlines()
        if " while(" in line and op_name_suffix + '"' in line and re.search(carries, line.split(" while(")[0])
    ]
    todo, seen = [re.search(r"body=%([\w.\-]+)", loop).group(1)], set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            for line in computations[name]:
                todo += re.findall(r"(?:body|condition|true_computation|false_computation)=%([\w.\-]+)", line)
                for branches in re.findall(r"branch_computations=\{([^}]*)\}", line):
                    todo += [b.strip().lstrip("%") for b in branches.split(",")]
    return [computations[name] for name in seen]


def test_decode_loop_never_copies_weights_or_cache_buffers():
    """Inside the sampler's decode loop no instruction produces an array shaped like a layer's weights
    (they are sliced from the stacks once, before the loop: XLA copies a slice taken inside it at
    every step, even a static one), and a layer's cache buffer is only ever written in place. Both
    copies were there before (measured at the medium bench shape: 2.0 s of expert-slice copies and
    0.7 s of cache-slice copies in an 11 s rollout). On CPU the decode step's expert products read
    transposed copies of the expert stacks, flattened to [E, I * D]: those are made once, before the
    loop (a first version had XLA copy every expert stack inside the loop at every step)."""
    cfg = SMALL.replace(num_hidden_layers=3, num_experts=6, moe_dispatch="tiled", decode_layers="unrolled")
    graphdef, params = nnx.split(nnx.eval_shape(lambda: QwenMoeForCausalLM(cfg, rngs=nnx.Rngs(0))))
    batch, width, samples, new = 2, 4, 2, 5
    sampler = Sampler(graphdef, max_new_tokens=new, num_samples=samples)
    prompts = jax.ShapeDtypeStruct((batch, width), jnp.int32)
    lowered = sampler._generate.lower(params, prompts, prompts.update(dtype=bool), jax.random.key(0))
    hlo = lowered.compile().as_text()
    cache = (batch * samples, width + new - 1, cfg.num_key_value_heads, cfg.head_dim)
    # The decode loop: the prefill's tile loops share its op_name but carry no cache.
    loop = _loop_computations(hlo, "_generate_impl)/while", r"f32\[" + ",".join(map(str, cache)) + r"\]")

    shape_of = lambda dims: r"= f32\[" + ",".join(map(str, dims)) + r"\]\{"
    per_layer = jax.eval_shape(lambda p: nnx.merge(graphdef, p).layer_params(), params)
    weight_shapes = {tuple(w.shape) for w in jax.tree.leaves(per_layer) if w.ndim >= 2}
    assert (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size) in weight_shapes
    transposed_flat = (cfg.num_experts, cfg.hidden_size * cfg.moe_intermediate_size)
    weight_shapes.add(transposed_flat)
    passes = re.compile(r"= \S+ (parameter|get-tuple-element|bitcast)\(")
    lines = [line for computation in loop for line in computation if not passes.search(line)]
    copied = [line for line in lines if any(re.search(shape_of(s), line) for s in weight_shapes)]
    assert not copied, copied[:3]
    if jax.default_backend() == "cpu":
        made = re.findall(shape_of(transposed_flat) + r"[^ ]* (?:fusion|copy|transpose)\(", hlo)
        assert len(made) >= 3, "no transposed expert copies: the test no longer looks at them"
    cache_ops = [line for line in lines if re.search(shape_of(cache), line)]
    assert cache_ops and all("dynamic-update-slice" in line.split("=")[0] for line in cache_ops), cache_ops


def test_chunked_attention_does_not_keep_every_layers_scores():
    """With attention_chunk the backward pass recomputes each query chunk's scores instead of keeping
    every layer's fp32 [B, heads, T, T] scores and probabilities: the compiled gradient's temporaries
    shrink by at least the scores of all layers (measured at 2064 tokens, 16 rows: 14.8 -> 4.8 GB,
    and 31.6 -> 13.8 s)."""
    batch, tokens = 2, 256
    cfg = SMALL.replace(num_hidden_layers=3, scan_unroll=1)
    ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)

    def temp_bytes(chunk):
        graphdef, params = nnx.split(
            nnx.eval_shape(lambda: QwenMoeForCausalLM(cfg.replace(attention_chunk=chunk), rngs=nnx.Rngs(0)))
        )
        loss = lambda p, ids: jnp.sum(nnx.merge(graphdef, p).forward(ids).hidden ** 2)
        compiled = jax.jit(jax.grad(loss)).lower(params, ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores = cfg.num_hidden_layers * batch * cfg.num_attention_heads * tokens * tokens * 4
    assert temp_bytes(0) - temp_bytes(32) >= scores


def test_scanned_and_unrolled_decoding_sample_the_same_tokens():
    """decode_layers="scan" (one [L, ...] cache carried by the layer scan: what accelerators run, with
    compile time flat in depth) and "unrolled" (per-layer buffers, weights sliced once: CPU) decode
    the same greedy tokens with the same log-probs, over several layer runs, G > 1 and a stop id."""
    cfg = SMALL.replace(
        num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=(3,), initializer_range=0.3
    )
    prompts = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (3, 6)), jnp.int32)
    mask = jnp.ones(prompts.shape, bool).at[0, :2].set(False)
    outputs = {}
    for mode in ("scan", "unrolled"):
        model = QwenMoeForCausalLM(cfg.replace(decode_layers=mode), rngs=nnx.Rngs(0))
        assert model.init_cache(1, 2).stacked == (mode == "scan")
        graphdef, params = nnx.split(model)
        sampler = Sampler(graphdef, max_new_tokens=7, num_samples=2, temperature=0.0, stop_ids=(52,))
        outputs[mode] = sampler(params, prompts, mask, jax.random.key(0))
    scan, unrolled = outputs["scan"], outputs["unrolled"]
    np.testing.assert_array_equal(np.asarray(scan.completion_ids), np.asarray(unrolled.completion_ids))
    np.testing.assert_array_equal(np.asarray(scan.completion_mask), np.asarray(unrolled.completion_mask))
    np.testing.assert_allclose(np.asarray(scan.logprobs), np.asarray(unrolled.logprobs), atol=1e-5)
    assert 0 < int(jnp.sum(scan.completion_mask == 0))  # some row stopped early
