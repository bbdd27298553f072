"""GSPO training configs for Qwen-style MoE policies.

  python -m gspo_jax.train --config=configs/qwen_moe.py                    # tiny: CPU, minutes, no downloads
  python -m gspo_jax.train --config=configs/qwen_moe.py:qwen3_30b_a3b \\
      --config.model.hf_path=/ckpt/Qwen3-30B-A3B --config.data.path=/data/math.jsonl

Presets: tiny (default), qwen3_30b_a3b, qwen3_235b_a22b, qwen1_5_moe_a2_7b. Any key can be overridden
with --config.a.b=value; the trainer validates the whole config before doing any work.
"""

import ml_collections
from ml_collections import config_dict

from gspo_jax.data import default_data_config

# Architectures (gspo_jax.models.config.PRESETS; a real run reads them from model.hf_path/config.json):
#   tiny               Qwen3-MoE, 2 layers, hidden 128, 4/2 heads x 32, 8 experts top-2 (width 128), vocab 64
#   qwen3_30b_a3b      Qwen3-MoE, 48 layers, hidden 2048, 32/4 heads x 128, 128 experts top-8 (768), vocab 151936
#   qwen3_235b_a22b    Qwen3-MoE, 94 layers, hidden 4096, 64/4 heads x 128, 128 experts top-8 (1536), vocab 151936
#   qwen1_5_moe_a2_7b  Qwen2-MoE, 24 layers, hidden 2048, 16/16 heads x 128, 60 experts top-4 (1408)
#                      + a gated shared expert (5632), qkv bias, vocab 151936
PRESETS = ("tiny", "qwen3_30b_a3b", "qwen3_235b_a22b", "qwen1_5_moe_a2_7b")


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with defaults suited to the tiny CPU run."""
    c = ml_collections.ConfigDict()
    c.preset = "tiny"
    c.workdir = "runs/qwen_moe_tiny"  # checkpoints, metrics.jsonl, tb/, samples.jsonl, plots/
    c.seed = 0
    c.steps = 500  # RL steps (a warm start, if any, has its own count)
    c.resume = "auto"  # auto: latest complete checkpoint in workdir | never | a checkpoint path

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"  # architecture for a fresh init (ignored when hf_path is set)
    c.model.hf_path = ""  # local HF directory: weights, config.json and tokenizer
    c.model.dtype = "float32"  # compute dtype (bfloat16 on TPU/GPU)
    c.model.param_dtype = "float32"  # master weights and optimizer state
    c.model.rollout_dtype = ""  # dtype of the sampler's weight copy; "" = param_dtype
    c.model.moe_dispatch = "auto"  # auto | dense | capacity | ragged | tiled
    c.model.capacity_factor = 0.0  # <= 0: dropless
    c.model.expert_parallel = "auto"  # auto: all-to-all expert parallelism when mesh.expert > 1 | off
    c.model.remat = False  # recompute decoder layers in the backward pass (long completions, big models)
    c.model.remat_policy = "nothing_saveable"  # what remat keeps: nothing_saveable | dots_saveable
    c.model.scan_unroll = 0  # decoder layers per scan iteration; 0: all (small models on CPU)
    c.model.decode_layers = "auto"  # prefill/decode layers: auto (unrolled on CPU) | unrolled | scan
    c.model.attention_chunk = 128  # query rows per training-attention chunk (memory O(T * chunk)); 0: off
    c.model.aux_loss_coef = config_dict.placeholder(float)  # None: the model's router_aux_loss_coef
    c.model.logprob_chunk = 256  # time steps per chunk of the LM-head log-softmax

    c.data = default_data_config()
    c.data.train_size = 20_000
    c.data.buckets = (8, 16, 32, 64, 128, 256, 512)

    c.rollout = ml_collections.ConfigDict()
    c.rollout.prompts_per_step = 32  # N prompts per RL step (global, all hosts)
    c.rollout.group_size = 8  # G completions per prompt
    c.rollout.max_new_tokens = 8
    c.rollout.temperature = 1.0
    c.rollout.top_k = 0  # 0: off
    c.rollout.top_p = 1.0
    c.rollout.cache_dtype = ""  # KV cache dtype; "" = compute dtype
    # Decode on the still-running rows only, once half have stopped: auto (one CPU device) / on / off.
    c.rollout.compact_rows = "auto"

    c.algo = ml_collections.ConfigDict()
    c.algo.importance_sampling_level = "sequence"  # sequence (GSPO) | sequence_token | token (GRPO)
    # Clip widths; None = the level's paper default (3e-4/4e-4 sequence, 0.2/0.28 token). The paper's
    # sequence widths assume a 30B model at lr ~1e-6; a tiny model at lr 1e-4 moves |log s| ~1e-2 per
    # update, so the tiny preset widens them (see BUILD_NOTES.md).
    c.algo.eps_low = config_dict.placeholder(float)
    c.algo.eps_high = config_dict.placeholder(float)
    c.algo.aggregation = "seq-mean-token-mean"  # or token-mean (DAPO)
    c.algo.advantage_scale = "group"  # group | batch | none (Dr. GRPO)
    c.algo.minibatches = 4  # gradient updates per rollout batch (paper: 4): updates 2.. are off-policy
    c.algo.iterations = 1  # passes over the rollout batch
    # Gradient accumulation: each minibatch update sums the gradients of this many micro-batches (one
    # forward + backward each; activations are a micro-batch's). The update is the same; memory is less.
    c.algo.grad_accumulation = 1
    c.algo.beta = 0.0  # KL(pi || ref) coefficient (k3); > 0 keeps a frozen reference copy
    c.algo.old_logprobs = "trainer"  # trainer: one extra forward pass | sampler: the sampler's own (sec. 5.4)
    c.algo.max_nonfinite_updates = 3  # stop after this many skipped (NaN/inf) updates in a row
    # Sequence packing: the update's forward runs on rows that hold several sequences end to end
    # (gspo_jax/packing.py) instead of [prompt | completion] rows that are often half padding.
    c.algo.pack_sequences = True
    # Routing Replay (GSPO paper): updates route every token through the experts the policy chose
    # before the first update (router weights stay live); meant for the token level, allowed at all.
    c.algo.routing_replay = False

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 5  # in optimizer updates
    c.optim.schedule = "constant"  # constant | cosine (decays to lr * final_lr_fraction)
    c.optim.final_lr_fraction = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0  # global-norm clipping

    c.reward = ml_collections.ConfigDict()
    c.reward.fns = "sort_digits"  # comma-separated registered names or package.module:function
    c.reward.weights = ""  # comma-separated, same length as fns; "" = all 1.0
    # Keyword arguments bound to a function, by its name in fns: {"format": {"pattern": r"^\\boxed"}}.
    c.reward.fn_kwargs = ml_collections.ConfigDict()

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 50  # RL steps between greedy evals on the held-out split; 0 = off
    c.eval.batch_size = 200
    c.eval.max_new_tokens = config_dict.placeholder(int)  # None: rollout.max_new_tokens
    # Built-in tasks count a prompt solved by their exact verifier; file data by total reward >= this.
    c.eval.correct_threshold = 1.0

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 100  # RL steps; a final checkpoint is always written
    c.checkpoint.keep = 3
    c.checkpoint.keep_best_by = ""  # also keep the best checkpoint by this metric, e.g. eval/accuracy
    c.checkpoint.keep_best_mode = (
        ""  # max | min; "": the metric's own (max for accuracy/reward, min for loss)
    )
    c.checkpoint.async_save = True

    c.log = ml_collections.ConfigDict()
    c.log.samples_every = 50  # write example completions every K steps
    c.log.num_samples = 4
    c.log.console_every = 25  # one summary line every K steps when stdout is not a terminal
    c.log.tensorboard = True
    # Diagnostics (BUILD_NOTES.md, "Diagnostics"). Routing volatility costs one forward per update
    # (two with routing_replay); ratio statistics by completion-length bin cost nothing measurable.
    c.log.routing_volatility = False
    c.log.ratio_by_length = True

    # Device mesh: sizes multiply to the device count; -1 takes what is left. The batch is split over
    # data x fsdp x expert, parameters per logical axis (sharding.DEFAULT_RULES, overridable in rules).
    c.mesh = ml_collections.ConfigDict()
    c.mesh.num_devices = 0  # 0: every device of the job; N: the first N (debugging on a shared host)
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.expert = 1
    c.mesh.tensor = 1
    c.mesh.rules = ml_collections.ConfigDict()

    # Multi-process jobs (one process per host; launch/ has scripts). "auto" joins a job when the
    # environment describes one (Cloud TPU pod slice, SLURM with several tasks, JAX_COORDINATOR_ADDRESS);
    # a coordinator_address here forces it, as on a single machine running several processes.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = "auto"  # auto | always | never
    c.distributed.coordinator_address = ""  # host:port of process 0
    c.distributed.num_processes = 0
    c.distributed.process_id = -1

    # Supervised warm start before RL (the paper starts RL from a cold-start fine-tuned model).
    c.warmstart = ml_collections.ConfigDict()
    c.warmstart.steps = 0  # 0: off
    c.warmstart.batch_size = 64
    c.warmstart.lr = 1e-3
    c.warmstart.eval_every = 0  # warm-start steps between evals (logged with phase "warmstart")
    return c


def _real_model(c, preset: str):
    """Shared settings for released checkpoints on TPU/GPU."""
    c.preset = preset
    c.workdir = f"runs/{preset}"
    c.model.preset = preset
    c.model.hf_path = ""  # required: the downloaded HF checkpoint directory
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.rollout_dtype = "bfloat16"
    c.model.moe_dispatch = "ragged"
    # Dropless expert-parallel blocks are sized for the worst case (every choice on one device): 36.9
    # GiB per MoE layer for 30B on v5p-64 vs 6.8 GiB at 1.25 (python -m gspo_jax.plan; BUILD_NOTES).
    c.model.capacity_factor = 1.25
    c.model.remat = True
    c.model.scan_unroll = 1  # one layer per scan iteration: compile time and memory stay flat in depth
    c.data.task = ""
    c.data.path = ""  # required: JSONL/Parquet with "prompt" and "answer"
    c.data.chat_template = True
    c.data.max_prompt_len = 1024
    c.data.buckets = (128, 256, 512, 1024)
    c.reward.fns = "math_answer"
    c.rollout.prompts_per_step = 64
    c.rollout.group_size = 16
    c.rollout.max_new_tokens = 4096
    c.rollout.temperature = 1.0
    c.algo.eps_low = 3e-4  # the paper's sequence-level clip widths
    c.algo.eps_high = 4e-4
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.1
    c.steps = 500
    c.eval.every = 25
    c.eval.batch_size = 256
    c.checkpoint.every = 10
    c.log.samples_every = 10
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.expert = 8  # 128 experts over 8 devices; must divide num_experts
    c.mesh.tensor = 1
    return c


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    preset = preset or "tiny"
    if preset not in PRESETS:
        raise ValueError(
            f"Unknown preset {preset!r}: use one of {PRESETS}, e.g. --config=configs/qwen_moe.py:tiny"
        )
    c = base_config()
    if preset == "tiny":
        # A 2-layer, 8-expert Qwen3-MoE on the built-in digit-sorting task; eps widened for lr 1e-4.
        c.algo.eps_low = 0.02
        c.algo.eps_high = 0.03
        # 15 supervised steps take held-out accuracy from 0 to ~0.25: enough for groups to hold both
        # better and worse answers, so GSPO has a signal; RL does the rest (see README for numbers).
        c.warmstart.steps = 15
        c.warmstart.eval_every = 5
        return c
    c = _real_model(c, preset)
    if preset == "qwen3_235b_a22b":
        c.mesh.expert = 16
        c.rollout.prompts_per_step = 128
    if preset == "qwen1_5_moe_a2_7b":
        c.mesh.expert = 4  # 60 experts: 4 or 6 or 12 divide it, 8 does not
        c.rollout.max_new_tokens = 2048
    return c
