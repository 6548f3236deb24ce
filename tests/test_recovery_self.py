"""Data-free recovery (``--data.source=self``) and the distillation loss (``--model.loss=kl``): the KL against
``torch.nn.functional.kl_div``, the teacher kept out of every state, a run that lowers the KL and exports a plain
checkpoint, deterministic self-generated blocks, ``auto`` resolution, resume, and one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from prunenet.artifacts import PLAN_FILE
from tests.conftest import private_cache
from tests.test_recover import _recover
from tests.tiny import save_tiny, tiny_llama

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own empty cache: the self-generated text is cached by model identity and settings."""
    monkeypatch.setenv("PRUNENET_CACHE", str(private_cache(tmp_path / "cache")))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny LLaMA whose FFNs matter (weights of std 0.3: 30% of the neurons removed move its next-token
    distribution by a KL of about 0.5 nats; at the default std 0.02 by 1e-6, too little to recover) and a
    pruned copy of it (its prunenet.json names the dense folder as its source)."""
    from prunenet.compress import compress

    root = tmp_path_factory.mktemp("recover-self")
    dense = save_tiny(tiny_llama(seed=0, initializer_range=0.3), root / "dense", tokenizer=True)
    compress(str(dense), str(root / "pruned"), 0.3, selection="random")
    return {"dense": dense, "pruned": root / "pruned"}


def _args(model, root, *more, steps: int = 6) -> list[str]:
    return [f"--model.model_name_or_path={model}", "--data.source=self", "--data.block_size=16",
            "--data.self_samples=16", "--data.val_fraction=0.25", f"--trainer.max_steps={steps}",
            f"--trainer.default_root_dir={root / 'logs'}", f"--export.output_dir={root / 'out'}",
            "--evaluation.enabled=false", "--trainer.enable_progress_bar=false", "--trainer.val_check_interval=2",
            "--trainer.log_every_n_steps=1", "--model.learning_rate=0.01", "--model.lr_scheduler=constant", *more]


def _tolerance(vocab: int, logits: torch.Tensor) -> float:
    """Float32 bound on the KL of two logit rows that give the same distribution: each log-probability
    x_v - max - log sum exp(x - max) carries the sum's rounding (V terms summed: relative V eps, so V eps after
    the log) plus the subtractions' (eps per |logit|, twice); the KL is a p-weighted mean of those errors."""
    return EPS32 * (vocab + 2 * float(logits.abs().max()) + 2)


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("vocab,chunk", [(101, 2 ** 24), (1000, 3 * 1000)])  # one chunk a block; 3 positions each
def test_kl_is_zero_for_one_distribution_and_matches_kl_div(vocab, chunk):
    from prunenet.recovery.distill import distill_losses

    g = torch.Generator().manual_seed(0)
    teacher = 4 * torch.randn(2, 9, vocab, generator=g)
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    # the same distribution: identical logits (exactly 0), and logits shifted per position (0 up to rounding)
    assert float(distill_losses(teacher.clone(), teacher, ids, chunk)[0]) == 0.0
    shifted = teacher + 50 * torch.randn(2, 9, 1, generator=g)
    kl_same = float(distill_losses(shifted, teacher, ids, chunk)[0])
    assert abs(kl_same) <= _tolerance(vocab, shifted), kl_same

    student = (teacher + 2 * torch.randn(2, 9, vocab, generator=g)).requires_grad_(True)
    kl, ce = distill_losses(student, teacher, ids, chunk)
    # reference: float64, all L - 1 predicted positions of both blocks at once
    s64 = student.detach().double()[:, :-1].reshape(-1, vocab).requires_grad_(True)
    t64 = teacher.double()[:, :-1].reshape(-1, vocab)
    ref = F.kl_div(F.log_softmax(s64, -1), F.log_softmax(t64, -1), log_target=True, reduction="batchmean")
    tol = _tolerance(vocab, student)
    assert float(kl) > 0.1 and kl.dtype == torch.float32
    assert abs(float(kl) - float(ref)) <= tol * max(1.0, float(ref)), (float(kl), float(ref))
    ref_ce = F.cross_entropy(s64, ids[:, 1:].reshape(-1))
    assert abs(float(ce) - float(ref_ce)) <= tol * float(ref_ce)
    # the gradient, through the chunks recomputed in backward
    kl.backward()
    ref.backward()
    expected = torch.zeros_like(student, dtype=torch.float64)
    expected[:, :-1] = s64.grad.view(2, 8, vocab)
    torch.testing.assert_close(student.grad.double(), expected, rtol=0, atol=tol)


