"""Speed benchmarks against transformers on the local machine.

  python -m gspo_jax.bench --what=decode [--batch_sizes=8,64] [--json_out=bench.json]

`decode`: greedy generation of --max_new_tokens tokens (no EOS: every row generates the full
length) for --batch_sizes prompts of --prompt_len tokens on a ~100M-parameter Qwen3-MoE with
random weights (hidden 512, 8 layers, 16 experts top-2, expert width 512, 4 heads x 64, 2 KV
heads), built locally, run by transformers' `generate` and by gspo_jax's Sampler with the same
weights. gspo_jax rows are reported per rollout parameter dtype (fp32, and a bf16 copy of the
weights; compute stays fp32) and KV cache dtype. Times are the best of --rounds after a warm-up
call; compile time is reported apart.

Each decode step must read the weights it uses, so the table relates the step time to the
machine's streaming bandwidth (measured here: a jitted sum over a 1 GiB array): "weights MB/step"
counts the experts the routing actually chose at each step plus every non-expert weight, and
"of bound" is (weights bytes / bandwidth) / step time.

  python -m gspo_jax.bench --what=compile [--depths=2,8,32] [--remat]

`compile`: lowers and compiles the GSPO train step (update.make_train_fn, AdamW, 8 sequences of
16 + 16 tokens in 2 minibatches) of a small-width Qwen3-MoE (COMPILE_MODEL) at each --depths number
of decoder layers, from abstract inputs; reports seconds to lower and to compile (wall), CPU seconds of
both (all threads), and the size of the lowered StableHLO and of the optimised HLO text. Scanned layers keep all four flat in depth.

RL-step, MoE dispatch and sweep benchmarks (--what=rl_step|dispatch|sweep): gspo_jax/bench_rl.py.

New benchmarks register a function in BENCHMARKS that returns a list of result rows (dicts).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import gspo_jax
from gspo_jax import bench_rl
from gspo_jax.sampler import Sampler


def define_flags() -> None:
    """Defines this CLI's flags (at run time, so the CLI modules can be imported together)."""
    if "batch_sizes" in flags.FLAGS:
        return
    flags.DEFINE_enum(
        "what", "decode", ["decode", "compile", *bench_rl.BENCHMARKS], "Which benchmark to run."
    )
    flags.DEFINE_list("batch_sizes", ["8", "64"], "Prompts per batch.")
    flags.DEFINE_integer("max_new_tokens", 128, "Tokens generated per prompt.")
    flags.DEFINE_integer("prompt_len", 32, "Prompt length in tokens (all prompts equal length).")
    flags.DEFINE_list(
        "param_dtypes", ["float32", "bfloat16"], "gspo_jax rollout parameter dtypes (compute is fp32)."
    )
    flags.DEFINE_list("moe_dispatch", ["auto"], "gspo_jax MoE dispatch strategies to time.")
    flags.DEFINE_list("cache_dtypes", ["float32"], "gspo_jax KV cache dtypes (float32 is faster on CPU).")
    flags.DEFINE_integer("rounds", 3, "Timed repetitions per configuration (the best is reported).")
    flags.DEFINE_bool("transformers", True, "Also time transformers' generate on the same weights.")
    flags.DEFINE_list("depths", ["2", "8", "32"], "compile: decoder depths to compile the train step at.")
    flags.DEFINE_bool("remat", False, "compile: rematerialise decoder layers.")
    flags.DEFINE_string("json_out", "", "Write the result rows and machine facts to this JSON file.")
    flags.DEFINE_alias("json", "json_out")
    bench_rl.define_flags()


# Qwen3-MoE shaped, ~106M parameters.
BENCH_MODEL = dict(
    vocab_size=2048,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=16,
    num_experts_per_tok=2,
    moe_intermediate_size=512,
    norm_topk_prob=True,
    max_position_embeddings=4096,
)

# Small width, so compile time is dominated by program structure rather than tensor sizes.
COMPILE_MODEL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
)


def best_of(fn: Callable[[], object], rounds: int) -> float:
    """Smallest wall time of `rounds` calls of fn (which must block until its result is ready)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def streaming_bandwidth_gbs(gib: float = 1.0, rounds: int = 5) -> float:
    """Bytes per second (in GB/s) a jitted sum reads from a `gib` GiB float32 array."""
    x = jnp.ones((int(gib * 2**30) // 4096, 1024), jnp.float32)
    total = jax.jit(lambda x: jnp.sum(x, axis=0))
    total(x).block_until_ready()
    seconds = best_of(lambda: total(x).block_until_ready(), rounds)
    return x.nbytes / seconds / 1e9


def build_bench_model(path: str, seed: int = 0):
    """Saves a random transformers Qwen3-MoE to `path`; returns it (eval mode)."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    hf = Qwen3MoeForCausalLM(Qwen3MoeConfig(**BENCH_MODEL)).eval()
    hf.save_pretrained(path)
    return hf


