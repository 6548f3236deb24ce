"""Reliability III (issue 25): runs stopped by a signal, a full disk, a diverged recovery.

A run stopped by SIGTERM / SIGINT exits 143 / 130 (never 0) with one ``error:`` line that says what was
saved; a recovery saves the step it stopped at and resumes from it to the same weights as an
uninterrupted run. A full disk or a file size limit is one line naming the folder and the space
needed, and the previous output stays intact. A recovery whose loss becomes non-finite stops with one
line naming the step and writes nothing.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import HANG_S, REPO, cli_command, one_line_error
from tests.test_recover import _args, _recover, setup  # noqa: F401 - the tiny dense / pruned / text fixture
from tests.test_reliability import _reap, _snapshot, _wait_for

FILE_LIMIT = 20 * 1024  # bytes: ``ulimit -f 20``; a tiny model's weights (~50 KiB) do not fit


def _run_main(call, capsys) -> tuple[int, str]:
    """``run_main(call)`` in this process: (exit code, stderr)."""
    from prunenet.cli import run_main

    with pytest.raises(SystemExit) as exit_info:
        run_main(call)
    return int(exit_info.value.code), capsys.readouterr().err


def _signal_at_step(monkeypatch, signum: int, step: int) -> None:
    """The recovery's training step ``step`` (0-based) sends ``signum`` to this process, as ``kill`` would."""
    from prunenet.recovery import RecoveryModule

    original = RecoveryModule.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        if self.global_step == step:
            signal.raise_signal(signum)
        return loss

    monkeypatch.setattr(RecoveryModule, "training_step", training_step)


# ----------------------------------------------------------------------------- signals


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_recovery_exits_non_zero_saves_its_step_and_resumes_to_the_same_weights(
        signum, code, setup, tmp_path, monkeypatch, capsys):  # noqa: F811 - setup is the imported fixture
    from safetensors.torch import load_file

    flags = ("--model.lr_scheduler=constant",)  # the schedule must not depend on max_steps
    whole = tmp_path / "whole"
    _recover(_args(setup["pruned"], setup["text"], whole, *flags, steps=5), monkeypatch)

    parts = tmp_path / "parts"
    with monkeypatch.context() as patch:
        _signal_at_step(patch, signum, step=2)
        rc, err = _run_main(lambda: _recover(_args(setup["pruned"], setup["text"], parts, *flags, steps=5), patch),
                            capsys)
    assert rc == code  # 128 + the signal, as a shell reports it; before, SIGTERM exited 0
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and line[0] == err.strip().splitlines()[-1], err[-3000:]
    assert f"stopped by {signal.Signals(signum).name}" in line[0] and "--ckpt_path last" in line[0]
    assert not (parts / "out").exists()  # no "recovered" checkpoint from a stopped run
    ckpt = next((parts / "logs").rglob("checkpoints/last.ckpt"))
    assert str(ckpt) in line[0]
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 3  # the step it stopped after

    _recover(_args(setup["pruned"], setup["text"], parts, *flags, "--ckpt_path=last", steps=5), monkeypatch)
    a, b = load_file(whole / "out" / "model.safetensors"), load_file(parts / "out" / "model.safetensors")
    # Same operations in the same order on the same CPU: the same bits.
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _popen(args: list[str], module: str, logdir: Path, **env: str) -> subprocess.Popen:
    cmd, environment = cli_command(args, module=module, env={"PYTHONUNBUFFERED": "1", **env})
    out, err = open(logdir / "stdout", "w"), open(logdir / "stderr", "w")
    try:
        return subprocess.Popen(cmd, cwd=REPO, env=environment, stdout=out, stderr=err)
    finally:
        out.close(), err.close()


def _finish(proc: subprocess.Popen, logdir: Path) -> subprocess.CompletedProcess:
    proc.wait(timeout=HANG_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, (logdir / "stdout").read_text(),
                                       (logdir / "stderr").read_text())