def test_the_teacher_is_outside_every_state_of_the_module(models):
    """A dense input is its own teacher: KL 0 before any update (LoRA's B starts at 0); the pruned input's
    teacher is the dense model: KL > 0. The teacher is in no state dict, parameter list or module tree."""
    from prunenet.recovery import RecoveryModule

    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    own = RecoveryModule(str(models["dense"]), loss="kl")
    own.configure_model()
    terms = own.losses(ids)
    assert set(terms) == {"loss", "kl"} and float(terms["kl"]) <= _tolerance(101, own.teacher().logits(ids))
    assert float(terms["loss"]) == pytest.approx(float(own(ids)), rel=1e-6)  # the same next-token loss as forward

    module = RecoveryModule(str(models["pruned"]), loss="kl")
    module.configure_model()
    assert float(module.losses(ids)["kl"]) > 0.1
    teacher = module.teacher().model
    assert module.teacher() is module.teacher() and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert next(teacher.parameters()).dtype == next(module.model.parameters()).dtype == torch.float32
    assert teacher.config.intermediate_size == 37 and module.model.config.intermediate_size < 37
    mine = {id(p) for p in module.parameters()}
    assert mine and not mine & {id(p) for p in teacher.parameters()}
    assert not any(m is teacher for m in module.modules())
    assert len(module.state_dict()) == len(module.model.state_dict())  # the student only


def test_auto_is_kl_for_self_text_and_next_token_for_a_corpus(models):
    from prunenet.errors import ConfigurationError
    from prunenet.recovery import RecoveryModule
    from prunenet.recovery.distill import resolve_loss

    assert resolve_loss("auto", "self") == "kl" and resolve_loss("auto", "wiki") == "next_token"
    assert resolve_loss("next_token", "self") == "next_token" and resolve_loss("kl", "wiki") == "kl"
    for source, expected in (("self", "kl"), ("wiki", "next_token"), ("notes.txt", "next_token")):
        module = RecoveryModule(str(models["pruned"]))
        assert module.hparams.loss == "auto"
        assert module.resolve_loss(source) == expected == module.hparams.loss == module.hparams_initial.loss
        assert module.run_settings()["loss"] == expected  # what a resume compares
    with pytest.raises(ConfigurationError, match=r"^model\.loss must be one of next_token, kl, auto, got 'foo'$"):
        RecoveryModule(str(models["pruned"]), loss="foo")


# ----------------------------------------------------------------------------- the self-generated blocks


def _blocks(models, tmp_path, monkeypatch, cache: str, seed: int, loads: list | None = None):
    from prunenet import loading
    from prunenet.recovery import RecoveryDataModule

    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / cache))
    data = RecoveryDataModule(source="self", block_size=16, batch_size=4, self_samples=8, val_fraction=0.25, seed=seed)

    def load():
        if loads is not None:
            loads.append(1)
        return loading.load_model(str(models["dense"]))

    record = data.prepare(loading.load_tokenizer(str(models["pruned"])), str(models["dense"]), load)
    return data, record


def test_self_blocks_are_deterministic_for_a_seed_and_cached(models, tmp_path, monkeypatch):
    loads: list[int] = []
    a, record = _blocks(models, tmp_path, monkeypatch, "cache-a", 0, loads)
    b, _ = _blocks(models, tmp_path, monkeypatch, "cache-b", 0)  # generated again, in another cache
    other, other_record = _blocks(models, tmp_path, monkeypatch, "cache-b", 1)
    assert a.train_blocks.shape == (6, 16) and a.val_blocks.shape == (2, 16) and a.train_blocks.dtype == torch.long
    assert bool((a.train_blocks[:, 0] == 1).all())  # every block starts with the BOS token
    assert torch.equal(a.train_blocks, b.train_blocks) and torch.equal(a.val_blocks, b.val_blocks)
    assert not torch.equal(a.train_blocks, other.train_blocks) and record["sha256"] != other_record["sha256"]
    assert record["kind"] == "self-generated" and record["source_model"] == str(models["dense"])
    assert (record["samples"], record["length"], record["seed"], record["blocks_train"], record["blocks_val"]) == (
        8, 16, 0, 6, 2)
    assert a.resume_settings()["sha256"] == record["sha256"]
    # the same settings again: read from the cache, the dense model is not loaded
    c, _ = _blocks(models, tmp_path, monkeypatch, "cache-a", 0, loads)
    assert loads == [1] and torch.equal(c.train_blocks, a.train_blocks)
    # blocks reused across epochs: a loader serves this rank's 6 blocks an epoch, whatever max_steps is
    assert sum(len(batch) for (batch,) in a.train_dataloader()) == 6


def test_the_text_of_a_self_calibrated_compress_is_reused(models, tmp_path, monkeypatch):
    """``prunenet.compress --calibration self`` and ``--data.source=self`` with the same settings (N x L, seed):
    one text, generated once (the recovery's dense model, named by the plan, is then never loaded)."""
    from prunenet.calibration import CalibrationSettings
    from prunenet.compress import compress

    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "shared"))
    compress(str(models["dense"]), str(tmp_path / "recon"), 0.3, selection="recon",
             calibration=CalibrationSettings(samples=8, length=16))
    plan = json.loads((tmp_path / "recon" / PLAN_FILE).read_text())
    assert plan["source_model"] == str(models["dense"]) and plan["calibration"]["kind"] == "self-generated"
    loads: list[int] = []
    _blocks(models, tmp_path, monkeypatch, "shared", 0, loads)
    assert loads == []