def touched_experts_per_step(graphdef, params, prompt_ids, completion_ids):
    """Mean number of (layer, expert) pairs the routing chose at each decode step of a completion.

    Replays the decode steps (teacher-forced on the sampled tokens) with a KV cache, as the sampler
    runs them, and counts experts with at least one assignment per step.
    """
    model = nnx.merge(graphdef, params)
    batch, width = prompt_ids.shape
    steps = completion_ids.shape[1] - 1
    cache = model.init_cache(batch, width + steps)
    cache = model.forward(prompt_ids, cache=cache, cache_start=0).cache

    def one_step(cache, i):
        token = jax.lax.dynamic_slice_in_dim(completion_ids, i, 1, axis=1)
        out = model.forward(
            token, positions_bt=jnp.full((batch, 1), width + i), cache=cache, cache_start=width + i
        )
        return out.cache, jnp.sum(out.router_stats.expert_counts > 0)

    _, touched = jax.lax.scan(one_step, cache, jnp.arange(steps))
    return float(jnp.mean(touched))


def weight_bytes_per_step(params, touched_pairs: float, batch: int) -> float:
    """Bytes of weights one decode step reads: chosen experts, all other weights, B embedding rows."""
    flat = {path: v.get_value() for path, v in nnx.to_flat_state(params)}
    # Expert weights are stacked [layers, E, ...]; a (layer, expert) pair owns one slice of each.
    expert = [v for p, v in flat.items() if p[-1] in ("gate_proj", "up_proj", "down_proj") and v.ndim == 4]
    pairs = sum(v.shape[0] * v.shape[1] for v in expert) / 3
    per_layer_expert = sum(v.nbytes for v in expert) / pairs
    embed = flat[("embed_tokens",)]
    dense = sum(
        v.nbytes for p, v in flat.items() if p != ("embed_tokens",) and not any(v is e for e in expert)
    )
    return touched_pairs * per_layer_expert + dense + batch * embed.nbytes / embed.shape[0]


def time_transformers(hf, prompt_ids: np.ndarray, new_tokens: int, rounds: int) -> dict:
    import torch

    ids = torch.as_tensor(prompt_ids, dtype=torch.long)

    def run(n):
        with torch.no_grad():
            return hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                eos_token_id=None,
                pad_token_id=0,
            )

    run(2)  # warm-up
    prefill = best_of(lambda: run(1), rounds)
    total = best_of(lambda: run(new_tokens), rounds)
    return {"total_s": total, "prefill_s": prefill, "compile_s": 0.0}


def time_sampler(graphdef, params, prompt_ids, new_tokens: int, rounds: int, cache_dtype) -> dict:
    ids = jnp.asarray(prompt_ids)
    mask = jnp.ones_like(ids)
    key = jax.random.key(0)
    result = {}
    for name, n in (("prefill_s", 1), ("total_s", new_tokens)):
        sampler = Sampler(graphdef, max_new_tokens=n, temperature=0.0, cache_dtype=cache_dtype)
        run = lambda: sampler(params, ids, mask, key).lengths.block_until_ready()
        start = time.perf_counter()
        run()
        first = time.perf_counter() - start
        result[name] = best_of(run, rounds)
        if n == new_tokens:
            result["compile_s"] = first - result[name]
            result["completion_ids"] = sampler(params, ids, mask, key).completion_ids
    return result


def decode_row(impl, dtype, cache_dtype, batch, new_tokens, timing, touched_pairs, weights, bandwidth):
    step_s = (timing["total_s"] - timing["prefill_s"]) / (new_tokens - 1)
    return {
        "impl": impl,
        "param_dtype": dtype,
        "cache_dtype": cache_dtype,
        "batch": batch,
        "new_tokens": new_tokens,
        "total_s": timing["total_s"],
        "tokens_per_s": batch * new_tokens / timing["total_s"],
        "prefill_s": timing["prefill_s"],
        "decode_ms_per_step": step_s * 1e3,
        "compile_s": timing["compile_s"],
        "touched_experts_per_step": touched_pairs,
        "weights_mb_per_step": weights / 1e6,
        "weights_gbs": weights / step_s / 1e9,
        "fraction_of_bandwidth_bound": weights / (bandwidth * 1e9) / step_s,
        "bandwidth_gbs": bandwidth,
    }


