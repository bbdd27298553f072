"""RL-step benchmarks (issue 11): whole GSPO steps through the library's RLStep, MoE dispatch timing, and
a completion-length x group-size sweep.

  python -m gspo_jax.bench --what=rl_step --shape=small|medium [--steps=N] [--json=F]
  python -m gspo_jax.bench --what=dispatch [--shape=medium]
  python -m gspo_jax.bench --what=sweep [--sweep_lengths=128,512,2048] [--sweep_groups=2,4,8] [--steps=2]

`rl_step` builds a random Qwen3-MoE of the shape (SHAPES: 4 heads x 64, 2 KV heads, top-2 experts,
vocab 64 = the built-in char tokenizer) and runs real steps on 13-digit sort prompts (14 tokens, bucket
16) with the partial-credit reward, once per update setting (--rl_settings): `sampler1` = one update
per rollout on the sampler's log-probs (algo.minibatches=1, old_logprobs=sampler; the setting the
peers were measured at) and `trainer4` = the default 4 minibatch updates with an extra old-policy
forward. Each setting runs in a fresh subprocess so `peak_rss_gb` (ru_maxrss) is its own. The first
step compiles; `rl_step_s` and its parts are medians of the --steps steps after it that compiled
nothing (`compiling_steps` counts the others: a packed update compiles again when a step needs more
packed rows than any before it; the medians take every timed step if all compiled). Parts: rollout,
reward and update from the step's time/* metrics, with the old-policy scoring timed apart (it is
inside time/update_s there) and subtracted from the update.

`update_mfu` = useful update FLOPs / update time / the f32 matmul peak measured in the same process
(a jitted 2048^3 matmul, best of 3). Useful FLOPs (forward, x3 for forward + backward), per valid
(non-pad) token of prompt + completion: 2 x (q, k, v, o, router and top-k experts' gate/up/down
weights) per layer; 2 x the LM head only at completion tokens (the only positions whose log-prob is
used); causal attention 2 x 2 x heads x head_dim x (i + 1) for the token at position i (QK^T and AV).
Padding, the dispatch's dropless buffers and anything recomputed are not useful work.

`floor_s` is what the step cannot go below on this machine (`step_floor_s`): the update's useful FLOPs,
the old-policy forward's (trainer4) and the rollout's (one forward over the same tokens) at the matmul
peak, the rollout taken at least as long as its decode steps' weight reads at the memory bandwidth
measured in the same process (`memory_gbps`: bench.streaming_bandwidth_gbs, a jitted sum over 1 GiB).
A step faster than `floor_s` would have to beat this machine's measured matmul peak or bandwidth on
the same work.

`dispatch` times forward + backward of one MoE block (router + experts) per strategy on the tokens of
one update at the shape (medium: 16 x 4 rows of 16 + 128 = 9216 tokens), best of --rounds after the
compiling call (dense and dropless capacity do E/k = 8x the routed work there: ~8 s per call on 2 cores,
`tiled` ~1 s). `sweep` runs rl_step (sampler1) on the small model for each completion length and
group size (8 prompts) and writes rl_sweep.png and, with --json, the rows; the default is 2 timed
steps each (2-core CPU: 1.5-8 min per 2048-token point, 19 min for the default sweep).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from flax import nnx

# hidden, layers, experts, expert width; prompts x group, completion tokens, timed steps by default.
SHAPES = {
    "tiny": dict(hidden=64, layers=2, experts=4, expert_width=64, prompts=2, group=2, new_tokens=8, steps=1),
    "small": dict(
        hidden=256, layers=4, experts=8, expert_width=256, prompts=8, group=4, new_tokens=32, steps=5
    ),
    "medium": dict(
        hidden=512, layers=8, experts=16, expert_width=512, prompts=16, group=4, new_tokens=128, steps=4
    ),
}
RL_SETTINGS = {"sampler1": (1, "sampler"), "trainer4": (4, "trainer")}
PROMPT_DIGITS = 13  # sort prompts of 13 digits + "=": 14 tokens, the prompt length
PROMPT_BUCKET = 16  # the data buckets pad them to 16


def define_flags() -> None:
    flags.DEFINE_enum("shape", None, list(SHAPES), "Model/batch shape (rl_step: small, dispatch: medium).")
    flags.DEFINE_integer("steps", 0, "Timed RL steps after the compiling one; 0 = the shape's default.")
    flags.DEFINE_list("rl_settings", list(RL_SETTINGS), "Update settings: sampler1 and/or trainer4.")
    flags.DEFINE_enum(
        "dtype",
        "float32",
        ["float32", "bfloat16"],
        "rl_step: compute dtype (model.dtype); bfloat16 also makes the sampler's weight copy bf16 "
        "(model.rollout_dtype). Parameters and Adam stay fp32; update_mfu is against this dtype's peak.",
    )
    flags.DEFINE_bool(
        "pack_sequences", True, "rl_step: sequence packing for the update and scoring (algo.pack_sequences)."
    )
    flags.DEFINE_enum(
        "compact_rows",
        "auto",
        ["auto", "on", "off"],
        "rl_step and sweep: decode on the running rows once half have stopped (rollout.compact_rows).",
    )
    flags.DEFINE_integer(
        "grad_accumulation",
        1,
        "rl_step and sweep: micro-batches each update's gradient is summed over (algo.grad_accumulation).",
    )
    flags.DEFINE_list("sweep_lengths", ["128", "512", "2048"], "Sweep: completion lengths.")
    flags.DEFINE_list("sweep_groups", ["2", "4", "8"], "Sweep: group sizes.")
    flags.DEFINE_string("plot_out", "rl_sweep.png", "Sweep: where to write the plot.")


def model_config(shape: dict, moe_dispatch: str = "auto"):
    from gspo_jax.models.config import PRESETS

    return PRESETS["tiny"].replace(
        dtype=shape.get("dtype", "float32"),
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_experts=shape["experts"],
        moe_intermediate_size=shape["expert_width"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts_per_tok=2,
        moe_dispatch=moe_dispatch,
    )


def run_config(shape: dict, setting: str, steps: int):
    """The run config of the tiny preset with the bench's batch, update setting and one device."""
    from configs.qwen_moe import get_config

    minibatches, old_logprobs = RL_SETTINGS[setting]
    cfg = get_config("tiny")
    cfg.steps = steps + 1
    cfg.rollout.prompts_per_step = shape["prompts"]
    cfg.rollout.group_size = shape["group"]
    cfg.rollout.max_new_tokens = shape["new_tokens"]
    cfg.algo.minibatches = minibatches
    cfg.algo.old_logprobs = old_logprobs
    cfg.data.train_size = max(256, shape["prompts"] * (steps + 1))
    cfg.data.task_kwargs = ml_collections.ConfigDict({"num_digits": PROMPT_DIGITS})
    cfg.eval.every = 0
    cfg.warmstart.steps = 0
    cfg.mesh.num_devices = 1
    cfg.model.dtype = shape.get("dtype", "float32")
    cfg.model.rollout_dtype = "" if cfg.model.dtype == "float32" else cfg.model.dtype
    cfg.algo.pack_sequences = shape.get("pack_sequences", True)
    cfg.algo.grad_accumulation = shape.get("grad_accumulation", 1)
    cfg.rollout.compact_rows = shape.get("compact_rows", "auto")
    return cfg


