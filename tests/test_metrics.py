"""Tests for gspo_jax.metrics: JSON lines, resume truncation, TensorBoard, console."""

import io
import json
import math
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from gspo_jax import metrics as M


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_write_converts_values_and_keeps_header_order(tmp_path):
    with M.MetricsWriter(tmp_path, total_steps=10, console=False) as w:
        w.write(
            1,
            {
                "reward/mean": jnp.float32(0.5),
                "count": np.int64(3),
                "flag": np.bool_(True),
                "hist": jnp.arange(3.0),
                "loss": float("nan"),
                "up": jnp.inf,
                "down": -np.inf,
            },
        )
        w.write(2, {"eval/accuracy": np.float64(0.25)}, phase="warmstart")
    first, second = _lines(tmp_path / "metrics.jsonl")
    assert list(first)[:2] == ["step", "reward/mean"]
    assert first["step"] == 1 and isinstance(first["step"], int)
    assert first["reward/mean"] == 0.5 and first["count"] == 3 and first["flag"] is True
    assert first["hist"] == [0.0, 1.0, 2.0]
    assert (first["loss"], first["up"], first["down"]) == ("nan", "inf", "-inf")
    assert list(second) == ["step", "phase", "eval/accuracy"]
    assert second == {"step": 2, "phase": "warmstart", "eval/accuracy": 0.25}
    back = M.read_metrics(tmp_path)[0]
    assert math.isnan(back["loss"]) and back["up"] == math.inf and back["down"] == -math.inf


def test_reserved_and_unsupported_names_raise(tmp_path):
    with M.MetricsWriter(tmp_path, total_steps=3, console=False, enable_tensorboard=False) as w:
        with pytest.raises(ValueError, match="reserved"):
            w.write(1, {"step": 1.0})
        with pytest.raises(TypeError, match="'odd'"):
            w.write(1, {"odd": object()})


def test_lines_are_on_disk_after_sigkill(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from gspo_jax.metrics import MetricsWriter
        w = MetricsWriter({str(tmp_path)!r}, total_steps=5, console=False, enable_tensorboard=False)
        w.write(1, {{"a": 1.0}})
        w.write(2, {{"a": 2.0}})
        w.write_samples(2, [{{"text": "hi"}}])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(M.Path(M.__file__).parents[1]))
    assert proc.returncode == -9
    assert [r["a"] for r in _lines(tmp_path / "metrics.jsonl")] == [1.0, 2.0]
    assert _lines(tmp_path / "samples.jsonl") == [{"step": 2, "text": "hi"}]


def test_truncate_after_keeps_old_steps_and_kept_phases(tmp_path):
    w = M.MetricsWriter(tmp_path, total_steps=10, console=False, enable_tensorboard=False)
    for step in range(1, 6):
        w.write(step, {"loss": float(step)}, phase="warmstart")
    for step in range(1, 8):
        w.write(step, {"loss": -float(step)})
        w.write_samples(step, [{"text": f"s{step}"}])
    w.truncate_after(4, keep_phases={"warmstart"})
    w.write(5, {"loss": -50.0})
    w.close()
    records = _lines(tmp_path / "metrics.jsonl")
    warm = [r["step"] for r in records if r.get("phase") == "warmstart"]
    rl = [(r["step"], r["loss"]) for r in records if "phase" not in r]
    assert warm == [1, 2, 3, 4, 5]
    assert rl == [(1, -1.0), (2, -2.0), (3, -3.0), (4, -4.0), (5, -50.0)]
    assert [r["step"] for r in _lines(tmp_path / "samples.jsonl")] == [1, 2, 3, 4]
    assert not list(tmp_path.glob("*.tmp"))


def test_truncate_after_without_kept_phases_drops_every_later_line(tmp_path):
    with M.MetricsWriter(tmp_path, total_steps=10, console=False, enable_tensorboard=False) as w:
        w.write(3, {"loss": 1.0}, phase="warmstart")
        w.write(2, {"loss": 2.0})
        w.truncate_after(2)
    assert _lines(tmp_path / "metrics.jsonl") == [{"step": 2, "loss": 2.0}]


