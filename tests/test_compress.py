"""``python -m prunenet.compress``: "you only prune once" (issue 6).

One policy, trained once by the fit CLI on a tiny model at r = 0.3, is reused at other ratios, on
another model of the same FFN shape, in a sweep, with ``round_to``; plans replay bit for bit; the
random and magnitude baselines; and every bad input is a one-line ``error:`` with exit code 2.
"""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prunenet.artifacts import PLAN_FILE, POLICY_FILE
from prunenet.compress import compress
from prunenet.compress import main as compress_main
from prunenet.errors import ConfigurationError
from prunenet.selection import kept_width
from tests.conftest import HANG_S, REPO, fit_in_process, one_line_error, run_fit, run_fit_many
from tests.tiny import save_tiny, tiny_llama

N, D, LAYERS, TRAINED_RATIO = 37, 24, 3, 0.3


def _width(n: int, ratio) -> int:
    """floor((1 - r) n), exactly (no float error)."""
    return math.floor((1 - Fraction(str(ratio))) * n)


def _plan(folder: Path) -> dict:
    return json.loads((folder / PLAN_FILE).read_text())


def _kept(folder: Path) -> list[list[int]]:
    plan = _plan(folder)
    return [plan["kept_indices"][str(i)] for i in range(len(plan["kept_indices"]))]


def _compress(*argv) -> None:
    compress_main([str(a) for a in argv])


@pytest.fixture(scope="module")
def policy_dir(tiny_dir, tmp_path_factory, extra_args) -> Path:
    """A fit output: the tiny model pruned at r = 0.3 after 2 episodes, with its policy.pt."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        fit_in_process([f"--model.model_name_or_path={tiny_dir}", f"--model.compression_ratio={TRAINED_RATIO}",
                        "--trainer.max_epochs=2", f"--trainer.default_root_dir={root / 'logs'}",
                        f"--slicing.output_dir={root / 'pruned'}"], extra_args, mp)
    assert (root / "pruned" / POLICY_FILE).is_file()
    return root / "pruned"


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> Path:
    """Another tiny LLaMA of the same FFN shape (n, d) = (37, 24), different weights."""
    return save_tiny(tiny_llama(seed=1), tmp_path_factory.mktemp("other") / "llama")


@pytest.fixture(scope="module")
def reused(policy_dir, tiny_dir, tmp_path_factory) -> dict[float, Path]:
    """The trained policy applied to its own source model at r = 0.1 and 0.5."""
    root = tmp_path_factory.mktemp("reused")
    out = {}
    for r in (0.1, 0.5):
        out[r] = root / f"r{r}"
        _compress("--policy", policy_dir, "--model", tiny_dir, "--compression_ratio", r, "--output_dir", out[r])
    return out


# ----------------------------------------------------------------------------- one policy, any ratio, any model


@pytest.mark.parametrize("ratio", [0.1, 0.5])
def test_policy_trained_once_compresses_at_other_ratios(ratio, reused, policy_dir, plain_load):
    out = reused[ratio]
    k = _width(N, ratio)
    model, info, messages = plain_load(out)  # plain transformers, no PruneNet code
    assert model.config.intermediate_size == k
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert not [m for m in messages if "mismatch" in m.lower()], messages
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.weight.shape == layer.mlp.up_proj.weight.shape == (k, D)
        assert layer.mlp.down_proj.weight.shape == (D, k)
    plan = _plan(out)
    assert plan["selection"] == "sample" and "method" not in plan
    assert plan["compression_ratio"] == ratio and plan["kept_width"] == k
    assert plan["effective_compression_ratio"] == round(1 - k / N, 6)
    assert plan["policy_trained_ratio"] == TRAINED_RATIO and plan["policy_episodes"] == 2
    assert plan["policy_transferred"] is False  # its own source model
    for idx in _kept(out):
        assert len(idx) == k == len(set(idx)) and idx == sorted(idx) and 0 <= idx[0] and idx[-1] < N
    # the policy travels with the checkpoint, unchanged
    saved = torch.load(out / POLICY_FILE, weights_only=True)
    trained = torch.load(policy_dir / POLICY_FILE, weights_only=True)
    assert saved["meta"] == trained["meta"] and saved["meta"]["compression_ratio"] == TRAINED_RATIO
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in trained["state_dict"].items())


def test_policy_transfers_to_another_model_of_the_same_shape(policy_dir, other_model_dir, tiny_dir, tmp_path,
                                                             plain_load):
    out = tmp_path / "transferred"
    _compress("--policy", policy_dir, "--model", other_model_dir, "--compression_ratio", 0.5, "--output_dir", out)
    assert plain_load(out)[0].config.intermediate_size == _width(N, 0.5)
    plan = _plan(out)
    assert plan["policy_transferred"] is True
    assert plan["policy_source_model"] == str(tiny_dir) and plan["source_model"] == str(other_model_dir)
    assert plan["policy_ffn_sha256"] != plan["source_ffn_sha256"]
    # on the source model itself the fingerprints agree (not transferred): the fit and compress see the same FFNs
    trained = torch.load(policy_dir / POLICY_FILE, weights_only=True)
    assert _plan(policy_dir)["source_ffn_sha256"] == trained["meta"]["ffn_sha256"] == plan["policy_ffn_sha256"]


# ----------------------------------------------------------------------------- bad inputs: one line, exit 2


class TrapPayload:
    """A custom class in a policy file: unpickling it (weights_only=False) writes ``self.marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).write_text("executed")
        self.__dict__.update(state)