def matmul_peak_gflops(n: int = 2048, rounds: int = 3, dtype: str = "float32") -> float:
    """GFLOP/s of a jitted n^3 matmul of `dtype` operands accumulated in fp32 (as the model's
    products are, models/matmul.py), best of `rounds`."""
    from gspo_jax.bench import best_of

    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))
    mm(a).block_until_ready()
    return 2 * n**3 / best_of(lambda: mm(a).block_until_ready(), rounds) / 1e9


def forward_flops(mcfg, prompt_lens_b, completion_lens_b) -> float:
    """Useful FLOPs of one forward over rows of prompt/completion lengths (module docstring)."""
    d, heads, kv, hd = mcfg.hidden_size, mcfg.num_attention_heads, mcfg.num_key_value_heads, mcfg.head_dim
    per_layer = d * heads * hd * 2 + d * kv * hd * 2 + d * mcfg.num_experts
    per_layer += mcfg.num_experts_per_tok * 3 * d * mcfg.moe_intermediate_size
    seq = np.asarray(prompt_lens_b, np.float64) + np.asarray(completion_lens_b, np.float64)
    tokens = seq.sum()
    forward = 2 * per_layer * mcfg.num_hidden_layers * tokens
    forward += 2 * d * mcfg.vocab_size * np.sum(completion_lens_b)
    # sum over positions i < S of (i + 1) = S (S + 1) / 2, times 2 matmuls x 2 FLOPs x heads x head_dim.
    forward += mcfg.num_hidden_layers * 4 * heads * hd * np.sum(seq * (seq + 1) / 2)
    return float(forward)


