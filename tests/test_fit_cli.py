"""``python -m prunenet.fit`` as users run it: subprocesses on tiny saved models, bad inputs, configs."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import yaml

from prunenet.artifacts import PLAN_FILE, POLICY_FILE
from tests.conftest import REPO, assert_logits_match, fit_parse_only, one_line_error, run_fit, run_fit_many
from tests.tiny import build_tiny, save_tiny, tiny_llama

CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.stem != "recover")  # recover: its own CLI
N = 37


def _expected_width(n: int, ratio) -> int:
    return math.floor((1 - Fraction(str(ratio))) * n)


def _check_pruned_folder(out: Path, source: Path, ratio, plain_load, tokenizer: bool) -> None:
    k = _expected_width(N, ratio)
    model, info, messages = plain_load(out)
    assert model.config.intermediate_size == k
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert not [m for m in messages if "mismatch" in m.lower()], messages

    plan = json.loads((out / PLAN_FILE).read_text())
    assert plan["compression_ratio"] == float(ratio) and plan["kept_width"] == k
    kept = [torch.tensor(plan["kept_indices"][str(i)]) for i in range(model.config.num_hidden_layers)]
    assert len(plan["kept_indices"]) == model.config.num_hidden_layers
    for idx in kept:
        assert idx.numel() == k == idx.unique().numel() and torch.equal(idx, idx.sort().values)

    policy = torch.load(out / POLICY_FILE, weights_only=True)
    assert policy["state_dict"]["proj_intermediate.weight"].shape == (N, 24)
    assert policy["meta"]["intermediate_size"] == N and policy["meta"]["episodes"] == 2

    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(str(source)).eval()
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    assert_logits_match(model, dense, ids, kept)

    has_tokenizer = (out / "tokenizer.json").is_file()
    assert has_tokenizer == tokenizer
    if tokenizer:
        from transformers import AutoTokenizer

        copied, original = AutoTokenizer.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(source))
        assert copied.get_vocab() == original.get_vocab()
        text = "w5 w17 w99 w3"
        assert copied(text)["input_ids"] == original(text)["input_ids"]


@pytest.fixture(scope="module")
def no_tokenizer_dir(tmp_path_factory):
    folder = save_tiny(tiny_llama(seed=5), tmp_path_factory.mktemp("notok") / "llama", tokenizer=False)
    assert not list(folder.glob("tokenizer*"))
    return folder


BAD_CASES = ["ratio-negative", "ratio-one", "ratio-keeps-no-row", "missing-path", "unsupported-family",
             "output-exists", "bloom"]


@pytest.fixture(scope="module")
def tiny_runs(tiny_dir, no_tokenizer_dir, unsupported_dir, tmp_path_factory, extra_args):
    """Every tiny-model CLI run of this file, launched together: name -> (result, case folder, extra info)."""
    model_type, unsupported = unsupported_dir
    root = tmp_path_factory.mktemp("cli")
    jobs, info = {}, {}

    def case(name, args, bad_value=None):
        folder = root / name
        folder.mkdir()
        out = folder / "out"
        before = None
        if name == "output-exists":
            out.mkdir()
            (out / "keep.txt").write_text("precious")
            before = {p.name: p.read_bytes() for p in out.iterdir()}
        jobs[name] = [*args, "--trainer.max_epochs=2", f"--slicing.output_dir={out}",
                      f"--trainer.default_root_dir={folder / 'logs'}"]
        info[name] = {"folder": folder, "out": out, "before": before, "bad_value": bad_value or str(out)}

    case("with-tokenizer", [f"--model.model_name_or_path={tiny_dir}", "--model.compression_ratio=0.5"])
    case("without-tokenizer", [f"--model.model_name_or_path={no_tokenizer_dir}"])
    case("ratio-negative", [f"--model.model_name_or_path={tiny_dir}", "--model.compression_ratio=-0.1"], "-0.1")
    case("ratio-one", [f"--model.model_name_or_path={tiny_dir}", "--model.compression_ratio=1.0"], "1.0")
    case("ratio-keeps-no-row", [f"--model.model_name_or_path={tiny_dir}", "--model.compression_ratio=0.99"],
         "0.99")
    missing = root / "no" / "such-model"
    case("missing-path", [f"--model.model_name_or_path={missing}"], str(missing))
    case("unsupported-family", [f"--model.model_name_or_path={unsupported}"], repr(model_type))
    case("output-exists", [f"--model.model_name_or_path={tiny_dir}"])
    # BLOOM: unsupported, or (adapter present) refused before training because BloomMLP hard-codes 4 * h.
    from transformers import BloomConfig

    bloom = save_tiny(build_tiny(BloomConfig, vocab_size=101, hidden_size=24, n_layer=2, n_head=4),
                      root / "bloom-model")
    case("bloom", [f"--model.model_name_or_path={bloom}"], "'bloom'")
    logdir = root / "process-output"
    logdir.mkdir()
    results = run_fit_many(jobs, extra_args, logdir)
    return {name: (results[name], info[name]) for name in jobs}


# ----------------------------------------------------------------------------- good runs


def test_fit_tiny_model_with_tokenizer(tiny_runs, tiny_dir, plain_load):
    res, info = tiny_runs["with-tokenizer"]
    assert res.returncode == 0, res.stderr[-4000:]
    _check_pruned_folder(info["out"], tiny_dir, 0.5, plain_load, tokenizer=True)
    # the Lightning logs went to default_root_dir, with a checkpoint to resume from
    assert list((info["folder"] / "logs").rglob("last.ckpt"))


def test_fit_tiny_model_without_tokenizer(tiny_runs, no_tokenizer_dir, plain_load):
    import inspect

    from prunenet.module import PruneNetModule

    default_ratio = inspect.signature(PruneNetModule).parameters["compression_ratio"].default
    res, info = tiny_runs["without-tokenizer"]
    assert res.returncode == 0, res.stderr[-4000:]
    _check_pruned_folder(info["out"], no_tokenizer_dir, default_ratio, plain_load, tokenizer=False)


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_error(case, tiny_runs):
    res, info = tiny_runs[case]
    error = one_line_error(res, code=None)
    assert info["bad_value"] in error, error
    out = info["out"]
    if info["before"] is None:
        assert not out.exists()
    else:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == info["before"]
    assert [p.name for p in info["folder"].iterdir() if p.name != "logs"] == (["out"] if info["before"] else [])


# ----------------------------------------------------------------------------- configs


def _leaves(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, prefix + (key,))
    else:
        yield prefix, tree


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"smollm2.yaml", "llama2.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_builds_the_classes_it_names(config, tiny_dir, tmp_path):
    """Not only parsed: the module with its policy, reward and learner, and every callback, are built
    (on the tiny model and the CPU, so that no hub or GPU is needed)."""
    from callbacks import StructuralSlicing
    from prunenet.fit import build_cli

    source = yaml.safe_load(config.read_text())
    cli = build_cli(["--config", str(config), f"--model.model_name_or_path={tiny_dir}", "--trainer.accelerator=cpu",
                     f"--trainer.default_root_dir={tmp_path}"])
    from prunenet import plugins

    model = source.get("model", {})
    for key in ("policy", "reward", "learner"):
        if key in model:  # a short name or a class_path with init_args: what was built is what the config says
            assert plugins.describe(getattr(cli.model, key)) == plugins.canonical(key, model[key]), key
    assert source.get("trainer", {}).get("max_epochs", 1) >= 1  # a fit config trains (compress runs do not)
    slicing = [c for c in cli.trainer.callbacks if isinstance(c, StructuralSlicing)]
    assert len(slicing) == 1 and slicing[0].selection == source.get("slicing", {}).get("selection", "sample")
    assert not any(tmp_path.iterdir())  # building writes nothing


@pytest.mark.parametrize("section, key, bad", [("slicing", "selection", "peek"), ("model", "policy", "foo"),
                                               ("model", "reward", "nonsense"), ("model", "learner", "nope")])
def test_a_config_naming_no_plug_point_fails_to_build(section, key, bad, tiny_dir, tmp_path):
    from prunenet.errors import ConfigurationError
    from prunenet.fit import build_cli

    config = yaml.safe_load((REPO / "configs" / "smollm2.yaml").read_text())
    config.setdefault(section, {})[key] = bad
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigurationError, match=rf"{key} must be one of .*{bad}"):
        build_cli(["--config", str(path), f"--model.model_name_or_path={tiny_dir}",
                   f"--trainer.default_root_dir={tmp_path / 'logs'}"])


def test_plug_points_take_a_class_path_and_init_args_from_flags(tiny_dir, tmp_path):
    """``--model.learner.class_path=... --model.learner.init_args.momentum=...`` on top of the paper's config,
    as LightningCLI does for any class; the short names of the config keep working beside it."""
    from prunenet.fit import build_cli
    from prunenet.learner import BaselineLearner
    from prunenet.policy import RowMLP

    cli = build_cli(["--config", str(REPO / "configs" / "paper.yaml"), f"--model.model_name_or_path={tiny_dir}",
                     "--model.learner.class_path=prunenet.learner.BaselineLearner",
                     "--model.learner.init_args.momentum=0.75", "--model.policy=row_mlp",
                     f"--trainer.default_root_dir={tmp_path}"])
    assert isinstance(cli.model.learner, BaselineLearner) and cli.model.learner.momentum == 0.75
    assert isinstance(cli.model.policy, RowMLP) and cli.model.policy.width == 16
    cli = build_cli([f"--model.model_name_or_path={tiny_dir}", "--model.policy.class_path=prunenet.policy.RowMLP",
                     "--model.policy.init_args.width=32", f"--trainer.default_root_dir={tmp_path}"])
    assert isinstance(cli.model.policy, RowMLP) and cli.model.policy.hidden.out_features == 32


BAD_FLAGS = {  # flags -> what the one error line names
    "class": (["--model.learner.class_path=prunenet.learner.BaselineLearnr"], "BaselineLearnr"),
    "init-arg": (["--model.learner.class_path=prunenet.learner.BaselineLearner",
                  "--model.learner.init_args.momentun=0.5"], "momentun"),
    "value": (["--model.policy.class_path=prunenet.policy.RowMLP", "--model.policy.init_args.width=wide"], "wide"),
    "key": (["--model.compresion_ratio=0.2"], "compresion_ratio"),
    "range": (["--model.learner.class_path=prunenet.learner.PaperLearner", "--model.learner.init_args.gamma=0"],
              "model.learner.init_args.gamma must be a finite number in (0, 1], got 0.0"),
    "short-name-args": (["--model.learner=baseline", "--model.learner.init_args.momentum=0.5"],
                        "a short name takes no init_args"),
    "protect-range": (["--model.protect_outliers=1.5"], "protect_outliers must be a finite number in [0, 1)"),
}


def test_a_misspelt_class_or_key_is_a_one_line_error_before_any_work(tiny_dir, tmp_path):
    # one shared start-up for the runs (run_fit_many): each is otherwise ~7 s of imports
    runs = run_fit_many({name: [f"--model.model_name_or_path={tiny_dir}",
                                f"--trainer.default_root_dir={tmp_path / name / 'logs'}",
                                f"--slicing.output_dir={tmp_path / name / 'out'}", *flags]
                         for name, (flags, _) in BAD_FLAGS.items()}, [], tmp_path)
    for name, (_, needle) in BAD_FLAGS.items():
        assert needle in one_line_error(runs[name], code=2), name
        assert not (tmp_path / name).exists(), name


@pytest.mark.parametrize("config", CONFIGS, ids=[p.name for p in CONFIGS])
def test_print_config_parses_every_config(config):
    code, text = fit_parse_only(["--config", str(config), "--print_config"])
    assert code == 0
    printed = yaml.safe_load(text)
    source = yaml.safe_load(config.read_text())
    assert printed["model"]["model_name_or_path"] == source["model"]["model_name_or_path"]
    for path, value in _leaves(source):
        got = printed
        for key in path:
            got = got[key]
        assert got == value, (path, got, value)


# ----------------------------------------------------------------------------- the real embedded model


@pytest.mark.slow
def test_fit_embedded_smollm2(tmp_path, extra_args, plain_load):
    from prunenet import loading

    config = REPO / "configs" / "smollm2.yaml"
    source = yaml.safe_load(config.read_text())
    out = tmp_path / "pruned"
    # the config's policy and reward read the model's own text: 2 x 16 tokens here, not 64 x 256 (minutes)
    text = [f"--model.{kind}.init_args.{key}={value}" for kind in ("policy", "reward")
            for key, value in (("samples", 2), ("length", 16))]
    res = run_fit("--config", str(config), "--trainer.max_epochs=2", f"--slicing.output_dir={out}",
                  f"--trainer.default_root_dir={tmp_path / 'logs'}", *text, extra=extra_args)
    assert res.returncode == 0, res.stderr[-4000:]

    dense = loading.load_model(source["model"]["model_name_or_path"])
    n = dense.config.intermediate_size
    k = _expected_width(n, source["model"]["compression_ratio"])
    assert (n, k) == (1536, 1075)  # SmolLM2-135M at the config's r = 0.3
    model, info, _messages = plain_load(out)
    assert model.config.intermediate_size == k
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer.model").is_file()
    plan = json.loads((out / PLAN_FILE).read_text())
    assert len(plan["kept_indices"]) == dense.config.num_hidden_layers == 30
    kept = [torch.tensor(plan["kept_indices"][str(i)]) for i in range(30)]
    ids = torch.randint(0, dense.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    assert plan["refit"] == {"ridge": source["slicing"]["refit_ridge"]}  # the config refits the output projections
    changed = 0
    with torch.no_grad():  # the dense model with the refit columns in the kept places (test_refit.py checks values)
        for mine, theirs, rows in zip(model.model.layers, dense.model.layers, kept):
            changed += int(not torch.equal(theirs.mlp.down_proj.weight[:, rows], mine.mlp.down_proj.weight))
            theirs.mlp.down_proj.weight[:, rows] = mine.mlp.down_proj.weight
    assert changed == 30
    assert_logits_match(model, dense, ids, kept)
    assert plan["policy"] == "features" and plan["selection"] == "topk" and plan["episodes"] == 2
