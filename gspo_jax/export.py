"""CLI: python -m gspo_jax.export --workdir W --to_hf DIR [--step N] [--dtype bfloat16]

Writes the policy of a run's checkpoint (the newest good one by default) as a Hugging Face directory:
safetensors weights, config.json, generation_config.json and the run's tokenizer, loadable with
transformers.AutoModelForCausalLM / AutoTokenizer.
"""

from __future__ import annotations

import sys

import ml_collections
from absl import app, flags
from flax import nnx


def define_flags() -> None:
    """Defines this CLI's flags (at run time, so the CLI modules can be imported together)."""
    if "to_hf" in flags.FLAGS:
        return
    flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.", required=True)
    flags.DEFINE_string("to_hf", None, "Output Hugging Face directory.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest good one).")
    flags.DEFINE_string("dtype", None, "Weight dtype on disk (default: the run's param_dtype).")


def export_checkpoint(workdir: str, out_dir: str, *, step: int | None = None, dtype: str | None = None) -> int:
    """Writes the policy of `workdir`'s checkpoint `step` (default: the newest) and the run's tokenizer
    as an HF directory; returns the step written. A missing step raises, listing the steps that exist."""
    from gspo_jax import checkpoint, sharding
    from gspo_jax.models.hf import save_pretrained
    from gspo_jax.policy import abstract_train_state
    from gspo_jax.tokenizer import load_tokenizer

    with checkpoint.Checkpointer(workdir, async_save=False) as ckpt:
        cfg = ml_collections.ConfigDict(ckpt.read_config(step))
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.expert, cfg.mesh.tensor = -1, 1, 1, 1
        target, graphdef = abstract_train_state(cfg, sharding.make_mesh(cfg.mesh))
        tree, _, restored_step = ckpt.read(target, step)
    tokenizer = load_tokenizer(cfg.model.hf_path or None)
    save_pretrained(nnx.merge(graphdef, tree["train"].params), out_dir, dtype=dtype, tokenizer=tokenizer)
    return restored_step


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        step = export_checkpoint(f.workdir, f.to_hf, step=f.step, dtype=f.dtype)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    print(f"exported step {step} of {f.workdir} to {f.to_hf}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