@pytest.mark.slow
def test_a_fit_stopped_by_sigterm_exits_143_and_names_its_checkpoint(tiny_dir, tmp_path, extra_args):
    args = [f"--model.model_name_or_path={tiny_dir}", "--trainer.max_epochs=100000",
            f"--trainer.default_root_dir={tmp_path / 'logs'}", f"--slicing.output_dir={tmp_path / 'out'}",
            "--trainer.enable_progress_bar=false", *extra_args]
    proc = _popen(args, "prunenet.fit", tmp_path)
    try:
        ckpt = _wait_for(lambda: list((tmp_path / "logs").rglob("checkpoints/last.ckpt")), proc)
        proc.send_signal(signal.SIGTERM)
        res = _finish(proc, tmp_path)
    finally:
        _reap(proc)
    line = one_line_error(res, code=143)
    assert "stopped by SIGTERM" in line and str(ckpt) in line and "--ckpt_path last" in line
    assert not (tmp_path / "out").exists()  # stopped mid-fit: no pruned checkpoint


@pytest.mark.slow
def test_an_evaluation_stopped_by_sigterm_exits_143(tiny_dir, tmp_path):
    # Two whole tasks and the whole perplexity text: tens of seconds after the first progress line.
    args = ["--model", str(tiny_dir), "--tasks", "arc_easy,arc_challenge", "--device", "cpu", "--no_cache",
            "--perplexity", "squad-wiki", "--perplexity_context_length", "32", "--output", str(tmp_path / "eval.json")]
    proc = _popen(args, "prunenet.evaluate", tmp_path, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    try:
        _wait_for(lambda: [tmp_path] if "[eval model 1/3]" in (tmp_path / "stderr").read_text() else [], proc)
        proc.send_signal(signal.SIGTERM)
        res = _finish(proc, tmp_path)
    finally:
        _reap(proc)
    assert "stopped by SIGTERM" in one_line_error(res, code=143)
    assert not (tmp_path / "eval.json").exists()


# ----------------------------------------------------------------------------- full disks


def _limited(runs: dict[str, tuple[list[str], str]]) -> dict[str, subprocess.CompletedProcess]:
    """``python -m <module> *args`` for each ``name: (args, module)``, all started at once, each under
    ``ulimit -f`` (:data:`FILE_LIMIT`): writes past it fail with EFBIG. Their output goes to pipes,
    which the limit does not apply to (read by one thread each, started after every process is)."""
    from concurrent.futures import ThreadPoolExecutor

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))

    procs = {}
    try:
        for name, (args, module) in runs.items():  # from this thread: preexec_fn is not thread-safe
            cmd, env = cli_command(args, module=module)
            procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True, preexec_fn=limit)
        with ThreadPoolExecutor(len(procs)) as pool:
            outputs = {name: pool.submit(proc.communicate, timeout=HANG_S) for name, proc in procs.items()}
        return {name: subprocess.CompletedProcess(proc.args, proc.returncode, *outputs[name].result())
                for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            _reap(proc)


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_folder_and_the_space_and_loses_nothing(tiny_dir, tmp_path, extra_args):
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "model.safetensors").write_bytes(b"the previous result")
    before = _snapshot(previous)
    compress = ["--selection", "peak", "--model", str(tiny_dir), "--compression_ratio", "0.3"]
    fit = [f"--model.model_name_or_path={tiny_dir}", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
           f"--trainer.default_root_dir={tmp_path / 'logs'}", f"--slicing.output_dir={tmp_path / 'fit-out'}",
           *extra_args]
    runs = _limited({"compress": ([*compress, "--output_dir", str(tmp_path / "nested" / "new")], "prunenet.compress"),
                     "compress-overwrite": ([*compress, "--output_dir", str(previous), "--overwrite"],
                                            "prunenet.compress"),
                     # the fit slices the safetensors shard by shard (prunenet/streaming.py)
                     "fit": (fit, "prunenet.fit")})
    for name, res in runs.items():
        line = one_line_error(res)
        assert "does not fit" in line and "File too large" in line and "it needs about" in line, (name, line)
        assert "file size limit 20.0 KiB (ulimit -f)" in line and "free in" in line, (name, line)
    assert not (tmp_path / "nested").exists() and not (tmp_path / "fit-out").exists()  # not even the parent
    assert "previous output is intact" in one_line_error(runs["compress-overwrite"])
    assert _snapshot(previous) == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporary folder left behind


