"""Tests for gspo_jax.checkpoint: round trips, keep-N/best, resume modes, corruption."""

import json
import logging
import shutil
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gspo_jax import checkpoint as C

# Reading a corrupt checkpoint makes Orbax drop its pending read coroutines, which Python reports
# as unraisable exceptions at garbage collection (possibly during a later test).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CONFIG = {"model": "tiny", "lr": 1e-4, "dims": (2, 3)}


def _dataset():
    return grain.MapDataset.range(100).shuffle(seed=0).to_iter_dataset()


def _iterator(advance=0):
    it = iter(_dataset())
    for _ in range(advance):
        next(it)
    return it


def _state(seed=0, w_shape=(64, 64)):
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        "w": jax.random.normal(k1, w_shape, jnp.float32),
        "b": jax.random.normal(k2, (4,), jnp.float32).astype(jnp.bfloat16),
    }
    opt_state = optax.adam(1e-3).init(params)
    # Make the Adam moments non-trivial so a mix-up of mu/nu would show.
    opt_state = jax.tree.map(lambda x: x + 0.5 if x.dtype != jnp.int32 else x + 3, opt_state)
    return {
        "params": params,
        "opt": opt_state,
        "step": jnp.int32(7 + seed),
        "rng": jax.random.key(100 + seed),
    }


def _bits(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x))
    return np.atleast_1d(np.asarray(x)).view(np.uint8)


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(_bits(x), _bits(y))


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _save(ckpt, step, seed=None, it=None, **kw):
    state = _state(step if seed is None else seed)
    ckpt.save(
        step, state, it if it is not None else _iterator(step), CONFIG, {"step": step, "phase": "rl"}, **kw
    )
    return state


def _step_dirs(workdir):
    root = workdir / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _corrupt(step_dir, how):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    if how == "garbage":
        middle = len(data) // 2
        data[middle : middle + 32] = bytes(range(200, 232))
        target.write_bytes(bytes(data))
    elif how == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:
        target.unlink()


def _tree_files(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ----- round trips -----------------------------------------------------------------------------
def test_round_trip_state_iterator_meta_is_bitwise(tmp_path):
    reference = [int(x) for x in _iterator()][:20]
    it = _iterator(7)
    state_calls = []
    get_state = it.get_state
    # Async saves run on a thread; the position must be read inside save(), on this thread.
    it.get_state = lambda: state_calls.append(threading.current_thread()) or get_state()
    with C.Checkpointer(tmp_path) as ckpt:
        saved = _state(0)
        assert ckpt.save(7, saved, it, CONFIG, {"step": 7, "phase": "rl", "acc": np.float32(0.5)})
        for _ in range(5):  # advancing right after save() must not change what is saved
            next(it)
        ckpt.wait()
    assert state_calls == [threading.main_thread()]
    fresh = _iterator(0)
    with C.Checkpointer(tmp_path) as ckpt:
        state, meta, step = ckpt.restore(_abstract(_state(9)), fresh)
    assert step == 7 and meta == {"step": 7, "phase": "rl", "acc": 0.5}
    _assert_bitwise_equal(state, saved)
    assert isinstance(state["opt"][0], optax.ScaleByAdamState)
    assert str(jax.random.key_impl(state["rng"])) == str(jax.random.key_impl(saved["rng"]))
    assert [int(next(fresh)) for _ in range(5)] == reference[7:12]
    config = json.loads((tmp_path / "checkpoints" / "7" / "config" / "metadata").read_text())
    assert config == {"model": "tiny", "lr": 1e-4, "dims": [2, 3]}


def test_restore_into_target_shardings_and_concrete_target(tmp_path):
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    w = jnp.arange(64.0, dtype=jnp.float32).reshape(8, 8)
    keys = jax.random.split(jax.random.key(3), 8)
    saved = {"w": put(w, P("data", "model")), "keys": put(keys, P("data"))}
    with C.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, saved, None, CONFIG, {})
        ckpt.wait()
        other = {"w": NamedSharding(mesh, P("model", "data")), "keys": NamedSharding(mesh, P())}
        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=other[k]) for k, v in saved.items()}
        state, _, _ = ckpt.restore(target, None)
        assert state["w"].sharding == other["w"] and state["keys"].sharding.is_fully_replicated
        _assert_bitwise_equal(state, {"w": w, "keys": keys})
        concrete, _, _ = ckpt.restore({"w": jnp.zeros((8, 8)), "keys": keys}, None)
        _assert_bitwise_equal(concrete, {"w": w, "keys": keys})


# ----- save policy ---------------------------------------------------------------------------
def test_keep_n(tmp_path):
    with C.Checkpointer(tmp_path, keep=2, async_save=False) as ckpt:
        written = [ckpt.save(s, _state(s), _iterator(s), CONFIG, {}) for s in (2, 4, 6)]
        assert written == [True, True, True] and ckpt.all_steps() == [4, 6]
        assert not ckpt.save(6, _state(6), _iterator(6), CONFIG, {})  # saved already
        assert ckpt.save(7, _state(7), _iterator(7), CONFIG, {})
        assert ckpt.all_steps() == [6, 7]
    assert _step_dirs(tmp_path) == ["6", "7"]


