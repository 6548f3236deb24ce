"""Shared helpers of the benchmark scripts: child-process peak RSS, headers, markdown tables, the
finished-cell records that make long benchmarks resumable."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The fit config of each embedded model the quality benchmarks run (the shipped defaults).
#: The shipped default of each embedded model: its compress config (what ``make demo`` runs).
CONFIGS = {"smollm2-135m": "configs/compress/smollm2.yaml", "gemma3-270m": "configs/compress/gemma3.yaml"}
#: Benchmark methods that draw nothing: one run per ratio, recorded under seed 0.
DETERMINISTIC = ("magnitude", "peak")
#: protect_outliers of the quality benchmarks' ``+protect`` methods.
PROTECT = 0.01


def config_method(config: dict) -> str | None:
    """The quality benchmarks' name of what a compress config (parsed YAML) selects: the selection's own
    name (``peak``, ``random``, ``magnitude``; ``recon``, ``wanda_sp``, ``flap`` on the model's own text, ``+refit`` with
    the refit), ``+protect`` where it protects :data:`PROTECT` of the
    neurons (``peak`` protects within its own ranking, so it stays ``peak``); None for anything no
    benchmark method reproduces exactly (another protected share, a policy)."""
    selection = config.get("selection", "peak")
    protect = config.get("protect_outliers") or 0
    if selection == "peak":
        return "peak"
    own_text = config.get("calibration", "self") == "self"
    if selection in ("recon", "wanda_sp", "flap", "obs") and not protect and own_text:
        return selection + ("+refit" if config.get("refit") else "")  # on the model's own text, as benchmarks run it
    if selection in ("random", "magnitude") and protect in (0, PROTECT):
        return f"{selection}+protect" if protect else selection
    return None


def default_method(model: str) -> str | None:
    """:func:`config_method` of the shipped compress config of ``model`` (:data:`CONFIGS`)."""
    import yaml

    return config_method(yaml.safe_load((REPO / CONFIGS[model]).read_text()))


def select_rows(selection: str, k: int, seed: int = 0, states=None, peaks=None, row_norms=None,
                protected=None) -> list:
    """Kept rows per layer by a closed-form selection (``selection.SELECTIONS``) from per-layer inputs given
    as lists (states (n, d), peaks (n,), row_norms (n,); what the selector needs), through the library's
    Selector: one sorted LongTensor (k,) per layer."""
    from prunenet.selectors import LayerInputs, build_selector, select_layers

    given = next(x for x in (states, peaks, row_norms) if x is not None)
    layers = [LayerInputs(index=i, size=int(given[i].shape[0]), state=None if states is None else states[i],
                          peaks=None if peaks is None else peaks[i], row_norms=None if row_norms is None else row_norms[i])
              for i in range(len(given))]
    return select_layers(build_selector(selection, seed=seed), layers, k, protected)


def add_text_batch_argument(parser) -> None:
    """``--calibration_batch``: sequences of the model's own text sampled per ``generate`` call (the text
    depends on it; see :func:`check_text_batch`)."""
    from prunenet.calibration import GENERATE_BATCH

    parser.add_argument("--calibration_batch", type=int, default=GENERATE_BATCH,
                        help=f"sequences of the model's own text sampled per generate call ({GENERATE_BATCH}; the "
                             "text depends on it: the results before 2026-12-05 used 16)")


def check_text_batch(records, batch: int, path: Path) -> None:
    """Refuse to add cells on the model's own text sampled ``batch`` sequences a call to a results file whose
    cells used another batch (a record without ``calibration_batch`` was sampled 16 a call), so one table never
    mixes two texts.

    Raises:
        SystemExit: one ``error:`` line naming the file and the batch that would match.
    """
    from prunenet.calibration import LEGACY_BATCH

    seen = {rec.get("calibration_batch", LEGACY_BATCH) for rec in records}
    if seen - {batch}:
        raise SystemExit(f"error: {path} holds cells on the model's own text sampled {sorted(seen)} sequences a call, "
                         f"not {batch}: pass --calibration_batch {min(seen)}, or write another file (--output)")


def scored_tokens(tokens: int, context: int = 512) -> int:
    """Tokens a squad-wiki perplexity on the first ``tokens`` tokens scores with windows of ``context``
    tokens and no overlap (a window's first token is not scored: 8192 -> 8176, 16384 -> 16352), the text
    being longer than ``tokens``; what a record without its scored count was measured on."""
    from prunenet.evaluation.perplexity import windows

    return sum(n for _, _, n in windows(tokens, context, context))


def load_records(path: Path, key_names: tuple[str, ...]) -> dict[tuple, dict]:
    """The finished cells of a resumable benchmark: every JSON line of ``path`` keyed by the tuple of
    its ``key_names`` values (a later line with the same key wins). Empty when ``path`` does not exist.

    Raises:
        ValueError: a line that is not JSON or lacks one of ``key_names`` (names the file and line).
    """
    records: dict[tuple, dict] = {}
    if not path.is_file():
        return records
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
            records[tuple(rec[k] for k in key_names)] = rec
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a record with fields {list(key_names)} ({exc})") from None
    return records


def run_measured(args: list[str], env: dict | None = None) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run ``python args...`` in a fresh process; return (wall seconds, peak RSS GiB, result).

    The peak RSS is the child's own ``ru_maxrss`` (via ``/usr/bin/time -f %M`` when present,
    otherwise ``resource.getrusage(RUSAGE_CHILDREN)``, which is exact for the first child).
    Raises:
        RuntimeError: the child failed (its stderr tail is in the message).
    """
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    timer = Path("/usr/bin/time")
    marker = "PEAK_RSS_KB="
    cmd = [sys.executable, *args]
    if timer.exists():
        cmd = [str(timer), "-f", f"{marker}%M", *cmd]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, cwd=REPO, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    if timer.exists():
        kb = int(proc.stderr.rsplit(marker, 1)[1].split()[0])
    else:
        import resource

        kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, kb / 2**20, proc


def header(command: str) -> str:
    """Markdown header: exact command, machine and package versions."""
    from prunenet.plan import package_versions

    versions = ", ".join(f"{k} {v}" for k, v in package_versions().items())
    return (f"Command: `{command}`\n\nMachine: {platform.machine()}, {os.cpu_count()} CPU cores, "
            f"Python {platform.python_version()}; {versions}\n\nDate: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± sample std`` of ``values`` times ``scale`` (the mean alone for one value, ``-`` for none)."""
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"
