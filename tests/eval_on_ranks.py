"""``python tests/eval_on_ranks.py <prunenet.evaluate args>``: prunenet.evaluate, with a failure injected
on the rank named by ``PRUNENET_TEST_FAIL_RANK``: its first lm-eval forward raises, or with
``PRUNENET_TEST_FAIL_HOW=kill`` the process is killed there; used by tests/test_eval_sharding.py
under a multi-process launch."""

from __future__ import annotations

import os
import signal
import sys

from prunenet.evaluate import command

if os.environ.get("RANK") == os.environ.get("PRUNENET_TEST_FAIL_RANK"):
    from prunenet.evaluation.lm import RankedHFLM

    def _fail(self, requests, disable_tqdm=False):
        if os.environ.get("PRUNENET_TEST_FAIL_HOW") == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("injected failure in the forward pass")

    RankedHFLM.loglikelihood = _fail

if __name__ == "__main__":
    command(sys.argv[1:])  # prunenet.evaluate's own entry point
