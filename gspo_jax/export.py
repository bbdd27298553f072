"""CLI: python -m gspo_jax.export --workdir W --to_hf DIR [--step N] [--dtype bfloat16]

Writes the policy of a run's checkpoint (the newest good one by default) as a Hugging Face directory:
safetensors weights, config.json, generation_config.json and the run's tokenizer, loadable with
transformers.AutoModelForCausalLM / AutoTokenizer.
"""

from __future__ import annotations

import json
import os

import jax
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


def run_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config a run saved with its checkpoint."""
    from gspo_jax.checkpoint import CHECKPOINT_DIR

    root = os.path.join(workdir, CHECKPOINT_DIR)
    steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {root}: run training first or check --workdir")
    chosen = step if step is not None else steps[-1]
    with open(os.path.join(root, str(chosen), "config", "metadata")) as f:
        return ml_collections.ConfigDict(json.load(f))


def export_checkpoint(workdir: str, out_dir: str, *, step: int | None = None, dtype: str | None = None):
    """Restores the policy parameters of `workdir`'s checkpoint and writes an HF directory."""
    from gspo_jax import checkpoint, sharding
    from gspo_jax.models.hf import save_pretrained
    from gspo_jax.policy import abstract_train_state, model_config
    from gspo_jax.tokenizer import load_tokenizer

    cfg = run_config(workdir, step)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.expert, cfg.mesh.tensor = -1, 1, 1, 1
    mesh = sharding.make_mesh(cfg.mesh)
    target, graphdef = abstract_train_state(cfg, mesh)
    resume = os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(step)) if step is not None else "auto"
    restored = checkpoint.Checkpointer(workdir, async_save=False).restore(target, None, resume=resume)
    if restored is None:
        raise FileNotFoundError(f"no readable checkpoint in {workdir}")
    state, _, restored_step = restored
    model = nnx.merge(graphdef, state["train"].params)
    save_pretrained(model, out_dir, dtype=dtype)
    if jax.process_index() == 0:
        load_tokenizer(cfg.model.hf_path or None).save_pretrained(out_dir)
    mcfg = model_config(cfg)
    return restored_step, mcfg


def main(argv):
    del argv
    f = flags.FLAGS
    step, _ = export_checkpoint(f.workdir, f.to_hf, step=f.step, dtype=f.dtype)
    print(f"exported step {step} of {f.workdir} to {f.to_hf}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
