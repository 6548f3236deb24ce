"""Multi-process DDP on CPU (gloo): layers are sharded, metrics gathered, one output folder."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import HANG_S, REPO, SUBPROCESS_THREADS
from tests.tiny import save_tiny, tiny_llama

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=SUBPROCESS_THREADS)


def _fit(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunenet.fit", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=HANG_S)


def _fit_together(runs: dict[str, list[str]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """Several ``python -m prunenet.fit`` runs started at once (each DDP run mostly imports, one rank
    after the other, so two runs keep both cores busy); output goes to files in ``cwd``."""
    with contextlib.ExitStack() as stack:  # one port each, told apart while all are held
        sockets = [stack.enter_context(socket.socket()) for _ in runs]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        ports = [str(s.getsockname()[1]) for s in sockets]
    procs = {}
    for (name, args), port in zip(runs.items(), ports):
        with open(cwd / f"{name}.stdout", "w") as out, open(cwd / f"{name}.stderr", "w") as err:
            procs[name] = subprocess.Popen([sys.executable, "-m", "prunenet.fit", *args], cwd=cwd,
                                           env={**_env(), "MASTER_PORT": port}, stdout=out, stderr=err, text=True)
    try:
        for proc in procs.values():
            proc.wait(timeout=HANG_S)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {name: subprocess.CompletedProcess(proc.args, proc.returncode, (cwd / f"{name}.stdout").read_text(),
                                              (cwd / f"{name}.stderr").read_text()) for name, proc in procs.items()}


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="DDP on CPU needs 2 cores")
def test_ddp_two_processes_shard_layers_write_one_output_and_repeat_with_the_same_seed(tmp_path, extra_args):
    """Two DDP fits of the same seed at once (one launch instead of three: each mostly imports): each writes one
    output that reloads, logs every layer's KS, and both keep the same rows with the same policy."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny(tiny_llama(num_hidden_layers=5), tmp_path / "tiny", tokenizer=True)
    runs = {run: [f"--model.model_name_or_path={model_dir}", "--trainer.max_epochs=2", "--trainer.accelerator=cpu",
                  "--trainer.devices=2", "--trainer.strategy=ddp", f"--trainer.default_root_dir={tmp_path / run}",
                  f"--slicing.output_dir={tmp_path / run / 'out'}", "--seed_everything=7", *extra_args]
            for run in ("a", "b")}
    results = _fit_together(runs, tmp_path)
    kept = []
    for run in runs:
        proc = results[run]
        assert proc.returncode == 0, (run, proc.stderr[-3000:])
        # Exactly one output folder per run, and it reloads with plain transformers.
        outputs = list((tmp_path / run).rglob("prunenet.json"))
        assert outputs == [tmp_path / run / "out" / "prunenet.json"]
        plan = json.loads(outputs[0].read_text())
        assert plan["num_layers"] == 5 and plan["kept_width"] == 25
        model = AutoModelForCausalLM.from_pretrained(tmp_path / run / "out")
        assert model.config.intermediate_size == 25
        assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
        # Both ranks ran (two processes joined the process group) ...
        assert "MEMBER: 2/2" in proc.stderr + proc.stdout
        # ... and TensorBoard has the KS of every layer, not only rank 0's shard.
        events = list((tmp_path / run).rglob("events.out.tfevents.*"))
        assert len(events) == 1
        acc = EventAccumulator(str(events[0].parent))
        acc.Reload()
        assert {f"ks/layer_{i:02d}" for i in range(5)} <= set(acc.Tags()["scalars"])
        for i in range(5):
            values = [e.value for e in acc.Scalars(f"ks/layer_{i:02d}")]
            assert len(values) == 2 and all(0.0 < v <= 1.0 for v in values)
        kept.append(plan["kept_indices"])
        policy = torch.load(tmp_path / run / "out" / "policy.pt", weights_only=True)["state_dict"]
        kept.append({k: v.tolist() for k, v in policy.items()})
    assert kept[0] == kept[2]
    assert kept[1] == kept[3]
