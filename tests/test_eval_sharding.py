"""Evaluation sharded over processes (issue 17): every rank scores its share, rank 0 writes one report
with the same numbers as one process; a failure on any rank stops them all with a one-line error.

The multi-process tests (``slow``) launch the ranks on CPU with gloo: by ``torchrun`` (the documented
way for ``prunenet.evaluate``), or by setting the variables torchrun and Lightning's own launcher set
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), which gives each process's
exit code and stderr.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunenet.evaluation.perplexity import PerplexitySettings, share, summarize
from prunenet.evaluation.sharding import Shards
from tests.conftest import HANG_S, REPO, cli_command, one_line_error, private_cache

TWO_CORES = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two CPU processes need 2 cores")


@pytest.fixture
def cache_env(tmp_path):
    """A private PRUNENET_CACHE (so the dense-result cache starts empty) that still finds the converted
    embedded models of the real one."""
    root = private_cache(tmp_path / "cache")
    return {"PRUNENET_CACHE": str(root), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv: list[str], env: dict[str, str], logdir: Path, n: int = 2, timeout: int = HANG_S,
            extra_env: dict[int, dict[str, str]] | None = None) -> list[subprocess.CompletedProcess]:
    """Start ``argv`` as ranks 0..n-1 of one process group (as torchrun or Lightning would); wait for
    all of them, killing every one and failing the test if any is still running after ``timeout`` s."""
    port = str(_free_port())
    procs = []
    for rank in range(n):
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0", "WORLD_SIZE": str(n),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **(extra_env or {}).get(rank, {})}
        out, err = open(logdir / f"rank{rank}.out", "w"), open(logdir / f"rank{rank}.err", "w")
        procs.append(subprocess.Popen(argv, cwd=REPO, env=rank_env, stdout=out, stderr=err, text=True))
        out.close(), err.close()
    deadline, hung = time.monotonic() + timeout, False
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung = True
    if hung:
        for proc in procs:
            proc.kill()
            proc.wait()
        pytest.fail(f"ranks still running after {timeout} s (a hang): "
                    + (logdir / "rank0.err").read_text()[-2000:])
    return [subprocess.CompletedProcess(argv, p.returncode, (logdir / f"rank{r}.out").read_text(),
                                        (logdir / f"rank{r}.err").read_text()) for r, p in enumerate(procs)]


def _run_together(commands: dict[str, list[str]], env: dict[str, str], logdir: Path) -> list[subprocess.CompletedProcess]:
    """Start every command at once; wait for all (killing all after HANG_S, a hang); results in order."""
    logdir.mkdir()
    procs = []
    for name, argv in commands.items():
        with open(logdir / f"{name}.out", "w") as out, open(logdir / f"{name}.err", "w") as err:
            procs.append((name, subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=err, text=True)))
    deadline = time.monotonic() + HANG_S
    try:
        for _, proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [subprocess.CompletedProcess(proc.args, proc.returncode, (logdir / f"{name}.out").read_text(),
                                        (logdir / f"{name}.err").read_text()) for name, proc in procs]


# ---------------------------------------------------------------------- fast: the pieces
@pytest.mark.parametrize("count,world", [(16, 2), (7, 2), (3, 4), (1, 3), (10, 3)])
def test_windows_are_shared_out_once_and_evenly(count, world):
    shares = [share(count, r, world) for r in range(world)]
    assert [i for s in shares for i in s] == list(range(count))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_perplexity_parts_combine_in_window_order():
    settings = PerplexitySettings(context_length=8)
    rows = [(i, 0.1 * (i + 1) + 1e-9 * i, 7) for i in range(10)]
    whole = summarize([{"nll": rows, "text_tokens": 80, "windows": 10, "cpu_s": 1.0}], settings, 1.0)
    parts = [{"nll": rows[6:], "text_tokens": 80, "windows": 10, "cpu_s": 0.5},
             {"nll": rows[:6], "text_tokens": 80, "windows": 10, "cpu_s": 0.5}]
    split = summarize(parts, settings, 1.0)
    assert split["perplexity"] == whole["perplexity"]  # summed in window order: bit for bit
    assert split["windows_per_rank"] == [4, 6] and split["processes"] == 2 and split["tokens"] == 70


def test_one_process_shards_run_work_as_is():
    shards = Shards()
    assert shards.exchange({"a": 1}) == [{"a": 1}] and shards.step(lambda: 3) == [3]
    with pytest.raises(ZeroDivisionError):  # not rewritten: a single process keeps its traceback
        shards.guarded(lambda: 1 / 0)


class _PeerGoneAtTheEnd:
    """Stands in for ``torch.distributed`` as rank 0 of 2 whose peer died after the last exchange:
    only the final barrier fails, as gloo's does when the connection is closed."""

    def __init__(self):
        self.initialized = False

    def is_available(self):
        return True

    def is_initialized(self):
        return self.initialized

    def init_process_group(self, backend):
        self.initialized = True

    def get_rank(self):
        return 0

    def get_world_size(self):
        return 2

    def barrier(self):
        raise RuntimeError("Connection closed by peer [127.0.0.1]:29500")

    def destroy_process_group(self):
        self.initialized = False