def test_keep_best_by_metric_keeps_best_and_latest(tmp_path):
    accuracy = {1: 0.5, 2: 0.9, 3: None, 4: 0.1, 5: 0.3}
    with C.Checkpointer(tmp_path, keep=1, keep_best_by="eval/accuracy", async_save=False) as ckpt:
        for step, acc in accuracy.items():
            metrics = {} if acc is None else {"eval/accuracy": jnp.float32(acc)}
            _save(ckpt, step, metrics=metrics)
        assert ckpt.all_steps() == [2, 5] and ckpt.best_step() == 2
    assert _step_dirs(tmp_path) == ["2", "5"]
    with C.Checkpointer(
        tmp_path, keep=1, keep_best_by="eval/accuracy", best_mode="min", async_save=False
    ) as ckpt:
        assert ckpt.best_step() == 5


def test_async_save_is_complete_after_wait(tmp_path):
    with C.Checkpointer(tmp_path, async_save=True) as ckpt:
        _save(ckpt, 1)
        ckpt.wait()
        assert _step_dirs(tmp_path) == ["1"]
        assert (tmp_path / "checkpoints" / "1" / "commit_success.txt").exists()
        assert ckpt.all_steps() == [1]


def test_saving_older_step_than_latest_is_refused(tmp_path):
    with C.Checkpointer(tmp_path, async_save=False) as ckpt:
        _save(ckpt, 5)
        assert not ckpt.save(5, _state(5), None, CONFIG, {})
        with pytest.raises(ValueError, match="increasing step order"):
            _save(ckpt, 3)


# ----- resume modes --------------------------------------------------------------------------
def test_resume_auto_without_checkpoints_and_never(tmp_path):
    with C.Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore(_abstract(_state()), _iterator()) is None
        _save(ckpt, 3)
        ckpt.wait()
        assert ckpt.restore(_abstract(_state()), _iterator(), resume="never") is None
        replaced = [p for p in tmp_path.iterdir() if p.name.startswith("checkpoints.replaced-")]
        assert len(replaced) == 1 and (replaced[0] / "3" / "commit_success.txt").exists()
        _save(ckpt, 1)
        ckpt.wait()
        assert ckpt.all_steps() == [1]


def test_resume_from_explicit_step_dir_or_workdir(tmp_path, caplog):
    source, run = tmp_path / "source", tmp_path / "run"
    with C.Checkpointer(source, async_save=False) as ckpt:
        saved = {s: _save(ckpt, s) for s in (3, 6)}
        with pytest.raises(ValueError, match="newer steps"):
            ckpt.restore(_abstract(_state()), None, resume=str(source / "checkpoints" / "3"))
    with C.Checkpointer(run) as ckpt:
        it = _iterator()
        state, _, step = ckpt.restore(_abstract(_state()), it, resume=str(source / "checkpoints" / "3"))
        assert step == 3 and int(next(it)) == [int(x) for x in _iterator()][3]
        _assert_bitwise_equal(state, saved[3])
        state, _, step = ckpt.restore(_abstract(_state()), None, resume=str(source))
        assert step == 6
        _assert_bitwise_equal(state, saved[6])
        _save(ckpt, 8)
        ckpt.wait()
        with caplog.at_level(logging.WARNING, logger="gspo_jax.checkpoint"):
            _, _, step = ckpt.restore(_abstract(_state()), None, resume=str(source))
        assert step == 8 and "ignored" in caplog.text
        with pytest.raises(ValueError, match="does not exist"):
            ckpt.restore(_abstract(_state()), None, resume=str(tmp_path / "nowhere"))


# ----- corruption and partial saves ----------------------------------------------------------
@pytest.mark.parametrize("how", ["garbage", "truncate", "delete"])
def test_corrupt_latest_falls_back_and_keeps_everything(tmp_path, caplog, how):
    with C.Checkpointer(tmp_path, keep=2, async_save=False) as ckpt:
        saved = {s: _save(ckpt, s) for s in (1, 2, 3)}
    assert _step_dirs(tmp_path) == ["2", "3"]
    _corrupt(tmp_path / "checkpoints" / "3", how)
    before = _tree_files(tmp_path)
    with C.Checkpointer(tmp_path, keep=2, async_save=False) as ckpt:
        with caplog.at_level(logging.WARNING, logger="gspo_jax.checkpoint"):
            state, meta, step = ckpt.restore(_abstract(_state()), _iterator())
        assert step == 2 and meta["step"] == 2
        _assert_bitwise_equal(state, saved[2])
        assert "step 3" in caplog.text and "falling back" in caplog.text
        assert _tree_files(tmp_path) == before
        assert ckpt.all_steps() == [2]


