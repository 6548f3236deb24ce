"""PruneNetModule: the frozen LLM's FFN states and the trainable policy.

Source: PruneNet Section 3 (policy learning with the spectral reward). Per episode
(= one Lightning epoch) and layer i:

1. keep probabilities ``p = policy(W_i)`` (relaxed Bernoulli, ``policy.py``);
2. action: ``k = floor((1 - r) n)`` rows drawn without replacement from p;
3. reward ``r_i = 1 / KS(sv(W_i), sv(W_i[kept]))``, discounted ``R_i = gamma^i r_i``;
4. REINFORCE loss ``L_i = -R_i * sum_{j in kept} log p_j`` (+ optional KL term); its gradient
   is taken per layer through the row logits and folded into the policy parameters, so the
   autograd graph never holds the layers' weights (see ``training_step``).

The LLM itself is never held: only the FFN input matrices W_i (views of the loaded
weights, the rest of the model is freed), which are not registered as buffers so
Lightning checkpoints and DDP broadcasts hold the policy alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from prunenet import loading
from prunenet.arch import check_finite, get_adapter
from prunenet.errors import ConfigurationError
from prunenet.policy import SparsityPredictor
from prunenet.reward import discount, ks_statistic, singular_values, spectral_reward
from prunenet.slicing import (atomic_write_dir, check_output_dir, count_parameters, ffn_fingerprint, kept_width,
                              layer_generator, make_plan, package_versions, sample_rows, save_pruned,
                              select_kept_rows, slice_model, validate_ratio, validate_selection, write_provenance)
from prunenet.streaming import (StreamedStates, available_memory, checkpoint_bytes, safetensors_files,
                                slice_checkpoint, stream_states)

_SPECTRA_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def load_ffn_states(model_name_or_path: str, dtype: str = "auto", trust_remote_code: bool = False,
                    low_memory: bool | None = None) -> tuple[Sequence[torch.Tensor], dict[str, Any]]:
    """Read the policy states (first FFN input matrix of every layer) of a model.

    A local safetensors checkpoint loaded in its own dtype is streamed: only the FFN input
    tensors are read, by name, without building the model (``streaming.stream_states``;
    ``low_memory`` reads one layer at a time). Otherwise the model is loaded with transformers,
    detached views of its FFN input matrices are kept (no copy) and the rest is freed.

    Returns:
        ``(states, info)``: states is a sequence of (n, d) tensors in the checkpoint dtype;
        info has ``params_dense`` and ``state_names`` (parameter paths).
    Raises:
        InvalidWeightsError: an FFN matrix has NaN/Inf (named by its parameter path).
        ModelLoadError, UnsupportedModelError: see ``loading`` and ``arch``.
    """
    path = loading.resolve(model_name_or_path)
    if loading.parse_dtype(dtype) == "auto" and Path(path).is_dir():
        streamed = stream_states(path, loading.load_config(path, trust_remote_code), low_memory)
        if streamed is not None:
            states, info = streamed
            for i in range(len(states)):  # validate every layer (NaN/Inf) before any training
                states[i]
            return states, info
    model = loading.load_model(model_name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    adapter = get_adapter(model.config)
    names = {id(p): name for name, p in model.named_parameters()}
    states, state_names = [], []
    for layer in adapter.layers(model):
        weight = adapter.input_modules(layer)[0].weight
        name = names.get(id(weight), "?")
        w = adapter.state(layer)
        check_finite(w, name)
        states.append(w)
        state_names.append(name)
    info = {"params_dense": count_parameters(model), "state_names": state_names, "streamed": False}
    del model
    return states, info


#: Hyperparameters that change the result of a fit (the rest, e.g. low_memory, change only how it runs).
RESULT_HPARAMS = ("compression_ratio", "learning_rate", "weight_decay", "gamma", "use_kld", "spectra_dtype", "dtype")


def canonical_source(model_name_or_path: str) -> str:
    """One name per source model: ``asset:<name>``, the absolute real path of a local folder
    (``./m``, ``m`` and a symlink to it are the same), or the hub id as given."""
    from prunenet import assets

    name = str(model_name_or_path)
    if assets.is_asset(name):
        return f"asset:{name}"
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def checkpoint_settings(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """:meth:`PruneNetModule.run_settings` of the fit that wrote a Lightning checkpoint (its saved
    hyperparameters and ``prunenet_run`` record). Checkpoints written before the record existed give
    no seed (None: not compared) and the source resolved from ``model_name_or_path`` now."""
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    run = dict(checkpoint.get("prunenet_run") or {})
    source = run.get("source")
    if source is None and hparams.get("model_name_or_path") is not None:
        source = canonical_source(hparams["model_name_or_path"])
    return {"source": source, "seed": run.get("seed"), **{key: hparams.get(key) for key in RESULT_HPARAMS}}


def settings_mismatch(stored: dict[str, Any], current: dict[str, Any]) -> str:
    """``""`` when a stored fit can be resumed with the current settings, else what differs, as
    ``"seed=0 (this run: 5), compression_ratio=0.3 (this run: 0.25)"``. A stored None is not compared."""
    parts = [f"{key}={stored[key]!r} (this run: {current.get(key)!r})" for key in stored
             if stored[key] is not None and stored[key] != current.get(key)]
    return ", ".join(parts)


class PruneNetModule(L.LightningModule):
    """Trains the PruneNet policy on one model's FFN matrices.

    Args:
        model_name_or_path: embedded asset name (``smollm2-135m``, ``gemma3-270m``),
            local Hugging Face folder, or hub id.
        compression_ratio: r, fraction of FFN intermediate neurons removed in every layer,
            0 <= r < 1; k = floor((1 - r) n) rows are kept.
        learning_rate: AdamW learning rate of the policy (authors: 1e-3).
        weight_decay: AdamW weight decay.
        gamma: layer discount, R_i = gamma^i r_i (authors: 0.99).
        use_kld: add the authors' KL-style regulariser on alpha.
        spectra_dtype: ``float32`` or ``float64`` for singular values.
        dtype: dtype to load the LLM weights in (``auto`` keeps the checkpoint's).
        trust_remote_code: passed to transformers; off by default.
        low_memory: read each layer's FFN matrix from the safetensors files when it is used
            instead of keeping all in memory (None: automatic, when they exceed 1 GiB).

    Raises:
        ConfigurationError: bad ratio / gamma / spectra dtype, or a ratio that keeps no row.
        ModelLoadError, UnsupportedModelError, AssetMissingError: the model cannot be used.
    """

    def __init__(self, model_name_or_path: str = "smollm2-135m", compression_ratio: float = 0.3,
                 learning_rate: float = 1e-3, weight_decay: float = 0.01, gamma: float = 0.99,
                 use_kld: bool = False, spectra_dtype: str = "float32", dtype: str = "auto",
                 trust_remote_code: bool = False, low_memory: bool | None = None) -> None:
        super().__init__()
        validate_ratio(compression_ratio)
        if not 0.0 < gamma <= 1.0:
            raise ConfigurationError(f"gamma must be in (0, 1], got {gamma!r}")
        if spectra_dtype not in _SPECTRA_DTYPES:
            raise ConfigurationError(f"spectra_dtype must be one of {list(_SPECTRA_DTYPES)}, got {spectra_dtype!r}")
        if learning_rate <= 0:
            raise ConfigurationError(f"learning_rate must be > 0, got {learning_rate!r}")
        loading.parse_dtype(dtype)
        self.save_hyperparameters()
        config = loading.load_config(model_name_or_path, trust_remote_code=trust_remote_code)
        self.adapter = get_adapter(config)
        self.config = config
        self.model_type = config.model_type
        self.intermediate_size = self.adapter.intermediate_size(config)
        self.hidden_size = self.adapter.hidden_size(config)
        self.kept_width = kept_width(self.intermediate_size, compression_ratio)
        self.adapter.check_sliceable(config, self.kept_width)  # fail before training, not at the end
        self.num_layers_config = getattr(self.adapter.text_config(config), "num_hidden_layers", None)
        self.policy = SparsityPredictor(self.intermediate_size, self.hidden_size)
        self._states: list[torch.Tensor] | None = None
        self._state_info: dict[str, Any] = {}
        self._reference: dict[int, torch.Tensor] = {}
        self._kept: list[torch.Tensor] | None = None
        self._pruned = None
        self._checkpoint: Path | None = None
        self._fit_start = time.time()
        self._default_output = Path("lightning_logs") / "pruned"
        self.history: list[dict[str, float]] = []
        self.last_ks: dict[int, float] = {}
        # Set by the StructuralSlicing callback (or defaults): where and how to slice.
        self.output_dir: str | None = None
        self.overwrite = False
        self.selection = "sample"
        self.shardwise: bool | None = None

    # ------------------------------------------------------------------ states
    @property
    def num_layers(self) -> int:
        """Number of decoder layers (= steps of one episode)."""
        return len(self.states)

    @property
    def states(self) -> list[torch.Tensor]:
        """Per-layer FFN input matrices W_i, each (n, d), loaded on first use."""
        if self._states is None:
            self._states, self._state_info = load_ffn_states(
                self.hparams.model_name_or_path, self.hparams.dtype, self.hparams.trust_remote_code,
                self.hparams.low_memory)
        return self._states

    @property
    def seed(self) -> int:
        """The run's seed (``seed_everything``), which also seeds every episode's sampling."""
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def setup(self, stage: str) -> None:
        self.states  # load before the first episode so the progress bar times episodes only
        # trainer.log_dir is a collective under DDP: resolve it here, on every rank.
        self._default_output = Path(self.trainer.log_dir or "lightning_logs") / "pruned"
        # Refuse a bad output folder now (also the default one), not after all the episodes.
        if stage == "fit":
            check_output_dir(self.resolved_output_dir(), self.overwrite, self.source_path())

    def source_path(self) -> str:
        """The resolved source model (asset cache folder, local folder or hub id)."""
        return loading.resolve(self.hparams.model_name_or_path)

    def on_fit_start(self) -> None:
        # A new fit changes the policy: results of an earlier fit of this module (kept rows, the sliced
        # model, the saved folder, its parameter count) are stale and are recomputed when asked.
        self._kept = self._pruned = self._checkpoint = None
        for key in ("params_pruned", "shardwise"):
            self._state_info.pop(key, None)
        self._fit_start = time.time()
        states = self.states
        self._states = states.to(self.device) if isinstance(states, StreamedStates) else [
            w.to(self.device) for w in states]

    def reference_spectrum(self, layer: int) -> torch.Tensor:
        """Singular values of the dense W_i, shape (min(n, d),); computed once per layer."""
        if layer not in self._reference:
            self._reference[layer] = singular_values(self.states[layer], _SPECTRA_DTYPES[self.hparams.spectra_dtype])
        return self._reference[layer]

    # ------------------------------------------------------------------ training
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """One episode over this rank's layers ``batch`` (LongTensor of layer indices)."""
        hp = self.hparams
        dtype = _SPECTRA_DTYPES[hp.spectra_dtype]
        num_layers = self.num_layers
        ks_all = torch.zeros(num_layers, dtype=torch.float64, device=self.device)
        reward_all = torch.zeros_like(ks_all)
        trained = torch.zeros_like(ks_all)
        # Starts connected to every parameter so a rank with no layer still joins the DDP all-reduce.
        surrogate = sum(p.sum() * 0.0 for p in self.policy.parameters())
        loss = torch.zeros((), device=self.device)
        u, c = self.policy.direction()  # z_i = W_i u + c: the parameters reach every layer through (u, c)
        detached = (u.detach(), c.detach())
        for i in batch.tolist():
            w = self.states[i]
            w32 = w.float()  # used twice below; a no-op for float32 states
            gen = layer_generator(self.seed, self.current_epoch, i, self.device)
            z = self.policy.logits(w32, detached).requires_grad_()
            p = self.policy.keep_probabilities(z, generator=gen)
            kept = sample_rows(p.detach(), self.kept_width, generator=gen, layer=i)
            ks = ks_statistic(self.reference_spectrum(i), singular_values(w.index_select(0, kept), dtype))
            r = spectral_reward(ks)
            step_loss = -discount(r, i, hp.gamma) * torch.log(p.index_select(0, kept)).sum()
            if hp.use_kld:
                step_loss = step_loss + self.policy.kl_regulariser(z)
            # Backpropagate to z_i now, while W_i is in memory: dL/du = W_i^T dL/dz_i, dL/dc = sum dL/dz_i.
            # The surrogate below has exactly these gradients, so the one backward of the episode gives
            # the gradient of sum_i L_i without the graph holding a float32 copy of every layer's W_i
            # (32 x 180 MB for LLaMA-2-7B, 80 x 940 MB for a 70B).
            (dz,) = torch.autograd.grad(step_loss, z)
            surrogate = surrogate + (w32.t() @ dz) @ u + dz.sum() * c
            loss = loss + step_loss.detach()
            ks_all[i], reward_all[i], trained[i] = ks, r, 1.0
        # Sum over ranks: every rank then holds every layer's metrics.
        reduce = self.trainer.strategy.reduce
        ks_all, reward_all = reduce(ks_all, reduce_op="sum"), reduce(reward_all, reduce_op="sum")
        trained = reduce(trained, reduce_op="sum")
        total_loss = reduce(loss.clone(), reduce_op="sum")
        layers = [i for i in range(num_layers) if trained[i] > 0]
        self.last_ks = {i: float(ks_all[i]) for i in layers}
        # One optimizer step per episode, so step-level logging is per-episode logging (and needs
        # no sync_dist: the values were already summed over ranks above).
        count = trained.sum()
        metrics = {"reward/mean": reward_all.sum() / count, "ks/mean": ks_all.sum() / count, "loss": total_loss}
        self.log_dict({k: v.float() for k, v in metrics.items()}, on_step=True, on_epoch=False, prog_bar=True,
                      batch_size=1)
        self.log_dict({f"ks/layer_{i:02d}": ks_all[i].float() for i in layers},
                      on_step=True, on_epoch=False, batch_size=1)
        self.history.append({"episode": self.current_epoch, "reward_mean": float(metrics["reward/mean"]),
                             "ks_mean": float(metrics["ks/mean"]), "loss": float(total_loss)})
        # DDP averages gradients over ranks; scaling by world size makes the update the
        # gradient of the full sum over layers, the same as on one device.
        return surrogate * self.trainer.world_size

    def on_train_end(self) -> None:
        # Slicing, the spectrum figure and evaluation run after Lightning moved the module to CPU;
        # the states and reference spectra are plain attributes, so move them too (frees GPU memory).
        states = self.states
        self._states = states.to("cpu") if isinstance(states, StreamedStates) else [w.cpu() for w in states]
        self._reference = {i: sv.cpu() for i, sv in self._reference.items()}

    def on_train_epoch_start(self) -> None:
        self._episode_start = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        # Whole episode: forward, spectra, KS, backward and the optimizer step.
        seconds = time.perf_counter() - self._episode_start
        self.log("time/episode_seconds", seconds, on_step=False, on_epoch=True, batch_size=1, sync_dist=False,
                 rank_zero_only=True)
        if self.history:
            self.history[-1]["seconds"] = seconds

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.policy.parameters(), lr=self.hparams.learning_rate,
                                 weight_decay=self.hparams.weight_decay)

    def run_settings(self) -> dict[str, Any]:
        """The settings that determine this fit's result: resolved source, seed and the hyperparameters
        that change the draws or the updates (a resumed fit must have the same ones)."""
        return {"source": canonical_source(self.hparams.model_name_or_path), "seed": self.seed,
                **{key: self.hparams[key] for key in RESULT_HPARAMS}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["prunenet_history"] = list(self.history)
        settings = self.run_settings()
        checkpoint["prunenet_run"] = {"source": settings["source"], "seed": settings["seed"]}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # prunenet.fit checks this before the Trainer starts; this covers programmatic resumes (a trainer is
        # attached), not load_from_checkpoint for inspection.
        differ = self._trainer is not None and settings_mismatch(checkpoint_settings(checkpoint), self.run_settings())
        if differ:
            raise ConfigurationError(f"cannot resume: the checkpoint was trained with {differ}")
        self.history = list(checkpoint.get("prunenet_history", []))

    # ------------------------------------------------------------------ results
    def configure_output(self, output_dir: str | None, overwrite: bool, selection: str,
                         shardwise: bool | None = None) -> None:
        """Set where and how the pruned model is produced (called by StructuralSlicing)."""
        validate_selection(selection)
        self.output_dir, self.overwrite, self.selection = output_dir, overwrite, selection
        self.shardwise = shardwise

    def use_shardwise(self) -> bool:
        """Slice the safetensors files shard by shard instead of loading the model: when asked,
        or (``shardwise=None``) when the checkpoint is larger than half the available memory."""
        path = Path(loading.resolve(self.hparams.model_name_or_path))
        local = path.is_dir() and safetensors_files(path) is not None
        if self.shardwise is None:
            return local and loading.parse_dtype(self.hparams.dtype) == "auto" and \
                checkpoint_bytes(path) > available_memory() // 2
        if self.shardwise and not local:
            raise ConfigurationError(f"shard-wise slicing needs a local safetensors checkpoint, "
                                     f"got {self.hparams.model_name_or_path!r}")
        if self.shardwise and loading.parse_dtype(self.hparams.dtype) != "auto":
            raise ConfigurationError(f"shard-wise slicing keeps the checkpoint's dtype; it cannot be combined "
                                     f"with --model.dtype={self.hparams.dtype} (use dtype auto)")
        return bool(self.shardwise)

    def kept_indices(self) -> list[torch.Tensor]:
        """Kept rows per layer chosen by the trained policy (cached): list of (k,) LongTensors."""
        if self._kept is None:
            self.policy.eval()
            self._kept = select_kept_rows(self.policy, self.states, self.kept_width, self.selection, self.seed)
        return self._kept

    def pruned_model(self):
        """The sliced model (cached). Loads the dense checkpoint once and slices it in place
        (or, after a shard-wise save, loads the saved pruned checkpoint)."""
        if self._pruned is None and self._checkpoint is not None and self._state_info.get("shardwise"):
            self._pruned = loading.load_model(str(self._checkpoint))
        if self._pruned is None:
            model = loading.load_model(self.hparams.model_name_or_path, dtype=self.hparams.dtype,
                                       trust_remote_code=self.hparams.trust_remote_code)
            self._state_info["params_dense"] = count_parameters(model)
            self._pruned = slice_model(model, self.kept_indices(), self.adapter)
        return self._pruned

    def load_dense_model(self):
        """A fresh dense copy of the source model (loaded from disk, never deep-copied)."""
        return loading.load_model(self.hparams.model_name_or_path, dtype=self.hparams.dtype,
                                  trust_remote_code=self.hparams.trust_remote_code)

    def load_tokenizer(self):
        """The source model's tokenizer, or None if it has none."""
        return loading.load_tokenizer(self.hparams.model_name_or_path, self.hparams.trust_remote_code)

    def resolved_output_dir(self) -> Path:
        """``output_dir`` or, by default, ``<log dir>/pruned``."""
        if self.output_dir:
            return Path(self.output_dir).expanduser()
        return self._default_output

    def plan(self, params_pruned: int | None = None) -> dict[str, Any]:
        """Provenance of the pruned checkpoint (written as ``prunenet.json``)."""
        if params_pruned is None:
            params_pruned = self._state_info.get("params_pruned") or count_parameters(self.pruned_model())
        self._state_info["params_pruned"] = params_pruned
        return make_plan(
            source_model=self.hparams.model_name_or_path, model_type=self.model_type,
            compression_ratio=self.hparams.compression_ratio, round_to=1,
            intermediate_size=self.intermediate_size, hidden_size=self.hidden_size, kept=self.kept_indices(),
            method="prunenet", selection=self.selection, seed=self.seed,
            params_dense=self._state_info["params_dense"], params_pruned=params_pruned,
            extra={"episodes": len(self.history),
                   "final_reward_mean": self.history[-1]["reward_mean"] if self.history else None,
                   "source_ffn_sha256": self.ffn_sha256(),
                   "shardwise": bool(self._state_info.get("shardwise"))})

    def ffn_sha256(self) -> str:
        """Fingerprint of the source model's FFN input matrices (cached)."""
        if "ffn_sha256" not in self._state_info:
            self._state_info["ffn_sha256"] = ffn_fingerprint(self.states)
        return self._state_info["ffn_sha256"]

    def policy_metadata(self) -> dict[str, Any]:
        """What a saved policy file says about itself."""
        return {"intermediate_size": self.intermediate_size, "hidden_size": self.hidden_size,
                "model_type": self.model_type, "source_model": str(self.hparams.model_name_or_path),
                "compression_ratio": float(self.hparams.compression_ratio), "episodes": len(self.history),
                "seed": self.seed, "ffn_sha256": self.ffn_sha256(), "versions": package_versions()}

    def pruned_checkpoint(self) -> Path:
        """Slice and save the pruned model once (atomic); return its folder. Call on rank 0."""
        if self._checkpoint is None:
            if self.use_shardwise():
                self._state_info["shardwise"] = True
                source = Path(loading.resolve(self.hparams.model_name_or_path))

                def write(tmp: Path) -> None:
                    params = slice_checkpoint(source, self.config, self.kept_indices(), tmp)
                    write_provenance(tmp, self.plan(params_pruned=params), self.policy, self.policy_metadata())

                self._checkpoint = atomic_write_dir(self.resolved_output_dir(), self.overwrite, write, source)
            else:
                model = self.pruned_model()
                self._checkpoint = save_pruned(model, self.resolved_output_dir(), self.plan(), policy=self.policy,
                                               policy_meta=self.policy_metadata(),
                                               tokenizer=self.load_tokenizer(), overwrite=self.overwrite,
                                               source=self.source_path())
        return self._checkpoint

    def summary(self) -> str:
        """One-screen summary: params dense -> pruned, % removed, rewards, wall time, output path."""
        plan = self.plan()
        lines = [
            "PruneNet summary",
            f"  model            {plan['source_model']} ({plan['model_type']}, {plan['num_layers']} layers)",
            f"  FFN width        {plan['intermediate_size']} -> {plan['kept_width']} "
            f"(compression ratio {plan['compression_ratio']}, selection {plan['selection']})",
            f"  parameters       {plan['params_dense']:,} -> {plan['params_pruned']:,} "
            f"({100 * plan['params_removed_fraction']:.1f}% removed)",
        ]
        if self.history:
            lines.append(f"  mean reward      episode 1: {self.history[0]['reward_mean']:.3f}   "
                         f"episode {len(self.history)}: {self.history[-1]['reward_mean']:.3f}")
        lines.append(f"  wall time        {time.time() - self._fit_start:.1f} s")
        if self._checkpoint is not None:
            lines.append(f"  output           {self._checkpoint}")
        return "\n".join(lines)