def _peer_gone_at_the_end(monkeypatch) -> _PeerGoneAtTheEnd:
    import torch.distributed

    fake = _PeerGoneAtTheEnd()
    for name in ("is_available", "is_initialized", "init_process_group", "get_rank", "get_world_size", "barrier",
                 "destroy_process_group"):
        monkeypatch.setattr(torch.distributed, name, getattr(fake, name))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("PRUNENET_VERBOSE", raising=False)
    return fake


@pytest.mark.parametrize("keep_group", [False, True])
def test_a_peer_lost_at_the_final_barrier_raises_and_never_exits(keep_group, monkeypatch, capsys):
    """The library raises the one-line ShardFailed (it never ends the process); it leaves the group
    unless asked to keep it for the entry point."""
    from prunenet import cli
    from prunenet.evaluation import sharding

    fake = _peer_gone_at_the_end(monkeypatch)
    monkeypatch.setattr(cli, "exit_now", lambda code: pytest.fail(f"library code ended the process ({code})"))
    with pytest.raises(sharding.ShardFailed, match="lost contact with the other ranks at the end"):
        with sharding.from_environment(keep_group=keep_group):
            pass
    assert capsys.readouterr().err == ""
    assert fake.initialized == keep_group


def test_the_entry_point_ends_a_rank_without_teardown(monkeypatch, capsys):
    """prunenet.evaluate's command keeps the group; run_main prints the one line and ends the rank with 2
    through exit_now (gloo's teardown skipped: the group is never destroyed)."""
    from prunenet import cli
    from prunenet.evaluation import sharding

    fake = _peer_gone_at_the_end(monkeypatch)

    def exit_now(code):  # the real one ends the process: pytest's with it
        raise SystemExit(code)

    def main():
        with sharding.from_environment(keep_group=True):
            pass

    monkeypatch.setattr(cli, "exit_now", exit_now)
    with pytest.raises(SystemExit) as caught:
        cli.run_main(main)
    err = capsys.readouterr().err.strip().splitlines()
    assert caught.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: evaluation stopped on rank 0 of 2: lost contact with the other ranks at the end")
    assert fake.initialized  # left to the process's end, not torn down


def test_evaluate_command_keeps_the_group_for_run_main(monkeypatch):
    """``python -m prunenet.evaluate`` is :func:`command`: main with the group kept, under run_main."""
    import prunenet.evaluate as ev

    seen = {}
    monkeypatch.setattr(ev, "main", lambda argv=None, keep_group=False: seen.update(argv=argv, keep=keep_group))
    monkeypatch.setattr(ev, "run_main", lambda work: (seen.update(run_main=True), work()))
    ev.command(["--model", "m"])
    assert seen == {"argv": ["--model", "m"], "keep": True, "run_main": True}


# ---------------------------------------------------------------------- slow: several processes
@pytest.fixture(scope="module")
def pruned_tiny(tiny_dir, tmp_path_factory):
    """The tiny LLaMA with 30% of every FFN's neurons removed (random rows, seed 0): only the gathering
    is under test, which a real model's scores would not change (tests/test_evaluation_real.py
    evaluates SmolLM2 itself)."""
    from prunenet.compress import main

    out = tmp_path_factory.mktemp("pruned") / "tiny-r0.3"
    main(["--selection", "random", "--model", str(tiny_dir), "--compression_ratio", "0.3", "--output_dir", str(out)])
    return next(p.parent for p in out.rglob("prunenet.json"))