def test_corrupt_steps_never_push_good_ones_out(tmp_path, caplog):
    with C.Checkpointer(tmp_path, keep=2, async_save=False) as ckpt:
        saved = {s: _save(ckpt, s) for s in (1, 2, 3)}
    for s in ("2", "3"):  # keep=2 left 2 and 3; both go bad
        _corrupt(tmp_path / "checkpoints" / s, "garbage")
    shutil.copytree(tmp_path / "checkpoints" / "3", tmp_path / "spare")
    with C.Checkpointer(tmp_path, keep=2, async_save=False) as ckpt:
        with pytest.raises(C.CheckpointCorruptError, match="step 3.*\n.*step 2"):
            ckpt.restore(_abstract(_state()), None)
    assert _step_dirs(tmp_path) == ["2", "3"]
    # Put a good step 1 back (as if older than keep); restore falls back to it.
    with C.Checkpointer(tmp_path / "again", keep=2, async_save=False) as other:
        _save(other, 1)
    shutil.copytree(tmp_path / "again" / "checkpoints" / "1", tmp_path / "checkpoints" / "1")
    with C.Checkpointer(tmp_path, keep=2, async_save=False) as ckpt:
        state, _, step = ckpt.restore(_abstract(_state()), None)
        assert step == 1
        _assert_bitwise_equal(state, saved[1])
        _save(ckpt, 2)  # would delete step 1 if the corrupt step 3 still counted for keep=2
        assert ckpt.all_steps() == [1, 2]
        names = _step_dirs(tmp_path)
        assert "1" in names and "3" in names and any(n.startswith("2.corrupt-") for n in names)
        _save(ckpt, 3)
        names = _step_dirs(tmp_path)
        assert ckpt.all_steps() == [2, 3] and "1" not in names
        assert sum(n.startswith("3.corrupt-") for n in names) == 1
    assert _tree_files(tmp_path / "spare") == _tree_files(
        tmp_path / "checkpoints" / next(n for n in names if n.startswith("3.corrupt-"))
    )


def test_uncommitted_dirs_are_ignored(tmp_path, caplog):
    with C.Checkpointer(tmp_path, async_save=False) as ckpt:
        saved = _save(ckpt, 1)
    root = tmp_path / "checkpoints"
    shutil.copytree(root / "1", root / "2.orbax-checkpoint-tmp")
    shutil.copytree(root / "1", root / "3")
    (root / "3" / "commit_success.txt").unlink()
    meta_file = root / "3" / "_CHECKPOINT_METADATA"
    meta = json.loads(meta_file.read_text())
    meta["commit_timestamp_nsecs"] = None
    meta_file.write_text(json.dumps(meta))
    with C.Checkpointer(tmp_path, async_save=False) as ckpt:
        assert ckpt.all_steps() == [1]
        with caplog.at_level(logging.WARNING, logger="gspo_jax.checkpoint"):
            state, _, step = ckpt.restore(_abstract(_state()), None)
        assert step == 1
        _assert_bitwise_equal(state, saved)
        assert "2.orbax-checkpoint-tmp, 3" in caplog.text
        _save(ckpt, 3)
        assert ckpt.all_steps() == [1, 3]
    assert any(n.startswith("3.uncommitted-") for n in _step_dirs(tmp_path))


def test_shape_mismatch_names_paths_and_deletes_nothing(tmp_path):
    with C.Checkpointer(tmp_path, async_save=False) as ckpt:
        _save(ckpt, 1)
        _save(ckpt, 2)
    before = _tree_files(tmp_path)
    target = _abstract(_state(w_shape=(65, 64)))
    target["params"]["extra"] = jax.ShapeDtypeStruct((2,), jnp.float32)
    with C.Checkpointer(tmp_path, async_save=False) as ckpt:
        with pytest.raises(C.CheckpointMismatchError) as info:
            ckpt.restore(target, _iterator())
    message = str(info.value)
    assert "step 2" in message and "step 1" not in message
    assert "params/w: checkpoint (64, 64) vs target (65, 64)" in message
    assert "opt/0/mu/w: checkpoint (64, 64) vs target (65, 64)" in message
    assert "params/extra: missing in the checkpoint" in message
    assert "resume=never" in message and "new workdir" in message
    assert _tree_files(tmp_path) == before


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
    # Bug: Orbax refuses relative paths ("Checkpoint path should be absolute"); the default
    # workdir of the CLI is relative (runs/qwen_moe_tiny).
    monkeypatch.chdir(tmp_path)
    with C.Checkpointer("runs/rel") as ckpt:
        assert ckpt.save(1, _state(0), None, CONFIG, {"step": 1})
        ckpt.wait()
    with C.Checkpointer("runs/rel") as ckpt:
        _, _, step = ckpt.restore(_abstract(_state(0)), None)
    assert step == 1 and (tmp_path / "runs" / "rel" / "checkpoints" / "1").is_dir()
