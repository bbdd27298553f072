"""The README's main command learns: GSPO raises held-out accuracy by >= 0.30 over the RL phase.

Opt-in (`pytest -m slow`): it is the full default run, about 3-4 minutes on 2 CPU cores.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_default_run_learns(tmp_path):
    workdir = tmp_path / "default"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "gspo_jax.train",
            "--config=configs/qwen_moe.py",
            f"--config.workdir={workdir}",
        ],
        cwd=ROOT,
        check=True,
        timeout=1200,
        env=os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
    )
    with open(workdir / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    rl_evals = [l for l in lines if "eval/accuracy" in l and l.get("phase") in (None, "rl")]
    warm_evals = [l for l in lines if "eval/accuracy" in l and l.get("phase") == "warmstart"]
    assert rl_evals[0]["step"] == 0 and warm_evals  # the RL baseline is measured after the warm start
    gain = rl_evals[-1]["eval/accuracy"] - rl_evals[0]["eval/accuracy"]
    assert gain >= 0.30, [(l["step"], l["eval/accuracy"]) for l in rl_evals]
    assert os.path.isfile(workdir / "plots" / "eval_accuracy.png")
