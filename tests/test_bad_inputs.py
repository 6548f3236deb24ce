"""Reliability II (issue 12): symlinked and read-only outputs, plans replayed on the wrong model,
mixed widths, mistyped paths, near-duplicate ratios, stale results after a second fit, a dtype-
independent FFN fingerprint, and resumes that must match the run they continue.

Every refused command is a one-line ``error:`` with exit code 2, before any work, with nothing
written and nothing lost. The CLI cases run as real processes, launched together.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from prunenet.artifacts import PLAN_FILE, POLICY_FILE
from prunenet.compress import compress, replay
from prunenet.errors import ConfigurationError, PruneNetWarning
from prunenet.plan import ffn_fingerprint
from prunenet.slicing import slice_model
from tests.conftest import REPO, fit_in_process, one_line_error, run_fit_many
from tests.tiny import save_tiny, tiny_llama, tiny_model

NOT_WRITABLE_LOGS = Path("/sys/prunenet-test-logs")  # root ignores chmod; sysfs refuses new files even to root
MISTYPED = "models/tlama"  # one slash: looks like a hub id, is a mistyped local path


def _plan(folder: Path) -> dict:
    return json.loads((folder / PLAN_FILE).read_text())


def _fit_args(model, root: Path, *more: str, epochs: int = 2) -> list[str]:
    return [f"--model.model_name_or_path={model}", f"--trainer.max_epochs={epochs}",
            f"--trainer.default_root_dir={root / 'logs'}", f"--slicing.output_dir={root / 'out'}", *more]


def _links(root: Path) -> dict[str, Path]:
    """A dangling link, a symlink loop, a path under the dangling link, and a link to a real folder."""
    root.mkdir(parents=True)
    dangling = root / "dangling"
    dangling.symlink_to(root / "missing-folder")
    loop_a, loop_b = root / "loop-a", root / "loop-b"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    (root / "real").mkdir()
    to_real = root / "to-real"
    to_real.symlink_to(root / "real")
    return {"dangling": dangling, "loop": loop_a, "under-dangling": dangling / "sub", "to-real": to_real}


# ----------------------------------------------------------------------------- the CLI cases, as users run them


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    gemma = save_tiny(tiny_model("gemma3_text", seed=0), root / "gemma3")
    llama = save_tiny(tiny_llama(seed=0), root / "llama", tokenizer=True)
    other_llama = save_tiny(tiny_llama(seed=3), root / "llama-other-weights")
    plans = root / "plans"
    compress(str(gemma), str(plans / "gemma"), 0.3, selection="random")
    compress(str(llama), str(plans / "llama"), 0.3, selection="random")
    mixed = _plan(plans / "llama")
    mixed["kept_indices"]["1"] = mixed["kept_indices"]["1"][:-3]  # layer 1 keeps 22 rows, layers 0 and 2 keep 25
    (plans / "mixed.json").write_text(json.dumps(mixed))
    return {"gemma": gemma, "llama": llama, "other-llama": other_llama, "gemma-plan": plans / "gemma" / PLAN_FILE,
            "llama-plan": plans / "llama" / PLAN_FILE, "mixed-plan": plans / "mixed.json"}


FIT_BAD = {  # name -> needles of the error line
    "output-dangling-symlink": ["output path", "is a symlink to", "missing-folder", "does not exist"],
    "output-symlink-loop": ["is a symlink loop"],
    "output-under-dangling-symlink": ["goes through", "missing-folder"],
    "log-dir-not-writable": ["--trainer.default_root_dir", str(NOT_WRITABLE_LOGS), "not writable"],
    "log-dir-dangling-symlink": ["--trainer.default_root_dir", "is a symlink to", "does not exist"],
    "mistyped-local-path": [repr(MISTYPED), "not a local folder", repr(str(REPO / MISTYPED)), "hub"],
}


@pytest.fixture(scope="module")
def bad_fits(models, tmp_path_factory, extra_args):
    root = tmp_path_factory.mktemp("bad-fits")
    links = _links(root / "links")
    jobs, info = {}, {}
    for name in FIT_BAD:
        folder = root / name
        folder.mkdir()
        out, logs = folder / "out", folder / "logs"
        if name.startswith("output-"):
            out = links[{"output-dangling-symlink": "dangling", "output-symlink-loop": "loop",
                         "output-under-dangling-symlink": "under-dangling"}[name]]
        logs = {"log-dir-not-writable": NOT_WRITABLE_LOGS, "log-dir-dangling-symlink": links["dangling"]}.get(name, logs)
        model = MISTYPED if name == "mistyped-local-path" else models["llama"]
        jobs[name] = [f"--model.model_name_or_path={model}", "--trainer.max_epochs=2",
                      f"--trainer.default_root_dir={logs}", f"--slicing.output_dir={out}"]
        info[name] = {"folder": folder, "out": out, "logs": logs}
    # The hub is unreachable here either way; offline mode answers at once instead of retrying.
    results = run_fit_many(jobs, extra_args, root, env={"HF_HUB_OFFLINE": "1"})
    return {name: (results[name], info[name], links) for name in jobs}


@pytest.mark.parametrize("case", list(FIT_BAD))
def test_bad_fit_input_is_one_line_error_before_any_work(case, bad_fits):
    res, info, links = bad_fits[case]
    error = one_line_error(res, code=2)
    for needle in FIT_BAD[case]:
        assert needle in error, error
    assert "Epoch" not in res.stderr + res.stdout  # refused before the first episode
    assert list(info["folder"].iterdir()) == []  # no log folder, no output, no checkpoint
    # the links are untouched: still links, still dangling or looping, nothing created behind them
    assert links["dangling"].is_symlink() and not links["dangling"].exists()
    assert links["loop"].is_symlink() and not (links["loop"].parent / "missing-folder").exists()
    assert not NOT_WRITABLE_LOGS.exists()


COMPRESS_BAD = {  # name -> needles of the error line
    "output-dangling-symlink": ["output path", "is a symlink to", "does not exist"],
    "output-symlink-loop": ["is a symlink loop"],
    "plan-of-another-family": ["model type 'gemma3_text'", "'llama'", "source model"],
    "plan-with-mixed-widths": ["22 in layer 1", "25 in layers 0, 2"],
    "ratio-given-twice": ["0.3 and 0.30000001", "r0.3"],
    "mistyped-local-path": [repr(MISTYPED), "not a local folder", repr(str(REPO / MISTYPED)), "hub"],
}


@pytest.fixture(scope="module")
def compress_runs(models, tmp_path_factory):
    """The refused compress commands and two that succeed (a write through a symlink, a replay on
    another model of the same shape), launched together."""
    root = tmp_path_factory.mktemp("compress-cli")
    links = _links(root / "links")
    llama = str(models["llama"])
    replay_args = ["--model", llama, "--from_plan"]
    jobs = {
        "output-dangling-symlink": ["--selection", "random", "--model", llama, "--output_dir", str(links["dangling"])],
        "output-symlink-loop": ["--selection", "random", "--model", llama, "--output_dir", str(links["loop"])],
        "plan-of-another-family": [*replay_args, str(models["gemma-plan"]), "--output_dir", str(root / "o1")],
        "plan-with-mixed-widths": [*replay_args, str(models["mixed-plan"]), "--output_dir", str(root / "o2")],
        "ratio-given-twice": ["--selection", "random", "--model", llama, "--compression_ratio", "0.3,0.30000001",
                              "--output_dir", str(root / "o3")],
        "mistyped-local-path": ["--selection", "random", "--model", MISTYPED, "--output_dir", str(root / "o4")],
        "write-through-symlink": ["--selection", "random", "--model", llama, "--output_dir", str(links["to-real"])],
        "replay-on-other-weights": ["--model", str(models["other-llama"]), "--from_plan", str(models["llama-plan"]),
                                    "--output_dir", str(root / "replayed")],
    }
    logs = root / "process-output"
    logs.mkdir()
    return run_fit_many(jobs, [], logs, module="prunenet.compress", env={"HF_HUB_OFFLINE": "1"}), root, links


@pytest.mark.parametrize("case", list(COMPRESS_BAD))
def test_bad_compress_input_is_one_line_error_before_any_work(case, compress_runs):
    results, root, links = compress_runs
    error = one_line_error(results[case], code=2)
    for needle in COMPRESS_BAD[case]:
        assert needle in error, error
    assert not any((root / f"o{i}").exists() for i in range(1, 5))
    assert links["dangling"].is_symlink() and not links["dangling"].exists()


def test_symlink_to_a_folder_is_written_through(compress_runs, models, tmp_path, extra_args, monkeypatch):
    """compress and fit write into the folder a link points to; the link stays a link."""
    results, _root, links = compress_runs
    assert results["write-through-symlink"].returncode == 0, results["write-through-symlink"].stderr[-2000:]
    assert links["to-real"].is_symlink() and (links["to-real"].resolve() / "config.json").is_file()
    fit_links = _links(tmp_path / "links")
    fit_in_process(_fit_args(models["llama"], tmp_path, f"--slicing.output_dir={fit_links['to-real']}",
                             epochs=1), extra_args, monkeypatch)
    assert fit_links["to-real"].is_symlink() and (tmp_path / "links" / "real" / PLAN_FILE).is_file()


def test_replay_on_other_weights_warns_and_records_what_was_done(compress_runs, models):
    results, root, _links = compress_runs
    res = results["replay-on-other-weights"]
    assert res.returncode == 0, res.stderr[-2000:]
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "other FFN weights" in warnings[0], res.stderr[-2000:]
    original, replayed = _plan(models["llama-plan"].parent), _plan(root / "replayed")
    assert replayed["kept_indices"] == original["kept_indices"]
    # the provenance of what was done: this model and its weights, the plan it came from
    assert replayed["source_model"] == str(models["other-llama"])
    assert replayed["model_type"] == json.loads((root / "replayed" / "config.json").read_text())["model_type"]
    states = [layer.mlp.gate_proj.weight for layer in tiny_llama(seed=3).model.layers]
    assert replayed["source_ffn_sha256"] == ffn_fingerprint(states) != original["source_ffn_sha256"]
    assert replayed["replayed_from"]["path"] == str(models["llama-plan"])
    assert replayed["replayed_from"]["source_model"] == original["source_model"]
    assert replayed["replayed_from"]["source_ffn_sha256"] == original["source_ffn_sha256"]


def test_replay_refuses_another_hidden_size_and_names_it(models, tmp_path):
    wider = save_tiny(tiny_llama(seed=0, hidden_size=32), tmp_path / "d32")
    with pytest.raises(ConfigurationError, match=r"made for hidden size 24, but .* has 32") as err:
        replay(str(models["llama-plan"]), str(wider), str(tmp_path / "out"))
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_replay_on_its_own_source_does_not_warn(models, tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", PruneNetWarning)
        plan = replay(str(models["llama-plan"]), str(models["llama"]), str(tmp_path / "out"))
    assert plan["source_ffn_sha256"] == _plan(models["llama-plan"].parent)["source_ffn_sha256"]


def test_mixed_widths_name_the_layers():
    model = tiny_llama(seed=0)
    g = torch.Generator().manual_seed(0)
    kept = [torch.randperm(37, generator=g)[:k].sort().values for k in (20, 25, 20)]
    with pytest.raises(ConfigurationError, match=r"got 20 in layers 0, 2 and 25 in layer 1$"):
        slice_model(model, kept)
    assert model.config.intermediate_size == 37


def test_symlink_loop_is_named_even_where_resolve_does_not_raise(tmp_path, monkeypatch):
    """Python 3.13's Path.resolve() returns a looping path instead of raising: still a loop, not 'dangling'."""
    from prunenet.artifacts import resolve_output_path
    from prunenet.errors import OutputExistsError

    links = _links(tmp_path / "links")
    monkeypatch.setattr(Path, "resolve", lambda self, strict=False: self.absolute())
    with pytest.raises(OutputExistsError, match="is a symlink loop"):
        resolve_output_path(links["loop"])
    with pytest.raises(OutputExistsError, match="is a symlink to .*missing-folder"):
        resolve_output_path(links["dangling"])


