"""python -m gspo_jax.compare: the report's numbers against numpy over hand-made metrics, collapse
detection on constructed curves, the arm/seed orchestration (with a stand-in trainer), and one real
end-to-end run of the command (slow)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from gspo_jax import compare, compare_report
from tests.micro_config import get_config as micro_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_records(rng, steps: int, final_acc: float, with_diagnostics: bool) -> list[dict]:
    """A run's metrics.jsonl lines: a warm-start line, step 0 eval, then RL steps with evals every 5."""
    records = [{"step": 10, "phase": "warmstart", "eval/accuracy": 0.9}, {"step": 0, "eval/accuracy": 0.2}]
    for step in range(1, steps + 1):
        row = {
            "step": step,
            "reward/mean": float(rng.uniform(0.3, 0.7)),
            "clip_frac/token": float(rng.uniform(0, 0.1)),
            "clip_frac/seq": float(rng.uniform(0, 0.2)),
            "step_time_s": float(rng.uniform(0.5, 1.5)),
            "update_skipped": 0.0,
        }
        if step % 5 == 0:
            row["eval/accuracy"] = final_acc if step == steps else float(rng.uniform(0.2, 0.3))
        if with_diagnostics:
            row["routing/volatility"] = float(rng.uniform(0, 0.2))
            row["routing/volatility_layer0"] = float(rng.uniform(0, 0.2))
            row["routing/volatility_layer1"] = float(rng.uniform(0, 0.2))
            for j in range(2):
                row[f"ratio_len/bin{j}_count"] = 0 if (j == 1 and step == 1) else 4
                row[f"ratio_len/bin{j}_max_len"] = 8 * (j + 1)
                row[f"ratio_len/bin{j}_var_token_logratio_sum"] = float(rng.uniform(0, 1))
                row[f"ratio_len/bin{j}_var_seq_logratio"] = float(rng.uniform(0, 0.01))
        records.append(row)
    return records


def _rl(records):
    return [r for r in records if "phase" not in r]


def _steps(records):
    return [r for r in _rl(records) if r["step"] >= 1]


def _arms(with_diagnostics=True):
    rng = np.random.default_rng(0)
    finals = {"gspo": [0.6, 0.7, 0.65], "grpo": [0.4, 0.5, 0.3]}
    return {
        arm: {
            "settings": {"algo.importance_sampling_level": arm},
            "runs": [
                {"seed": s, "records": _run_records(rng, 20, acc, with_diagnostics), "wall_s": 10.0 + s}
                for s, acc in enumerate(accs)
            ],
        }
        for arm, accs in finals.items()
    }


def test_report_numbers_are_numpy_statistics_of_the_inputs():
    arms = _arms()
    report = compare_report.build_report(arms, {"model": "hand-made", "eval problems": 100})
    text = compare_report.format_markdown(report, [])
    assert "gspo 0.650 (seeds 0.600-0.700), grpo 0.400 (seeds 0.300-0.500)" in text
    assert "gspo's worst seed beats every other arm's best seed" in text
    assert f"standard error of about {np.sqrt(0.65 * 0.35 / 100):.3f}" in text
    for arm, spec in arms.items():
        summary = report["arms"][arm]["summary"]
        finals = np.array([_rl(r["records"])[-1]["eval/accuracy"] for r in spec["runs"]])
        assert summary["eval_final"]["mean"] == pytest.approx(finals.mean())
        assert summary["eval_final"]["std"] == pytest.approx(finals.std())
        assert (summary["eval_final"]["min"], summary["eval_final"]["max"]) == (finals.min(), finals.max())
        assert summary["eval_start"]["mean"] == pytest.approx(
            0.2
        )  # the step-0 eval, not the warm start's 0.9
        clip = [np.mean([r["clip_frac/token"] for r in _steps(run["records"])]) for run in spec["runs"]]
        assert summary["clip_frac_token"]["mean"] == pytest.approx(np.mean(clip))
        assert summary["clip_frac_token"]["std"] == pytest.approx(np.std(clip))
        last_two = [np.mean([r["reward/mean"] for r in _steps(run["records"])][-2:]) for run in spec["runs"]]
        assert summary["reward_final"]["mean"] == pytest.approx(np.mean(last_two))  # last 10% of 20 steps
        vol = [np.mean([r["routing/volatility"] for r in _steps(run["records"])]) for run in spec["runs"]]
        assert summary["routing_volatility"]["mean"] == pytest.approx(np.mean(vol))
        assert summary["wall_s"]["per_seed"] == [10.0, 11.0, 12.0]
        times = [np.array([r["step_time_s"] for r in _steps(run["records"])]) for run in spec["runs"]]
        assert summary["train_time_s"]["per_seed"] == pytest.approx(
            [np.median(t[1:]) + t[1:].sum() for t in times]
        )
        # Curves: mean / min / max over seeds at each eval step, x also as mean cumulative step time.
        acc_curve = report["curves"][arm]["eval/accuracy"]
        assert acc_curve["step"] == [0, 5, 10, 15, 20]
        at_10 = [
            next(r["eval/accuracy"] for r in _rl(run["records"]) if r["step"] == 10) for run in spec["runs"]
        ]
        assert acc_curve["mean"][2] == pytest.approx(np.mean(at_10))
        assert acc_curve["min"][2] == min(at_10) and acc_curve["max"][2] == max(at_10)
        # Train time: the first (compiling) step counts at the median of the others.
        time_10 = [np.median(t[1:]) + t[1:10].sum() for t in times]
        assert acc_curve["train_time_s"][2] == pytest.approx(np.mean(time_10))
        # Ratio variance by length: mean over the steps where the bin held completions, then over seeds.
        bin1 = report["ratio_by_length"][arm][1]
        per_seed = [
            np.mean(
                [r["ratio_len/bin1_var_token_logratio_sum"] for r in _steps(run["records"]) if r["step"] > 1]
            )
            for run in spec["runs"]
        ]
        assert bin1["var_token_logratio_sum"]["mean"] == pytest.approx(np.mean(per_seed))
        assert bin1["max_len"] == 16 and bin1["count"] == 19 * 4


