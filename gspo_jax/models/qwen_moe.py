"""Qwen3-MoE / Qwen2-MoE causal LM: decoder layers, final norm, LM head, KV-cache entry points."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from gspo_jax import sharding
from gspo_jax.logprobs import lm_head_logits
from gspo_jax.models.config import ModelConfig
from gspo_jax.models.layers import Attention, LayerKVCache, RMSNorm, SwiGLU, param
from gspo_jax.models.moe import MoeBlock, RouterStats, load_balancing_loss


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecoderOutput:
    """hidden: [B, T, D] final-normed hidden states; cache: per-layer caches or None;
    router_stats: one RouterStats per MoE layer (empty for a dense model)."""

    hidden: jax.Array
    cache: list[LayerKVCache] | None
    router_stats: list[RouterStats]

    @property
    def aux_loss(self):
        """HF's load-balancing loss (without router_aux_loss_coef)."""
        return load_balancing_loss(self.router_stats)


RESIDUAL_AXES = ("batch", "seq", "embed")  # logical axes of the residual stream [B, T, D]


class DecoderLayer(nnx.Module):
    """Pre-norm block: h += attn(norm(h)); h += mlp(norm(h)), the MLP dense or sparse per config."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        self.self_attn = Attention(cfg, layer, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        self.is_moe = cfg.is_moe_layer(layer)
        if self.is_moe:
            self.mlp = MoeBlock(cfg, rngs=rngs)
        else:
            self.mlp = SwiGLU(
                cfg.hidden_size,
                cfg.intermediate_size,
                param_dtype=pdt,
                dtype=cfg.dtype,
                init_std=cfg.initializer_range,
                rngs=rngs,
            )

    def __call__(self, h_btd, pos_bt, valid_bt, cache, cache_start):
        # The residual stream keeps one layout at layer boundaries (sharding.ACTIVATION_RULES), so
        # the collectives around each layer are the same for every layer and predictable.
        h_btd = sharding.constrain(h_btd, RESIDUAL_AXES)
        attn_out, cache = self.self_attn(self.input_layernorm(h_btd), pos_bt, valid_bt, cache, cache_start)
        h_btd = sharding.constrain(h_btd + attn_out, RESIDUAL_AXES)
        normed = self.post_attention_layernorm(h_btd)
        stats = None
        if self.is_moe:
            mlp_out, stats = self.mlp(normed, valid_bt)
        else:
            mlp_out = self.mlp(normed)
        return sharding.constrain(h_btd + mlp_out, RESIDUAL_AXES), cache, stats


def default_positions(valid_bt):
    """Positions that skip left padding: the first real token of each row is position 0."""
    return jnp.maximum(jnp.cumsum(valid_bt.astype(jnp.int32), axis=-1) - 1, 0)


class QwenMoeForCausalLM(nnx.Module):
    """`model(input_ids)` -> float32 logits [B, T, V]; `forward` exposes hidden states and the cache."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        init = jax.nn.initializers.normal(cfg.initializer_range)
        self.embed_tokens = param(rngs, init, (cfg.vocab_size, cfg.hidden_size), pdt, ("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(cfg, i, rngs=rngs) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, init, (cfg.hidden_size, cfg.vocab_size), pdt, ("embed", "vocab"))

    def __call__(self, input_ids_bt, attention_mask_bt=None, positions_bt=None):
        out = self.forward(input_ids_bt, valid_bt=attention_mask_bt, positions_bt=positions_bt)
        return self.logits(out.hidden)

    def forward(
        self, input_ids_bt, *, valid_bt=None, positions_bt=None, cache=None, cache_start=None
    ) -> DecoderOutput:
        """Runs the decoder.

        valid_bt: [B, T] 1 for real tokens, 0 for padding (default all real); positions_bt default to
        the running count of real tokens. With `cache` (from init_cache), the T tokens are written at
        slots [cache_start, cache_start + T) and attend to everything cached so far.
        """
        if valid_bt is None:
            valid_bt = jnp.ones(input_ids_bt.shape, bool)
        valid_bt = valid_bt.astype(bool)
        if positions_bt is None:
            positions_bt = default_positions(valid_bt)
        h = self.embed_tokens.value[input_ids_bt].astype(self.dtype)
        new_cache, stats = [], []
        # With remat, a layer's activations are recomputed in the backward pass instead of stored
        # (cache-free calls only: decoding is never differentiated).
        remat = self.config.remat and cache is None
        for i, layer in enumerate(self.layers):
            layer_args = (h, positions_bt, valid_bt, None if cache is None else cache[i], cache_start)
            if remat:
                graphdef, state = nnx.split(layer)
                run = jax.checkpoint(
                    lambda state, *args, graphdef=graphdef: nnx.merge(graphdef, state)(*args)
                )
                h, layer_cache, layer_stats = run(state, *layer_args)
            else:
                h, layer_cache, layer_stats = layer(*layer_args)
            new_cache.append(layer_cache)
            if layer_stats is not None:
                stats.append(layer_stats)
        return DecoderOutput(
            hidden=self.norm(h), cache=None if cache is None else new_cache, router_stats=stats
        )

    def lm_head_weight(self):
        """[D, V] output projection in the compute dtype (the transposed embedding when tied)."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.value.T.astype(self.dtype)
        return self.lm_head.value.astype(self.dtype)

    def logits(self, hidden_btd):
        """[B, T, V] float32, accumulated in fp32 (the same function the trainer's log-probs use)."""
        return lm_head_logits(hidden_btd, self.lm_head_weight())

    def init_cache(self, batch: int, slots: int, dtype=None) -> list[LayerKVCache]:
        """Zeroed per-layer KV caches of `slots` positions (dtype defaults to the compute dtype)."""
        cfg = self.config
        return [
            LayerKVCache.zeros(batch, slots, cfg.num_key_value_heads, cfg.head_dim, dtype or self.dtype)
            for _ in range(cfg.num_hidden_layers)
        ]