def test_self_without_a_training_block_is_refused(models, tmp_path, monkeypatch):
    from prunenet import loading
    from prunenet.recovery import RecoveryDataModule
    from prunenet.recovery.corpus import DataError

    data = RecoveryDataModule(source="self", block_size=16, self_samples=1, val_fraction=0.01)
    with pytest.raises(DataError, match=r"data\.self_samples=1 leaves no training block after the 1 held out"):
        data.prepare(loading.load_tokenizer(str(models["pruned"])), str(models["dense"]), lambda: 1 / 0)  # no load
    with pytest.raises(DataError, match="needs the dense model"):
        RecoveryDataModule(source="self", block_size=16).prepare(loading.load_tokenizer(str(models["pruned"])))


# ----------------------------------------------------------------------------- the entry point


def test_self_recovery_lowers_the_kl_and_exports_a_plain_checkpoint(models, tmp_path, monkeypatch, plain_load):
    from safetensors.torch import load_file

    from prunenet import loading
    from prunenet.recovery.distill import distill_losses

    cli = _recover(_args(models["pruned"], tmp_path), monkeypatch)
    assert cli.model.hparams.loss == "kl" and cli.model._teacher is None  # released after training
    assert {"train/kl", "train/loss", "val/kl", "val/loss"} <= set(cli.trainer.callback_metrics)

    # the KL from the dense model on the blocks trained on: lower after 6 LoRA steps than before
    blocks = cli.datamodule.train_blocks
    dense, pruned = loading.load_model(str(models["dense"])), loading.load_model(str(models["pruned"]))
    recovered, info, _ = plain_load(tmp_path / "out")
    assert not any(info.values())  # no missing, unexpected or mismatched weights
    with torch.no_grad():
        teacher = dense(blocks).logits
        before, after = (float(distill_losses(m(blocks).logits, teacher, blocks)[0]) for m in (pruned, recovered))
    assert after < 0.9 * before, (before, after)

    # no teacher weights anywhere: the export has the pruned model's tensors, the checkpoint the adapters only
    saved, source = load_file(tmp_path / "out" / "model.safetensors"), load_file(models["pruned"] / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in source.items()}
    ckpt = torch.load(next((tmp_path / "logs").rglob("last.ckpt")), weights_only=False)
    assert ckpt["state_dict"] and all(".lora_A." in n or ".lora_B." in n for n in ckpt["state_dict"])
    moments = sum(state["exp_avg"].numel() for state in ckpt["optimizer_states"][0]["state"].values())
    assert moments == cli.model.num_trained and ckpt["hyper_parameters"]["loss"] == "kl"

    rec = json.loads((tmp_path / "out" / PLAN_FILE).read_text())["recovery"]
    assert rec["hyperparameters"]["loss"] == "kl" and rec["data"]["kind"] == "self-generated"
    assert rec["data"]["source_model"] == str(models["dense"]) and rec["data"]["blocks_train"] == 12
    assert rec["tokens"] == 6 * 4 * 16 and "val/kl" in rec["final_metrics"]


def test_resume_with_another_loss_is_refused(models, tmp_path, monkeypatch):
    from prunenet.errors import ConfigurationError

    _recover(_args(models["pruned"], tmp_path, steps=1), monkeypatch)
    with pytest.raises(ConfigurationError, match=r"loss='kl' \(this run: 'next_token'\)"):
        _recover(_args(models["pruned"], tmp_path, "--ckpt_path=last", "--model.loss=next_token",
                       "--export.overwrite=true", steps=2), monkeypatch)


@pytest.mark.parametrize("flag,model,needles", [
    ("--model.loss=foo", "pruned", ["model.loss must be one of next_token, kl, auto, got 'foo'"]),
    ("--data.self_samples=0", "pruned", ["data.self_samples must be an integer >= 1, got 0"]),
    ("--data.block_size=1", "pruned", ["data.block_size must be an integer >= 2, got 1"]),
    ("--model.loss=kl", "dense", ["model.loss=kl needs the dense model as the teacher", "prunenet.json",
                                  "--model.loss=next_token"]),
])
def test_bad_values_are_one_line_errors_before_any_work(flag, model, needles, models, tmp_path, monkeypatch, capsys):
    from prunenet.cli import run_main

    args = _args(models[model], tmp_path, flag)
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: _recover(args, monkeypatch))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and lines[-1].startswith("error:") and sum(
        line.startswith("error:") for line in lines) == 1, lines
    assert all(needle in lines[-1] for needle in needles), lines[-1]
    assert not (tmp_path / "logs").exists() and not (tmp_path / "out").exists()
    assert not list((tmp_path / "cache").glob("calibration/*"))  # no text generated either
