"""ModelConfig: the shape and numerics of a Qwen-style MoE causal LM, read from or written to HF config.json.

Field names follow Hugging Face's so a config.json maps over with few renames. Runtime settings
(parameter dtype, compute dtype, MoE dispatch strategy) live here too but are never written to HF.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "qwen2_moe")
MOE_DISPATCH_STRATEGIES = ("auto", "dense", "capacity", "ragged", "tiled")
EXPERT_PARALLEL_MODES = ("auto", "off")
DECODE_LAYER_MODES = ("auto", "scan", "unrolled")
# What a rematerialised layer keeps for the backward pass: nothing (recompute the whole layer), or the
# results of its matmuls (recompute only the cheap elementwise work; more memory, fewer FLOPs).
REMAT_POLICIES = ("nothing_saveable", "dots_saveable")
DTYPES = ("float32", "bfloat16", "float16")


def dtype_name(value: Any) -> str | None:
    """The canonical name of a dtype-like ("bfloat16", jnp.bfloat16, np.float32, np.dtype(...)) if it
    is one of the supported float dtypes, else None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        name = jnp.dtype(value).name
    except TypeError:
        return None
    return name if name in DTYPES else None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Qwen3-MoE or Qwen2-MoE decoder (see shared/QWEN_MOE.md)."""

    model_type: str = "qwen3_moe"
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144  # dense SwiGLU layers (mlp_only_layers / decoder_sparse_step)
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128  # explicit: Qwen3 has head_dim != hidden_size / heads
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    shared_expert_intermediate_size: int = 0  # 0: no shared expert (Qwen3); Qwen2-MoE: 5632
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    norm_topk_prob: bool = False
    attention_bias: bool = False  # bias on q, k, v and o (Qwen3 spelling)
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2 spelling)
    qk_norm: bool = True  # per-head RMSNorm on q and k before RoPE (Qwen3 only)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    router_aux_loss_coef: float = 0.001
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer "full_attention" | "sliding_attention"; () = all full
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    # Runtime settings (never written to config.json).
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of activations and matmuls
    moe_dispatch: str = "auto"
    capacity_factor: float = 0.0  # <= 0: dropless (capacity covers the worst case)
    # auto: all-to-all expert parallelism where the mesh context splits experts; off: GSPMD partitions
    # the single-device dispatch
    expert_parallel: str = "auto"
    remat: bool = False  # recompute each decoder layer in the backward pass (activation memory / layers)
    remat_policy: str = "nothing_saveable"  # one of REMAT_POLICIES (used when remat)
    # Decoder layers per lax.scan iteration; 0 unrolls every layer. On CPU unrolling saves copying each
    # layer's saved activations in and out of stacked buffers (small models); deep models on TPU/GPU
    # keep 1 for compile time and memory.
    scan_unroll: int = 1
    # Query rows per chunk of cache-free attention (training, scoring): the backward keeps one chunk's
    # [chunk, T] scores, and keys after a chunk are skipped. 0: one [T, T] call.
    attention_chunk: int = 128
    # The KV-cache path (prefill, decode): "unrolled" layers with per-layer cache buffers and weights
    # sliced once before the decode loop (fast on CPU, compile time grows with depth), "scan" over the
    # stacks with one [L, ...] cache (compile time flat in depth); auto: unrolled on CPU or when
    # scan_unroll is 0, else scan.
    decode_layers: str = "auto"

    def __post_init__(self):
        errors = []
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            errors.append(
                f"model_type={self.model_type!r} is not supported; use one of {SUPPORTED_MODEL_TYPES}"
            )
        if self.num_attention_heads % max(self.num_key_value_heads, 1):
            errors.append(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            errors.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            errors.append(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]"
            )
        if self.decoder_sparse_step < 1:
            errors.append(f"decoder_sparse_step={self.decoder_sparse_step} must be >= 1")
        if self.moe_dispatch not in MOE_DISPATCH_STRATEGIES:
            errors.append(f"moe_dispatch={self.moe_dispatch!r}: use one of {MOE_DISPATCH_STRATEGIES}")
        if self.expert_parallel not in EXPERT_PARALLEL_MODES:
            errors.append(f"expert_parallel={self.expert_parallel!r}: use one of {EXPERT_PARALLEL_MODES}")
        if not isinstance(self.attention_chunk, int) or self.attention_chunk < 0:
            errors.append(f"attention_chunk={self.attention_chunk!r}: use an int >= 0 (0: no chunking)")
        if self.decode_layers not in DECODE_LAYER_MODES:
            errors.append(f"decode_layers={self.decode_layers!r}: use one of {DECODE_LAYER_MODES}")
        if not isinstance(self.scan_unroll, int) or self.scan_unroll < 0:
            errors.append(f"scan_unroll={self.scan_unroll!r}: use an int >= 0 (0 unrolls every layer)")
        if self.remat_policy not in REMAT_POLICIES:
            errors.append(f"remat_policy={self.remat_policy!r}: use one of {REMAT_POLICIES}")
        for name in ("param_dtype", "dtype"):
            canonical = dtype_name(getattr(self, name))
            if canonical is None:
                errors.append(
                    f"{name}={getattr(self, name)!r}: use one of {DTYPES} (a name, or e.g. jnp.bfloat16)"
                )
            else:  # stored by name: the config stays hashable, comparable and JSON-friendly
                object.__setattr__(self, name, canonical)
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            errors.append(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        if any(t == "sliding_attention" for t in self.layer_types) and not self.sliding_window:
            errors.append("sliding_attention layers need sliding_window > 0")
        if errors:
            raise ValueError("Invalid ModelConfig:\n  " + "\n  ".join(errors))

    def decodes_unrolled(self, platform: str | None = None) -> bool:
        """Whether the cache path runs the layers unrolled (see decode_layers) on `platform`
        ("cpu", "gpu", "tpu"; default the current backend)."""
        if self.decode_layers == "auto":
            return (platform or jax.default_backend()) == "cpu" or self.scan_unroll == 0
        return self.decode_layers == "unrolled"

    def is_moe_layer(self, layer: int) -> bool:
        """HF's rule: sparse iff not in mlp_only_layers, experts exist and (layer+1) % step == 0."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def layer_window(self, layer: int) -> int | None:
        """Sliding-window size of `layer`'s attention, or None for full causal attention."""
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def has_qkv_bias(self) -> bool:
        return self.attention_bias or self.qkv_bias

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ----

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **runtime) -> "ModelConfig":
        """Builds a config from a parsed HF config.json (either spelling of experts and rope theta)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json has model_type={model_type!r}; gspo_jax supports {SUPPORTED_MODEL_TYPES}"
            )
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"rope_type={rope_type!r} is not supported (only 'default' RoPE); "
                "remove rope scaling from config.json or use a model without it"
            )
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        hidden_act = hf.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act={hidden_act!r} is not supported (only 'silu')")
        num_experts = hf.get("num_experts", hf.get("num_local_experts", 0)) or 0
        heads = hf["num_attention_heads"]
        use_window = bool(hf.get("use_sliding_window", False))
        window = hf.get("sliding_window") if use_window else None
        layer_types: tuple[str, ...] = ()
        if use_window and window:
            layers = hf["num_hidden_layers"]
            if model_type == "qwen3_moe":  # Qwen3-MoE: every layer slides when enabled
                layer_types = ("sliding_attention",) * layers
            else:
                layer_types = tuple(
                    hf.get("layer_types")
                    or [
                        "sliding_attention"
                        if (i + 1) % 2 and i < hf.get("max_window_layers", 28)
                        else "full_attention"
                        for i in range(layers)
                    ]
                )
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        is_qwen3 = model_type == "qwen3_moe"
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf.get("intermediate_size", 0),
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            num_experts=num_experts,
            num_experts_per_tok=hf.get("num_experts_per_tok", 0),
            moe_intermediate_size=hf.get("moe_intermediate_size", 0),
            shared_expert_intermediate_size=(
                0 if is_qwen3 else hf.get("shared_expert_intermediate_size", 5632)
            ),
            decoder_sparse_step=hf.get("decoder_sparse_step", 1) or 1,
            mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            attention_bias=bool(hf.get("attention_bias", False)) if is_qwen3 else False,
            qkv_bias=False if is_qwen3 else bool(hf.get("qkv_bias", True)),
            qk_norm=is_qwen3,
            rope_theta=float(rope_theta),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            sliding_window=window,
            layer_types=layer_types,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
            initializer_range=hf.get("initializer_range", 0.02),
            **runtime,
        )

    @classmethod
    def from_hf_path(cls, path: str, **runtime) -> "ModelConfig":
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(
                f"{config_file} not found: point hf_path at a Hugging Face model directory"
            )
        with open(config_file) as f:
            return cls.from_hf_dict(json.load(f), **runtime)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers needs to rebuild this architecture."""
        is_qwen3 = self.model_type == "qwen3_moe"
        eos: Any = (
            list(self.eos_token_id)
            if len(self.eos_token_id) > 1
            else (self.eos_token_id[0] if self.eos_token_id else None)
        )
        hf: dict[str, Any] = {
            "architectures": ["Qwen3MoeForCausalLM" if is_qwen3 else "Qwen2MoeForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "decoder_sparse_step": self.decoder_sparse_step,
            "mlp_only_layers": list(self.mlp_only_layers),
            "norm_topk_prob": self.norm_topk_prob,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "max_position_embeddings": self.max_position_embeddings,
            "use_sliding_window": bool(self.layer_types and self.sliding_window),
            "sliding_window": self.sliding_window,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range,
            "torch_dtype": self.param_dtype,
        }
        if is_qwen3:
            hf["attention_bias"] = self.attention_bias
        else:
            hf["qkv_bias"] = self.qkv_bias
            hf["shared_expert_intermediate_size"] = self.shared_expert_intermediate_size
            if self.layer_types:
                hf["layer_types"] = list(self.layer_types)
        return hf


# Released shapes (checked against the parameter counts in shared/QWEN_MOE.md by tests).
PRESETS: dict[str, ModelConfig] = {
    # Qwen3-30B-A3B: 48 layers, 128 experts top-8, 30.5B total / 3.3B active.
    "qwen3_30b_a3b": ModelConfig(
        model_type="qwen3_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=True,
        rope_theta=1e6,
        max_position_embeddings=40960,
        bos_token_id=151643,
        eos_token_id=(151645,),
    ),
    # Qwen3-235B-A22B: 94 layers, 128 experts top-8, 235B total / 22B active.
    "qwen3_235b_a22b": ModelConfig(
        model_type="qwen3_moe",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=94,
        num_attention_heads=64,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=1536,
        norm_topk_prob=True,
        rope_theta=1e6,
        max_position_embeddings=40960,
        bos_token_id=151643,
        eos_token_id=(151645,),
    ),
    # Qwen1.5-MoE-A2.7B (Qwen2-MoE architecture): 60 experts top-4 plus a gated shared expert.
    "qwen1_5_moe_a2_7b": ModelConfig(
        model_type="qwen2_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=128,
        num_experts=60,
        num_experts_per_tok=4,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        qkv_bias=True,
        qk_norm=False,
        rope_theta=1e6,
        max_position_embeddings=8192,
        bos_token_id=151643,
        eos_token_id=(151643,),
    ),
}

# The default training run's policy: a 2-layer, 8-expert Qwen3-MoE sized for the built-in
# 64-token character vocabulary (gspo_jax.tokenizer) and a 2-core CPU.
PRESETS["tiny"] = ModelConfig(
    model_type="qwen3_moe",
    vocab_size=64,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    norm_topk_prob=True,
    rope_theta=10000.0,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=(2,),
    pad_token_id=0,
    initializer_range=0.05,
)


def config_errors(model) -> list[str]:
    """Problems with a run config's `model.*` keys (dtypes, dispatch, where the weights come from)."""
    errors = []
    for key in ("dtype", "param_dtype"):
        if model[key] not in DTYPES:
            errors.append(f"--config.model.{key}: {model[key]!r}: use one of {DTYPES}")
    if model.rollout_dtype not in ("",) + DTYPES:
        errors.append(
            f"--config.model.rollout_dtype: {model.rollout_dtype!r}: use '' (same as param_dtype) or one of {DTYPES}"
        )
    if model.moe_dispatch not in MOE_DISPATCH_STRATEGIES:
        errors.append(
            f"--config.model.moe_dispatch: {model.moe_dispatch!r}: use one of {MOE_DISPATCH_STRATEGIES}"
        )
    if model.logprob_chunk < 1:
        errors.append("--config.model.logprob_chunk: must be >= 1")
    if model.hf_path:
        if not os.path.isfile(os.path.join(model.hf_path, "config.json")):
            errors.append(
                f"--config.model.hf_path: {model.hf_path!r} has no config.json: point it at a local "
                "Hugging Face model directory"
            )
    elif model.preset != "tiny":
        errors.append(
            f"--config.model.hf_path: preset {model.preset!r} needs its released weights: set "
            f"--config.model.hf_path=/path/to/hf_dir (a fresh init is only offered for 'tiny'; known presets: "
            f"{sorted(PRESETS)})"
        )
    return errors