def test_remote_log_folders_are_not_probed_locally():
    from types import SimpleNamespace

    from prunenet.fit import check_log_dirs

    logger = SimpleNamespace(save_dir="gs://bucket/logs")
    check_log_dirs(SimpleNamespace(default_root_dir="s3://bucket/runs", loggers=[logger]))  # no error


def test_resume_compares_dtypes_by_meaning():
    from prunenet.resume import settings_mismatch

    assert settings_mismatch({"dtype": "bfloat16", "seed": 0}, {"dtype": "bf16", "seed": 0}) == ""
    assert settings_mismatch({"dtype": "bfloat16"}, {"dtype": "float32"}) == "dtype='bfloat16' (this run: 'float32')"
    assert settings_mismatch({"dtype": None, "seed": None}, {"dtype": "auto", "seed": 3}) == ""  # old checkpoints


def test_one_writer_and_reader_of_the_run_state():
    """resume.save_run_state / load_run_state: the fit's and the recovery's state under the same keys as
    before (prunenet_run, prunenet_<name>), defaults for a checkpoint without them, a mismatch refused."""
    from prunenet.errors import ConfigurationError
    from prunenet.resume import checkpoint_settings, load_run_state, save_run_state

    fit = {"source": "asset:smollm2-135m", "seed": 7, "compression_ratio": 0.3}
    checkpoint = {"hyper_parameters": {"compression_ratio": 0.3}}
    save_run_state(checkpoint, fit, {"history": [{"episode": 0}], "learner": {"baseline": 1.5}})
    assert checkpoint["prunenet_run"] == {"source": "asset:smollm2-135m", "seed": 7}
    assert checkpoint["prunenet_history"] == [{"episode": 0}] and checkpoint["prunenet_learner"] == {"baseline": 1.5}
    state = load_run_state(checkpoint, {"history": [], "learner": {}, "absent": None}, current=fit,
                           keys=("compression_ratio",))
    assert state == {"history": [{"episode": 0}], "learner": {"baseline": 1.5}, "absent": None}
    with pytest.raises(ConfigurationError, match="cannot resume: .*seed=7 \\(this run: 8\\)"):
        load_run_state(checkpoint, {}, current={**fit, "seed": 8}, keys=("compression_ratio",))
    recovery = {"source": "/m", "seed": 0, "stage": "recover", "data": {"block_size": 16}, "lora_r": 8}
    checkpoint = {"hyper_parameters": {"lora_r": 8}}
    save_run_state(checkpoint, recovery, {"tokens_seen": 64, "val_loss_before": 2.5, "rng_state": None})
    assert checkpoint["prunenet_run"] == {"source": "/m", "seed": 0, "stage": "recover", "data": {"block_size": 16}}
    assert (checkpoint["prunenet_tokens_seen"], checkpoint["prunenet_val_loss_before"]) == (64, 2.5)
    assert checkpoint_settings(checkpoint, ("lora_r",)) == recovery


