"""Plug points (ours): the policy, the reward and the learner of a fit, built from a short name
(``--model.learner=baseline``), a class name, or a LightningCLI ``class_path`` with ``init_args``
(``--model.learner.class_path=prunenet.learner.BaselineLearner --model.learner.init_args.momentum=0.8``).

Each plug point has a base class with a documented protocol and a registry of short names:

=========  ===========================  =====================================================  =====================
kind       base (protocol)              short names                                            built with
=========  ===========================  =====================================================  =====================
policy     ``policy.RowPolicy``         ``sparsity_predictor`` (paper), ``row_mlp``            ``(n, d)`` + init_args
reward     ``reward.Reward``            ``ks_gate`` (paper)                                    init_args
learner    ``learner.Learner``          ``paper``, ``baseline``                                init_args
=========  ===========================  =====================================================  =====================

Every plug-point object reports its own hyperparameters (``hparams()``), so :func:`describe` gives one
canonical record, ``{"class_path": ..., "init_args": {...}}``, for plans, policy files and resume checks.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from typing import Any

from prunenet.errors import ConfigurationError

#: kind -> (module, registry attribute, base class attribute, positional arguments the module supplies).
_KINDS = {"policy": ("prunenet.policy", "POLICIES", "RowPolicy", ("intermediate_size", "hidden_size")),
          "reward": ("prunenet.reward", "REWARDS", "Reward", ()),
          "learner": ("prunenet.learner", "LEARNERS", "Learner", ())}


def _kind(kind: str) -> tuple[dict[str, type], type, tuple[str, ...]]:
    module, registry, base, supplied = _KINDS[kind]
    mod = importlib.import_module(module)
    return getattr(mod, registry), getattr(mod, base), supplied


def resolve_class(kind: str, name: str, option: str | None = None) -> type:
    """The class a short name (``row_mlp``), a class name (``RowMLP``) or a dotted ``class_path`` names.

    Raises:
        ConfigurationError: nothing of that name, or not a subclass of the plug point's base (one line,
            listing the short names).
    """
    registry, base, _ = _kind(kind)
    option = option or f"model.{kind}"
    if name in registry:
        return registry[name]
    by_class = {cls.__name__: cls for cls in registry.values()}
    cls = by_class.get(name)
    if cls is None and "." in name:
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigurationError(f"{option} must be one of {', '.join(sorted(registry))} or the class_path of a "
                                 f"{base.__module__}.{base.__name__} subclass, got {name!r}")
    return cls


def build(kind: str, spec: Any, *args: Any, option: str | None = None) -> Any:
    """A plug-point object from ``spec``: a short or class name, a ``{"class_path", "init_args"}`` dict,
    a class, a callable that takes ``args`` (LightningCLI's dependency injection), or an instance.

    Args:
        kind: ``policy``, ``reward`` or ``learner``.
        args: what the module supplies (a policy's ``(intermediate_size, hidden_size)``).
    Raises:
        ConfigurationError: an unknown name, an unknown or bad init argument (one line).
    """
    _, base, _ = _kind(kind)
    option = option or f"model.{kind}"
    if isinstance(spec, base):  # a copy: an object holds per-model state (a reward's reference spectra)
        return copy.deepcopy(spec)
    init_args: dict[str, Any] = {}
    if isinstance(spec, str):
        factory = resolve_class(kind, spec, option)
    elif isinstance(spec, dict) and "class_path" in spec:
        factory = resolve_class(kind, spec["class_path"], option)
        init_args = dict(spec.get("init_args") or {})
    elif callable(spec):
        factory = spec
    else:
        raise ConfigurationError(f"{option} must be a name or a class_path with init_args, got {spec!r}")
    try:
        obj = factory(*args, **init_args)
    except ConfigurationError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{option}: {exc}") from None
    if not isinstance(obj, base):
        raise ConfigurationError(f"{option} built a {type(obj).__name__}, not a {base.__name__}")
    return obj


def describe(obj: Any) -> dict[str, Any]:
    """The canonical record of a built plug-point object: ``{"class_path": module.Class, "init_args": ...}``,
    its ``__init__`` defaults overridden by what ``obj.hparams()`` reports (so a subclass that does not
    override ``hparams`` is described as :func:`canonical` describes its name)."""
    cls = type(obj)
    kind = next(k for k in _KINDS if isinstance(obj, _kind(k)[1]))
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": {**_defaults(cls, _kind(kind)[2]), **dict(obj.hparams())}}


def _defaults(cls: type, supplied: tuple[str, ...]) -> dict[str, Any]:
    """The keyword defaults of ``cls.__init__`` besides the arguments the module supplies."""
    params = inspect.signature(cls.__init__).parameters
    return {name: p.default for name, p in params.items()
            if name not in ("self", *supplied) and p.default is not inspect.Parameter.empty}


def canonical(kind: str, spec: Any) -> dict[str, Any] | None:
    """:func:`describe` of what ``spec`` would build, without building it (a short name, a dict, or an
    already described record; a checkpoint's saved hyperparameters). None for None.

    Raises:
        ConfigurationError: as :func:`resolve_class`.
    """
    if spec is None:
        return None
    _, base, supplied = _kind(kind)
    if isinstance(spec, base):
        return describe(spec)
    if isinstance(spec, str):
        cls, given = resolve_class(kind, spec), {}
    elif isinstance(spec, dict) and "class_path" in spec:
        cls, given = resolve_class(kind, spec["class_path"]), dict(spec.get("init_args") or {})
    else:
        return spec
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {**_defaults(cls, supplied), **given}}
