"""Two processes on this machine form one JAX job (gloo): the multi-host path of pods and clusters."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_two_process_training_run(tmp_path):
    workdir = tmp_path / "mp"
    env = os.environ | {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [
            "bash",
            "launch/local_multiprocess.sh",
            "2",
            "--config=tests/micro_config.py",
            f"--config.workdir={workdir}",
            "--config.steps=2",
            "--config.mesh.num_devices=0",
            # After this warm start completions end anywhere in the 8, 16 and 24 buckets, and with 4
            # rows per host the hosts' longest differ (19 vs 12 tokens at step 1): each host once
            # trained on its own width and gloo aborted ("256 vs 192 ... collective mismatch").
            "--config.rollout.max_new_tokens=24",
            "--config.rollout.prompts_per_step=4",
            "--config.rollout.group_size=2",
            "--config.warmstart.steps=15",
            "--config.warmstart.batch_size=64",
            "--config.warmstart.eval_every=0",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(workdir / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    rl = [l for l in lines if "reward/mean" in l]
    assert [l["step"] for l in rl] == [1, 2]
    assert max(l["train/completion_bucket"] for l in rl) > 8  # past the smallest bucket
    # Each host packs its own rows: the trainer's log-probs are the sampler's (fp32) only if every
    # packed sequence was read back for its own row on its own host.
    assert all(l["logprob_gap/token_abs"] < 1e-3 for l in rl), [l["logprob_gap/token_abs"] for l in rl]
    assert all(l["eval/num_prompts"] == 8 for l in lines if "eval/num_prompts" in l)  # both hosts' halves
    assert sorted(d for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == ["0", "1", "2"]
    assert proc.stdout.count("done:") == 2  # both processes finished


def test_widen_left_pads_a_host_batch_to_the_agreed_width():
    import numpy as np

    from gspo_jax.data import PromptBatch, widen

    ids = np.array([[5, 6, 7], [0, 8, 9]], np.int32)
    mask = np.array([[1, 1, 1], [0, 1, 1]], np.int32)
    batch = PromptBatch(ids, mask, ["a", "b"], {}, np.ones(2, bool))
    wide = widen(batch, 5, pad_id=0)
    np.testing.assert_array_equal(wide.prompt_ids, [[0, 0, 5, 6, 7], [0, 0, 0, 8, 9]])
    np.testing.assert_array_equal(wide.prompt_mask, [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    assert widen(batch, 3, pad_id=0).prompt_ids.shape == (2, 3)
    with pytest.raises(ValueError, match="narrow"):
        widen(batch, 2, pad_id=0)