def test_fingerprints_written_before_the_canonical_form_still_match():
    """Policies and plans of earlier versions hashed bf16/fp16 states in their own dtype."""
    from prunenet.plan import same_ffn

    states = [layer.mlp.gate_proj.weight.detach() for layer in tiny_llama(seed=0).to(torch.bfloat16).model.layers]
    legacy = hashlib.sha256()
    for w in states:
        legacy.update(f"{w.dtype}{tuple(w.shape)}".encode())
        legacy.update(w.contiguous().view(torch.uint8).numpy().tobytes())
    canonical = ffn_fingerprint(states)
    assert legacy.hexdigest() != canonical
    assert same_ffn(canonical, states, canonical) and same_ffn(legacy.hexdigest(), states, canonical)
    assert not same_ffn("0" * 64, states, canonical) and not same_ffn(None, states, canonical)


def test_evaluation_without_slicing_is_refused_before_training(tiny_dir, tmp_path):
    import lightning as L

    from callbacks import PostPruningEvaluation
    from prunenet.data import LayerDataModule
    from prunenet.module import PruneNetModule

    module = PruneNetModule(str(tiny_dir))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[PostPruningEvaluation(tasks="piqa", limit=2)], default_root_dir=tmp_path)
    with pytest.raises(ConfigurationError, match="needs the StructuralSlicing callback"):
        trainer.fit(module, datamodule=LayerDataModule())
    assert module.history == []  # no episode ran