def update_flops(mcfg, prompt_lens_b, completion_lens_b) -> float:
    """Useful FLOPs of one forward + backward: 3 forwards."""
    return 3 * forward_flops(mcfg, prompt_lens_b, completion_lens_b)


def decode_read_bytes(mcfg, rows: int) -> float:
    """Weight bytes one decode step of `rows` rows reads at least: per layer q, k, v, o, the router and
    the experts its rows choose (the expected number under uniform routing, E (1 - (1 - k/E)^rows)),
    plus the LM head; fp32 unless model.dtype is bf16 (the rollout copy then is too)."""
    d, heads, kv, hd = mcfg.hidden_size, mcfg.num_attention_heads, mcfg.num_key_value_heads, mcfg.head_dim
    experts, k = mcfg.num_experts, mcfg.num_experts_per_tok
    chosen = experts * (1 - (1 - k / experts) ** rows)
    per_layer = (
        d * heads * hd * 2 + d * kv * hd * 2 + d * experts + chosen * 3 * d * mcfg.moe_intermediate_size
    )
    weights = per_layer * mcfg.num_hidden_layers + d * mcfg.vocab_size
    return float(weights * jnp.dtype(mcfg.dtype).itemsize)


def step_floor_s(
    mcfg, prompt_lens_b, completion_lens_b, old_policy_pass: bool, peak_gflops: float, memory_gbps: float
) -> dict:
    """Lower bounds on one RL step's parts on this machine: useful FLOPs at the matmul peak, and for
    the rollout also every decode step's weight reads at the measured bandwidth (the larger bound).
    The rollout does one forward over the same tokens as the update; decode steps: the longest
    completion (the last generated token is never fed back)."""
    forward = forward_flops(mcfg, prompt_lens_b, completion_lens_b) / (peak_gflops * 1e9)
    decode_steps = max(0, int(np.max(completion_lens_b)) - 1)
    weight_reads = decode_steps * decode_read_bytes(mcfg, len(completion_lens_b)) / (memory_gbps * 1e9)
    parts = {
        "rollout_floor_s": max(forward, weight_reads),
        "old_policy_floor_s": forward if old_policy_pass else 0.0,
        "update_floor_s": 3 * forward,
    }
    return parts | {"floor_s": sum(parts.values())}