def _evaluate_args(model: Path, output: Path, *extra: str) -> list[str]:
    # Batch size 1: every request and every perplexity window is computed alone, in one process or
    # two, so the loglikelihoods are the same bits and only the gathering is under test.
    return ["--model", str(model), "--baseline", "source", "--tasks", "piqa,arc_easy", "--limit", "6",
            "--batch_size", "1", "--device", "cpu", "--perplexity", "squad-wiki", "--perplexity_context_length",
            "32", "--perplexity_max_tokens", "160", "--output", str(output), *extra]


@pytest.mark.slow
@TWO_CORES
def test_two_processes_give_one_report_with_the_one_process_scores(pruned_tiny, cache_env, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "prunenet.evaluate"]
    env = {**os.environ, **cache_env}
    cmd, _ = cli_command(_evaluate_args(pruned_tiny, tmp_path / "one" / "eval.json", "--no_cache"),
                         module="prunenet.evaluate")
    # The one-process run (--no_cache: it neither reads nor writes the cache) at the same time as the two.
    two, one = _run_together({"two": [*torchrun, *_evaluate_args(pruned_tiny, tmp_path / "two" / "eval.json")],
                              "one": cmd}, env, tmp_path / "logs")
    assert two.returncode == 0, two.stderr[-4000:]
    assert one.returncode == 0, one.stderr[-4000:]

    # Exactly one report (rank 0's), and the table printed once.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["eval.json", "eval.md", "eval.png"]
    assert two.stdout.count("## Evaluation of") == 1
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    assert a["settings"]["processes"] == 1 and b["settings"]["processes"] == 2
    assert "Processes: 2" in (tmp_path / "two" / "eval.md").read_text()
    for key in ("result", "baseline_result"):
        for task, ref in a[key]["tasks"].items():
            got = b[key]["tasks"][task]
            # Each document's 0/1 correctness comes from the same loglikelihoods (batch size 1), so
            # only the order of the sums in the mean and stderr differs: 1e-12 covers that rounding.
            assert got["n"] == ref["n"] == 6 and not got["cached"]
            assert got["metrics"].keys() == ref["metrics"].keys()
            for metric, value in ref["metrics"].items():
                assert got["metrics"][metric] == pytest.approx(value, abs=1e-12), (key, task, metric)
            # Both processes did work, and together exactly the one process's requests.
            assert ref["requests_per_rank"] == [sum(got["requests_per_rank"])]
            assert all(n > 0 for n in got["requests_per_rank"]), got["requests_per_rank"]
        p, q = a[key]["perplexity"], b[key]["perplexity"]
        # Same windows computed alone, NLLs summed in window order in float64: the same bits.
        assert q["perplexity"] == pytest.approx(p["perplexity"], rel=1e-12) and q["tokens"] == p["tokens"]
        assert q["windows_per_rank"] == [3, 2] and p["windows_per_rank"] == [5]

    # A second two-process run reuses the cache rank 0 wrote: no model is loaded, same numbers.
    again = subprocess.run([*torchrun, *_evaluate_args(pruned_tiny, tmp_path / "again" / "eval.json")],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert again.returncode == 0, again.stderr[-4000:]
    c = json.loads((tmp_path / "again" / "eval.json").read_text())
    for key in ("result", "baseline_result"):
        assert all(t["cached"] for t in c[key]["tasks"].values()) and c[key]["perplexity"]["cached"]
        assert {t: r["score"] for t, r in c[key]["tasks"].items()} == {t: r["score"] for t, r in b[key]["tasks"].items()}
    assert "Loading weights" in two.stderr and "Loading weights" not in again.stderr


@pytest.mark.slow
@TWO_CORES
def test_two_process_fit_with_evaluation_writes_one_report(tiny_dir, cache_env, tmp_path):
    out = tmp_path / "out"
    args = [f"--model.model_name_or_path={tiny_dir}", "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
            "--trainer.devices=2", "--trainer.strategy=ddp", f"--trainer.default_root_dir={tmp_path / 'runs'}",
            f"--slicing.output_dir={out}", "--spectrum.enabled=false", "--trainer.enable_progress_bar=false",
            "--evaluation.tasks=[piqa,arc_easy]", "--evaluation.limit=4", "--evaluation.batch_size=2",
            "--evaluation.perplexity=squad-wiki", "--evaluation.perplexity_context_length=32", "--evaluation.perplexity_max_tokens=160"]
    cmd, env = cli_command(args, env=cache_env)
    ranks = _launch(cmd, env, tmp_path, timeout=HANG_S)
    for rank, res in enumerate(ranks):
        assert res.returncode == 0, (rank, res.stderr[-4000:])
    assert [p.parent for p in tmp_path.rglob("eval.json")] == [out]
    report = json.loads((out / "eval.json").read_text())
    assert report["settings"]["processes"] == 2 and report["model"] == str(out)
    for key in ("result", "baseline_result"):
        for task in ("piqa", "arc_easy"):
            counts = report[key]["tasks"][task]["requests_per_rank"]
            assert len(counts) == 2 and all(n > 0 for n in counts), (key, task, counts)
        assert report[key]["perplexity"]["windows_per_rank"] == [3, 2]
    assert sum(r.stdout.count("PruneNet evaluation:") + r.stderr.count("PruneNet evaluation:") for r in ranks) == 1


@pytest.mark.slow
@TWO_CORES
def test_less_work_than_processes(tiny_dir, cache_env, tmp_path):
    """One document and one perplexity window for two processes: rank 0 does both, rank 1 only takes
    part in the exchanges (lm-eval's evaluator cannot run a rank without documents)."""
    output = tmp_path / "res" / "eval.json"
    argv = [sys.executable, "-m", "prunenet.evaluate", "--model", str(tiny_dir), "--tasks", "piqa", "--limit", "1",
            "--device", "cpu", "--perplexity", "squad-wiki", "--perplexity_context_length", "32",
            "--perplexity_max_tokens", "20", "--output", str(output)]
    ranks = _launch(argv, {**os.environ, **cache_env}, tmp_path, timeout=HANG_S)
    assert [r.returncode for r in ranks] == [0, 0], ranks[1].stderr[-3000:]
    result = json.loads(output.read_text())["result"]
    assert result["tasks"]["piqa"]["requests_per_rank"] == [2, 0] and result["tasks"]["piqa"]["n"] == 1
    assert result["perplexity"]["windows_per_rank"] == [1, 0] and result["perplexity"]["tokens"] == 19


@pytest.mark.slow
@TWO_CORES
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_failure_on_one_rank_stops_every_rank_with_one_line(how, tiny_dir, cache_env, tmp_path):
    """Rank 1's forward pass raises (or the process is killed); rank 0, which finished its share and
    waits for rank 1's metrics, stops at once too. No launcher here ends rank 0 for us."""
    output = tmp_path / "res" / "eval.json"
    argv = [sys.executable, str(REPO / "tests" / "eval_on_ranks.py"), "--model", str(tiny_dir), "--tasks",
            "piqa,arc_easy", "--limit", "4", "--device", "cpu", "--output", str(output)]
    env = {k: v for k, v in os.environ.items() if k != "PRUNENET_VERBOSE"}
    ranks = _launch(argv, {**env, **cache_env, "PRUNENET_TEST_FAIL_RANK": "1", "PRUNENET_TEST_FAIL_HOW": how},
                    tmp_path, timeout=HANG_S)
    other = one_line_error(ranks[0])
    if how == "raise":
        assert one_line_error(ranks[1]) == ("error: evaluation failed on rank 1 of 2: RuntimeError: injected "
                                            "failure in the forward pass")
        assert other == ("error: evaluation failed on rank 1 of 2: RuntimeError: injected failure in the forward "
                         "pass (every rank stops; nothing was written)")
    else:
        assert ranks[1].returncode == -9
        assert other.startswith("error: evaluation stopped on rank 0 of 2: lost contact with the other ranks")
    assert not output.exists() and not output.with_suffix(".md").exists()
