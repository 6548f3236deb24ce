"""PruneNetModule: the frozen LLM's FFN states, the trainable policy, and ``training_step``.

Source: PruneNet Section 3 (policy learning with the spectral reward). Per episode (= one Lightning
epoch) and layer i (ours: steps 1-2 for all layers first, then the spectra of step 3 in one batch):

1. row logits ``z_i = policy(W_i)`` and keep probabilities ``p`` (relaxed Bernoulli, ``policy.py``);
2. action: ``k = floor((1 - r) n)`` rows drawn without replacement from p (``selection.py``);
3. reward, e.g. the paper's ``r_i = 1 / KS(sv(W_i), sv(W_i[kept]))`` (``reward.py``);
4. the learner's loss, e.g. the paper's REINFORCE ``L_i = -gamma^i r_i sum_{j in kept} log p_j``
   (``learner.py``); its gradient is taken per layer through the row logits and handed to the
   policy's ``surrogate`` (the paper's policy folds it, so the autograd graph never holds the
   layers' weights; any other policy gets autograd).

Policy, reward and learner are plug points (``--model.policy``, ``--model.reward``, ``--model.learner``:
a short name or a class_path with init_args, ``plugins.py``; the defaults are the paper's); the reward
owns its precomputation (``Reward.prepare``). Slicing and saving are ``StructuralSlicing``'s
work; this module answers which rows are kept. It never holds the LLM, only the FFN input matrices
W_i (not buffers: Lightning checkpoints and DDP broadcasts hold the policy alone).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import lightning as L
import torch

from prunenet import loading, plugins
from prunenet.arch import get_adapter
from prunenet.checks import check_float
from prunenet.evaluation.subject import SourceModelSubject
from prunenet.learner import Learner
from prunenet.pipeline import select
from prunenet.plan import ffn_fingerprint, package_versions
from prunenet.policy import DEFAULT_POLICY, RowPolicy
from prunenet.resume import PLUG_POINTS, RESULT_HPARAMS, canonical_source, load_run_state, save_run_state
from prunenet.reward import Reward
from prunenet.selection import (RANDOM_REFERENCE_EPISODE, check_protect_fraction, draw_kept, free_probabilities,
                                kept_width, layer_generator, protected_rows, uniform_kept, validate_ratio)
from prunenet.selectors import POLICY_SELECTIONS, build_selector, validate_selection
from prunenet.inputs import SelectionInputs
from prunenet.states import StreamedStates, load_ffn_states, load_output_peaks


class PruneNetModule(L.LightningModule, SourceModelSubject):
    """Trains the PruneNet policy on one model's FFN matrices.

    Args:
        model_name_or_path: embedded asset name (``smollm2-135m``, ``gemma3-270m``),
            local Hugging Face folder, or hub id.
        compression_ratio: r, fraction of FFN intermediate neurons removed in every layer,
            0 <= r < 1; k = floor((1 - r) n) rows are kept.
        learning_rate: AdamW learning rate of the policy (authors: 1e-3).
        weight_decay: AdamW weight decay.
        dtype: dtype to load the LLM weights in (``auto`` keeps the checkpoint's).
        trust_remote_code: passed to transformers; off by default.
        low_memory: read each layer's FFN matrix from the safetensors files when it is used
            instead of keeping all in memory (None: automatic, when they exceed 1 GiB).
        policy: the policy network (``policy.RowPolicy``): a short name, ``sparsity_predictor`` (paper)
            or ``row_mlp`` (ours), or a class_path with init_args (``plugins.py``); built for (n, d).
        reward: the reward (``reward.Reward``): ``ks_gate`` (paper: 1 / KS of the gate spectra; init_args
            ``spectra_dtype``, ``spectra_method``) or a class_path.
        learner: how rewards become a loss (``learner.Learner``): ``paper`` (REINFORCE, Section 3; init_args
            ``gamma``, ``use_kld``), ``baseline`` (ours: per-layer baseline, normalised advantages, exact
            likelihood of the draw; init_args ``use_kld``, ``momentum``) or a class_path.
        protect_outliers: share of each layer's neurons always kept, those whose output column has the
            largest max-|w| (ours; 0 = none, the paper); the policy draws the rest.

    Raises:
        ConfigurationError: bad ratio / learning rate / plug point (name, class_path or init argument), or a
            ratio that keeps no row.
        ModelLoadError, UnsupportedModelError, AssetMissingError: the model cannot be used.
    """

    def __init__(self, model_name_or_path: str = "smollm2-135m", compression_ratio: float = 0.3,
                 learning_rate: float = 1e-3, weight_decay: float = 0.01, dtype: str = "auto",
                 trust_remote_code: bool = False, low_memory: bool | None = None,
                 policy: str | Callable[[int, int], RowPolicy] = DEFAULT_POLICY,
                 reward: str | Reward = "ks_gate", learner: str | Learner = "paper",
                 protect_outliers: float = 0.0) -> None:
        super().__init__()
        validate_ratio(compression_ratio)
        check_float(learning_rate, "model.learning_rate", 0.0, low_open=True)
        check_float(weight_decay, "model.weight_decay", 0.0)
        loading.parse_dtype(dtype)
        check_protect_fraction(protect_outliers)
        self.reward = plugins.build("reward", reward)  # the plug points fail before the model is read
        self.learner = plugins.build("learner", learner)
        # The plug points are stored as their canonical records (class_path, init_args), set below once built:
        # plain data, so a checkpoint loads with weights_only=True whatever object or callable was passed.
        self.save_hyperparameters(ignore=list(PLUG_POINTS))
        config = loading.load_config(model_name_or_path, trust_remote_code=trust_remote_code)
        self.adapter = get_adapter(config)
        self.config, self.model_type = config, config.model_type
        self.intermediate_size = self.adapter.intermediate_size(config)
        self.hidden_size = self.adapter.hidden_size(config)
        self.kept_width = kept_width(self.intermediate_size, compression_ratio)
        self.adapter.check_sliceable(config, self.kept_width)  # fail before training, not at the end
        self.num_layers_config = getattr(self.adapter.text_config(config), "num_hidden_layers", None)
        self.policy = plugins.build("policy", policy, self.intermediate_size, self.hidden_size)
        self.hparams.update(self.plug_points())
        self._states: list[torch.Tensor] | None = None
        self._state_info: dict[str, Any] = {}
        self.fit_started = time.time()
        self.history: list[dict[str, float]] = []
        self.last_ks: dict[int, float] = {}
        #: Seconds per phase of training_step, summed over the fit (benchmarks/speed.py reads them).
        self.timings: dict[str, float] = defaultdict(float)

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

    @cached_property
    def output_peaks(self) -> list[torch.Tensor]:
        """Per layer, max |w| of each neuron's FFN output column, (n,) float32, read once: what
        ``protect_outliers`` and the ``peak`` selection rank."""
        return load_output_peaks(self.hparams.model_name_or_path, self.hparams.trust_remote_code)

    @cached_property
    def protected(self) -> list[torch.Tensor] | None:
        """Per layer, the rows always kept (sorted LongTensors; ``protect_outliers``), or None."""
        if self.hparams.protect_outliers <= 0:
            return None
        return [protected_rows(x, self.hparams.protect_outliers) for x in self.output_peaks]

    @cached_property
    def features(self) -> list[torch.Tensor] | None:
        """Per layer, a FeaturePolicy's input: the neurons' activation features on its calibration text, (n, F)."""
        return None if self.policy.input == "state" else list(self.selection_inputs().features)

    def policy_input(self, layer: int, weight: torch.Tensor) -> torch.Tensor:
        """What the policy scores in ``layer``: its state ``weight`` (n, d) or its features (n, F)."""
        return weight if self.features is None else self.features[layer].to(weight.device)

    def _fixed(self, layer: int) -> torch.Tensor | None:
        return None if self.protected is None else self.protected[layer].to(self.device)
    @property
    def seed(self) -> int:
        """The run's seed (``seed_everything``), which also seeds every episode's sampling."""
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def setup(self, stage: str) -> None:
        # Load (and fingerprint: the reference cache's key) before the first episode, so episodes time episodes only.
        self.states, self.protected, self.ffn_sha256(), self.features
        self.reward.setup(self.hparams.model_name_or_path, self.hparams.dtype, self.hparams.trust_remote_code)

    def on_fit_start(self) -> None:
        self.fit_started = time.time()
        self.timings.clear()
        states = self.states
        self._states = states.to(self.device) if isinstance(states, StreamedStates) else [
            w.to(self.device) for w in states]

    @property
    def streams_layers(self) -> bool:
        """True when the states are read one layer at a time (``low_memory``): nothing per layer is held."""
        return isinstance(self.states, StreamedStates) and not self.states.cache

    # ------------------------------------------------------------------ training
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """One episode over this rank's layers ``batch`` (LongTensor of layer indices)."""
        num_layers = self.num_layers
        ks_all = torch.zeros(num_layers, dtype=torch.float64, device=self.device)
        reward_all = torch.zeros_like(ks_all)
        trained = torch.zeros_like(ks_all)
        # Starts connected to every parameter so a rank with no layer still joins the DDP all-reduce.
        surrogate = sum(p.sum() * 0.0 for p in self.policy.parameters())
        loss = torch.zeros((), device=self.device)
        prepared = self.policy.prepare()  # e.g. the paper policy's (u, c), through which it reaches every layer
        layers = batch.tolist()
        # The draws of all layers do not depend on each other's rewards (the policy changes once per
        # episode), so their spectra are computed together, batched; streamed states go one layer at a time.
        group = 1 if self.streams_layers else max(len(layers), 1)
        for start in range(0, len(layers), group):
            chunk = layers[start:start + group]
            weights = [self.states[i] for i in chunk]  # read once (a streamed layer is read from disk here)
            draws = []
            for i, w in zip(chunk, weights):
                gen = layer_generator(self.seed, self.current_epoch, i, self.device)
                with self.timed("policy forward"):
                    z = self.policy.detached_logits(self.policy_input(i, w), prepared).requires_grad_()
                    p = self.policy.keep_probabilities(z, generator=gen)
                with self.timed("sampling"):
                    kept, drawn = draw_kept(p.detach(), self.kept_width, self._fixed(i), generator=gen, layer=i)
                draws.append((z, p, kept, drawn))
            with self.timed("reward preparation (reference spectra, once per layer)"):
                scoring = self.reward.prepare(chunk, weights, self.ffn_sha256(), keep=not self.streams_layers)
            with self.timed("reward (spectra of the kept rows, KS)"):
                results = self.reward.rewards(weights, [d[2] for d in draws], scoring)
            for i, w, (z, p, kept, drawn), (ks, r) in zip(chunk, weights, draws, results):
                with self.timed("learner loss and per-layer backward to the logits"):
                    # The learner is about the drawn rows only: protected ones were kept without a draw.
                    step_loss = self.learner.loss(z=z, p=free_probabilities(p, self._fixed(i)),
                                                  kept=drawn.sort().values, drawn=drawn, reward=r, layer=i)
                    # Backpropagate to z_i now, while W_i is in memory, and let the policy turn dL/dz_i into
                    # a surrogate with the same parameter gradient: the one backward of the episode then
                    # gives the gradient of sum_i L_i (the paper's policy holds no float32 copy of W_i).
                    (dz,) = torch.autograd.grad(step_loss, z)
                    surrogate = surrogate + self.policy.surrogate(self.policy_input(i, w), dz, prepared)
                loss = loss + step_loss.detach()
                ks_all[i], reward_all[i], trained[i] = ks, r, 1.0
            del weights, draws
        # Sum over ranks: every rank then holds every layer's metrics.
        reduce = self.trainer.strategy.reduce
        ks_all, reward_all = reduce(ks_all, reduce_op="sum"), reduce(reward_all, reduce_op="sum")
        trained = reduce(trained, reduce_op="sum")
        total_loss = reduce(loss.clone(), reduce_op="sum")
        layers = [i for i in range(num_layers) if trained[i] > 0]
        self.last_ks = {i: float(ks_all[i]) for i in layers}
        self.learner.end_episode({i: float(reward_all[i]) for i in layers})  # the same on every rank
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

    def on_train_start(self) -> None:
        # A learner that compares with random rows gets, once per layer (on every rank: the same state),
        # the reward of a seeded uniformly random draw of the same size.
        if self.learner.wants_random_reference:
            for i in range(self.num_layers):
                gen = layer_generator(self.seed, RANDOM_REFERENCE_EPISODE, i, self.device)
                rows = uniform_kept(self.intermediate_size, self.kept_width, gen, self._fixed(i))
                with self.timed("reward of a random draw (once per layer)"):
                    w = self.states[i]
                    r = self.reward.rewards([w], [rows], self.reward.prepare([i], [w], self.ffn_sha256(),
                                                                             keep=not self.streams_layers))[0][1]
                self.learner.set_random_reference(i, r)

    def on_train_end(self) -> None:
        # Slicing, the spectrum figure and evaluation run after Lightning moved the module to CPU;
        # the states and reference spectra are plain attributes, so move them too (frees GPU memory).
        states = self.states
        self._states = states.to("cpu") if isinstance(states, StreamedStates) else [w.cpu() for w in states]
        self.reward.release()

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
                **{key: self.hparams[key] for key in RESULT_HPARAMS if key not in PLUG_POINTS},
                **self.plug_points()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the run state: the episodes, the learner's state (e.g. a running baseline: exact resume)."""
        save_run_state(checkpoint, self.run_settings(), {"history": list(self.history),
                                                         "learner": self.learner.state_dict()})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the run state; with a trainer attached (a resume) the checkpoint's settings must be this run's."""
        state = load_run_state(checkpoint, {"history": [], "learner": {}},
                               current=self.run_settings() if self._trainer is not None else None)
        self.history = list(state["history"])
        self.learner.load_state_dict(state["learner"])

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the wall time of the ``with`` block to ``timings[phase]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] += time.perf_counter() - start

    def selection_inputs(self, calibration: Any = None, activations: Any = None) -> SelectionInputs:
        """The source's selection inputs from what this module read; the text (a feature policy's by default)."""
        hp, device = self.hparams, self.trainer.strategy.root_device if self._trainer is not None else "cpu"
        return SelectionInputs(hp.model_name_or_path, hp.dtype, hp.trust_remote_code, states=self.states, device=device,
                               peaks=self.__dict__.get("output_peaks"), fingerprint=self.ffn_sha256(),
                               calibration=calibration or getattr(self.policy, "settings", None),
                               activations=activations, features=self.__dict__.get("features"))

    def kept_indices(self, selection: str = "sample") -> list[torch.Tensor]:
        """Kept rows per layer, sorted (k,) LongTensors, chosen by the trained policy: ``sample`` (the paper's
        seeded draw) or ``topk`` (``selection.POLICY_SELECTIONS``), with this fit's protected rows.

        Raises:
            ConfigurationError: another selection (those do not use the policy: ``prunenet.compress``).
        """
        validate_selection(selection, "slicing.selection", POLICY_SELECTIONS)
        selector = build_selector(selection, policy=self.policy, seed=self.seed)
        return select(selector, self.selection_inputs(), self.kept_width, self.hparams.protect_outliers)

    def ffn_sha256(self) -> str:
        """Fingerprint of the source model's FFN input matrices (cached with the states)."""
        if "ffn_sha256" not in self._state_info:
            self._state_info["ffn_sha256"] = ffn_fingerprint(self.states)
        return self._state_info["ffn_sha256"]

    def policy_metadata(self) -> dict[str, Any]:
        """What a saved policy file says about itself."""
        return {"intermediate_size": self.intermediate_size, "hidden_size": self.hidden_size,
                "model_type": self.model_type, "source_model": str(self.hparams.model_name_or_path),
                "compression_ratio": float(self.hparams.compression_ratio), "episodes": len(self.history),
                "seed": self.seed, "ffn_sha256": self.ffn_sha256(), "versions": package_versions(),
                **self.algorithm()}

    def plug_points(self) -> dict[str, dict[str, Any]]:
        """The built policy, reward and learner as ``plugins.describe`` records (class_path, init_args)."""
        return {"policy": plugins.describe(self.policy), "reward": plugins.describe(self.reward),
                "learner": plugins.describe(self.learner)}

    def algorithm(self) -> dict[str, Any]:
        """The choices that trained this policy: the ``policy``, ``reward`` and ``learner`` short names,
        ``protect_outliers``, and the full ``plug_points`` records."""
        return {"policy": self.policy.name or type(self.policy).__name__,
                "reward": self.reward.name or type(self.reward).__name__,
                "learner": self.learner.name or type(self.learner).__name__,
                "protect_outliers": self.hparams.protect_outliers, "plug_points": self.plug_points()}