def _tb_scalars(run_dir):
    """{tag: [(step, value)]} read from TFRecord event files (8-byte length, crc, data, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
            if event.HasField("session_log"):  # a restart: TensorBoard hides events >= step
                scalars.setdefault("<restart>", []).append(event.step)
    return scalars


def test_tensorboard_event_files_hold_scalars(tmp_path):
    with M.MetricsWriter(tmp_path, total_steps=4, console=False) as w:
        for step in (1, 2):
            w.write(step, {"reward/mean": 0.25 * step, "moe/expert_load": [0.5, 0.5]})
        w.write(1, {"eval/accuracy": 0.75}, phase="warmstart")
    rl = _tb_scalars(tmp_path / "tb" / "rl")
    assert rl == {"reward/mean": [(1, 0.25), (2, 0.5)]}
    assert _tb_scalars(tmp_path / "tb" / "warmstart") == {"eval/accuracy": [(1, 0.75)]}


def test_truncate_after_purges_redone_steps_in_tensorboard(tmp_path):
    with M.MetricsWriter(tmp_path, total_steps=4, console=False) as w:
        for step in (1, 2, 3):
            w.write(step, {"loss": float(step)})
            w.write(step, {"loss": float(step)}, phase="warmstart")
        w.truncate_after(1, keep_phases={"warmstart"})
        w.write(2, {"loss": 20.0})
    rl = _tb_scalars(tmp_path / "tb" / "rl")
    assert rl["<restart>"] == [2]
    assert rl["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (2, 20.0)]
    assert "<restart>" not in _tb_scalars(tmp_path / "tb" / "warmstart")


def test_non_tty_console_prints_compact_summary_every_n_steps(tmp_path):
    out = io.StringIO()
    with M.MetricsWriter(tmp_path, total_steps=5, summary_every=2, stream=out, enable_tensorboard=False) as w:
        w.log("hello")
        for step in range(1, 6):
            w.write(step, {"reward/mean": 0.1 * step, "loss/policy": 0.5, "clip_frac/seq": 0.0})
            if step == 3:
                w.write(step, {"eval/accuracy": 0.4})
        w.write(9, {"loss": 1.0}, phase="warmstart")
    lines = out.getvalue().splitlines()
    assert lines[0] == "hello"
    # The first step's line comes as soon as it ends, then every 2 steps and the last.
    assert [line.split(" |")[0] for line in lines[1:]] == ["step 1/5", "step 2/5", "step 4/5", "step 5/5"]
    assert "reward 0.1 | loss 0.5 | clip/seq 0" in lines[1] and "first step (includes compilation)" in lines[1]
    assert "acc 0.4" in lines[3] and "eta" in lines[3] and "eta" not in lines[4]
    assert "\r" not in out.getvalue()


def test_eta_excludes_the_first_steps_compilation(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(M.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    with M.MetricsWriter(tmp_path, total_steps=10, summary_every=1, stream=out, enable_tensorboard=False) as w:
        for step, ends_at in ((1, 100.0), (2, 101.0), (3, 102.0)):  # step 1 compiles for 100 s, then 1 s a step
            now[0] = ends_at
            w.write(step, {"loss": 1.0})
    lines = out.getvalue().splitlines()
    # After step 3: 2 s for 2 steps since step 1 ended, 7 steps left -> 7 s (100 s of compilation excluded).
    assert lines[2].startswith("step 3/10") and "eta 0:00:07" in lines[2], lines


def test_tty_console_uses_progress_bar_with_postfix(tmp_path):
    out = _TTY()
    with M.MetricsWriter(tmp_path, total_steps=4, stream=out, enable_tensorboard=False) as w:
        w.write(1, {"reward/mean": 0.5, "tokens_per_s": 12345.0})
        w.log("note")
        assert w._bar.n == 1
    text = out.getvalue()
    assert "reward 0.5" in text and "tok/s 12,345" in text and "note" in text
    assert "1/4" in text


def test_other_processes_write_nothing(tmp_path):
    out = io.StringIO()
    with M.MetricsWriter(tmp_path / "p1", total_steps=2, process_index=1, stream=out) as w:
        w.write(1, {"a": 1.0})
        w.write_samples(1, [{"x": 1}])
        w.log("x")
    assert not (tmp_path / "p1").exists() and out.getvalue() == ""


def test_expert_load_metrics_match_numpy():
    load_le = np.array([[10.0, 30.0, 20.0, 40.0], [25.0, 25.0, 25.0, 25.0], [0.0, 0.0, 0.0, 0.0]])
    got = M.expert_load_metrics(load_le)
    # Layer 0: mean 25, max 40, population std sqrt(125); layer 1 balanced; layer 2 empty.
    assert got["moe/load_max_over_mean"] == pytest.approx(40.0 / 25.0)
    assert got["moe/load_cv"] == pytest.approx((math.sqrt(125.0) / 25.0 + 0.0 + 0.0) / 3)
    shares = [
        (0.1 + 0.25 + 0.25) / 3,
        (0.3 + 0.25 + 0.25) / 3,
        (0.2 + 0.25 + 0.25) / 3,
        (0.4 + 0.25 + 0.25) / 3,
    ]
    assert got["moe/expert_load"] == pytest.approx(shares)
    with pytest.raises(ValueError, match=r"\[layers, experts\]"):
        M.expert_load_metrics(np.ones(4))