# ----------------------------------------------------------------------------- results follow the policy


def test_second_fit_of_the_same_module_rewrites_the_results(tiny_dir, tmp_path, extra_args, monkeypatch, one_thread):
    """fit 1 episode, then 2 more on the same module (overwrite=true): the saved checkpoint is that
    of the 3-episode policy, not the cached 1-episode result."""
    cli = fit_in_process(_fit_args(tiny_dir, tmp_path, "--slicing.overwrite=true", epochs=1), extra_args, monkeypatch)
    assert _plan(tmp_path / "out")["episodes"] == 1
    cli.trainer.fit_loop.max_epochs = 3
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    plan = _plan(tmp_path / "out")
    assert plan["episodes"] == 3
    saved = torch.load(tmp_path / "out" / POLICY_FILE, weights_only=True)
    assert saved["meta"]["episodes"] == 3
    for name, value in cli.model.policy.state_dict().items():
        assert torch.equal(saved["state_dict"][name], value), name
    fresh = cli.model.kept_indices("sample")
    assert plan["kept_indices"] == {str(i): idx.tolist() for i, idx in enumerate(fresh)}


# ----------------------------------------------------------------------------- the FFN fingerprint


def test_fingerprint_does_not_depend_on_the_load_dtype(tmp_path, extra_args, monkeypatch, one_thread):
    """A bf16 checkpoint fitted with --model.dtype=float32 is the same model for compress --dtype auto."""
    bf16 = tiny_llama(seed=0).to(torch.bfloat16)
    states = [layer.mlp.gate_proj.weight for layer in bf16.model.layers]
    assert ffn_fingerprint(states) == ffn_fingerprint([w.float() for w in states])
    fp32 = [layer.mlp.gate_proj.weight for layer in tiny_llama(seed=0).model.layers]
    assert ffn_fingerprint(fp32) != ffn_fingerprint([w.bfloat16() for w in fp32])  # rounded values, another print
    # float32 states hash as before the canonical form (policy files of earlier versions still match)
    h = hashlib.sha256()
    for w in (w.float() for w in states):
        h.update(f"{w.dtype}{tuple(w.shape)}".encode())
        h.update(w.contiguous().view(torch.uint8).numpy().tobytes())
    assert ffn_fingerprint([w.float() for w in states]) == h.hexdigest()

    folder = save_tiny(bf16, tmp_path / "bf16")
    fit_in_process(_fit_args(folder, tmp_path, "--model.dtype=float32", epochs=1), extra_args, monkeypatch)
    (plan,) = compress(str(folder), str(tmp_path / "reused"), 0.5, policy=str(tmp_path / "out"))
    assert plan["policy_ffn_sha256"] == plan["source_ffn_sha256"]
    assert plan["policy_transferred"] is False


