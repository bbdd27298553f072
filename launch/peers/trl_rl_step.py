"""TRL's GRPOTrainer in GSPO mode on the RL bench's shapes (python -m gspo_jax.bench --what=rl_step):
prints the median seconds per step after the first, as JSON.

Same work as the bench's `sampler1` setting: a random Qwen3-MoE of the shape (4 heads x 64, 2 KV
heads, top-2 experts, vocab 64), the bench's prompts and the partial-credit reward, one policy update
per rollout batch (num_iterations=1: the old log-probs are the detached current ones, no extra pass),
sequence-level importance ratios, fp32 on the CPU. TRL is never a dependency of gspo-jax: run this in
a separate virtualenv.

  python launch/peers/make_inputs.py /tmp/peers              # in the project's environment
  python -m venv /tmp/trl && /tmp/trl/bin/pip install torch==2.13.0 trl
  /tmp/trl/bin/python launch/peers/trl_rl_step.py small /tmp/peers
"""

import json
import statistics
import sys
import time

import torch
import transformers
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

SHAPES = {
    "small": dict(
        hidden=256, layers=4, experts=8, expert_width=256, prompts=8, group=4, new_tokens=32, steps=5
    ),
    "medium": dict(
        hidden=512, layers=8, experts=16, expert_width=512, prompts=16, group=4, new_tokens=128, steps=3
    ),
}


def partial_credit(completion: str, answer: str) -> float:
    """The bench's reward (gspo_jax.tasks.positional_credit, left aligned)."""
    text = completion.strip()
    if text == answer:
        return 1.0
    matches = sum(a == b for a, b in zip(text, answer))
    if len(text) == len(answer):
        return matches / len(answer)
    return 0.5 * matches / max(len(text), len(answer))


def reward(completions, answer, **_):
    return [partial_credit(c, a) for c, a in zip(completions, answer)]


class StepTimer(transformers.TrainerCallback):
    """Wall time of each optimizer step (generation, reward and update)."""

    def __init__(self):
        self.seconds, self.start = [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.start)


def main(shape_name: str, inputs_dir: str) -> None:
    torch.manual_seed(0)
    shape = SHAPES[shape_name]
    tokenizer = transformers.AutoTokenizer.from_pretrained(f"{inputs_dir}/tokenizer")
    config = transformers.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=shape["experts"],
        num_experts_per_tok=2,
        moe_intermediate_size=shape["expert_width"],
        norm_topk_prob=True,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.05,
    )
    model = transformers.Qwen3MoeForCausalLM(config)
    with open(f"{inputs_dir}/prompts_{shape_name}.json") as f:
        rows = json.load(f)[: shape["prompts"] * (shape["steps"] + 1)]
    args = GRPOConfig(
        output_dir="/tmp/trl_rl_step",
        use_cpu=True,
        bf16=False,
        report_to="none",
        logging_steps=1000,
        save_strategy="no",
        per_device_train_batch_size=shape["prompts"] * shape["group"],
        num_generations=shape["group"],
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=shape["new_tokens"],
        temperature=1.0,
        importance_sampling_level="sequence",
        loss_type="grpo",
        epsilon=3e-4,
        epsilon_high=4e-4,
        beta=0.0,
        learning_rate=1e-5,
        max_steps=shape["steps"] + 1,
        shuffle_dataset=False,
        disable_dropout=True,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    result = {
        "peer": "trl",
        "versions": {"trl": __import__("trl").__version__, "torch": torch.__version__},
        "shape": shape_name,
        "params": sum(p.numel() for p in model.parameters()),
        "steps_s": [round(s, 3) for s in timer.seconds],
        "rl_step_s": round(statistics.median(timer.seconds[1:]), 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
