"""Memory and FLOP plan of a run on a mesh, computed from shapes alone (nothing is allocated).

  python -m gspo_jax.plan --config=configs/qwen_moe.py:qwen3_30b_a3b --accelerator=tpu-v5p --num_devices=64
  python -m gspo_jax.plan --config=tests/micro_config.py --config.mesh.fsdp=2 --compile   # + XLA's view

Per device: parameters, optimizer state and gradients as the sharding rules lay them out (the same
code the trainer uses, on an AbstractMesh), activations of one update minibatch (rematerialised
layers keep only each layer's input; MoE buffers of the dispatch and expert-parallel exchange the
config compiles to), FSDP's per-layer gather and unsharded-gradient transients, the rollout KV cache,
the rollout-dtype weight copy and the sampler's per-layer slices of it (when it decodes unrolled).
The train phase and the rollout phase do not overlap, so the peak is
the larger of the two. Layers are modelled as scanned one at a time (model.scan_unroll = 1, as the
real presets run); the CPU configs' unrolled layers are not modelled.
"""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from gspo_jax import optim, packing, policy, sharding
from gspo_jax.models import expert_buffers, tiled
from gspo_jax.models.config import ModelConfig
from gspo_jax.models.hf import abstract_model
from gspo_jax.update import RolloutBatch, TrainState, UpdateSettings, make_train_fn

GiB = 2**30
# Memory per chip. XLA needs room for its own temporaries and fragmentation: plans use USABLE of it.
ACCELERATORS = {"tpu-v5p": 95 * GiB, "tpu-v6e": 32 * GiB, "h100": 80e9, "h200": 141e9}
USABLE = 0.9


@functools.lru_cache(maxsize=4)
def _abstract_params(mcfg: ModelConfig):
    return abstract_model(mcfg)[1]


def parameter_counts(mcfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token): active counts top-k of the routed experts in every MoE layer."""
    abstract = _abstract_params(mcfg)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    per_expert = 3 * mcfg.hidden_size * mcfg.moe_intermediate_size
    idle = mcfg.num_moe_layers * (mcfg.num_experts - mcfg.num_experts_per_tok) * per_expert
    return total, total - idle


def _abstract_mesh(cfg, num_devices: int) -> AbstractMesh:
    return AbstractMesh(sharding.mesh_shape(cfg.mesh, num_devices), sharding.MESH_AXES)


def _bytes_per_device(tree) -> int:
    """Bytes of one device's shard of every leaf (ShapeDtypeStructs with shardings)."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


def abstract_state(cfg, mcfg: ModelConfig, mesh) -> TrainState:
    """The train state as ShapeDtypeStructs in the trainer's shardings (policy.train_state_shardings)."""
    abstract = _abstract_params(mcfg)
    shardings = sharding.param_shardings(abstract, mesh, cfg.mesh.rules.to_dict())
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    optimizer = optim.make_optimizer(cfg.optim, policy.total_updates(cfg))
    state_shardings = policy.train_state_shardings(optimizer, params)
    opt_state = jax.eval_shape(optimizer.init, params)
    step = jax.ShapeDtypeStruct((), jnp.int32)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        TrainState(params=params, opt_state=opt_state, step=step),
        state_shardings,
    )


def _batch_shards(mesh) -> int:
    return math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)


def _split(size: int, ways: int) -> float:
    return size / ways if size % ways == 0 else size


def sequence_shape(cfg) -> tuple[int, int, int]:
    """(rows per RL step, prompt width, completion width): the widest the config allows."""
    return (
        cfg.rollout.prompts_per_step * cfg.rollout.group_size,
        int(cfg.data.max_prompt_len),
        int(cfg.rollout.max_new_tokens),
    )


def dispatch_strategy(name: str, platform: str) -> str:
    """dispatch.resolve_dispatch for a planned platform: "auto" is ragged on accelerators, tiled on CPU."""
    if name != "auto":
        return name
    return "tiled" if platform == "cpu" else "ragged"