# ----------------------------------------------------------------------------- resume matches the run


def test_resume_matches_the_run_by_resolved_source_seed_and_settings(tiny_dir, tmp_path, extra_args, monkeypatch,
                                                                     one_thread):
    fit_in_process(_fit_args(tiny_dir, tmp_path, "--seed_everything=0", epochs=2), extra_args, monkeypatch)
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    before = (tmp_path / "out" / PLAN_FILE).read_bytes()
    refused = {
        "seed": ("--seed_everything=5", r"seed=0 \(this run: 5\)"),
        "ratio": ("--model.compression_ratio=0.25", r"compression_ratio=0.3 \(this run: 0.25\)"),
        "learning rate": ("--model.learning_rate=0.01", r"learning_rate=0.001 \(this run: 0.01\)"),
    }
    for flag, match in refused.values():
        for ckpt_path in ("last", str(ckpt)):
            with pytest.raises(ConfigurationError, match=match):
                fit_in_process(_fit_args(tiny_dir, tmp_path, flag, f"--ckpt_path={ckpt_path}",
                                         "--slicing.overwrite=true", epochs=4), extra_args, monkeypatch)
    assert (tmp_path / "out" / PLAN_FILE).read_bytes() == before  # refused before anything was rewritten
    assert len(list((tmp_path / "logs").rglob("*.ckpt"))) == 2  # last.ckpt and the epoch checkpoint, no more
    # The same folder by another spelling (a '..' detour, a symlink) is the same source: it resumes.
    (tmp_path / "detour").mkdir()
    link = tmp_path / "link-to-model"
    link.symlink_to(tiny_dir)
    for spelling in (tmp_path / "detour" / ".." / "link-to-model", f"{tiny_dir}/."):
        cli = fit_in_process(_fit_args(spelling, tmp_path, "--ckpt_path=last", "--slicing.overwrite=true",
                                       epochs=3), extra_args, monkeypatch)
        assert Path(cli.trainer.ckpt_path) == ckpt
        assert _plan(tmp_path / "out")["episodes"] == 3
        os.utime(ckpt)  # stays the newest last.ckpt of this run for the next spelling