@pytest.mark.parametrize(
    "values, starts",
    [
        ([0.1, 0.5, 0.6, 0.4, 0.3, 0.5, 0.6, 0.2], [3, 7]),  # two episodes; 0.5 at index 5 ends the first
        ([0.5, 0.4, 0.36, 0.5], []),  # never more than 0.15 below the best
        ([0.9, 0.1, 0.1, 0.1], [1]),  # one long episode counts once
    ],
)
def test_collapse_starts_on_constructed_curves(values, starts):
    assert compare_report.collapse_starts(values, drop=0.15) == starts


def test_trailing_mean_matches_a_loop():
    values = np.random.default_rng(1).normal(size=23)
    expected = [values[max(0, i - 4) : i + 1].mean() for i in range(23)]
    np.testing.assert_allclose(compare_report.trailing_mean(values, 5), expected)


def test_run_summary_counts_collapses_nonfinite_updates_and_a_stopped_run():
    records = [{"step": 0, "eval/accuracy": 0.5}]
    accuracy = {5: 0.7, 10: 0.3, 15: 0.7, 20: 0.65}
    for step in range(1, 21):
        row = {"step": step, "reward/mean": 0.5, "update_skipped": 0.25 if step == 7 else 0.0, "loss": 0.1}
        if step == 12:
            row["loss"] = math.nan
        if step in accuracy:
            row["eval/accuracy"] = accuracy[step]
        records.append(row)
    summary = compare_report.run_summary(records, wall_s=3.0, stopped="3 non-finite updates in a row")
    assert summary["collapse_steps"]["eval_accuracy"] == [10]
    assert summary["collapse_steps"]["reward"] == []
    assert summary["collapse_steps"]["nonfinite_updates"] == [7, 12]
    assert summary["collapses"] == 1 + 2 + 1
    assert (summary["eval_start"], summary["eval_final"], summary["eval_best"]) == (0.5, 0.65, 0.7)


def test_missing_diagnostics_become_notes_and_the_files_are_written(tmp_path):
    arms = _arms(with_diagnostics=False)
    arms["grpo_replay"] = {"settings": {"algo.routing_replay": True}, "runs": [], "note": "not run: no key"}
    report = compare_report.write_report(arms, {"model": "hand-made"}, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "No run logged `routing/volatility`" in text and "No run logged `ratio_len/bin*`" in text
    for arm in ("gspo", "grpo", "grpo_replay"):
        assert f"| {arm} |" in text
    assert "not run: no key" in text
    assert json.loads((tmp_path / "report.json").read_text())["arms"].keys() == report["arms"].keys()
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "accuracy_reward.png",
        "clip_fraction.png",
    ]


