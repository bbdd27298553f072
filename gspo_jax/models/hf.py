"""Hugging Face safetensors directories <-> gspo_jax parameters, in both directions.

One `TensorSpec` per group of tensors says which HF keys make which parameters and how to convert:
torch Linear weights are [out, in] and become [in, out] (heads split out for attention); per-expert
HF tensors are stacked into [E, ...]; transformers' fused `gate_up_proj` layout is accepted too.
Loading reads one tensor at a time (single file or sharded with an index) and places each parameter
with its sharding, so nothing larger than one tensor sits in host memory at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import save_file

from gspo_jax.models.config import ModelConfig
from gspo_jax.models.qwen_moe import QwenMoeForCausalLM, layer_runs

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Keys some checkpoints carry that hold no parameters of ours.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

Path = tuple


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """params at `paths` <-> HF tensors `keys` of `shapes` through `to_params` / `to_hf`.

    layer: for a decoder layer, (index, run length): the params at `paths` are [run length, ...]
    stacks and this spec's arrays are their slice `index`; None for a parameter outside the layers.
    """

    paths: tuple[Path, ...]
    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    to_params: Callable[[list[np.ndarray]], list[np.ndarray]]
    to_hf: Callable[[list[np.ndarray]], list[np.ndarray]]
    layer: tuple[int, int] | None = None


def _linear(path: Path, key: str, d_in: int, out_shape: tuple[int, ...]) -> TensorSpec:
    """torch Linear [prod(out), in] <-> param [in, *out]."""
    out = int(np.prod(out_shape))
    return TensorSpec(
        (path,),
        (key,),
        ((out, d_in),),
        lambda t: [t[0].T.reshape(d_in, *out_shape)],
        lambda p: [p[0].reshape(d_in, out).T],
    )


def _linear_in_heads(path: Path, key: str, in_shape: tuple[int, ...], d_out: int) -> TensorSpec:
    """torch Linear [out, prod(in)] <-> param [*in, out] (the attention output projection)."""
    d_in = int(np.prod(in_shape))
    return TensorSpec(
        (path,),
        (key,),
        ((d_out, d_in),),
        lambda t: [t[0].T.reshape(*in_shape, d_out)],
        lambda p: [p[0].reshape(d_in, d_out).T],
    )


def _same(path: Path, key: str, shape: tuple[int, ...]) -> TensorSpec:
    return TensorSpec(
        (path,), (key,), (shape,), lambda t: [t[0].reshape(shape)], lambda p: [p[0].reshape(shape)]
    )


def _reshaped(path: Path, key: str, hf_shape: tuple[int, ...], shape: tuple[int, ...]) -> TensorSpec:
    return TensorSpec(
        (path,), (key,), (hf_shape,), lambda t: [t[0].reshape(shape)], lambda p: [p[0].reshape(hf_shape)]
    )


def _per_expert(path: Path, key_fmt: str, num_experts: int, hf_shape: tuple[int, int]) -> TensorSpec:
    """E torch Linear weights [out, in] <-> param [E, in, out]."""
    keys = tuple(key_fmt.format(e) for e in range(num_experts))
    return TensorSpec(
        (path,),
        keys,
        (hf_shape,) * num_experts,
        lambda t: [np.stack([w.T for w in t])],
        lambda p: [w.T for w in p[0]],
    )


def _expert_specs(prefix: Path, hf: str, cfg: ModelConfig, fused: bool) -> list[TensorSpec]:
    e, d, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    gate, up, down = prefix + ("gate_proj",), prefix + ("up_proj",), prefix + ("down_proj",)
    if not fused:
        return [
            _per_expert(gate, hf + ".experts.{}.gate_proj.weight", e, (i, d)),
            _per_expert(up, hf + ".experts.{}.up_proj.weight", e, (i, d)),
            _per_expert(down, hf + ".experts.{}.down_proj.weight", e, (d, i)),
        ]
    # transformers' in-memory layout: gate_up_proj [E, 2I, D] (gate rows first), down_proj [E, D, I].
    return [
        TensorSpec(
            (gate, up),
            (hf + ".experts.gate_up_proj",),
            ((e, 2 * i, d),),
            lambda t: [t[0][:, :i].transpose(0, 2, 1), t[0][:, i:].transpose(0, 2, 1)],
            lambda p: [np.concatenate([p[0], p[1]], axis=2).transpose(0, 2, 1)],
        ),
        TensorSpec(
            (down,),
            (hf + ".experts.down_proj",),
            ((e, d, i),),
            lambda t: [t[0].transpose(0, 2, 1)],
            lambda p: [p[0].transpose(0, 2, 1)],
        ),
    ]


def _mlp_specs(prefix: Path, hf: str, d: int, inter: int) -> list[TensorSpec]:
    return [
        _linear(prefix + ("gate_proj",), hf + ".gate_proj.weight", d, (inter,)),
        _linear(prefix + ("up_proj",), hf + ".up_proj.weight", d, (inter,)),
        _linear_in_heads(prefix + ("down_proj",), hf + ".down_proj.weight", (inter,), d),
    ]


def _layer_specs(cfg: ModelConfig, p: Path, layer: int, fused: bool) -> list[TensorSpec]:
    """HF layer `layer`'s tensors <-> one slice of the stacked parameters under `p`."""
    d, nq, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    hf = f"model.layers.{layer}"
    attn, hf_attn = p + ("self_attn",), hf + ".self_attn"
    specs = [
        _same(p + ("input_layernorm", "weight"), hf + ".input_layernorm.weight", (d,)),
        _same(p + ("post_attention_layernorm", "weight"), hf + ".post_attention_layernorm.weight", (d,)),
        _linear(attn + ("q_proj",), hf_attn + ".q_proj.weight", d, (nq, hd)),
        _linear(attn + ("k_proj",), hf_attn + ".k_proj.weight", d, (nkv, hd)),
        _linear(attn + ("v_proj",), hf_attn + ".v_proj.weight", d, (nkv, hd)),
        _linear_in_heads(attn + ("o_proj",), hf_attn + ".o_proj.weight", (nq, hd), d),
    ]
    if cfg.has_qkv_bias:
        specs += [
            _reshaped(attn + ("q_bias",), hf_attn + ".q_proj.bias", (nq * hd,), (nq, hd)),
            _reshaped(attn + ("k_bias",), hf_attn + ".k_proj.bias", (nkv * hd,), (nkv, hd)),
            _reshaped(attn + ("v_bias",), hf_attn + ".v_proj.bias", (nkv * hd,), (nkv, hd)),
        ]
    if cfg.attention_bias:
        specs.append(_same(attn + ("o_bias",), hf_attn + ".o_proj.bias", (d,)))
    if cfg.qk_norm:
        specs += [
            _same(attn + ("q_norm", "weight"), hf_attn + ".q_norm.weight", (hd,)),
            _same(attn + ("k_norm", "weight"), hf_attn + ".k_norm.weight", (hd,)),
        ]
    mlp, hf_mlp = p + ("mlp",), hf + ".mlp"
    if not cfg.is_moe_layer(layer):
        return specs + _mlp_specs(mlp, hf_mlp, d, cfg.intermediate_size)
    specs.append(_linear(mlp + ("router",), hf_mlp + ".gate.weight", d, (cfg.num_experts,)))
    specs += _expert_specs(mlp, hf_mlp, cfg, fused=fused)
    if cfg.shared_expert_intermediate_size:
        specs += _mlp_specs(
            mlp + ("shared_expert",), hf_mlp + ".shared_expert", d, cfg.shared_expert_intermediate_size
        )
        specs.append(_linear(mlp + ("shared_expert_gate",), hf_mlp + ".shared_expert_gate.weight", d, (1,)))
    return specs