class ExecPayload:
    """Pickles as a call to ``exec``: loading it without weights_only runs code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('executed')",)


def _bad_policy_files(folder: Path) -> dict[str, tuple[Path, Path | None]]:
    """name -> (policy file, marker file its unpickling would create or None)."""
    folder.mkdir()
    files = {}
    junk = folder / "junk.pt"
    junk.write_bytes(random.Random(0).randbytes(4096))
    files["random-bytes"] = (junk, None)
    no_keys = folder / "no_keys.pt"
    torch.save({"weights": torch.zeros(N, D), "epoch": 3}, no_keys)
    files["dict-without-keys"] = (no_keys, None)
    for name, cls in (("custom-class", TrapPayload), ("exec-reduce", ExecPayload)):
        marker = folder / f"{name}.executed"
        path = folder / f"{name}.pt"
        torch.save({"state_dict": {}, "meta": cls(str(marker))}, path)
        files[name] = (path, marker)
    return files


COMPRESS_BAD = ["shape-mismatch", "random-bytes", "dict-without-keys", "custom-class", "exec-reduce", "ratio-abc"]


@pytest.fixture(scope="module")
def bad_compress_runs(policy_dir, tiny_dir, tmp_path_factory):
    """Every failing ``python -m prunenet.compress`` run, launched together: name -> (result, info)."""
    root = tmp_path_factory.mktemp("compress-bad")
    wider = save_tiny(tiny_llama(seed=2, intermediate_size=40), root / "n40")
    bad_files = _bad_policy_files(root / "files")
    jobs, info = {}, {}

    def case(name, policy, model, needles, ratio="0.3", marker=None):
        out = root / name / "out"
        out.parent.mkdir()
        jobs[name] = ["--policy", str(policy), "--model", str(model), "--compression_ratio", ratio,
                      "--output_dir", str(out)]
        info[name] = {"out": out, "needles": needles, "marker": marker}

    case("shape-mismatch", policy_dir, wider, ["(37, 24)", "(40, 24)"])
    for name, (path, marker) in bad_files.items():
        case(name, path, tiny_dir, [str(path), "not a PruneNet policy"], marker=marker)
    case("ratio-abc", policy_dir, tiny_dir, ["'abc'"], ratio="abc")
    logdir = root / "process-output"
    logdir.mkdir()
    results = run_fit_many(jobs, [], logdir, module="prunenet.compress")
    return {name: (results[name], info[name]) for name in jobs}


@pytest.mark.parametrize("case", COMPRESS_BAD)
def test_bad_compress_input_is_one_line_error(case, bad_compress_runs):
    res, info = bad_compress_runs[case]
    error = one_line_error(res, code=2)
    for needle in info["needles"]:
        assert needle in error, error
    assert not info["out"].exists() and [p.name for p in info["out"].parent.iterdir()] == []  # nothing written
    if info["marker"] is not None:  # refused by weights_only=True, not executed
        assert not info["marker"].exists()


def test_compress_error_path_does_not_import_lightning(tmp_path):
    """``run_main`` maps Lightning's MisconfigurationException too, but must not import Lightning to do so:
    that alone cost the compress CLI ~4 s of CPU per start."""
    script = ("import sys\n"
              "from prunenet.cli import run_main\n"
              "from prunenet.compress import main\n"
              "try:\n"
              f"    run_main(lambda: main(['--model', 'x', '--output_dir', {str(tmp_path / 'out')!r}, "
              "'--compression_ratio', 'abc']))\n"
              "except SystemExit as exc:\n"
              "    print('exit', exc.code, sorted(m for m in sys.modules if m.split('.')[0] == 'lightning'))\n")
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=HANG_S,
                         check=False)
    assert res.stdout.strip() == "exit 2 []", res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "'abc'" in res.stderr


@pytest.mark.parametrize("name", ["custom-class", "exec-reduce"])
def test_refused_policy_payloads_are_real_traps(name, bad_compress_runs, tmp_path):
    """Control for the test above: without weights_only these files do run code when loaded."""
    bad_compress_runs[name]  # the CLI runs (which must not trigger them) happen first
    path, _ = _bad_policy_files(tmp_path / "again")[name]
    marker = Path(str(tmp_path / "again" / f"{name}.executed"))
    torch.load(path, weights_only=False)
    assert marker.read_text() == "executed"


_SIZES = {"intermediate_size": N, "hidden_size": D}


@pytest.mark.parametrize("blob,match", [
    ({"state_dict": {}, "meta": [1, 2]}, "'meta' is a list, not a dict"),
    ({"state_dict": {}, "meta": "abc"}, "'meta' is a str, not a dict"),
    ({"state_dict": "abc", "meta": _SIZES}, "Expected state_dict to be dict-like"),
    ({"state_dict": {"proj_intermediate.weight": torch.zeros(3, 3)}, "meta": _SIZES},
     r"size mismatch for proj_intermediate\.weight.*torch\.Size\(\[3, 3\]\)"),
    ({"state_dict": {}, "meta": {"hidden_size": D}}, "'intermediate_size'"),
    ({"state_dict": {}, "meta": {"intermediate_size": None, "hidden_size": D}}, "NoneType"),
], ids=["meta-list", "meta-str", "state-dict-str", "wrong-shapes", "no-size", "size-none"])
def test_malformed_policy_file_is_a_one_line_policy_error(blob, match, tmp_path):
    from prunenet.artifacts import load_policy
    from prunenet.errors import PolicyError

    path = tmp_path / "policy.pt"
    torch.save(blob, path)
    with pytest.raises(PolicyError, match=match) as err:
        load_policy(tmp_path)  # a folder holding policy.pt works like the file
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_sweep_listing_a_ratio_twice_is_refused_before_writing(tiny_dir, tmp_path):
    from prunenet.compress import compress

    with pytest.raises(ConfigurationError, match="lists a ratio twice: 0.1 and 0.10 "):
        compress(str(tiny_dir), str(tmp_path / "sweep"), "0.1,0.10", selection="random", overwrite=True)
    assert not (tmp_path / "sweep").exists()


# ----------------------------------------------------------------------------- sweep and round_to


def test_ratio_sweep_writes_one_folder_per_ratio_and_a_summary(policy_dir, tiny_dir, tmp_path):
    out = tmp_path / "sweep"
    _compress("--policy", policy_dir, "--model", tiny_dir, "--compression_ratio", "0.1,0.2,0.3", "--output_dir", out)
    assert sorted(p.name for p in out.iterdir()) == ["r0.1", "r0.2", "r0.3", "summary.md"]
    for r in (0.1, 0.2, 0.3):
        folder = out / f"r{r}"
        config = json.loads((folder / "config.json").read_text())
        assert config["intermediate_size"] == _width(N, r)
        assert _plan(folder)["compression_ratio"] == r and _plan(folder)["kept_width"] == _width(N, r)
    rows = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("|")]
    header, rule, *body = rows
    assert "requested ratio" in header and set(rule) <= set("|-")
    assert len(body) == 3
    for r, row in zip((0.1, 0.2, 0.3), body):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == f"{r:g}" and cells[2] == f"{N} -> {_width(N, r)}" and cells[-1] == str(out / f"r{r}")


@pytest.mark.parametrize("n,r,round_to,expected", [
    (37, 0.3, 1, 25),          # floor(25.9)
    (37, 0.3, 8, 24),          # 25 -> 24
    (37, 0.1, 8, 32),          # floor(33.3) = 33 -> 32
    (37, 0.0, 8, 32),          # nothing removed, still rounded down
    (1536, 0.3, 64, 1024),     # SmolLM2: 1075 -> 1024
    (11008, 0.3, 128, 7680),   # LLaMA-2-7B: 7705 -> 7680
    (10, 0.9, 1, 1),           # (1 - 0.9) * 10 is 0.999...: the slack keeps 1 row
    (64, 0.5, 32, 32),         # already a multiple
])
def test_kept_width_with_round_to(n, r, round_to, expected):
    assert kept_width(n, r, round_to) == expected
    assert expected % round_to == 0 and expected <= _width(n, r)


@pytest.mark.parametrize("n,r,round_to,match", [
    (37, 0.9, 8, "after rounding 3 down to a multiple of 8"),  # floor(3.7) = 3 -> 0 rows
    (37, 0.3, 64, "after rounding 25 down to a multiple of 64"),
    (37, 0.3, 0, "round_to must be an integer >= 1, got 0"),
    (37, 0.3, -8, "round_to must be an integer >= 1, got -8"),
    (37, 0.3, 2.5, "round_to must be an integer >= 1, got 2.5"),
])
def test_kept_width_round_to_errors(n, r, round_to, match):
    with pytest.raises(ConfigurationError, match=match) as err:
        kept_width(n, r, round_to)
    assert "\n" not in str(err.value)


def test_round_to_8_on_a_tiny_model(policy_dir, tiny_dir, tmp_path, plain_load):
    out = tmp_path / "r8"
    _compress("--policy", policy_dir, "--model", tiny_dir, "--compression_ratio", 0.3, "--round_to", 8,
              "--output_dir", out)
    width = plain_load(out)[0].config.intermediate_size
    assert width % 8 == 0 and width == 24
    plan = _plan(out)
    assert plan["round_to"] == 8 and plan["kept_width"] == 24 and plan["compression_ratio"] == 0.3
    assert plan["effective_compression_ratio"] == round(1 - 24 / N, 6) == 0.351351
    assert all(len(idx) == 24 for idx in _kept(out))


# ----------------------------------------------------------------------------- plan replay


@pytest.mark.parametrize("source", ["fit-output", "compress-output"])
def test_plan_replay_is_bit_identical(source, policy_dir, reused, tiny_dir, tmp_path):
    original = policy_dir if source == "fit-output" else reused[0.5]
    out = tmp_path / "replay"
    _compress("--from_plan", original / PLAN_FILE, "--model", tiny_dir, "--output_dir", out)
    a, b = load_file(original / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert json.loads((out / "config.json").read_text()) == json.loads((original / "config.json").read_text())
    assert _kept(out) == _kept(original)
    assert _plan(out)["replayed_from"]["path"] == str(original / PLAN_FILE)
    if "policy_ffn_sha256" in _plan(original):  # a policy's plan: replayed on its own source, not transferred
        assert _plan(out)["policy_transferred"] is _plan(original)["policy_transferred"] is False


def test_plan_replay_refuses_a_model_of_another_ffn_width(policy_dir, tmp_path):
    from prunenet.compress import replay

    wider = save_tiny(tiny_llama(seed=2, intermediate_size=40), tmp_path / "n40")
    out = tmp_path / "replay"
    with pytest.raises(ConfigurationError, match=r"made for FFN width 37, but .* has 40") as err:
        replay(str(policy_dir), str(wider), str(out))
    assert "\n" not in str(err.value) and not out.exists()


# ----------------------------------------------------------------------------- baselines


def test_random_selection_is_seeded(tiny_dir, tmp_path):
    outs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        outs[name] = tmp_path / name
        _compress("--selection", "random", "--seed", seed, "--model", tiny_dir, "--compression_ratio", 0.3,
                  "--output_dir", outs[name])
    a, b, c = (_kept(outs[n]) for n in "abc")
    assert a == b  # same seed, same rows
    assert a != c  # another seed, other rows
    assert len(a) == LAYERS and all(len(idx) == _width(N, 0.3) == len(set(idx)) for idx in a + c)
    assert len({tuple(idx) for idx in a}) == LAYERS  # the draw differs per layer
    plan = _plan(outs["a"])
    assert plan["selection"] == "random" and plan["seed"] == 1 and "method" not in plan


def test_magnitude_selection_keeps_the_largest_gate_up_row_norms(tiny_dir, tmp_path):
    out = tmp_path / "magnitude"
    _compress("--selection", "magnitude", "--model", tiny_dir, "--compression_ratio", 0.3, "--output_dir", out)
    k = _width(N, 0.3)
    weights = load_file(tiny_dir / "model.safetensors")
    for i, kept in enumerate(_kept(out)):
        gate = weights[f"model.layers.{i}.mlp.gate_proj.weight"].double()
        up = weights[f"model.layers.{i}.mlp.up_proj.weight"].double()
        norms = torch.sqrt((gate**2).sum(dim=1) + (up**2).sum(dim=1))
        assert kept == sorted(torch.topk(norms, k).indices.tolist()), i
    assert _plan(out)["selection"] == "magnitude"


def test_a_config_file_sets_the_options_and_flags_override_it(tiny_dir, tmp_path):
    """``--config`` holds the same keys as the flags; a flag given as well wins; the run goes through the
    one pipeline (shard-wise from the safetensors files: no dense model is built)."""
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_dir}\ncompression_ratio: 0.5\nselection: random\nseed: 3\n"
                      f"output_dir: {tmp_path / 'from-config'}\n")
    _compress("--config", config)
    _compress("--config", config, "--seed", 4, "--output_dir", tmp_path / "flags")
    a, b = _plan(tmp_path / "from-config"), _plan(tmp_path / "flags")
    assert (a["selection"], a["seed"], a["compression_ratio"], a["shardwise"]) == ("random", 3, 0.5, True)
    assert b["seed"] == 4 and a["kept_indices"] != b["kept_indices"]


@pytest.mark.parametrize("text, match", [
    ("selecton: peak\n", r"unknown key 'selecton'; accepted: model, output_dir, "),
    ("selection: peek\n", r"selection must be one of sample, topk, random, magnitude, peak, wanda_sp, flap, recon, obs, got 'peek'"),
    ("- peak\n", "must be a mapping of options"),
    ("overwrite: 'false'\n", "overwrite must be true or false, got 'false'"),
    ("seed: 1.7\n", "seed must be an integer, got 1.7"),
])
def test_a_bad_config_file_is_a_one_line_error_naming_the_key(text, match, tiny_dir, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    res = run_fit("--config", str(config), "--model", str(tiny_dir), "--output_dir", str(tmp_path / "o"), extra=[],
                  module="prunenet.compress")
    assert re.search(match, one_line_error(res, code=2))
    assert not (tmp_path / "o").exists()


def test_a_policy_selection_needs_a_policy_and_a_closed_form_one_refuses_it(policy_dir, tiny_dir, tmp_path):
    with pytest.raises(ConfigurationError, match="--selection topk needs --policy"):
        compress(str(tiny_dir), str(tmp_path / "a"), 0.3, selection="topk")
    with pytest.raises(ConfigurationError, match="--policy is used only by --selection sample or topk, got "
                                                 "--selection peak"):
        compress(str(tiny_dir), str(tmp_path / "b"), 0.3, policy=str(policy_dir), selection="peak")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("method, selection, now", [("prunenet", "sample", "sample"), ("prunenet", "uniform", "random"),
                                                    ("random", None, "random"), ("peak", None, "peak")])
def test_a_format_1_plan_reads_in_todays_vocabulary_and_replays(method, selection, now, tiny_dir, tmp_path):
    """Plans written before the one vocabulary (``method`` + ``selection``) are read as today's and replay."""
    from prunenet.plan import load_plan

    _compress("--selection", "peak", "--model", tiny_dir, "--compression_ratio", 0.3, "--output_dir", tmp_path / "p")
    old = _plan(tmp_path / "p")
    old.update(format="prunenet/1", method=method, selection=selection)
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert load_plan(tmp_path / "old.json")["selection"] == now and "method" not in load_plan(tmp_path / "old.json")
    _compress("--from_plan", tmp_path / "old.json", "--model", tiny_dir, "--output_dir", tmp_path / "r")
    replayed = _plan(tmp_path / "r")
    assert replayed["selection"] == now and replayed["format"] == "prunenet/2"
    assert replayed["kept_indices"] == old["kept_indices"]