def run_decode() -> list[dict]:
    f = flags.FLAGS
    n = f.max_new_tokens
    with tempfile.TemporaryDirectory() as path:
        hf = build_bench_model(path)
        models = {d: nnx.split(gspo_jax.from_pretrained(path, moe_dispatch=d)) for d in f.moe_dispatch}
    bandwidth = streaming_bandwidth_gbs()
    prompts = {
        batch: np.random.default_rng(batch).integers(
            0, BENCH_MODEL["vocab_size"], (batch, f.prompt_len), dtype=np.int32
        )
        for batch in map(int, f.batch_sizes)
    }
    rows: dict[int, list[dict]] = {batch: [] for batch in prompts}
    for batch, prompt_ids in prompts.items():
        for dispatch, (graphdef, params) in models.items():
            for dtype in f.param_dtypes:
                cast = jax.tree.map(lambda x: x.astype(dtype), params)
                for cache_dtype in f.cache_dtypes:
                    timing = time_sampler(graphdef, cast, prompt_ids, n, f.rounds, cache_dtype)
                    completions = timing.pop("completion_ids")
                    touched = touched_experts_per_step(graphdef, cast, jnp.asarray(prompt_ids), completions)
                    weights = weight_bytes_per_step(cast, touched, batch)
                    rows[batch].append(
                        decode_row(
                            f"gspo_jax[{dispatch}]",
                            dtype,
                            cache_dtype,
                            batch,
                            n,
                            timing,
                            touched,
                            weights,
                            bandwidth,
                        )
                    )
    # transformers runs last: torch's OpenMP threads keep spinning for a while after generate()
    # returns, and a JAX run right after it measured up to 2x slower.
    if f.transformers:
        fp32_params = next(iter(models.values()))[1]
        for batch, prompt_ids in prompts.items():
            # Same weights, same greedy tokens, so the same experts are read.
            touched = rows[batch][0]["touched_experts_per_step"]
            timing = time_transformers(hf, prompt_ids, n, f.rounds)
            weights = weight_bytes_per_step(fp32_params, touched, batch)
            reference = decode_row(
                "transformers", "float32", "float32", batch, n, timing, touched, weights, bandwidth
            )
            rows[batch].insert(0, reference)
            for row in rows[batch]:
                row["x_vs_transformers"] = reference["total_s"] / row["total_s"]
    return [row for batch_rows in rows.values() for row in batch_rows]


def run_compile() -> list[dict]:
    from gspo_jax.lowering import lower_train_step

    rows = []
    for depth in map(int, flags.FLAGS.depths):
        cfg = gspo_jax.ModelConfig(**COMPILE_MODEL, num_hidden_layers=depth, remat=flags.FLAGS.remat)
        start, start_cpu = time.perf_counter(), time.process_time()
        lowered = lower_train_step(cfg)
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        compiled_at, compiled_cpu = time.perf_counter(), time.process_time()
        rows.append(
            {
                "layers": depth,
                "remat": flags.FLAGS.remat,
                "lower_s": lowered_at - start,
                "compile_s": compiled_at - lowered_at,
                "total_cpu_s": compiled_cpu - start_cpu,  # all threads; robust to a busy machine
                "stablehlo_chars": len(lowered.as_text()),
                "hlo_chars": len(compiled.as_text()),
            }
        )
    return rows


BENCHMARKS: dict[str, Callable[[], list[dict]]] = {
    "decode": run_decode,
    "compile": run_compile,
    **bench_rl.BENCHMARKS,
}

COLUMNS = (
    ("impl", "{}"),
    ("param_dtype", "{}"),
    ("cache_dtype", "{}"),
    ("batch", "{}"),
    ("total_s", "{:.2f}"),
    ("tokens_per_s", "{:.0f}"),
    ("x_vs_transformers", "{:.2f}"),
    ("decode_ms_per_step", "{:.1f}"),
    ("prefill_s", "{:.3f}"),
    ("compile_s", "{:.1f}"),
    ("weights_mb_per_step", "{:.0f}"),
    ("weights_gbs", "{:.1f}"),
    ("fraction_of_bandwidth_bound", "{:.2f}"),
)


COMPILE_COLUMNS = (
    ("layers", "{}"),
    ("remat", "{}"),
    ("lower_s", "{:.1f}"),
    ("compile_s", "{:.1f}"),
    ("total_cpu_s", "{:.1f}"),
    ("stablehlo_chars", "{}"),
    ("hlo_chars", "{}"),
)


def format_table(rows: list[dict], columns=COLUMNS) -> str:
    cells = [[name for name, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(name) is None else fmt.format(row[name]) for name, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def main(argv):
    del argv
    load_before = os.getloadavg()
    rows = BENCHMARKS[flags.FLAGS.what]()
    facts = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    columns = {"compile": COMPILE_COLUMNS, **bench_rl.COLUMNS}.get(flags.FLAGS.what, COLUMNS)
    print(format_table(rows, columns))
    print(json.dumps(facts))
    if flags.FLAGS.json_out:
        with open(flags.FLAGS.json_out, "w") as f:
            json.dump({"what": flags.FLAGS.what, "machine": facts, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    define_flags()
    app.run(main)