class _Timed:
    """Wraps a jitted phase: blocks on its result and adds the wall time to `seconds`."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args):
        start = time.perf_counter()
        out = jax.block_until_ready(self.fn(*args))
        self.seconds += time.perf_counter() - start
        return out


def measure_rl_step(shape_name: str, setting: str, steps: int) -> dict:
    """Runs 1 + `steps` RL steps in this process; returns the result row (module docstring)."""
    from gspo_jax import sharding
    from gspo_jax.bench import streaming_bandwidth_gbs
    from gspo_jax.data import make_prompt_dataset
    from gspo_jax.models.hf import abstract_model
    from gspo_jax.policy import Policy, init_params, init_train_state
    from gspo_jax.rewards import RewardSet
    from gspo_jax.rl_step import RLStep
    from gspo_jax.tokenizer import eos_token_ids, load_tokenizer

    shape = SHAPES[shape_name]
    cfg = run_config(shape, setting, steps)
    peak = matmul_peak_gflops(dtype=cfg.model.dtype)
    bandwidth = streaming_bandwidth_gbs()
    mesh = sharding.make_mesh(cfg.mesh)
    mcfg = model_config(shape)
    graphdef, abstract = abstract_model(mcfg)
    params = init_params(mcfg, sharding.param_shardings(abstract, mesh, {}), cfg.seed)
    policy = Policy(mcfg, graphdef, params)
    tokenizer = load_tokenizer(None)
    data = make_prompt_dataset(cfg.data, tokenizer, prompts_per_step=shape["prompts"], seed=cfg.seed)
    rl = RLStep(
        cfg, policy, mesh, tokenizer, RewardSet.from_reward_config(cfg.reward), eos_token_ids(tokenizer)
    )
    rl.score_fn = _Timed(rl.score_fn)
    old_policy_pass = cfg.algo.old_logprobs == "trainer"
    state = init_train_state(rl.optimizer, policy.params)
    compiles = []  # one entry per XLA compilation in this process
    count_compiles = lambda name, secs, **_: (
        name.endswith("backend_compile_duration") and compiles.append(secs)
    )
    jax.monitoring.register_event_duration_secs_listener(count_compiles)
    rows = []
    for step in range(steps + 1):
        batch = next(data)
        rl.score_fn.seconds = 0.0
        compiles_before = len(compiles)
        start = time.perf_counter()
        state, result = rl(state, batch, None, jax.random.key(step))
        jax.block_until_ready(state)
        m = result.metrics
        prompt_lens = np.repeat(batch.prompt_mask.sum(axis=1), shape["group"])
        rows.append(
            {
                "rl_step_s": time.perf_counter() - start,
                "rollout_s": m["time/rollout_s"],
                "reward_s": m["time/reward_s"],
                "old_policy_s": rl.score_fn.seconds,
                "update_s": m["time/update_s"] - rl.score_fn.seconds,
                "generated": float(result.scored.lengths.sum()),
                "update_tokens": float(prompt_lens.sum() + result.scored.lengths.sum()),
                "update_flops": update_flops(mcfg, prompt_lens, result.scored.lengths),
                **step_floor_s(mcfg, prompt_lens, result.scored.lengths, old_policy_pass, peak, bandwidth),
                "compiled": len(compiles) > compiles_before,
            }
        )
    jax.monitoring.unregister_event_duration_listener(count_compiles)
    first, timed = rows[0], rows[1:]
    compiling = sum(r["compiled"] for r in timed)
    # Steady state: steps that compiled nothing (a packed update compiles again when a step needs more
    # packed rows than any before it); all timed steps if every one compiled.
    timed = [r for r in timed if not r["compiled"]] or timed

    def total(key):
        return sum(r[key] for r in timed)

    median = {k: float(np.median([r[k] for r in timed])) for k in first if k.endswith("_s")}
    return {
        "shape": shape_name,
        "setting": setting,
        "dtype": cfg.model.dtype,
        "packed": cfg.algo.pack_sequences,
        "minibatches": cfg.algo.minibatches,
        "grad_accumulation": cfg.algo.grad_accumulation,
        "compact_rows": cfg.rollout.compact_rows,
        "old_logprobs": cfg.algo.old_logprobs,
        "prompts": shape["prompts"],
        "group": shape["group"],
        "max_new_tokens": shape["new_tokens"],
        "params_m": sum(x.size for x in jax.tree.leaves(params)) / 1e6,
        "steps": steps,
        "compiling_steps": compiling,
        **median,
        "first_step_s": first["rl_step_s"],
        "gen_tokens_per_s": total("generated") / total("rollout_s"),
        "update_tokens_per_s": total("update_tokens") / total("update_s"),
        "update_gflops_per_step": total("update_flops") / len(timed) / 1e9,
        "update_mfu": total("update_flops") / total("update_s") / (peak * 1e9),
        "matmul_peak_gflops": peak,
        "memory_gbps": bandwidth,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def in_subprocess(shape_name: str, setting: str, steps: int, **shape_changes) -> dict:
    """measure_rl_step in a fresh Python process (its own peak RSS); shape_changes override SHAPES fields."""
    spec = json.dumps(dict(shape=shape_name, setting=setting, steps=steps, changes=shape_changes))
    proc = subprocess.run(
        [sys.executable, "-m", "gspo_jax.bench_rl", spec],
        check=False,  # a failed child becomes an "error" row; the other settings still run
        capture_output=True,
        text=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {
            "shape": shape_name,
            "setting": setting,
            "error": f"rc={proc.returncode}: {proc.stderr[-2000:]}",
        }
    return json.loads(lines[-1][len("RESULT ") :])


def run_rl_step() -> list[dict]:
    f = flags.FLAGS
    shape = f.shape or "small"
    steps = f.steps or SHAPES[shape]["steps"]
    return [
        in_subprocess(
            shape,
            setting,
            steps,
            dtype=f.dtype,
            pack_sequences=f.pack_sequences,
            grad_accumulation=f.grad_accumulation,
            compact_rows=f.compact_rows,
        )
        for setting in f.rl_settings
    ]


def run_dispatch() -> list[dict]:
    """Forward + backward of one MoE block per dispatch strategy, on one update's tokens at the shape."""
    from gspo_jax.models.dispatch import DISPATCH_STRATEGIES
    from gspo_jax.models.moe import MoeBlock

    shape = SHAPES[flags.FLAGS.shape or "medium"]
    rows_b, width = shape["prompts"] * shape["group"], PROMPT_BUCKET + shape["new_tokens"]
    x = jax.random.normal(jax.random.key(0), (rows_b, width, shape["hidden"]), jnp.float32)
    valid = jnp.ones((rows_b, width), jnp.int32)
    results = []
    for name in DISPATCH_STRATEGIES:
        graphdef, params = nnx.split(MoeBlock(model_config(shape, name), rngs=nnx.Rngs(0)))

        def loss(params, x, graphdef=graphdef):
            y, _ = nnx.merge(graphdef, params)(x, valid)
            return jnp.sum(y * y)

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        start = time.perf_counter()
        jax.block_until_ready(step(params, x))
        first_s = time.perf_counter() - start  # compilation + one call
        times = []
        for _ in range(flags.FLAGS.rounds):
            start = time.perf_counter()
            jax.block_until_ready(step(params, x))
            times.append(time.perf_counter() - start)
        results.append(
            {"dispatch": name, "tokens": rows_b * width, "fwd_bwd_s": min(times), "first_call_s": first_s}
        )
    return results


