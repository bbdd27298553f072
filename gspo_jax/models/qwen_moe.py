"""Qwen3-MoE / Qwen2-MoE causal LM: decoder layers, final norm, LM head, KV-cache entry points.

Decoder layers are stored stacked: each run of consecutive layers with the same structure (MLP dense
or sparse, attention window) is one DecoderLayer whose parameters carry a leading layer axis, and
`forward` runs it with `jax.lax.scan`, so the traced and compiled program does not grow with depth.
The KV-cache path (prefill, decode) runs the layers unrolled instead on CPU (ModelConfig.decode_layers,
`KVCache`).
Released Qwen3 / Qwen1.5-MoE models are one run; mlp_only_layers / decoder_sparse_step give several.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from gspo_jax import sharding
from gspo_jax.logprobs import lm_head_logits
from gspo_jax.models.config import ModelConfig
from gspo_jax.models.layers import Attention, KVCache, RMSNorm, SwiGLU, param
from gspo_jax.models.moe import MoeBlock, RouterStats, load_balancing_loss


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecoderOutput:
    """hidden: [B, T, D] final-normed hidden states; cache: the updated KVCache or None;
    router_stats: RouterStats stacked over the MoE layers ([L_moe, E], ..., expert_ids [L_moe, B, T, k]),
    None for a dense model."""

    hidden: jax.Array
    cache: KVCache | None
    router_stats: RouterStats | None

    @property
    def aux_loss(self):
        """HF's load-balancing loss (without router_aux_loss_coef)."""
        return load_balancing_loss(self.router_stats)


RESIDUAL_AXES = ("batch", "seq", "embed")  # logical axes of the residual stream [B, T, D]


def layer_runs(cfg: ModelConfig) -> tuple[tuple[int, int], ...]:
    """(first layer, length) of each run of consecutive layers with the same structure."""
    kind = lambda i: (cfg.is_moe_layer(i), cfg.layer_window(i))
    runs: list[list[int]] = []
    for i in range(cfg.num_hidden_layers):
        if runs and kind(i) == kind(runs[-1][0]):
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return tuple((first, count) for first, count in runs)


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

    def __call__(
        self,
        h_btd,
        pos_bt,
        valid_bt,
        cache=None,
        cache_start=None,
        layer=None,
        replay_ids_btk=None,
        segments_bt=None,
    ):
        """One layer: (h [B, T, D], cache with layer `layer`'s buffers updated (or None), RouterStats or None).

        replay_ids_btk: [B, T, k] expert ids for a MoE layer to route with (routing replay), or None;
        segments_bt: segment ids of packed rows (attention stays inside a segment), or None."""
        # The residual stream keeps one layout at layer boundaries (sharding.ACTIVATION_RULES), so
        # the collectives around each layer are the same for every layer and predictable.
        h_btd = sharding.constrain(h_btd, RESIDUAL_AXES)
        attn_out, cache = self.self_attn(
            self.input_layernorm(h_btd), pos_bt, valid_bt, cache, cache_start, layer, segments_bt
        )
        h_btd = sharding.constrain(h_btd + attn_out, RESIDUAL_AXES)
        normed = self.post_attention_layernorm(h_btd)
        stats = None
        if self.is_moe:
            mlp_out, stats = self.mlp(normed, valid_bt, replay_ids_btk)
        else:
            mlp_out = self.mlp(normed)
        return sharding.constrain(h_btd + mlp_out, RESIDUAL_AXES), cache, stats


