"""Sample completions from a local Hugging Face model directory.

  python -m gspo_jax.generate --hf_path DIR --prompt "2+2=" [--prompt "3+4=" ...] --max_new_tokens 32 \
      --temperature 0 [--chat_template] [--json]
  python -m gspo_jax.generate --hf_path DIR --prompts_file prompts.jsonl --chat_template --json

Weights and config load with gspo_jax.from_pretrained, the tokenizer with transformers (local files
only). A text prompt is encoded like transformers' `generate` input (`tokenizer(text)`, default special
tokens); with --chat_template it becomes one user message in the tokenizer's chat template (with the
generation prompt), as the trainer's `data.chat_template` does. --prompts_file takes JSONL records with a
"prompt" field, text or a list of {"role", "content"} messages (always templated), as training data.
All prompts are left-padded into one batch; generation stops at the tokenizer's and
generation_config.json's EOS ids.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import numpy as np
from absl import app, flags
from flax import nnx

import gspo_jax
from gspo_jax.data import encode_prompts
from gspo_jax.records import Prompt, file_records
from gspo_jax.sampler import Sampler
from gspo_jax.tokenizer import eos_token_ids, load_tokenizer


def define_flags() -> None:
    """Defines this CLI's flags (at run time, so the CLI modules can be imported together)."""
    if "hf_path" in flags.FLAGS:
        return
    flags.DEFINE_string("hf_path", None, "Local HF model directory (config, safetensors, tokenizer).")
    flags.DEFINE_multi_string("prompt", [], "Prompt text; repeat the flag for several prompts.")
    flags.DEFINE_string("prompts_file", None, 'JSONL file of records with a "prompt" (text or messages).')
    flags.DEFINE_bool("chat_template", False, "Wrap text prompts as a user message in the chat template.")
    flags.DEFINE_integer("max_new_tokens", 64, "Most tokens to generate.")
    flags.DEFINE_float("temperature", 0.0, "0 for greedy, else the sampling temperature.")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: no limit).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1: no limit).")
    flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
    flags.DEFINE_bool("json", False, "Print one JSON object per prompt instead of the completion text.")


def _encode(tokenizer, prompt: Prompt, chat_template: bool) -> list[int]:
    if isinstance(prompt, str) and not chat_template:
        return list(tokenizer(prompt)["input_ids"])  # as transformers' generate input
    return encode_prompts([prompt], tokenizer, chat_template=chat_template, add_bos=False)[0]


def generate(
    hf_path: str,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    dtype: str = "float32",
    chat_template: bool = False,
) -> list[dict[str, Any]]:
    """Encodes each prompt, samples one completion per prompt in one batch, and returns them as text
    and ids (EOS included), in order."""
    tokenizer = load_tokenizer(hf_path)
    if not prompts:
        raise ValueError("no prompts: give --prompt (repeatable) or --prompts_file")
    encoded = [_encode(tokenizer, p, chat_template) for p in prompts]
    for prompt, ids in zip(prompts, encoded):
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens: give a non-empty --prompt")
    stop_ids = eos_token_ids(tokenizer, hf_path)
    graphdef, params = nnx.split(gspo_jax.from_pretrained(hf_path, dtype=dtype))
    pad_id = tokenizer.pad_token_id or 0
    sampler = Sampler(
        graphdef,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_ids=stop_ids,
        pad_id=pad_id,
    )
    width = max(map(len, encoded))
    ids = np.full((len(encoded), width), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for row, tokens in enumerate(encoded):
        ids[row, width - len(tokens) :], mask[row, width - len(tokens) :] = tokens, 1
    out = jax.device_get(sampler(params, ids, mask, jax.random.key(seed)))
    results = []
    for row, (prompt, prompt_ids) in enumerate(zip(prompts, encoded)):
        completion_ids = [int(t) for t in out.completion_ids[row, : int(out.lengths[row])]]
        results.append(
            {
                "prompt": prompt,
                "prompt_ids": [int(t) for t in prompt_ids],
                "completion": tokenizer.decode(completion_ids, skip_special_tokens=True),
                "completion_ids": completion_ids,
                "stopped_at_eos": bool(completion_ids) and completion_ids[-1] in stop_ids,
            }
        )
    return results


def main(argv):
    del argv
    f = flags.FLAGS
    if f.hf_path is None:
        raise app.UsageError("set --hf_path")
    if not f.prompt and not f.prompts_file:
        raise app.UsageError("set --prompt (repeatable) or --prompts_file")
    prompts = list(f.prompt) + (file_records(f.prompts_file, "prompt").prompts if f.prompts_file else [])
    results = generate(
        f.hf_path,
        prompts,
        max_new_tokens=f.max_new_tokens,
        temperature=f.temperature,
        top_k=f.top_k,
        top_p=f.top_p,
        seed=f.seed,
        dtype=f.dtype,
        chat_template=f.chat_template,
    )
    for result in results:
        print(json.dumps(result) if f.json else result["completion"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