def tensor_specs(cfg: ModelConfig, fused_experts: frozenset[int] = frozenset()) -> list[TensorSpec]:
    """Every parameter's HF counterpart; layers in `fused_experts` use the fused expert layout.

    HF layer `first + j` of the run of layers stacked under ("layers", run) is slice j of its params.
    """
    specs = [
        _same(("embed_tokens",), "model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)),
        _same(("norm", "weight"), "model.norm.weight", (cfg.hidden_size,)),
    ]
    if not cfg.tie_word_embeddings:
        specs.append(_linear(("lm_head",), "lm_head.weight", cfg.hidden_size, (cfg.vocab_size,)))
    for run, (first, count) in enumerate(layer_runs(cfg)):
        for j in range(count):
            layer = first + j
            specs += [
                dataclasses.replace(spec, layer=(j, count))
                for spec in _layer_specs(cfg, ("layers", run), layer, layer in fused_experts)
            ]
    return specs


class CheckpointKeyError(ValueError):
    """The HF files do not hold exactly the tensors this architecture needs."""


class _SafetensorsDir:
    """Lazy, key-addressed reader over model.safetensors or an indexed set of shards."""

    def __init__(self, path: str):
        index_file = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index_file):
            with open(index_file) as f:
                self.key_to_file = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
            single = os.path.join(path, SINGLE_FILE)
            with safe_open(single, framework="numpy") as f:
                self.key_to_file = {k: single for k in f.keys()}
        else:
            raise FileNotFoundError(
                f"No {SINGLE_FILE} or {INDEX_FILE} in {path}: gspo_jax loads safetensors checkpoints "
                "(convert .bin files with transformers' save_pretrained first)"
            )
        self._open: dict[str, object] = {}

    def _handle(self, key: str):
        file = self.key_to_file[key]
        if file not in self._open:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"Shard {file} listed in {INDEX_FILE} is missing")
            self._open[file] = safe_open(file, framework="numpy")
        return self._open[file]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def read(self, key: str) -> np.ndarray:
        return self._handle(key).get_tensor(key)


