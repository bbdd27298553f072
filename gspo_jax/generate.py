"""Sample a completion from a local Hugging Face model directory.

  python -m gspo_jax.generate --hf_path DIR --prompt "2+2=" --max_new_tokens 32 --temperature 0 [--json]

Weights and config load with gspo_jax.from_pretrained, the tokenizer with transformers (local files
only). The prompt is encoded like transformers' `generate` input (`tokenizer(text)`, default special
tokens), and generation stops at the tokenizer's and generation_config.json's EOS ids.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from absl import app, flags
from flax import nnx

import gspo_jax
from gspo_jax.sampler import Sampler
from gspo_jax.tokenizer import eos_token_ids, load_tokenizer

flags.DEFINE_string("hf_path", None, "Local Hugging Face model directory (config, safetensors, tokenizer).")
flags.DEFINE_string("prompt", None, "Prompt text.")
flags.DEFINE_integer("max_new_tokens", 64, "Most tokens to generate.")
flags.DEFINE_float("temperature", 0.0, "0 for greedy, else the sampling temperature.")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: no limit).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1: no limit).")
flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
flags.DEFINE_bool("json", False, "Print one JSON object instead of the completion text.")


def generate(
    hf_path: str,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Encodes `prompt`, samples one completion and returns it as text and ids (EOS included)."""
    tokenizer = load_tokenizer(hf_path)
    prompt_ids = tokenizer(prompt)["input_ids"]
    if not prompt_ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens: give a non-empty --prompt")
    stop_ids = eos_token_ids(tokenizer, hf_path)
    graphdef, params = nnx.split(gspo_jax.from_pretrained(hf_path, dtype=dtype))
    sampler = Sampler(
        graphdef,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_ids=stop_ids,
        pad_id=tokenizer.pad_token_id or 0,
    )
    ids = np.asarray([prompt_ids], np.int32)
    out = sampler(params, ids, np.ones_like(ids), jax.random.key(seed))
    length = int(out.lengths[0])
    completion_ids = [int(t) for t in np.asarray(out.completion_ids)[0, :length]]
    return {
        "prompt": prompt,
        "prompt_ids": [int(t) for t in prompt_ids],
        "completion": tokenizer.decode(completion_ids, skip_special_tokens=True),
        "completion_ids": completion_ids,
        "stopped_at_eos": bool(completion_ids) and completion_ids[-1] in stop_ids,
    }


def main(argv):
    del argv
    missing = [name for name in ("hf_path", "prompt") if flags.FLAGS[name].value is None]
    if missing:
        raise app.UsageError(f"set {' and '.join('--' + m for m in missing)}")
    f = flags.FLAGS
    result = generate(
        f.hf_path,
        f.prompt,
        max_new_tokens=f.max_new_tokens,
        temperature=f.temperature,
        top_k=f.top_k,
        top_p=f.top_p,
        seed=f.seed,
        dtype=f.dtype,
    )
    print(json.dumps(result) if f.json else result["completion"])


if __name__ == "__main__":
    app.run(main)
