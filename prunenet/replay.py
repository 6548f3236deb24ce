"""``python -m prunenet.compress --from_plan``: rebuild a pruned checkpoint from its ``prunenet.json`` (the plan)
and the source model, with the plan's kept indices (no selection, no policy)."""

from __future__ import annotations

import warnings
from typing import Any

from prunenet import loading
from prunenet.arch import get_adapter
from prunenet.artifacts import check_output_dir
from prunenet.calibration import CalibrationSettings
from prunenet.compensation import planned_biases
from prunenet.errors import ConfigurationError, PruneNetWarning
from prunenet.export import export, use_shardwise
from prunenet.inputs import SelectionInputs
from prunenet.plan import read_plan, same_ffn
from prunenet.refit import check_ridge, refit_weights
from prunenet.slicing import check_kept


def planned_refit(plan: dict[str, Any], where: str) -> tuple[CalibrationSettings, float] | None:
    """For a replay: the calibration settings and ridge of a plan's ``refit`` (None when it has none). Cheap.

    Raises:
        ConfigurationError: a ``refit`` without readable ``calibration`` settings or ridge (names ``where``).
    Warns:
        PruneNetWarning: the plan's self-generated text was written on another device than the CPU.
    """
    if plan.get("refit") in (None, False):
        return None
    try:
        record = plan["calibration"]
        settings = CalibrationSettings.from_record(record)
        ridge = check_ridge(plan["refit"]["ridge"])
    except (KeyError, TypeError) as exc:
        raise ConfigurationError(f"plan {where} has refit but no readable calibration settings or ridge "
                                 f"({type(exc).__name__}: {exc})") from None
    if record.get("device", "cpu") != "cpu" and settings.data_free:
        warnings.warn(f"plan {where} refit on text the model wrote on {record['device']}; the replay writes it on "
                      f"the CPU, where the sampled text, and so the refit weights, differ", PruneNetWarning,
                      stacklevel=3)
    return settings, ridge


def replay(plan_path: str, model: str, output_dir: str, overwrite: bool = False, dtype: str = "auto",
           trust_remote_code: bool = False) -> dict[str, Any]:
    """Rebuild a checkpoint from its ``prunenet.json`` and the source model: same kept indices,
    hence byte-identical weights for the same source weights and dtype.

    The plan must fit the model: same model type and FFN shape (n, d), one kept-index list per layer.
    A model whose FFN weights differ from the plan's source (another fingerprint) is sliced with a
    warning: the same neurons, chosen for other weights. The new ``prunenet.json`` records what was
    done now (this model, its fingerprint, today's versions) and, under ``replayed_from``, the plan's
    path and its own source. A plan with ``bias_compensation`` is replayed with its stored biases
    (``compensation.planned_biases``). A plan with ``refit`` recomputes the refit (``refit.py``) on the plan's
    calibration text, with its ridge: one calibration pass (the text is cached); the weights equal the first
    run's up to the summation order of the activation Gram (the same machine and thread count: identical).

    Raises:
        ConfigurationError: unreadable plan, or a plan that does not fit the model (says which fact differs).
    """
    plan, kept, path = read_plan(plan_path)
    config = loading.load_config(model, trust_remote_code)
    adapter = get_adapter(config)
    n, d = adapter.intermediate_size(config), adapter.hidden_size(config)
    hint = f"replay it on its source model {plan.get('source_model')!r}"
    if plan.get("model_type", config.model_type) != config.model_type:
        raise ConfigurationError(f"plan {str(path)!r} was made for model type {plan['model_type']!r}, but {model!r} "
                                 f"is {config.model_type!r}; {hint}")
    # A plan made for a wider model fails the index check, but one made for a narrower model would
    # silently keep the wrong neurons: compare the widths.
    if plan.get("intermediate_size", n) != n:
        raise ConfigurationError(f"plan {str(path)!r} was made for FFN width {plan['intermediate_size']}, "
                                 f"but {model!r} has {n}; {hint}")
    if plan.get("hidden_size", d) != d:
        raise ConfigurationError(f"plan {str(path)!r} was made for hidden size {plan['hidden_size']}, "
                                 f"but {model!r} has {d}; {hint}")
    layers = getattr(adapter.text_config(config), "num_hidden_layers", None)
    check_kept(kept, n, layers if layers is not None else len(kept))
    biases = planned_biases(plan, adapter, config, len(kept), d, repr(str(path)))
    refit = planned_refit(plan, repr(str(path)))
    source = loading.resolve(model)
    check_output_dir(output_dir, overwrite, source)
    shardwise = use_shardwise(model, None, dtype)
    inputs = SelectionInputs(model, dtype, trust_remote_code, calibration=refit[0] if refit else None)
    fingerprint = inputs.fingerprint()
    planned = plan.get("source_ffn_sha256")
    if planned and not same_ffn(planned, inputs.states, fingerprint):
        warnings.warn(f"{model!r} has other FFN weights than the plan's source {plan.get('source_model')!r} "
                      f"(FFN SHA-256 {fingerprint[:12]} vs {planned[:12]}): the same neurons are kept, but they "
                      f"were chosen{' and compensated' if biases else ''} for other weights", PruneNetWarning,
                      stacklevel=2)
    replayed_from = {key: plan.get(key) for key in ("source_model", "model_type", "source_ffn_sha256", "versions")}
    carried = {key: plan[key] for key in ("policy", "reward", "learner", "plug_points", "protect_outliers",
                                          "episodes", "final_reward_mean", "calibration", "bias_compensation",
                                          "compensation_biases", "refit",
                                          "policy_source_model", "policy_trained_ratio", "policy_learner",
                                          "policy_reward", "policy_episodes", "policy_ffn_sha256") if key in plan}
    if "policy_ffn_sha256" in plan:  # whether the policy was trained on other weights than this model's
        carried["policy_transferred"] = not same_ffn(plan["policy_ffn_sha256"], inputs.states, fingerprint)
    new_plan = export(model, kept, output_dir, selection=plan.get("selection"),
                      compression_ratio=plan.get("compression_ratio", 0.0), round_to=plan.get("round_to", 1),
                      seed=plan.get("seed", 0), overwrite=overwrite, shardwise=shardwise, dtype=dtype,
                      trust_remote_code=trust_remote_code, biases=biases,
                      output_weights=refit_weights(inputs, kept, refit[1]) if refit else None,
                      extra={**carried, "source_ffn_sha256": fingerprint,
                             "replayed_from": {"path": str(path), **replayed_from}}).plan
    return new_plan
