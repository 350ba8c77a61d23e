"""Test set-up: fake CPU devices, one compilation cache, slow tests first.

- 8 fake CPU devices, set before JAX first touches a device.
- One persistent XLA compilation cache serves the whole session: both
  pytest-xdist workers and every subprocess a test starts (they inherit the
  environment). Tests rebuild the same tiny models and steps many times
  over; an executable whose HLO was compiled once is read back instead of
  compiled again. The cache lives in a fresh temporary folder, made by the
  first process of the session and removed by it at the end, so a run never
  reads what an earlier run compiled.
- Under `-n`, tests marked `slow` start first and idle workers steal queued
  tests from busy ones (xdist's work stealing instead of its default
  `load`), so that no worker is left alone with a slow test at the end.
"""

import os
import shutil
import tempfile

from xdist.scheduler import WorkStealingScheduling

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# Made here, in the first process; xdist workers inherit the variable.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fdistill-tests-xla-")
# Tiny test programs compile in well under JAX's default 1 s threshold.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: slow first


def pytest_xdist_make_scheduler(config, log):
  if config.getvalue("dist") == "load":  # -n's default; an explicit other --dist is kept
    return WorkStealingScheduling(config, log)
  return None


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
