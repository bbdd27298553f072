"""Tests for gspo_jax.plots: which PNGs are drawn from which logged keys."""

from gspo_jax.metrics import MetricsWriter
from gspo_jax.plots import plot_metrics


def _png_ok(path):
    return path.exists() and path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_plots_with_all_keys(tmp_path):
    with MetricsWriter(tmp_path, total_steps=6, console=False, enable_tensorboard=False) as w:
        for step in range(1, 4):
            w.write(step, {"eval/accuracy": 0.1 * step, "loss": 1.0}, phase="warmstart")
        for step in range(1, 7):
            line = {
                "reward/mean": 0.1 * step,
                "reward/std": 0.05,
                "clip_frac/seq": 0.01,
                "clip_frac/token": 0.02,
                "completion_len/mean": 10.0 + step,
            }
            line.update({f"log_ratio_seq/abs_mean/mb{i}": 0.01 * i for i in range(4)})
            w.write(step, line)
            if step % 2 == 0:
                w.write(step, {"eval/accuracy": 0.5 + 0.01 * step})
    written = plot_metrics(tmp_path)
    names = sorted(p.name for p in written)
    assert names == sorted(
        [
            "reward.png",
            "eval_accuracy.png",
            "clip_fraction.png",
            "completion_length.png",
            "minibatch_log_ratio_seq_abs_mean.png",
        ]
    )
    assert all(_png_ok(p) for p in written)


def test_plots_skip_missing_keys(tmp_path):
    assert plot_metrics(tmp_path) == []
    with MetricsWriter(tmp_path, total_steps=3, console=False, enable_tensorboard=False) as w:
        for step in range(1, 4):
            w.write(step, {"reward/mean": float("nan") if step == 2 else 0.5})
    written = plot_metrics(tmp_path)
    assert [p.name for p in written] == ["reward.png"] and _png_ok(written[0])