def test_checkpoint_stores_the_seed_and_the_source(tiny_dir, tmp_path, extra_args, monkeypatch, one_thread):
    fit_in_process(_fit_args(tiny_dir, tmp_path, "--seed_everything=7", epochs=1), extra_args, monkeypatch)
    ckpt = torch.load(next((tmp_path / "logs").rglob("last.ckpt")), weights_only=True, map_location="cpu")
    assert ckpt["prunenet_run"] == {"source": str(Path(tiny_dir).resolve()), "seed": 7}


def test_programmatic_resume_with_another_seed_is_refused(tiny_dir, tmp_path, extra_args, monkeypatch, one_thread):
    """Trainer.fit(ckpt_path=...) outside prunenet.fit is checked too; loading for inspection is not a resume."""
    import lightning as L

    from prunenet.data import LayerDataModule
    from prunenet.module import PruneNetModule

    fit_in_process(_fit_args(tiny_dir, tmp_path, "--seed_everything=0", epochs=1), extra_args, monkeypatch)
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path / "again")
    with pytest.raises(ConfigurationError, match=r"seed=0 \(this run: 5\)"):
        trainer.fit(PruneNetModule(str(tiny_dir)), datamodule=LayerDataModule(), ckpt_path=ckpt)
    assert PruneNetModule.load_from_checkpoint(ckpt).hparams.model_name_or_path == str(tiny_dir)


# ----------------------------------------------------------------------------- Reliability III (issue 25)


NON_FINITE = [float("nan"), float("inf"), float("-inf")]


