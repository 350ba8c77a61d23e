"""Test set-up: fake CPU devices, one compilation cache, slow tests first.

- 8 fake CPU devices, set before JAX first touches a device.
- One persistent XLA compilation cache serves the whole session: both
  pytest-xdist workers and every subprocess a test starts (they inherit the
  environment). Tests rebuild the same tiny models and steps many times
  over; an executable whose HLO was compiled once is read back instead of
  compiled again. The cache lives in a fresh temporary folder, made by the
  first process of the session and removed by it at the end, so a run never
  reads what an earlier run compiled.
- JAX's own `jax_disable_most_optimizations` (XLA backend optimisation
  level 0, no expensive LLVM passes) for the session and its subprocesses.
  The suite is compile-bound, not compute-bound: one golden case spends 72
  of its 117 s compiling 16 programs, and level 0 cut the CPU time of
  golden cases and of test_divergences + test_fused_head to 0.6-0.67x
  (measured 2026-12-01). It changes codegen, not the HLO the tests check:
  results move by float rounding only (golden parameters by <= 1.6e-6
  against the fixture's 1e-5, but engine/unfused by 5e-5, so
  tests/test_golden.py compiles at the default level the fixture was
  recorded with). Benchmarks and user runs keep the default; set
  JAX_DISABLE_MOST_OPTIMIZATIONS=0 to test everything with full optimisation.
- XLA's legacy CPU fusion emitters (`--xla_cpu_use_fusion_emitters=false`
  in XLA_FLAGS) for the session and its subprocesses: they compile the same
  programs faster than the new MLIR emitters (CPU time of test_fused_head
  55 -> 29 s back to back on one core with a cold cache; test_models and
  test_train 117 and 137 s against 167 and 216 s in an earlier serial run;
  measured 2026-12-01); the computed values move by float rounding only.
  tests/test_golden.py runs its cases without either setting.
- Under `-n`, tests marked `slow` start first and idle workers steal queued
  tests from busy ones (xdist's work stealing instead of its default
  `load`), so that no worker is left alone with a slow test at the end.
"""

import os
import shutil
import tempfile

import pytest
from xdist.scheduler import WorkStealingScheduling

SUITE_COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false"  # compile-bound suite: see above
os.environ.setdefault(
  "XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {SUITE_COMPILE_FLAGS}"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # compile-bound suite: see above

# Made here, in the first process; xdist workers inherit the variable.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fdistill-tests-xla-")
# Tiny test programs compile in well under JAX's default 1 s threshold.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (after the environment above, which JAX reads as it loads)


@pytest.fixture(autouse=True)
def _session_cache_threshold():
  """The persistent cache's threshold restored after each test: `pipeline.run`
  raises it to 0.5 s (its job's setting), which would leave the rest of the
  session's tiny programs uncached."""
  before = jax.config.jax_persistent_cache_min_compile_time_secs
  yield
  jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: slow first


@pytest.hookimpl(optionalhook=True)  # xdist's hook: `-p no:xdist` runs must not reject it
def pytest_xdist_make_scheduler(config, log):
  if config.getvalue("dist") == "load":  # -n's default; an explicit other --dist is kept
    return WorkStealingScheduling(config, log)
  return None


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