def test_os_errors_anywhere_in_a_chain_become_one_line():
    from safetensors import SafetensorError

    from prunenet.cli import os_error_message

    full = OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors")
    line = os_error_message(full)
    assert line.startswith("cannot write '/data/out/model.safetensors' (No space left on device;") and "free" in line
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert "Disk quota exceeded" in os_error_message(wrapped)
    rust = SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    assert "File too large" in os_error_message(rust)
    assert "permission denied for '/x'" in os_error_message(PermissionError(errno.EACCES, "Permission denied", "/x"))
    assert os_error_message(OSError(errno.ENOENT, "No such file or directory", "/x")) is None  # not this class
    assert os_error_message(ValueError("bad")) is None


# ----------------------------------------------------------------------------- a diverged recovery


def test_a_recovery_whose_loss_becomes_non_finite_stops_naming_the_step_and_writes_nothing(
        setup, tmp_path, monkeypatch, capsys):  # noqa: F811 - setup is the imported fixture
    # Finite and accepted, but it turns the weights into infinities at the first update.
    args = _args(setup["pruned"], setup["text"], tmp_path / "run", "--model.learning_rate=1e30", steps=5)
    rc, err = _run_main(lambda: _recover(args, monkeypatch), capsys)
    assert rc == 2
    line = err.strip().splitlines()[-1]
    # NaN or an infinity, whichever the BLAS gives for weights of ~1e30: both are refused.
    assert re.match(r"error: the training loss became (nan|-?inf) at step 2 ", line) and "nothing was saved" in line
    assert not (tmp_path / "run").exists()  # no output, no log folder, no checkpoint


def test_non_finite_weights_are_never_saved():
    from prunenet.errors import DivergedError
    from prunenet.recovery.module import check_finite

    check_finite({"a": torch.ones(3), "ids": torch.tensor([1, 2])}, "after step 1")  # finite: no error
    with pytest.raises(DivergedError, match=r"^2 of 3 tensors are NaN or infinite after merging .*first: b\)"):
        check_finite({"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "c": torch.tensor([float("-inf")])},
                     "after merging the LoRA adapters")



@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="DDP on CPU needs 2 cores")
def test_a_two_process_recovery_stopped_by_sigterm_stops_every_rank_together(setup, tmp_path):  # noqa: F811
    """SIGTERM to the launching process only: both ranks stop after the same step (one all-reduce of
    the request), save that step, and exit 143 with one line, without a hang or a traceback."""
    args = _args(setup["pruned"], setup["text"], tmp_path, "--trainer.devices=2", "--trainer.strategy=ddp",
                 "--trainer.accelerator=cpu", "--trainer.val_check_interval=1000", steps=100000)
    proc = _popen(args, "prunenet.recover", tmp_path)
    try:
        _wait_for(lambda: list((tmp_path / "logs").rglob("checkpoints/last.ckpt")), proc)  # step 25 reached
        proc.send_signal(signal.SIGTERM)
        res = _finish(proc, tmp_path)
    finally:
        _reap(proc)
    line = one_line_error(res, code=143)
    assert "stopped by SIGTERM" in line and "--ckpt_path last" in line, line
    ckpt = next((tmp_path / "logs").rglob("checkpoints/last.ckpt"))
    step = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    assert step > 25 and f"after step {step} " in line  # saved where it stopped, not at the last periodic save
    assert not (tmp_path / "out").exists()