@pytest.mark.parametrize("selection", ["peak", "magnitude", "random"])
def test_compress_never_builds_the_dense_model(selection, tiny_dir, tmp_path, monkeypatch):
    """A local safetensors source is read tensor by tensor and sliced shard by shard (the one pipeline):
    building the model (transformers' loader) would fail here, and the checkpoint still appears."""
    from prunenet import loading

    def refuse(*args, **kwargs):
        raise AssertionError("compress built the dense model")

    monkeypatch.setattr(loading, "load_model", refuse)
    _compress("--selection", selection, "--model", tiny_dir, "--compression_ratio", 0.3, "--output_dir", tmp_path / "o")
    plan = _plan(tmp_path / "o")
    assert plan["shardwise"] is True and plan["selection"] == selection and len(plan["kept_indices"]) == LAYERS


def test_a_bad_flag_is_one_line_like_every_entry_point(tiny_dir, tmp_path):
    """argparse's own refusals (a bad choice, a missing option) are one ``error:`` line, not the usage block."""
    res = run_fit("--model", str(tiny_dir), "--selection", "peek", "--output_dir", str(tmp_path / "o"), extra=[],
                  module="prunenet.compress")
    assert "argument --selection: invalid choice: 'peek'" in one_line_error(res, code=2)
    res = run_fit("--model", str(tiny_dir), extra=[], module="prunenet.compress")
    assert "the following arguments are required: --output_dir" in one_line_error(res, code=2)
    assert not (tmp_path / "o").exists()


def test_a_compressed_folder_carries_no_manifest_of_the_dense_files(tiny_dir, tmp_path):
    """The cache's manifest lists a converted model's own files; a pruned copy must not claim it."""
    from prunenet.cache import MANIFEST

    (tmp_path / "src").mkdir()
    for f in tiny_dir.iterdir():
        (tmp_path / "src" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "src" / MANIFEST).write_text("{}")
    _compress("--selection", "peak", "--model", tmp_path / "src", "--output_dir", tmp_path / "o")
    assert not (tmp_path / "o" / MANIFEST).exists() and (tmp_path / "o" / "config.json").is_file()
