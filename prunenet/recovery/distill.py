"""The recovery's distillation loss: KL(p_teacher || p_student) with the dense model as the frozen teacher.

Source: ours, knowledge distillation (Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural
Network"; temperature 1) on self-generated text after Williams, Chrysostomou and Aletras (NAACL 2025,
"Self-calibration for Language Model Quantization and Pruning"): with ``--data.source=self`` the dense model
writes the training text and teaches the pruned one its full next-token distribution on it, so a recovery
needs no data at all.

``model.loss`` (:data:`LOSSES`): ``next_token`` (the causal-LM cross entropy), ``kl`` (this module), or
``auto`` (``kl`` for ``data.source=self``, else ``next_token``), resolved by :func:`resolve_loss` before
training. The teacher is held by :class:`Teacher`, a plain object: never a submodule of the LightningModule,
so it is in no state dict, Lightning checkpoint, optimizer or exported model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from prunenet.errors import ConfigurationError

#: ``model.loss`` values; ``auto`` is resolved by :func:`resolve_loss`.
LOSSES = ("next_token", "kl", "auto")
#: Positions x vocabulary of one float32 chunk of the KL (64 MiB): 341 positions of SmolLM2's 49k
#: vocabulary, 64 of Gemma-3's 262k. Each chunk is recomputed in backward instead of kept.
CHUNK_ELEMENTS = 2 ** 24


def check_loss(loss: Any) -> str:
    """``loss`` if it is one of :data:`LOSSES`.

    Raises:
        ConfigurationError: one line naming the value and the accepted ones.
    """
    if loss not in LOSSES:
        raise ConfigurationError(f"model.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    return loss


def resolve_loss(loss: str, data_source: str | None) -> str:
    """``auto`` -> ``kl`` when the training text is the dense model's own (``data.source=self``), else
    ``next_token``; any other value as given (checked by :func:`check_loss`)."""
    from prunenet.calibration import SELF

    if check_loss(loss) != "auto":
        return loss
    return "kl" if str(data_source) == SELF else "next_token"


def _chunk(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over P positions of KL(p_t || p_s) and of -log p_s(target): logits (P, V), targets (P,)."""
    log_s = torch.log_softmax(student.float(), dim=-1)
    log_t = torch.log_softmax(teacher.float(), dim=-1)
    # p_t (log p_t - log p_s), with 0 where the teacher gives a token no mass (0 * -inf would be NaN)
    terms = torch.where(torch.isneginf(log_t), 0.0, log_t.exp() * (log_t - log_s))
    return terms.sum(), -log_s.gather(-1, targets[:, None]).sum()


def distill_losses(student: torch.Tensor, teacher: torch.Tensor, input_ids: torch.Tensor,
                   chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL loss and the next-token loss of a batch of blocks, from one student forward.

    Both are means over the block's L - 1 predicted positions (position t predicts token t + 1, as the
    causal-LM loss) of every block, in nats, computed in float32 on the full-vocabulary softmax
    (temperature 1): ``kl`` = mean KL(p_teacher || p_student), ``next_token`` = mean -log p_student(token),
    the cross entropy ``forward`` computes. Chunked over at most ``chunk_elements // V`` positions of one
    block at a time; with gradients, each chunk is recomputed in backward (``torch.utils.checkpoint``), so
    the float32 softmaxes of the whole batch are never held at once.

    Args:
        student: logits (B, L, V), any float dtype, with or without grad.
        teacher: logits (B, L, V) of the same blocks (no grad).
        input_ids: LongTensor (B, L), the blocks.
    Returns:
        ``(kl, next_token)``: float32 scalars; ``kl`` is 0 for identical logits and carries the gradient.
    Raises:
        ConfigurationError: the shapes differ (a teacher with another vocabulary) or L < 2.
    """
    if student.shape != teacher.shape or student.shape[:2] != input_ids.shape or student.shape[1] < 2:
        raise ConfigurationError(f"distillation needs student and teacher logits (B, L >= 2, V) of the same shape "
                                 f"as the blocks, got {tuple(student.shape)}, {tuple(teacher.shape)} for blocks "
                                 f"{tuple(input_ids.shape)}")
    batch, length, vocab = student.shape
    step = max(1, int(chunk_elements) // vocab)
    grad = torch.is_grad_enabled() and student.requires_grad
    kl = ce = torch.zeros((), dtype=torch.float32, device=student.device)
    for b in range(batch):
        for start in range(0, length - 1, step):
            end = min(start + step, length - 1)
            args = (student[b, start:end], teacher[b, start:end], input_ids[b, start + 1:end + 1])
            k, c = checkpoint(_chunk, *args, use_reentrant=False) if grad else _chunk(*args)
            kl, ce = kl + k, ce + c
    count = batch * (length - 1)
    return kl / count, ce / count


class Teacher:
    """The dense model, frozen (no grad, eval mode), held outside the LightningModule's module tree.

    Not an ``nn.Module``: assigned to a LightningModule it is a plain attribute, so its weights are in no
    ``state_dict``, Lightning checkpoint, optimizer, DDP bucket or exported model, and Lightning's
    ``.train()`` / ``.to()`` do not reach it. It follows the student's device on first use. Every DDP
    rank builds its own (``RecoveryModule.teacher``).

    Args:
        model: a causal LM (``loading.load_model``: frozen, eval mode).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.requires_grad_(False).eval()

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) of ``input_ids`` (B, L), on their device, in the teacher's dtype, no grad."""
        if next(self.model.parameters()).device != input_ids.device:
            self.model.to(input_ids.device)
        return self.model(input_ids=input_ids, use_cache=False).logits


def check_teacher(input_source: str, dense_source: str, student_config: Any, trust_remote_code: bool = False) -> None:
    """Refuse a distillation whose teacher cannot be the dense model, before any work: an input with no
    ``prunenet.json`` naming the model it was pruned from (its teacher would be itself: KL 0, nothing to
    learn), a dense source that no longer loads, or one with another vocabulary than the student.

    Raises:
        ConfigurationError: naming the input, the dense source and what to do instead.
        ModelLoadError: the dense source's config cannot be read.
    """
    from prunenet import loading
    from prunenet.resume import canonical_source

    if canonical_source(dense_source) == canonical_source(input_source):
        raise ConfigurationError(f"model.loss=kl needs the dense model as the teacher, but {input_source!r} has no "
                                 "prunenet.json naming the model it was pruned from (the teacher would be the input "
                                 "itself); use --model.loss=next_token with a text --data.source")
    dense = loading.load_config(dense_source, trust_remote_code)
    sizes = [getattr(c.get_text_config(), "vocab_size", None) for c in (dense, student_config)]
    if sizes[0] != sizes[1]:
        raise ConfigurationError(f"model.loss=kl: the dense source {dense_source!r} has a vocabulary of {sizes[0]}, "
                                 f"the input {input_source!r} one of {sizes[1]}; the KL needs the same one")