def run_sweep() -> list[dict]:
    f = flags.FLAGS
    steps = f.steps or 2
    rows = [
        in_subprocess(
            f.shape or "small",
            "sampler1",
            steps,
            new_tokens=int(n),
            group=int(g),
            grad_accumulation=f.grad_accumulation,
            compact_rows=f.compact_rows,
        )
        for n in f.sweep_lengths
        for g in f.sweep_groups
    ]
    plot_sweep(rows, f.plot_out)
    return rows


def plot_sweep(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ok = [r for r in rows if "error" not in r]
    for group in sorted({r["group"] for r in ok}):
        mine = sorted((r for r in ok if r["group"] == group), key=lambda r: r["max_new_tokens"])
        lengths = [r["max_new_tokens"] for r in mine]
        axes[0].plot(lengths, [r["rl_step_s"] for r in mine], marker="o", label=f"G={group}")
        axes[1].plot(lengths, [r["update_mfu"] for r in mine], marker="o", label=f"G={group}")
    for ax, label in zip(axes, ("RL step [s] (median)", "update MFU")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("max completion tokens")
        ax.set_ylabel(label)
        ax.legend()
    if ok:
        fig.suptitle(
            f"gspo_jax RL step, {ok[0]['shape']} model, {ok[0]['prompts']} prompts, 1 update per rollout"
        )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _columns(names: str) -> list[tuple[str, str]]:
    """(name, format) pairs for bench.format_table."""
    fmt = {"per_s": "{:.0f}", "_s": "{:.3f}", "mfu": "{:.3f}", "_gb": "{:.2f}"}
    return [(n, next((v for k, v in fmt.items() if n.endswith(k)), "{}")) for n in names.split()]


COLUMNS = {
    "rl_step": _columns(
        "shape setting dtype packed grad_accumulation compact_rows rl_step_s floor_s rollout_s reward_s old_policy_s update_s "
        "gen_tokens_per_s "
        "update_tokens_per_s update_mfu peak_rss_gb first_step_s compiling_steps error"
    ),
    "sweep": _columns(
        "max_new_tokens group grad_accumulation compact_rows rl_step_s floor_s rollout_s update_s update_mfu "
        "peak_rss_gb error"
    ),
    "dispatch": _columns("dispatch tokens fwd_bwd_s first_call_s"),
}
BENCHMARKS = {"rl_step": run_rl_step, "dispatch": run_dispatch, "sweep": run_sweep}


def main(spec: str) -> None:
    """Child process entry: one measure_rl_step, printed as a RESULT line."""
    args = json.loads(spec)
    SHAPES[args["shape"]] = SHAPES[args["shape"]] | args["changes"]
    print("RESULT " + json.dumps(measure_rl_step(args["shape"], args["setting"], args["steps"])), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
