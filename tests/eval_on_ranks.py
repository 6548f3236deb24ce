"""``python tests/eval_on_ranks.py <prunenet.evaluate args>``: prunenet.evaluate, with a failure injected
on the rank named by ``PRUNENET_TEST_FAIL_RANK`` (its first lm-eval forward raises); used by
tests/test_eval_sharding.py under a multi-process launch."""

from __future__ import annotations

import os
import sys

from prunenet.cli import run_main
from prunenet.evaluate import main

if os.environ.get("RANK") == os.environ.get("PRUNENET_TEST_FAIL_RANK"):
    from prunenet.evaluation.lm import RankedHFLM

    def _fail(self, requests, disable_tqdm=False):
        raise RuntimeError("injected failure in the forward pass")

    RankedHFLM.loglikelihood = _fail

if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