def _fused_expert_layers(keys, cfg: ModelConfig) -> frozenset[int]:
    return frozenset(
        i for i in range(cfg.num_hidden_layers) if f"model.layers.{i}.mlp.experts.gate_up_proj" in keys
    )


def _check_keys(specs: list[TensorSpec], reader: _SafetensorsDir, cfg: ModelConfig, path: str):
    available = set(reader.key_to_file)
    wanted = {k: s for spec in specs for k, s in zip(spec.keys, spec.shapes)}
    missing = sorted(k for k in wanted if k not in available)
    misshaped = sorted(
        f"{k}: file {reader.shape(k)} vs expected {wanted[k]}"
        for k in wanted
        if k in available and reader.shape(k) != wanted[k]
    )
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(
        k for k in available - wanted.keys() if k not in ignorable and not k.endswith(_IGNORED_SUFFIXES)
    )
    if missing or misshaped or unexpected:
        parts = [
            f"The checkpoint in {path} does not match its config.json ({cfg.model_type}, "
            f"{cfg.num_hidden_layers} layers, {cfg.num_experts} experts):"
        ]
        for title, items in (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected)):
            if items:
                shown = "\n    ".join(items[:40]) + (
                    f"\n    ... and {len(items) - 40} more" if len(items) > 40 else ""
                )
                parts.append(f"  {len(items)} {title} key(s):\n    {shown}")
        parts.append("Fix config.json (or the files) so they describe the same architecture.")
        raise CheckpointKeyError("\n".join(parts))


def abstract_model(cfg: ModelConfig):
    """(graphdef, abstract param state) of the model; nothing is allocated."""
    return nnx.split(nnx.eval_shape(lambda: QwenMoeForCausalLM(cfg, rngs=nnx.Rngs(0))))


def _place(array: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jax.device_put(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _without_layer_axis(sharding):
    """The sharding of one slice of a stacked parameter (None stays None)."""
    if sharding is None:
        return None
    return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))


# Writes slice i of a stacked parameter in place (the stack is donated): one compile per shape.
_set_layer = jax.jit(
    lambda stack, x, i: jax.lax.dynamic_update_index_in_dim(stack, x, i, axis=0), donate_argnums=0
)
_get_layer = jax.jit(lambda stack, i: jax.lax.dynamic_index_in_dim(stack, i, axis=0, keepdims=False))


