"""Writes what the peer scripts read, from the bench's own data pipeline: the built-in char tokenizer
(save_pretrained) and, per bench shape, the prompts and answers of its first steps.

Run in the project's environment (the peer script runs in another one):
  python launch/peers/make_inputs.py /tmp/peers
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # configs/
from gspo_jax import bench_rl
from gspo_jax.data import make_prompt_dataset
from gspo_jax.tokenizer import load_tokenizer


def main(out_dir: str, steps: int = 8) -> None:
    tokenizer = load_tokenizer(None)
    tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
    for name in ("small", "medium"):
        shape = bench_rl.SHAPES[name]
        cfg = bench_rl.run_config(shape, "sampler1", steps)
        data = make_prompt_dataset(cfg.data, tokenizer, prompts_per_step=shape["prompts"], seed=cfg.seed)
        rows = []
        for _ in range(steps):
            batch = next(data)
            for ids, mask, answer in zip(batch.prompt_ids, batch.prompt_mask, batch.fields["answer"]):
                rows.append({"prompt": tokenizer.decode(ids[np.asarray(mask, bool)]), "answer": answer})
        with open(os.path.join(out_dir, f"prompts_{name}.json"), "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main(sys.argv[1])
