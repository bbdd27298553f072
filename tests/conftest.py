"""Test-wide settings: eight simulated CPU devices, no hub access, fp32 matmuls, one XLA compilation
cache for the session."""

import os
import shutil
import tempfile

# Test programs are tiny: LLVM's optimisation passes (XLA:CPU's backend) cost more compile time than
# they save run time (tests/test_moe.py + tests/test_scan.py: 143 -> 90 s on 2 cores). CLI
# subprocesses started by the tests pass the same flag.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the CLI subprocesses they start, which inherit the environment) compile the same
# programs: the micro preset's phases, a run restarted after a kill. A cache keyed by the program
# compiles each once per session; the directory is this session's own, so nothing stale is read.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="gspo-jax-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_sessionfinish(session, exitstatus):
    # pytest-xdist workers inherit the directory (and _SESSION_CACHE None); the process that made it
    # removes it.
    if _SESSION_CACHE:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