def expert_bytes(
    strategy: str, tokens: int, k: int, experts: int, factor: float, d: int, i: int, c: int
) -> float:
    """Activation bytes of one MoE dispatch over `tokens` rows with k choices among `experts`.

    Each expert row holds its input and output [D] and gate, up, silu(gate) * up [I]. ragged: one row
    per assignment; dense: every expert on every token; capacity: experts * capacity slots plus the
    tiled inputs and gathered outputs [k * tokens, D]; tiled: its padded expert-sorted rows, keeping
    input, output, gate and up per row."""
    row = (2 * d + 3 * i) * c
    if strategy == "ragged":
        return tokens * k * row
    if strategy == "tiled":
        tile = tiled.training_tile_rows(tokens * k, experts)
        return (-(-tokens * k // tile) + experts) * tile * (2 * d + 2 * i) * c
    if strategy == "dense":
        return experts * tokens * row
    capacity = expert_buffers.expert_capacity(tokens, k, experts, factor if strategy == "capacity" else 0.0)
    return experts * capacity * row + 2 * tokens * k * d * c


def moe_bytes(mcfg: ModelConfig, mesh, tokens: int, platform: str) -> float:
    """Activation bytes of one MoE layer's dispatch on one device holding `tokens` rows.

    With expert parallelism (mesh.expert > 1, as expert_parallel.expert_parallel_dispatch): the send and receive
    blocks and the outputs going and coming back, [ways * rows, D] each (rows per block: tokens *
    min(k, E / ways) dropless, (E / ways) * capacity with a capacity factor), the tiled inputs and
    gathered outputs [k * tokens, D], and the inner dispatch of the received rows over the local
    experts with capacity_dispatch's room (min(received, ways * capacity or tokens))."""
    k, e, d, c = mcfg.num_experts_per_tok, mcfg.num_experts, mcfg.hidden_size, jnp.dtype(mcfg.dtype).itemsize
    inner = _split(mcfg.moe_intermediate_size, mesh.shape["tensor"])
    factor = float(mcfg.capacity_factor)
    ways = mesh.shape["expert"]
    if mcfg.expert_parallel != "auto" or ways == 1:
        strategy = dispatch_strategy(mcfg.moe_dispatch, platform)
        return expert_bytes(strategy, tokens, k, e, factor, d, inner, c)
    local = e // ways
    capacity = expert_buffers.expert_capacity(tokens, k, e, factor) if factor > 0 else tokens
    rows = local * capacity if factor > 0 else tokens * min(k, local)
    received = ways * rows
    strategy = dispatch_strategy(mcfg.moe_dispatch, platform)
    room = ways * capacity
    exchange = 4 * received * d * c + 2 * tokens * k * d * c
    return exchange + expert_bytes(strategy, received, 1, local, room * local / received, d, inner, c)


def activation_bytes(cfg, mcfg: ModelConfig, mesh, platform: str) -> float:
    """Peak activation bytes per device of one update micro-batch (forward + backward; a minibatch
    when algo.grad_accumulation is 1).

    Per layer: norms, q/k/v/o projections, fp32 attention scores and probabilities (over the whole
    [T, T] when unchunked; with model.attention_chunk one [chunk, T] block at a time, recomputed in
    the backward pass, so not kept per layer), router probabilities and the MoE dispatch buffers of the strategy
    the config resolves to on `platform` (moe_bytes). Without remat every layer's internals are kept
    for the backward pass; with remat only each layer's input is, plus one layer's internals
    recomputed and their gradients. Logits exist one `logprob_chunk` of time steps at a time."""
    rows, prompt, new = sequence_shape(cfg)
    b = rows / (cfg.algo.minibatches * cfg.algo.grad_accumulation) / _batch_shards(mesh)
    t = prompt + new - 1
    c = jnp.dtype(mcfg.dtype).itemsize
    tp = mesh.shape["tensor"]
    d, hd = mcfg.hidden_size, mcfg.head_dim
    heads, kv = _split(mcfg.num_attention_heads, tp), _split(mcfg.num_key_value_heads, tp)
    tokens = b * t
    chunked = 0 < mcfg.attention_chunk < t
    scores = b * heads * (mcfg.attention_chunk if chunked else t) * t * (4 + c)
    attention = tokens * c * (4 * d + 2 * (heads + 2 * kv) * hd + heads * hd) + (0 if chunked else scores)
    if mcfg.num_experts:
        mlp = tokens * 2 * mcfg.num_experts * 4 + moe_bytes(mcfg, mesh, math.ceil(tokens), platform)
    else:
        mlp = tokens * c * 3 * _split(mcfg.intermediate_size, tp)
    layer = attention + mlp
    layers = mcfg.num_hidden_layers
    kept = layers * tokens * d * c + 2 * layer if mcfg.remat else layers * layer
    chunk = min(int(cfg.model.logprob_chunk), t)
    logits = 3 * b * chunk * _split(mcfg.vocab_size, tp) * 4
    return kept + logits + 2 * tokens * d * 4 + (scores if chunked else 0)


def fsdp_transient_bytes(params) -> int:
    """FSDP's per-layer transients: the largest layer's weights gathered over `fsdp` for its matmuls
    plus its gradient at that size before the reduce-scatter (0 without an fsdp axis). A layer is
    one decoder layer (a slice of its run's stack) or one top-level leaf (embedding, lm_head)."""

    def gathered(x):
        mesh, spec = x.sharding.mesh, x.sharding.spec
        if mesh.shape["fsdp"] == 1:
            return 0
        drop = lambda a: tuple(n for n in ((a,) if isinstance(a, str) else a) if n != "fsdp") or None
        spec = PartitionSpec(*(None if a is None else drop(a) for a in spec))
        full = NamedSharding(mesh, spec).shard_shape(x.shape)
        return math.prod(full) * jnp.dtype(x.dtype).itemsize

    top = [sum(gathered(x) for x in jax.tree.leaves(g)) for name, g in params.items() if name != "layers"]
    # A run of scanned layers is stacked on a leading axis; the scan gathers one layer's slice at a time.
    layer = [sum(gathered(x) / x.shape[0] for x in jax.tree.leaves(run)) for run in params["layers"].values()]
    return 2 * max(top + layer)


def kv_cache_bytes(cfg, mcfg: ModelConfig, mesh) -> float:
    """The sampler's cache per device: K and V of every layer, [rows, prompt + new, kv_heads, head_dim]."""
    rows, prompt, new = sequence_shape(cfg)
    dtype = jnp.dtype(cfg.rollout.cache_dtype or mcfg.dtype)
    kv = _split(mcfg.num_key_value_heads, mesh.shape["tensor"])
    per_row = 2 * mcfg.num_hidden_layers * (prompt + new) * kv * mcfg.head_dim * dtype.itemsize
    return rows / _batch_shards(mesh) * per_row


def forward_flops(mcfg: ModelConfig, active: int, tokens: float, context: float) -> float:
    """2 FLOPs per multiply-add of every active weight except the embedding lookup, plus QK^T and AV
    over `context` keys per token (the implementation computes masked positions too)."""
    matmul = active - mcfg.vocab_size * mcfg.hidden_size * (0 if mcfg.tie_word_embeddings else 1)
    attention = 4 * mcfg.num_hidden_layers * mcfg.num_attention_heads * mcfg.head_dim * context
    return tokens * (2 * matmul + attention)


def step_flops(cfg, mcfg: ModelConfig, active: int) -> dict[str, float]:
    """FLOPs of one RL step at the config's batch with every completion at full length."""
    rows, prompt, new = sequence_shape(cfg)
    slots = prompt + new
    rollout = forward_flops(mcfg, active, rows * prompt, prompt) + forward_flops(
        mcfg, active, rows * new, slots
    )
    seq = forward_flops(mcfg, active, rows * (slots - 1), slots - 1)
    passes = int(cfg.algo.old_logprobs == "trainer") + int(cfg.algo.beta > 0)
    # Backward is twice the forward; rematerialised layers run the forward once more.
    update = cfg.algo.iterations * (4 if mcfg.remat else 3) * seq
    return {
        "rollout": rollout,
        "scoring": passes * seq,
        "update": update,
        "total": rollout + passes * seq + update,
    }


def _platform(accelerator: str | None) -> str:
    if accelerator is None:
        return jax.default_backend()
    return "tpu" if accelerator.startswith("tpu") else "gpu"


def plan(cfg, num_devices: int, accelerator: str | None = None, platform: str | None = None) -> dict:
    """Everything `python -m gspo_jax.plan` prints, as a dict of numbers (bytes are per device).

    platform decides what moe_dispatch="auto" resolves to: an accelerator's plan assumes "tpu"/"gpu"
    (ragged); without one, the current backend (on CPU: the tiled/capacity path `--compile` builds)."""
    platform = platform or _platform(accelerator)
    mcfg = policy.model_config(cfg)
    mesh = _abstract_mesh(cfg, num_devices)
    state = abstract_state(cfg, mcfg, mesh)
    total, active = parameter_counts(mcfg)
    params = _bytes_per_device(state.params)
    rollout_dtype = jnp.dtype(cfg.model.rollout_dtype or cfg.model.param_dtype)
    memory = {
        "params": params,
        "optimizer": _bytes_per_device(state.opt_state) + _bytes_per_device(state.step),
        "gradients": params,
        # Accumulating, the micro-batches' gradients are summed into fp32 buffers laid out like the
        # parameters, beside the micro-batch's own gradient.
        "grad_accumulator": params * 4 / jnp.dtype(mcfg.param_dtype).itemsize
        if cfg.algo.grad_accumulation > 1
        else 0,
        "fsdp_transient": fsdp_transient_bytes(state.params),
        "activations": activation_bytes(cfg, mcfg, mesh, platform),
        "kv_cache": kv_cache_bytes(cfg, mcfg, mesh),
        "rollout_copy": params * rollout_dtype.itemsize / jnp.dtype(mcfg.param_dtype).itemsize,
        # Decoding with unrolled layers, the sampler slices each layer out of the stacks once per
        # call (sampler.py): one more copy of the layers' weights in the rollout dtype while it runs.
        "decode_layers": _bytes_per_device(state.params["layers"])
        * rollout_dtype.itemsize
        / jnp.dtype(mcfg.param_dtype).itemsize
        * mcfg.decodes_unrolled(platform),
        "reference": params if cfg.algo.beta > 0 else 0,
    }
    resident = memory["params"] + memory["optimizer"] + memory["reference"]
    # The update computes new parameters and moments beside the old ones (kept if the step is not
    # finite), so a second copy of the state exists transiently.
    memory["update_transient"] = memory["params"] + memory["optimizer"]
    memory["train_peak"] = resident + sum(
        memory[k]
        for k in ("gradients", "grad_accumulator", "fsdp_transient", "update_transient", "activations")
    )
    memory["rollout_peak"] = resident + sum(memory[k] for k in ("rollout_copy", "decode_layers", "kv_cache"))
    memory["peak"] = max(memory["train_peak"], memory["rollout_peak"])
    out = {
        "model": cfg.model.preset if not cfg.model.hf_path else cfg.model.hf_path,
        "mesh": dict(mesh.shape),
        "num_devices": num_devices,
        "params_total": total,
        "params_active": active,
        "batch": dict(zip(("rows", "prompt_len", "new_tokens"), sequence_shape(cfg))),
        "bytes_per_device": {k: float(v) for k, v in memory.items()},
        "flops_per_step": step_flops(cfg, mcfg, active),
    }
    if accelerator:
        out["accelerator"] = accelerator
        out["hbm_bytes"] = float(ACCELERATORS[accelerator])
        out["fits"] = bool(memory["peak"] <= USABLE * ACCELERATORS[accelerator])
        if not out["fits"]:
            out["suggestion"] = fitting_mesh(cfg, num_devices, accelerator)
    return out


def _candidate_meshes(num_devices: int):
    """expert x tensor splits of num_devices with fsdp taking the rest (a data axis never lowers the
    per-device bytes that fsdp would: fsdp splits the batch too)."""
    divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
    for expert in divisors:
        for tensor in (d for d in divisors if (num_devices // expert) % d == 0):
            yield {"data": 1, "fsdp": num_devices // (expert * tensor), "expert": expert, "tensor": tensor}


def _accumulation_options(cfg, axes: dict) -> list[int]:
    """algo.grad_accumulation values (powers of two) whose micro-batches split over the mesh's batch
    shards."""
    rows = cfg.rollout.prompts_per_step * cfg.rollout.group_size // cfg.algo.minibatches
    shards = math.prod(axes[a] for a in sharding.BATCH_AXES)
    return [k for k in (2**i for i in range(8)) if rows % (k * shards) == 0]


def fitting_mesh(cfg, num_devices: int, accelerator: str) -> dict:
    """A mesh and algo.grad_accumulation that fit at num_devices, else at the fewest devices (doubling)
    that fit: the least accumulation that fits (micro-batches as large as memory allows), then the
    smallest peak."""
    devices, room = num_devices, USABLE * ACCELERATORS[accelerator]
    while devices <= 16384:
        fits = []
        for axes in _candidate_meshes(devices):
            for accumulation in _accumulation_options(cfg, axes):
                trial = cfg.copy_and_resolve_references()
                trial.mesh.update(axes)
                trial.algo.grad_accumulation = accumulation
                try:
                    peak = plan(trial, devices, platform=_platform(accelerator))["bytes_per_device"]["peak"]
                except ValueError:  # a dimension this mesh cannot split
                    break
                if peak <= room:
                    fits.append((accumulation, peak, axes))
                    break
        if fits:
            accumulation, peak, axes = min(fits, key=lambda f: f[:2])
            return {
                "num_devices": devices,
                "mesh": axes,
                "grad_accumulation": accumulation,
                "peak_bytes": float(peak),
            }
        devices *= 2
    return {"num_devices": None, "mesh": None, "grad_accumulation": None, "peak_bytes": None}


def abstract_packing(mesh, rows: int, prompt_len: int, width: int, chunks: int, iterations: int):
    """A packing.PackedRows of ShapeDtypeStructs for `rows` sequences at the widest packing (every
    sequence a full row: the most packed rows a step can need), shard dim split like the trainer's."""
    shards = sharding.batch_divisor(mesh)
    n = rows // (shards * chunks)
    lead = (iterations, chunks, shards)
    spec = NamedSharding(mesh, PartitionSpec(None, None, sharding.BATCH_AXES))
    slots = jax.ShapeDtypeStruct((*lead, n, prompt_len + width - 1), jnp.int32, sharding=spec)
    return packing.PackedRows(
        sequences=jax.ShapeDtypeStruct((*lead, n), jnp.int32, sharding=spec),
        row_seq=slots,
        row_t=slots,
        positions=slots,
        segments=slots,
        hidden_index=jax.ShapeDtypeStruct((*lead, n, width), jnp.int32, sharding=spec),
    )


def abstract_rollout_batch(mesh, rows: int, prompt_len: int, width: int, packed_as=None):
    """A RolloutBatch of ShapeDtypeStructs, rows split over the batch axes like the trainer's;
    packed_as=(chunks, iterations) adds the widest packing plan (abstract_packing; chunks: forward
    chunks per pass, minibatches x grad_accumulation)."""

    def rowwise(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))

    per_token = rowwise((rows, width), jnp.float32)
    plan = None if packed_as is None else abstract_packing(mesh, rows, prompt_len, width, *packed_as)
    return RolloutBatch(
        packing=plan,
        tokens=rowwise((rows, prompt_len + width), jnp.int32),
        valid=rowwise((rows, prompt_len + width), jnp.bool_),
        completion_mask=per_token,
        advantages=rowwise((rows,), jnp.float32),
        old_logp=per_token,
        sampler_logp=per_token,
        ref_logp=per_token,
    )


def compiled_memory(cfg) -> dict[str, float]:
    """XLA's memory analysis (per device) of the train step compiled on the current devices."""
    mesh = sharding.make_mesh(cfg.mesh)
    mcfg = policy.model_config(cfg)
    target, graphdef = policy.abstract_train_state(cfg, mesh)
    state = target["train"]
    optimizer = optim.make_optimizer(cfg.optim, policy.total_updates(cfg))
    settings = UpdateSettings.from_config(cfg, mcfg.router_aux_loss_coef)
    train = make_train_fn(graphdef, optimizer, settings, sharding.shardings_of(state))
    packed_as = (settings.chunks, settings.iterations) if cfg.algo.pack_sequences else None
    batch = abstract_rollout_batch(mesh, *sequence_shape(cfg), packed_as=packed_as)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    with sharding.use_mesh(mesh, cfg.mesh.rules.to_dict()):  # as the trainer traces it (expert parallelism)
        stats = train.lower(state, batch, key).compile().memory_analysis()
    return {
        "arguments": float(stats.argument_size_in_bytes),
        "temporaries": float(stats.temp_size_in_bytes),
        "peak": float(stats.argument_size_in_bytes + stats.temp_size_in_bytes),
    }


def format_plan(p: dict) -> str:
    gb = lambda x: f"{x / GiB:9.2f} GiB"
    m = p["bytes_per_device"]
    lines = [
        f"model {p['model']}: {p['params_total']:,} parameters, {p['params_active']:,} active per token",
        f"mesh {p['mesh']} on {p['num_devices']} devices; batch {p['batch']}",
        "per device:",
        *(
            f"  {name:<17}{gb(m[name])}"
            for name in (
                "params",
                "optimizer",
                "gradients",
                "grad_accumulator",
                "fsdp_transient",
                "update_transient",
            )
        ),
        f"  {'activations':<17}{gb(m['activations'])}",
        *(
            f"  {name:<17}{gb(m[name])}"
            for name in ("kv_cache", "rollout_copy", "decode_layers", "reference")
        ),
        f"  train peak   {gb(m['train_peak'])}   rollout peak {gb(m['rollout_peak'])}",
        "FLOPs per RL step: " + ", ".join(f"{k} {v:.3e}" for k, v in p["flops_per_step"].items()),
    ]
    if "accelerator" in p:
        verdict = "fits" if p["fits"] else "does NOT fit"
        lines.append(
            f"{p['accelerator']} ({gb(p['hbm_bytes']).strip()}, {USABLE:.0%} usable): peak {verdict}"
        )
        if not p["fits"]:
            s = p["suggestion"]
            lines.append(
                f"  a layout that fits: mesh {s['mesh']}, --config.algo.grad_accumulation="
                f"{s['grad_accumulation']} on {s['num_devices']} devices (peak {gb(s['peak_bytes'])})"
                if s["mesh"]
                else "  no mesh up to 16384 devices fits"
            )
    if "xla" in p:
        x = p["xla"]
        lines.append(
            f"XLA (compiled train step): arguments {gb(x['arguments'])}, temporaries {gb(x['temporaries'])}, "
            f"peak {gb(x['peak'])} vs predicted train peak {gb(m['train_peak'])}"
        )
    return "\n".join(lines)


def main():
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", "configs/qwen_moe.py", "Run config (as for train).")
    accelerator = flags.DEFINE_enum(
        "accelerator", None, list(ACCELERATORS), "Check the plan against its HBM."
    )
    num_devices = flags.DEFINE_integer(
        "num_devices",
        0,
        "Mesh size to plan for; 0: the config's fixed mesh product, else jax.device_count().",
    )
    json_path = flags.DEFINE_string("json", "", "Also write the plan as JSON to this file.")
    compile_step = flags.DEFINE_bool("compile", False, "Compile the train step here and add XLA's numbers.")

    def run(argv):
        del argv
        cfg = config.value
        sizes = [int(cfg.mesh.get(a, 1)) for a in sharding.MESH_AXES]
        devices = num_devices.value or (math.prod(sizes) if -1 not in sizes else jax.device_count())
        result = plan(cfg, devices, accelerator.value)
        if compile_step.value:
            result["xla"] = compiled_memory(cfg)
        print(format_plan(result))
        if json_path.value:
            with open(json_path.value, "w") as f:
                json.dump(result, f, indent=2)

    app.run(run)


if __name__ == "__main__":
    main()
