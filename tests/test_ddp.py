"""Multi-process DDP on CPU (gloo): layers are sharded, metrics gathered, one output folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import HANG_S, REPO, SUBPROCESS_THREADS
from tests.tiny import save_tiny, tiny_llama

pytestmark = pytest.mark.slow


def _fit(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=SUBPROCESS_THREADS)
    return subprocess.run([sys.executable, "-m", "prunenet.fit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=HANG_S)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="DDP on CPU needs 2 cores")
def test_ddp_two_processes_shard_layers_and_write_one_output(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny(tiny_llama(num_hidden_layers=5), tmp_path / "tiny", tokenizer=True)
    args = [f"--model.model_name_or_path={model_dir}", "--trainer.max_epochs=2", "--trainer.accelerator=cpu",
            "--trainer.devices=2", "--trainer.strategy=ddp", f"--trainer.default_root_dir={tmp_path / 'runs'}",
            f"--slicing.output_dir={tmp_path / 'out'}"]
    if "--evaluation.enabled" in _fit(["--help"], tmp_path).stdout:
        args.append("--evaluation.enabled=false")
    proc = _fit(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Exactly one output folder, and it reloads with plain transformers.
    outputs = [p for p in tmp_path.rglob("prunenet.json")]
    assert outputs == [tmp_path / "out" / "prunenet.json"]
    plan = json.loads(outputs[0].read_text())
    assert plan["num_layers"] == 5 and plan["kept_width"] == 25
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.intermediate_size == 25
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()

    # Both ranks ran (two processes joined the process group) ...
    assert "MEMBER: 2/2" in proc.stderr + proc.stdout
    # ... and TensorBoard has the KS of every layer, not only rank 0's shard.
    events = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"ks/layer_{i:02d}" for i in range(5)} <= tags
    for i in range(5):
        values = [e.value for e in acc.Scalars(f"ks/layer_{i:02d}")]
        assert len(values) == 2 and all(0.0 < v <= 1.0 for v in values)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="DDP on CPU needs 2 cores")
def test_ddp_same_seed_same_policy(tmp_path):
    model_dir = save_tiny(tiny_llama(num_hidden_layers=4), tmp_path / "tiny")
    kept = []
    for run in ("a", "b"):
        args = [f"--model.model_name_or_path={model_dir}", "--trainer.max_epochs=2", "--trainer.accelerator=cpu",
                "--trainer.devices=2", "--trainer.strategy=ddp", f"--trainer.default_root_dir={tmp_path / run}",
                f"--slicing.output_dir={tmp_path / run / 'out'}", "--spectrum.enabled=false", "--seed_everything=7"]
        if "--evaluation.enabled" in _fit(["--help"], tmp_path).stdout:
            args.append("--evaluation.enabled=false")
        proc = _fit(args, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        kept.append(json.loads((tmp_path / run / "out" / "prunenet.json").read_text())["kept_indices"])
        policy = torch.load(tmp_path / run / "out" / "policy.pt", weights_only=True)["state_dict"]
        kept.append({k: v.tolist() for k, v in policy.items()})
    assert kept[0] == kept[2]
    assert kept[1] == kept[3]