def _float_settings(models) -> dict[str, object]:
    """Every float hyperparameter of fit, compress, recover and evaluate -> a callable that sets it to a value
    (building what checks it, nothing else)."""
    from prunenet.evaluation import EvalSettings
    from prunenet.learner import BaselineLearner, PaperLearner
    from prunenet.module import PruneNetModule
    from prunenet.recovery import RecoveryDataModule, RecoveryModule

    llama, plans = str(models["llama"]), models["llama-plan"].parent
    fit = {f"fit.{k}": (lambda v, k=k: PruneNetModule(llama, **{k: v}))
           for k in ("compression_ratio", "learning_rate", "weight_decay", "protect_outliers")}
    recover = {f"recover.{k}": (lambda v, k=k: RecoveryModule(str(plans), **{k: v}))
               for k in ("lora_alpha", "lora_dropout", "learning_rate", "weight_decay")}
    return {**fit, **recover,
            "fit.learner.momentum": lambda v: BaselineLearner(momentum=v),
            "fit.learner.gamma": lambda v: PaperLearner(gamma=v),
            "recover.data.val_fraction": lambda v: RecoveryDataModule(val_fraction=v),
            "compress.compression_ratio": lambda v: compress(llama, str(plans.parent / "never"), v, selection="random"),
            "compress.protect_outliers": lambda v: compress(llama, str(plans.parent / "never"), 0.3, selection="random",
                                                            protect_outliers=v),
            "evaluate.limit": lambda v: EvalSettings(tasks=["piqa"], limit=v)}


def test_every_float_hyperparameter_refuses_nan_and_infinities(models):
    """The class, not only the example: ``x <= 0`` lets NaN and inf through; the one helper does not."""
    from prunenet.errors import EvaluationError

    for name, build in _float_settings(models).items():
        for value in NON_FINITE:
            with pytest.raises((ConfigurationError, EvaluationError)) as err:
                build(value)
            message = str(err.value)
            assert "\n" not in message and repr(value) in message, (name, value, message)
            assert name.rsplit(".", 1)[-1] in message, (name, message)  # names the setting
    assert not (models["llama-plan"].parent.parent / "never").exists()


@pytest.fixture(scope="module")
def bad_recoveries(models, tmp_path_factory):
    """Refused ``prunenet.recover`` runs, launched together."""
    from tests.test_recover import _args, _words

    root = tmp_path_factory.mktemp("bad-recover")
    pruned = models["llama-plan"].parent
    text = root / "train.txt"
    text.write_text(_words(60, 50))
    (root / "nan.yaml").write_text("model:\n  learning_rate: .nan\n")
    broken = root / "broken-weights"
    broken.mkdir()
    for f in pruned.iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[:200] if f.suffix == ".safetensors" else f.read_bytes())
    cases = {  # name -> (model, flags, needles of the error line)
        "learning-rate-inf": (pruned, ["--model.learning_rate=.inf"], ["model.learning_rate", "finite", "inf"]),
        "learning-rate-nan-yaml": (pruned, [f"--config={root / 'nan.yaml'}"], ["model.learning_rate", "finite", "nan"]),
        "max-steps-unbounded": (pruned, ["--trainer.max_steps=-1"], ["trainer.max_steps", "got -1", "max_epochs"]),
        "max-steps-zero": (pruned, ["--trainer.max_steps=0"], ["trainer.max_steps", "got 0", "unchanged copy"]),
        "output-inside-input": (pruned, [f"--export.output_dir={pruned / 'recovered'}"], ["source model folder"]),
        "weights-that-do-not-load": (broken, [], ["cannot load model", str(broken)]),
        "gradient-clip-nan": (pruned, ["--trainer.gradient_clip_val=.nan"], ["trainer.gradient_clip_val", "nan"]),
        "no-training-step": (pruned, ["--trainer.limit_train_batches=0"], ["trained no step", "nothing was saved"]),
    }
    jobs = {}
    for name, (model, flags, _) in cases.items():
        args = [a for a in _args(model, text, root / "runs" / name) if not a.startswith("--export.output_dir")]
        jobs[name] = [*args, *flags] + ([] if name == "output-inside-input" else
                                        [f"--export.output_dir={root / 'runs' / name / 'out'}"])
    logs = root / "process-output"
    logs.mkdir()
    return run_fit_many(jobs, [], logs, module="prunenet.recover"), cases, root, pruned