def stacked_layers(cfg: ModelConfig, first: int, count: int, rngs: nnx.Rngs) -> DecoderLayer:
    """`count` layers shaped like layer `first`, parameters stacked on a leading "layers" axis.

    Each layer is initialised from its own key (vmapped), so the stack is built in one traced call.
    """
    keys = jax.random.split(rngs.params(), count)
    make = lambda key: DecoderLayer(cfg, first, rngs=nnx.Rngs(params=key))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(jax.random.key(0))))
    stack = nnx.merge(graphdef, jax.vmap(lambda key: nnx.split(make(key))[1])(keys))
    for _, variable in nnx.iter_graph(stack):
        if isinstance(variable, nnx.Param):
            variable.set_metadata("logical_axes", ("layers",) + variable.get_metadata("logical_axes"))
    return stack


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
        self.runs = layer_runs(cfg)
        self.layers = nnx.List([stacked_layers(cfg, first, count, rngs) for first, count in self.runs])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, init, (cfg.hidden_size, cfg.vocab_size), pdt, ("embed", "vocab"))

    def __call__(self, input_ids_bt, attention_mask_bt=None, positions_bt=None):
        out = self.forward(input_ids_bt, valid_bt=attention_mask_bt, positions_bt=positions_bt)
        return self.logits(out.hidden)

    def forward(
        self,
        input_ids_bt,
        *,
        valid_bt=None,
        positions_bt=None,
        cache=None,
        cache_start=None,
        layer_params=None,
        replay_expert_ids=None,
        segments_bt=None,
    ) -> DecoderOutput:
        """Runs the decoder.

        valid_bt: [B, T] 1 for real tokens, 0 for padding (default all real); positions_bt default to
        the running count of real tokens. segments_bt: [B, T] int segment ids when rows hold several
        packed sequences (packing.py; pass their positions too): a token attends only inside its
        segment. Not with a cache. With `cache` (from init_cache), the T tokens are written at
        slots [cache_start, cache_start + T) and attend to everything cached so far. With a cache of
        per-layer buffers (config.decodes_unrolled()) the layers run unrolled, taking their parameters
        from `layer_params` (`self.layer_params()`, computed once outside a decode loop; computed here
        when not given); with a stacked cache they run as the scan.
        replay_expert_ids: [L_moe, B, T, k] int32 expert choices (router_stats.expert_ids of an earlier
        forward over the same tokens) that every MoE layer routes with instead of its own top-k: the
        GSPO paper's Routing Replay. Combine weights still come from the current router.
        """
        if segments_bt is not None and (cache is not None or positions_bt is None):
            raise ValueError("segments_bt (packed rows) needs positions_bt and no cache")
        if valid_bt is None:
            valid_bt = jnp.ones(input_ids_bt.shape, bool)
        valid_bt = valid_bt.astype(bool)
        if positions_bt is None:
            positions_bt = default_positions(valid_bt)
        h = self.embed_tokens.value[input_ids_bt].astype(self.dtype)
        if cache is not None:
            cache = cache.write_slots(cache_start, valid_bt, positions_bt)
        if layer_params is not None and len(layer_params) != self.config.num_hidden_layers:
            raise ValueError(
                f"layer_params has {len(layer_params)} entries for {self.config.num_hidden_layers} layers: "
                "pass model.layer_params() of this model"
            )
        if cache is not None and not cache.stacked and layer_params is None:
            layer_params = self.layer_params()
        replay_runs = self._split_replay_ids(replay_expert_ids, input_ids_bt.shape)
        stats = []
        for (first, _), stack, replay in zip(self.runs, self.layers, replay_runs):
            if cache is None or cache.stacked:
                h, cache, run_stats = self._scan_layers(
                    stack, first, h, positions_bt, valid_bt, replay, cache, cache_start, segments_bt
                )
            else:
                h, cache, run_stats = self._unrolled_layers(
                    stack, first, h, positions_bt, valid_bt, replay, cache, cache_start, layer_params
                )
            if run_stats is not None:
                stats.append(run_stats)
        router_stats = jax.tree.map(lambda *s: jnp.concatenate(s), *stats) if stats else None
        return DecoderOutput(hidden=self.norm(h), cache=cache, router_stats=router_stats)

    def layer_params(self) -> tuple:
        """Every decoder layer's parameters sliced out of its stack: a tuple of L States for
        `forward(..., layer_params=...)`. A decode loop takes them once, before the loop: XLA copies a
        slice taken inside the loop at every step, even a static slice of a loop-invariant stack."""
        sliced = []
        for stack in self.layers:
            _, params = nnx.split(stack)
            count = jax.tree.leaves(params)[0].shape[0]
            sliced.extend(jax.tree.map(lambda w, i=i: w[i], params) for i in range(count))
        return tuple(sliced)

    def _split_replay_ids(self, ids_lbtk, tokens_shape) -> list:
        """[L_moe, B, T, k] replay ids -> one [count, B, T, k] slice per run (None for dense runs)."""
        if ids_lbtk is None:
            return [None] * len(self.runs)
        cfg = self.config
        moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        expected = (moe_layers, *tokens_shape, cfg.num_experts_per_tok)
        if tuple(ids_lbtk.shape) != expected:
            raise ValueError(
                f"replay_expert_ids has shape {tuple(ids_lbtk.shape)}; expected {expected} "
                "([MoE layers, B, T, k]): pass router_stats.expert_ids of a forward over the same tokens"
            )
        slices, used = [], 0
        for first, count in self.runs:
            if cfg.is_moe_layer(first):
                slices.append(ids_lbtk[used : used + count])
                used += count
            else:
                slices.append(None)
        return slices

    def _scan_layers(
        self,
        stack,
        first,
        h_btd,
        pos_bt,
        valid_bt,
        replay_ids=None,
        cache=None,
        cache_start=None,
        segments_bt=None,
    ):
        """Runs one stack of layers with lax.scan: (h, stacked cache or None) is the carry, each step
        takes one layer's parameters, index and [B, T, k] replay ids (if any); returns (h, cache,
        RouterStats stacked over the run or None)."""
        graphdef, params = nnx.split(stack)

        def one_layer(carry, xs):
            h_btd, cache = carry
            layer_params, layer, replay_btk = xs
            layer_module = nnx.merge(graphdef, layer_params)
            h_btd, cache, stats = layer_module(
                h_btd, pos_bt, valid_bt, cache, cache_start, layer, replay_btk, segments_bt
            )
            return (h_btd, cache), stats

        # With remat, a layer's activations are recomputed in the backward pass instead of stored
        # (cache-free calls only: decoding is never differentiated).
        if self.config.remat and cache is None:
            policy = getattr(jax.checkpoint_policies, self.config.remat_policy)
            one_layer = jax.checkpoint(one_layer, policy=policy, prevent_cse=False)
        count = jax.tree.leaves(params)[0].shape[0]
        unroll = min(self.config.scan_unroll or count, count)
        layers = jnp.arange(first, first + count, dtype=jnp.int32)
        (h_btd, cache), stats = jax.lax.scan(
            one_layer, (h_btd, cache), (params, layers, replay_ids), unroll=unroll
        )
        return h_btd, cache, stats

    def _unrolled_layers(
        self, stack, first, h_btd, pos_bt, valid_bt, replay_ids, cache, cache_start, layer_params
    ):
        """The cache path with per-layer buffers (prefill and decode, never differentiated): one stack's
        layers in a Python loop, layer first + i with layer_params[first + i], each writing and reading
        its own cache buffer in place; returns (h, cache, RouterStats stacked over the run or None)."""
        graphdef, params = nnx.split(stack)
        stats = []
        for i in range(jax.tree.leaves(params)[0].shape[0]):
            replay_btk = None if replay_ids is None else replay_ids[i]
            layer_module = nnx.merge(graphdef, layer_params[first + i])
            h_btd, cache, layer_stats = layer_module(
                h_btd, pos_bt, valid_bt, cache, cache_start, first + i, replay_btk
            )
            stats.append(layer_stats)
        stacked = None if stats[0] is None else jax.tree.map(lambda *s: jnp.stack(s), *stats)
        return h_btd, cache, stacked

    def lm_head_weight(self):
        """[D, V] output projection in the compute dtype (the transposed embedding when tied)."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.value.T.astype(self.dtype)
        return self.lm_head.value.astype(self.dtype)

    def logits(self, hidden_btd):
        """[B, T, V] float32, accumulated in fp32 (the same function the trainer's log-probs use)."""
        return lm_head_logits(hidden_btd, self.lm_head_weight())

    def init_cache(self, batch: int, slots: int, dtype=None) -> KVCache:
        """A zeroed KV cache of `slots` positions for every layer (dtype defaults to the compute dtype):
        per-layer buffers when the config decodes unrolled, else one stack for the layer scan."""
        cfg = self.config
        return KVCache.zeros(
            cfg.num_hidden_layers,
            batch,
            slots,
            cfg.num_key_value_heads,
            cfg.head_dim,
            dtype or self.dtype,
            stacked=not cfg.decodes_unrolled(),
        )