def load_params(
    path: str, cfg: ModelConfig, shardings: dict[Path, object] | None = None
) -> dict[Path, jax.Array]:
    """Reads and converts every parameter; `shardings` maps a param path to its jax Sharding.

    A stacked layer parameter is allocated once in its sharding and filled one HF layer at a time,
    so neither host nor device ever holds a second copy of it.
    """
    reader = _SafetensorsDir(path)
    specs = tensor_specs(cfg, _fused_expert_layers(reader.key_to_file, cfg))
    _check_keys(specs, reader, cfg, path)
    dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
    shardings = shardings or {}
    params = {}
    for spec in specs:
        arrays = spec.to_params([reader.read(k) for k in spec.keys])
        for p, array in zip(spec.paths, arrays):
            array = np.ascontiguousarray(array.astype(dtype))
            if spec.layer is None:
                params[p] = _place(array, shardings.get(p))
                continue
            index, count = spec.layer
            if p not in params:
                params[p] = jax.numpy.zeros((count, *array.shape), dtype, device=shardings.get(p))
            layer = _place(array, _without_layer_axis(shardings.get(p)))
            params[p] = _set_layer(params[p], layer, np.int32(index))
    return params


def from_pretrained(
    path: str,
    dtype: Any = "float32",
    *,
    param_dtype: Any = None,
    shardings: dict[Path, object] | None = None,
    **runtime,
) -> QwenMoeForCausalLM:
    """Loads a local HF Qwen3-MoE / Qwen2-MoE directory into a model.

    dtype: compute dtype, any dtype-like ("bfloat16", jnp.bfloat16, np.float32); param_dtype defaults
    to dtype. Extra keyword arguments set other runtime
    ModelConfig fields (moe_dispatch, capacity_factor).
    """
    cfg = ModelConfig.from_hf_path(path, dtype=dtype, param_dtype=dtype if param_dtype is None else param_dtype, **runtime)
    graphdef, state = abstract_model(cfg)
    params = load_params(path, cfg, shardings)
    flat = dict(nnx.to_flat_state(state))
    for p, value in params.items():
        flat[p].set_value(value)
    return nnx.merge(graphdef, state)


def _host_numpy(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def save_pretrained(
    model: QwenMoeForCausalLM,
    path: str,
    *,
    dtype: Any = None,
    fused_experts: bool = False,
    max_shard_bytes: int = 4 * 1024**3,
    tokenizer=None,
) -> None:
    """Writes config.json, generation_config.json and safetensors that transformers loads, and the
    tokenizer when given (any object with HF's `save_pretrained`), so AutoTokenizer reads it too.

    Experts are written per expert (HF's on-disk default) unless fused_experts. Files above
    max_shard_bytes are split into model-0000i-of-0000n.safetensors with an index. In a multi-host
    job every process must call this (parameters are gathered); only process 0 writes.
    """
    cfg: ModelConfig = model.config
    out_dtype = np.dtype(jax.numpy.dtype(dtype or cfg.param_dtype))
    fused = frozenset(range(cfg.num_hidden_layers)) if fused_experts else frozenset()
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    tensors: dict[str, np.ndarray] = {}
    for spec in tensor_specs(cfg, fused):
        if spec.layer is None:
            values = spec.to_hf([_host_numpy(flat[p]) for p in spec.paths])
        else:
            index = np.int32(spec.layer[0])
            values = spec.to_hf([_host_numpy(_get_layer(flat[p], index)) for p in spec.paths])
        for key, value in zip(spec.keys, values):
            tensors[key] = np.ascontiguousarray(value.astype(out_dtype))
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    hf_config = cfg.to_hf_dict() | {"torch_dtype": str(out_dtype), "dtype": str(out_dtype)}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    generation = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": hf_config["eos_token_id"],
        "pad_token_id": cfg.pad_token_id,
    }
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({k: v for k, v in generation.items() if v is not None}, f, indent=2)
    _write_safetensors(tensors, path, max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def _write_safetensors(tensors: dict[str, np.ndarray], path: str, max_shard_bytes: int) -> None:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SINGLE_FILE), metadata=metadata)
        return
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata=metadata)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