@pytest.mark.parametrize("case", ["learning-rate-inf", "learning-rate-nan-yaml", "max-steps-unbounded",
                                  "max-steps-zero", "output-inside-input", "weights-that-do-not-load",
                                  "gradient-clip-nan", "no-training-step"])
def test_bad_recovery_input_is_one_line_error_and_writes_nothing(case, bad_recoveries):
    results, cases, root, pruned = bad_recoveries
    line = one_line_error(results[case])
    assert all(needle in line for needle in cases[case][2]), line
    assert not (root / "runs" / case).exists()  # no log folder (lightning_logs/version_N), no output
    assert not (pruned / "recovered").exists()


def test_generate_checks_every_input_before_generating(models, tmp_path):
    llama = str(models["llama"])
    jobs = {"empty-prompt": ["--dense", llama, "--pruned", llama, "--prompt", ""],
            "missing-pruned": ["--dense", llama, "--pruned", str(tmp_path / "missing")],
            "missing-recovered": ["--dense", llama, "--pruned", llama, "--recovered", str(tmp_path / "missing")]}
    results = run_fit_many(jobs, [], tmp_path, module="prunenet.generate")
    assert "--prompt is empty" in one_line_error(results["empty-prompt"])
    for name in ("missing-pruned", "missing-recovered"):
        assert str(tmp_path / "missing") in one_line_error(results[name]) and "does not exist" in one_line_error(
            results[name])
    for res in results.values():
        assert "[dense" not in res.stdout and "Loading weights" not in res.stderr  # nothing loaded, nothing generated


def test_messages_name_the_folder_and_the_held_out_block(models, tmp_path):
    from prunenet.errors import EvaluationError
    from prunenet.evaluation import EvalSettings, evaluate_checkpoint
    from prunenet.recovery import RecoveryDataModule
    from prunenet.recovery.corpus import DataError

    with pytest.raises(EvaluationError) as err:  # models["gemma"] was saved without tokenizer files
        evaluate_checkpoint(str(models["gemma"]), EvalSettings(tasks=["piqa"], limit=2), use_cache=False)
    assert repr(str(models["gemma"])) in str(err.value) and "model model" not in str(err.value)
    (tmp_path / "short.txt").write_text("w5 w6")  # 3 tokens with the EOS: not one block
    from prunenet import loading

    data = RecoveryDataModule(source=str(tmp_path / "short.txt"), block_size=4, val_fraction=0.5, check_overlap=False)
    with pytest.raises(DataError, match=r"3 tokens, fewer than the 8 needed: one training block of 4 tokens and one block "
                                        r"of 4 held out for the validation loss"):
        data.prepare(loading.load_tokenizer(str(models["llama-plan"].parent)))


def test_a_refused_run_removes_only_the_log_folders_it_created(tmp_path):
    """A refused run removes its own ``version_N`` and the parents made for it while they are empty: a
    sibling run's files in a folder both runs created stay (a sweep under a new root)."""
    from types import SimpleNamespace

    from prunenet.fit import no_logs_when_refused

    log_dir = tmp_path / "sweep" / "lr1" / "lightning_logs" / "version_0"
    trainer = SimpleNamespace(loggers=[SimpleNamespace(log_dir=str(log_dir))], global_step=0, is_global_zero=True)
    with pytest.raises(ConfigurationError), no_logs_when_refused(trainer):
        log_dir.mkdir(parents=True)
        (log_dir / "events").write_text("x")
        (tmp_path / "sweep" / "lr2").mkdir()  # another run of the sweep, started meanwhile
        (tmp_path / "sweep" / "lr2" / "last.ckpt").write_text("theirs")
        raise ConfigurationError("refused while loading")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "sweep", "sweep/lr2", "sweep/lr2/last.ckpt"]
    trainer.global_step = 3  # a run that trained a step keeps its logs
    with pytest.raises(ConfigurationError), no_logs_when_refused(trainer):
        log_dir.mkdir(parents=True)
        raise ConfigurationError("a later failure")
    assert log_dir.is_dir()