def test_compare_runs_every_arm_and_seed_in_its_own_workdir_from_one_warm_start(tmp_path, monkeypatch):
    trained, resumed = [], []

    def fake_run(cfg):  # writes a run's metrics the way the trainer does, from its config alone
        trained.append((cfg.workdir, cfg.seed, cfg.algo.importance_sampling_level, cfg.algo.eps_low))
        resumed.append(cfg.resume)
        os.makedirs(os.path.join(cfg.workdir, "checkpoints", "0"), exist_ok=True)
        lines = [
            {"step": step, "eval/accuracy": 0.1 * cfg.seed, "reward/mean": 0.5}
            for step in range(cfg.steps + 1)
        ]
        with open(os.path.join(cfg.workdir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        return {}

    monkeypatch.setattr(compare.train, "run", fake_run)
    base = micro_config()
    base.seed = 7
    report = compare.compare(
        base, setup="quick", seeds=2, arms=list(compare.ARMS), out=tmp_path, log=lambda m: None
    )
    has_replay = compare.has_key(base, "algo.routing_replay")
    expected_arms = ["gspo", "grpo"] + (["grpo_replay"] if has_replay else [])
    assert [(w.split("/")[-2], w.split("/")[-1], s) for w, s, _, _ in trained] == [
        (arm, f"seed{k}", 7 + k) for k in range(2) for arm in expected_arms
    ]
    # The first arm of a seed runs the warm start; the others start RL from its step-0 checkpoint.
    first = str(tmp_path / "gspo" / "seed{}" / "checkpoints" / "0")
    assert resumed == [r for k in range(2) for r in ["auto"] + [first.format(k)] * (len(expected_arms) - 1)]
    levels = {w.split("/")[-2]: (level, eps) for w, _, level, eps in trained}
    assert levels["gspo"] == ("sequence", base.algo.eps_low) and levels["grpo"] == ("token", 0.2)
    assert report["arms"]["gspo"]["summary"]["eval_final"]["per_seed"] == pytest.approx([0.7, 0.8])
    assert list(report["arms"]) == list(compare.ARMS)
    if not has_replay:
        assert report["arms"]["grpo_replay"]["note"].startswith("not run")
    trained.clear()
    compare.compare(base, setup="quick", seeds=2, arms=["gspo"], out=tmp_path, log=lambda m: None)
    assert trained == []  # finished runs are reused


def test_setup_keys_yield_to_command_line_keys():
    cfg = micro_config()
    compare.apply_setup(cfg, "quick", {"steps", "log.ratio_by_length"})
    assert cfg.steps == 2 and cfg.data.task == "running_sum"
    assert cfg.log.routing_volatility and cfg.log.ratio_by_length == micro_config().log.ratio_by_length
    assert cfg.rollout.max_new_tokens == compare.SETUPS["quick"]["rollout.max_new_tokens"]
    assert compare.user_config_keys(["--quick", "--config.steps=3", "--config.algo.eps_low=0.1"]) == {
        "steps",
        "algo.eps_low",
    }


def test_unknown_arm_is_named():
    with pytest.raises(ValueError, match=r"unknown arms \['ppo'\]"):
        compare.compare(micro_config(), setup="quick", seeds=1, arms=["ppo"], out="/tmp/x", log=print)


@pytest.mark.slow
def test_compare_command_end_to_end(tmp_path):
    out = tmp_path / "cmp"
    args = [
        sys.executable, "-m", "gspo_jax.compare", "--config=tests/micro_config.py", "--quick", f"--out={out}",
        "--config.steps=2", "--config.warmstart.steps=2", "--config.eval.every=2", "--config.data.eval_size=8",
        "--config.eval.batch_size=8", "--config.rollout.prompts_per_step=4", "--config.rollout.group_size=4",
        "--config.rollout.max_new_tokens=8",
    ]  # fmt: skip
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    proc = subprocess.run(args, check=False, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report["arms"]) == ["gspo", "grpo", "grpo_replay"]
    for arm in ("gspo", "grpo"):
        assert report["arms"][arm]["summary"]["eval_final"]["n"] == 1
        assert report["curves"][arm]["eval/accuracy"]["step"] == [0, 2]
    assert all(f"| {arm} |" in (out / "report.md").read_text() for arm in report["arms"])
    assert (out / "plots" / "accuracy_reward.png").stat().st_size > 0
