"""``python -m prunenet.compress``: prune a model by any selection at any ratio, without training.

A closed-form selection (``peak``, ``random``, ``magnitude``) or a trained policy (``sample``, ``topk``;
"You only prune once", paper Section 3: the policy scores rows from the weights alone and does not
depend on the ratio, so one policy serves any ratio and any model with FFN matrices of its shape):

    python -m prunenet.compress --config configs/compress/smollm2.yaml [--output_dir out/x --overwrite]
    python -m prunenet.compress --model smollm2-135m --selection peak --compression_ratio 0.3 --output_dir out/x
    python -m prunenet.compress --policy out/smollm2-r0.3 --model smollm2-135m \\
        --compression_ratio 0.1,0.2,0.3 --output_dir out/sweep [--round_to 64] [--overwrite]
    python -m prunenet.compress --from_plan out/smollm2-r0.3/prunenet.json --model smollm2-135m --output_dir out/replay

Every run goes through the one pipeline (``prunenet.pipeline.prune``), as the fit's StructuralSlicing does.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from prunenet import loading
from prunenet.arch import get_adapter
from prunenet.arch.bias import bias_mode
from prunenet.argconfig import OneLineParser, yaml_defaults
from prunenet.artifacts import atomic_write_text, check_output_dir, load_policy
from prunenet.cli import run_main
from prunenet.errors import ConfigurationError, PolicyError, PruneNetWarning
from prunenet.export import use_shardwise
from prunenet.pipeline import prune
from prunenet.plan import same_ffn
from prunenet.refit import RIDGE, check_ridge
from prunenet.replay import replay
from prunenet.selection import check_protect_fraction, kept_width
from prunenet.selectors import POLICY_SELECTIONS, SELECTIONS, build_selector, validate_selection
from prunenet.calibration import CalibrationSettings
from prunenet.inputs import SelectionInputs


def parse_ratios(text: str | float | Sequence[float]) -> list[float]:
    """``"0.1,0.2"`` -> [0.1, 0.2]. Raises ConfigurationError naming a non-numeric entry."""
    if isinstance(text, (int, float)):
        return [float(text)]
    if not isinstance(text, str):
        return [float(t) for t in text]
    out = []
    for part in text.split(","):
        try:
            out.append(float(part))
        except ValueError:
            raise ConfigurationError(f"compression_ratio must be a number or comma-separated numbers in [0, 1), "
                                     f"got {part.strip()!r}") from None
    return out


def compress(model: str, output_dir: str, compression_ratio: float | str | Sequence[float] = 0.3,
             policy: str | None = None, selection: str | None = None, seed: int = 0,
             round_to: int = 1, overwrite: bool = False, dtype: str = "auto",
             trust_remote_code: bool = False, protect_outliers: float | None = None,
             calibration: CalibrationSettings | None = None, bias_compensation: bool = False,
             refit: bool = False, refit_ridge: float = RIDGE) -> list[dict[str, Any]]:
    """Prune ``model`` at one or more ratios and save one checkpoint per ratio (``pipeline.prune``; the
    dense model is never built when the source is a local safetensors checkpoint).

    With one ratio the checkpoint is ``output_dir``; with several, ``output_dir/r<ratio>`` each,
    plus ``output_dir/summary.md``.

    Args:
        model: asset name, folder or hub id of the source (dense) model.
        output_dir: where to write.
        compression_ratio: r, or several.
        policy: ``policy.pt`` or a folder holding one (needed by the ``sample`` and ``topk`` selections).
        selection: a name in ``selection.SELECTIONS``; default ``sample`` with a policy, else ``peak``.
        seed: seed of the ``sample`` and ``random`` draws.
        round_to: kept width rounded down to a multiple of this.
        protect_outliers: share of each layer's neurons always kept (``selection.protected_rows``);
            None: the policy's own setting with a policy, else 0.
        calibration: the text ``wanda_sp`` / ``flap`` / ``recon`` and the bias compensation compute activation
            statistics on; None: the model's own (``CalibrationSettings()`` with ``seed``).
        bias_compensation: FLAP's output bias of the removed neurons (``pipeline.prune``), any selection.
        refit, refit_ridge: the least-squares refit of each FFN output projection's kept columns on the
            calibration text (ours, ``refit.py``; ``pipeline.prune``), any selection.
    Returns:
        One plan dict (``prunenet.json`` contents, without kept indices and biases) per ratio.
    Raises:
        ConfigurationError, PolicyError, OutputExistsError, ModelLoadError, UnsupportedModelError.
    """
    ratios = parse_ratios(compression_ratio)
    selection = validate_selection(selection or ("sample" if policy else "peak"), "--selection")
    uses_policy = selection in POLICY_SELECTIONS
    if protect_outliers is not None:
        check_protect_fraction(protect_outliers)
    if uses_policy and policy is None:
        raise ConfigurationError(f"--selection {selection} needs --policy (a policy.pt or a fit output folder)")
    if policy is not None and not uses_policy:
        raise ConfigurationError(f"--policy is used only by --selection {' or '.join(POLICY_SELECTIONS)}, "
                                 f"got --selection {selection}; drop --policy or choose one of those")
    config = loading.load_config(model, trust_remote_code=trust_remote_code)
    adapter = get_adapter(config)
    if bias_compensation:
        bias_mode(adapter, config)
    if refit:
        check_ridge(refit_ridge)
    n, d = adapter.intermediate_size(config), adapter.hidden_size(config)
    for r in ratios:  # every ratio is checked before any work
        kept_width(n, r, round_to)
    sweep = len(ratios) > 1
    targets = [Path(output_dir) / f"r{r:g}" for r in ratios] if sweep else [Path(output_dir)]
    if len(set(targets)) != len(targets):  # would write one folder twice (and fail half-way without overwrite)
        given = ([part.strip() for part in compression_ratio.split(",")] if isinstance(compression_ratio, str)
                 else [f"{r!r}" for r in ratios])
        first = next(t for t in targets if targets.count(t) > 1)
        same = [g for g, t in zip(given, targets) if t == first]
        raise ConfigurationError(f"compression_ratio lists a ratio twice: {' and '.join(same)} (of "
                                 f"{','.join(given)}) both give the output folder {first.name!r}")
    source = loading.resolve(model)
    for t in targets:
        check_output_dir(t, overwrite, source)
    shardwise = use_shardwise(model, None, dtype)  # a bad dtype fails here, before any weight is read
    pol, meta = (None, {})
    if uses_policy:
        pol, meta = load_policy(policy)
        if meta.get("episodes") == 0:
            warnings.warn(f"the policy in {policy} was never trained (0 episodes): --selection {selection} keeps "
                          "what its random initialisation scores", PruneNetWarning, stacklevel=2)
        if (pol.intermediate_size, pol.hidden_size) != (n, d):
            raise PolicyError(f"policy was trained on FFN matrices of shape (n, d)={(pol.intermediate_size, pol.hidden_size)} "
                              f"({meta.get('source_model')}), but {model!r} has {(n, d)}")
    if protect_outliers is None:
        protect_outliers = float(meta.get("protect_outliers") or 0.0)
    # a FeaturePolicy scores the features of the text it was trained on, unless other text is given
    calibration = calibration or getattr(pol, "settings", None) or CalibrationSettings(seed=seed)
    inputs = SelectionInputs(model, dtype, trust_remote_code, calibration=calibration)
    selector = build_selector(selection, policy=pol, seed=seed, name="--selection")
    provenance = {}
    if pol is not None:
        provenance = {"policy_source_model": meta.get("source_model"),
                      "policy_trained_ratio": meta.get("compression_ratio"), "policy_learner": meta.get("learner"),
                      "policy_reward": meta.get("reward"), "policy_episodes": meta.get("episodes"),
                      "policy_ffn_sha256": meta.get("ffn_sha256"),
                      "policy_transferred": not same_ffn(meta.get("ffn_sha256"), inputs.states, inputs.fingerprint())}

    plans = []
    for r, target in zip(ratios, targets):
        start = time.perf_counter()
        exported = prune(model, selector, r, target, round_to=round_to, protect_outliers=protect_outliers,
                         inputs=inputs, provenance=provenance, policy=pol, policy_meta=meta or None,
                         overwrite=overwrite, shardwise=shardwise, dtype=dtype, trust_remote_code=trust_remote_code,
                         bias_compensation=bias_compensation, refit=refit, refit_ridge=refit_ridge)
        summary = {k_: v for k_, v in exported.plan.items() if k_ not in ("kept_indices", "compensation_biases")}
        summary.update(output_dir=str(target), seconds=round(time.perf_counter() - start, 2))
        plans.append(summary)
    if sweep:
        atomic_write_text(Path(output_dir) / "summary.md", summary_table(plans))
    return plans


def summary_table(plans: list[dict[str, Any]]) -> str:
    """Markdown table of a ratio sweep."""
    rows = ["| requested ratio | effective ratio | FFN width | params | removed | output |",
            "|---|---|---|---|---|---|"]
    for p in plans:
        rows.append(f"| {p['compression_ratio']:g} | {p['effective_compression_ratio']:.4f} | "
                    f"{p['intermediate_size']} -> {p['kept_width']} | {p['params_pruned']:,} | "
                    f"{100 * p['params_removed_fraction']:.1f}% | {p['output_dir']} |")
    return "\n".join(rows) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m prunenet.compress`` (also the keys a ``--config`` YAML may set)."""
    parser = OneLineParser(prog="python -m prunenet.compress", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file of these options (keys without the dashes, e.g. "
                                         "configs/compress/smollm2.yaml); flags given as well override it")
    parser.add_argument("--model", help="asset name, folder or hub id of the dense model (required)")
    parser.add_argument("--output_dir", help="where to write the pruned checkpoint (required)")
    parser.add_argument("--policy", help="policy.pt, or a folder holding one (a fit output): for --selection "
                                         "sample or topk")
    parser.add_argument("--from_plan", help="prunenet.json to replay exactly (no policy needed)")
    parser.add_argument("--compression_ratio", default="0.3", help="r in [0, 1), or comma-separated for a sweep")
    parser.add_argument("--selection", choices=list(SELECTIONS), default=None,
                        help="which rows each layer keeps: sample (the trained --policy's seeded draw, the paper's; "
                             "the default with --policy), topk (the policy's k largest logits), peak (the neurons "
                             "whose output column has the largest max-|w|; the default without --policy), random "
                             "(uniform, seeded), magnitude (the largest input-weight L2 norm), or the calibration-based "
                             "wanda_sp / flap (per-neuron activation statistics on --calibration text), recon (ours: the kept set "
                             "whose FFN output on that text is closest to the dense one) and obs (ours: backward "
                             "elimination that sees the --refit)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample and random draws")
    parser.add_argument("--round_to", type=int, default=1, help="round the kept width down to a multiple")
    parser.add_argument("--protect_outliers", type=float, default=None,
                        help="share of each layer's neurons always kept: those whose output column has the largest "
                             "max-|w| (ours; default: the policy's setting, else 0)")
    parser.add_argument("--bias_compensation", action="store_true",
                        help="FLAP's bias compensation (any selection): each FFN output bias gets the mean output of "
                             "the removed neurons on the --calibration text (a --from_plan replay follows its plan)")
    parser.add_argument("--refit", action=argparse.BooleanOptionalAction, default=False,
                        help="refit each FFN output projection's kept columns by least squares on the --calibration "
                             "text (ours; any selection; same shapes, better function)")
    parser.add_argument("--refit_ridge", type=float, default=RIDGE,
                        help=f"the refit's ridge, a fraction of the mean kept activation energy ({RIDGE})")
    parser.add_argument("--calibration", default=None,
                        help="text for wanda_sp / flap / recon / --refit / --bias_compensation: self (own samples, no data; default), or "
                             "a corpus (wiki, lambada, a .txt/.jsonl file, hub:<id>): calibration-based; a feature "
                             "--policy reads the text it was trained on unless a --calibration flag is given")
    parser.add_argument("--calibration_samples", type=int, default=None, help="sequences of calibration text (64)")
    parser.add_argument("--calibration_length", type=int, default=None, help="tokens per sequence (256)")
    parser.add_argument("--calibration_temperature", type=float, default=None, help="sampling temperature of self (1)")
    parser.add_argument("--calibration_top_p", type=float, default=None, help="nucleus mass of self's sampling (1)")
    parser.add_argument("--calibration_batch", type=int, default=None,
                        help="sequences of self sampled per generate call (64; the text depends on it: 16 before "
                             "2026-12-05, what the README's quality tables used)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                        help="replace a non-empty output_dir (--no-overwrite undoes a config's overwrite: true)")
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> None:
    """``python -m prunenet.compress``: parse (``--config`` first, flags over it), then :func:`replay` or
    :func:`compress`, and print the summary table.

    Raises:
        ConfigurationError: a bad flag or config value (one line through ``cli.run_main``).
    """
    parser = build_parser()
    config = parser.parse_known_args(argv)[0].config
    if config:
        parser.set_defaults(**yaml_defaults(config, parser))
    args = parser.parse_args(argv)
    missing = [f"--{key}" for key in ("model", "output_dir") if getattr(args, key) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    start = time.perf_counter()
    if args.from_plan:
        plan = replay(args.from_plan, args.model, args.output_dir, args.overwrite, args.dtype, args.trust_remote_code)
        print(f"replayed {args.from_plan} -> {args.output_dir}: {plan['params_dense']:,} -> "
              f"{plan['params_pruned']:,} params")
    else:
        given = {k: v for k in ("samples", "length", "temperature", "top_p", "batch") if (v := getattr(args, f"calibration_{k}")) is not None}
        calibration = None if args.calibration is None and not given else CalibrationSettings(args.calibration or "self", seed=args.seed, **given)
        plans = compress(args.model, args.output_dir, args.compression_ratio, args.policy, args.selection,
                         args.seed, args.round_to, args.overwrite, args.dtype, args.trust_remote_code,
                         args.protect_outliers, calibration, args.bias_compensation, args.refit, args.refit_ridge)
        print(summary_table(plans), end="")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_main(main)
