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
    assert all(l["eval/num_prompts"] == 8 for l in lines if "eval/num_prompts" in l)  # both hosts' halves
    assert sorted(d for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == ["0", "1", "2"]
    assert proc.stdout.count("done:") == 2  # both processes finished
