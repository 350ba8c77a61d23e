"""`python tests/hold_workdir_lock.py DIR`: holds DIR's workdir lock, prints "held", sleeps.

The other process that tests a refused start (tests/test_runguard.py,
tests/test_distributed.py); the test kills it when done. Needs the repository
on PYTHONPATH.
"""

import sys
import time

from fdistill_jax import runguard

with runguard.workdir_lock(sys.argv[1]):
  print("held", flush=True)
  time.sleep(600)
