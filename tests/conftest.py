"""Fixtures shared by the core suite: a tiny saved model, a plain reload that records every
load warning, and the "dense with removed neurons zeroed" reference of a pruned model."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from tests.tiny import save_tiny, tiny_llama

REPO = Path(__file__).resolve().parents[1]

#: Seconds after which a test process is taken to hang. A bound for a hang, never for speed: the
#: slowest subprocess of the suite (a two-process SmolLM2 evaluation) takes about 90 s on an idle
#: 2-core machine, and CI machines can be 5-10x slower when shared; no test asserts a duration.
HANG_S = 1800

#: Threads per test subprocess unless a test says otherwise: the suite starts several PyTorch processes
#: at once (ranks, concurrent CLI runs), and each one taking every core slows all of them ~10x.
SUBPROCESS_THREADS = "1"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny LLaMA (n=37, d=24, GQA, tied embeddings) saved with a tokenizer; do not modify."""
    return save_tiny(tiny_llama(seed=0), tmp_path_factory.mktemp("tiny") / "llama", tokenizer=True)


def private_cache(root: Path) -> Path:
    """A new, empty PRUNENET_CACHE folder at ``root`` (no reference spectra, no evaluation results)
    that still finds the converted embedded models and GGUF files of the real cache, if it has them:
    converting SmolLM2 again takes ~15 s and is not what such a test is about."""
    from prunenet.cache import cache_dir

    root.mkdir(parents=True)
    for sub in ("models", "gguf"):
        if (cache_dir() / sub).is_dir():
            (root / sub).symlink_to(cache_dir() / sub)
    return root


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _plain_load(path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` with no PruneNet code involved.

    Returns ``(model, loading_info, messages)``; messages are every transformers log record
    (its logger does not propagate, so it is hooked directly) and Python warning emitted.
    """
    from transformers import AutoModelForCausalLM

    handler = _Collect()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, **kwargs)
    finally:
        logger.removeHandler(handler)
    return model.eval(), info, handler.messages + [str(w.message) for w in caught]


@pytest.fixture
def plain_load():
    return _plain_load


def _zero_removed(model, kept: Sequence[torch.Tensor], where: str = "down"):
    """Zero the removed FFN neurons of a dense LLaMA-style model in place.

    ``where="down"``: columns of ``down_proj``; ``where="inputs"``: rows of ``gate_proj`` AND ``up_proj``.
    Either makes the dense model compute exactly what the sliced one computes.
    """
    n = model.config.intermediate_size
    with torch.no_grad():
        for layer, idx in zip(model.model.layers, kept):
            removed = torch.ones(n, dtype=torch.bool)
            removed[torch.as_tensor(idx, dtype=torch.long)] = False
            if where == "down":
                layer.mlp.down_proj.weight[:, removed] = 0
            else:
                layer.mlp.gate_proj.weight[removed, :] = 0
                layer.mlp.up_proj.weight[removed, :] = 0
    return model


@pytest.fixture
def zero_removed():
    return _zero_removed


# ----------------------------------------------------------------------------- logits comparisons


@torch.no_grad()
def forward_logits(model, ids: torch.Tensor, dtype: torch.dtype, kept: Sequence[torch.Tensor] | None = None,
                   adapter=None) -> torch.Tensor:
    """Logits of ``model`` on ``ids``, shape (batch, seq, vocab), computed by a copy of it in ``dtype``.

    With ``kept`` (one index tensor per decoder layer), the activations of the removed neurons are
    zeroed at the input of each FFN output module (a forward pre-hook found through the adapter's
    module paths only, not its slicing code): what a model sliced to ``kept`` must compute.
    The caller's model is not changed (a deep copy is cast; casting back would round buffers).
    """
    import copy

    from prunenet.arch import get_adapter

    model = copy.deepcopy(model).to(dtype)
    if kept is not None:
        adapter = adapter or get_adapter(model.config)
        n = adapter.intermediate_size(model.config)
        for layer, idx in zip(adapter.layers(model), kept):
            mask = torch.zeros(n, dtype=dtype)
            mask[torch.as_tensor(idx, dtype=torch.long)] = 1

            def zero_removed(_module, args, mask=mask):
                return (args[0] * mask,) + tuple(args[1:])

            adapter.output_module(layer).register_forward_pre_hook(zero_removed)
    return model(input_ids=ids).logits.to(dtype)


def assert_logits_match(actual, reference, ids: torch.Tensor, kept: Sequence[torch.Tensor] | None = None,
                        adapter=None) -> None:
    """Assert that ``actual`` computes the same function as ``reference`` (with the neurons outside
    ``kept`` zeroed, when given) on ``ids``.

    Both run in float64. What float64 leaves to differ is (a) float64 rounding in another summation
    order (a sliced matmul has fewer terms) and (b) a last-bit flip where transformers casts to
    float32 inside a norm or the rotary embedding. Either is bounded by the float32 rounding error of
    the whole reference forward, measured here on the same inputs: ``tol = max|ref_f32 - ref_f64|``.
    So the tolerance follows from the dtype and the size of this computation (vocabulary, depth,
    widths) on whatever CPU runs it: about 1e-7 for the tiny models, about 1e-4 for Gemma-3-270M's
    262k-wide vocabulary. A floor of 64 float64 ulps of the largest logit covers a float32 forward
    that happens to be exact. One wrongly kept neuron moves the logits by 1e-4 to 4e-1 on every
    model of the suite, far above that (``test_slicing_is_exact`` and the Gemma test prove it fails).
    """
    want = forward_logits(reference, ids, torch.float64, kept, adapter)
    noise32 = (forward_logits(reference, ids, torch.float32, kept, adapter).double() - want).abs().max()
    tol = max(float(noise32), 64 * torch.finfo(torch.float64).eps * float(want.abs().max()))
    got = forward_logits(actual, ids, torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=tol)


def assert_same_weights(a, b) -> None:
    """The two models hold bit-identical tensors under the same names (exact on any CPU)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), sorted(set(sa) ^ set(sb))
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


#: Tiny models of families PruneNet may not support; the first one it does not is used.
_UNSUPPORTED_CANDIDATES = {
    "bloom": ("BloomConfig", {"vocab_size": 101, "hidden_size": 24, "n_layer": 2, "n_head": 4}),
    "mpt": ("MptConfig", {"vocab_size": 101, "d_model": 24, "n_heads": 4, "n_layers": 2, "max_seq_len": 64}),
    "xglm": ("XGLMConfig", {"vocab_size": 101, "d_model": 24, "ffn_dim": 37, "num_layers": 2, "attention_heads": 4,
                                "max_position_embeddings": 64}),
    "biogpt": ("BioGptConfig", {"vocab_size": 101, "hidden_size": 24, "intermediate_size": 37, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "max_position_embeddings": 64}),
}


@pytest.fixture(scope="session")
def unsupported_dir(tmp_path_factory):
    """``(model_type, folder)`` of a saved tiny model whose family has no PruneNet adapter."""
    import transformers

    from prunenet.arch import supported_model_types
    from tests.tiny import build_tiny

    supported = set(supported_model_types())
    for model_type, (cls_name, kwargs) in _UNSUPPORTED_CANDIDATES.items():
        if model_type not in supported:
            model = build_tiny(getattr(transformers, cls_name), **kwargs)
            assert model.config.model_type == model_type
            return model_type, save_tiny(model, tmp_path_factory.mktemp("unsupported") / model_type)
    pytest.fail(f"every candidate family is supported now; add one to _UNSUPPORTED_CANDIDATES: {sorted(supported)}")


# ----------------------------------------------------------------------------- entry points (CLI runs)


def fit_parse_only(args: list[str]) -> tuple[int, str]:
    """Run ``prunenet.fit.main(args)`` for a parse-only action (--help, --print_config): (exit code, stdout)."""
    from prunenet.fit import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exit_info:
        main(args)
    return int(exit_info.value.code or 0), buf.getvalue()


@pytest.fixture(scope="session")
def extra_args() -> list[str]:
    """Flags every fit run gets: post-pruning evaluation off when the CLI has it (keeps runs fast)."""
    code, text = fit_parse_only(["--help"])
    assert code == 0 and "--slicing.output_dir" in text
    return ["--evaluation.enabled=false"] if "--evaluation.enabled" in text else []


def cli_command(args, extra=(), module: str = "prunenet.fit", env: dict[str, str] | None = None):
    """``(argv, environment)`` of ``python -m <module> *args *extra`` (no PRUNENET_VERBOSE, no inherited seed)."""
    base = {k: v for k, v in os.environ.items() if k not in ("PRUNENET_VERBOSE", "PL_GLOBAL_SEED")}
    base.setdefault("OMP_NUM_THREADS", SUBPROCESS_THREADS)
    return [sys.executable, "-m", module, *args, *extra], {**base, **(env or {})}


def run_fit(*args: str, extra: list[str], timeout: int = HANG_S, module: str = "prunenet.fit") -> subprocess.CompletedProcess:
    cmd, env = cli_command(args, extra, module)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)


#: Imported by ``run_fit_many``'s shared start-up beyond the module's own imports: the libraries a run
#: imports once it reaches a model (the tiny models are LLaMAs; never Lightning: compress and generate
#: do not import it).
WARM = ["torch", "safetensors.torch", "transformers.models.llama.modeling_llama"]


def run_fit_many(jobs: dict[str, list[str]], extra: list[str], logdir: Path, timeout: int = HANG_S,
                 module: str = "prunenet.fit", env: dict[str, str] | None = None) -> dict[str, subprocess.CompletedProcess]:
    """Run several ``python -m <module>`` processes at once; output goes to files.

    They share one start-up (``tests/cli_zygote.py``): one process imports what ``<module>`` imports,
    then forks one child per job, which runs ``<module>`` as ``__main__`` with its own arguments, its
    own stdout and stderr and its own exit code, as ``python -m <module> *args *extra`` would (each
    run is otherwise mostly import time). A job still running after ``timeout`` s is killed (-9)."""
    spec = {"module": module, "timeout": timeout, "result": str(logdir / "zygote-result.json"), "warm": WARM,
            "jobs": {name: {"argv": [*args, *extra], "stdout": str(logdir / f"{name}.stdout"),
                            "stderr": str(logdir / f"{name}.stderr")} for name, args in jobs.items()}}
    (logdir / "zygote-spec.json").write_text(json.dumps(spec))
    cmd, environment = cli_command([str(logdir / "zygote-spec.json")], module="tests.cli_zygote", env=env)
    zygote = subprocess.run(cmd, cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout + 120,
                            check=False)
    assert zygote.returncode == 0, zygote.stderr[-4000:]
    codes = json.loads((logdir / "zygote-result.json").read_text())
    return {name: subprocess.CompletedProcess([*cmd[:2], module, *spec["jobs"][name]["argv"]], codes[name],
                                              (logdir / f"{name}.stdout").read_text(),
                                              (logdir / f"{name}.stderr").read_text())
            for name in jobs}


def one_line_error(res: subprocess.CompletedProcess, code: int | None = 2) -> str:
    """Check a failed entry-point run: exit ``code`` (any non-zero if None), no traceback, and exactly
    one ``error:`` line, the last thing on stderr. Returns that line."""
    assert res.returncode != 0 if code is None else res.returncode == code, (res.returncode, res.stderr[-4000:])
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr[-4000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, res.stderr[-4000:]
    assert lines[-1] == errors[0]  # the message is the last thing printed, on one line
    return errors[0]


def fit_in_process(args: list[str], extra: list[str], monkeypatch: pytest.MonkeyPatch, spectrum: bool = False):
    """``prunenet.fit.main`` in this process, quietly (no progress bar; no spectrum figure unless
    ``spectrum``); returns the CLI. The seed environment variables that ``seed_everything`` sets are
    restored by ``monkeypatch`` afterwards."""
    from prunenet.fit import main

    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    monkeypatch.setenv("PL_SEED_WORKERS", "0")
    return main([*args, *extra, "--trainer.enable_progress_bar=false", f"--spectrum.enabled={str(spectrum).lower()}"])


@pytest.fixture
def one_thread():
    """One intra-op thread while the test runs: runs compared bit for bit then use the same LAPACK
    path as a subprocess started with OMP_NUM_THREADS=1, and tiny SVDs do not stall on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
