"""The "dataset" of PruneNet: layer indices. One epoch = one episode over all layers.

Under DDP the layers are sharded across ranks (rank r gets layers r, r+N, r+2N, ...)
without the padding of ``DistributedSampler`` (a padded layer would be counted
twice). Each rank sees its whole shard as one batch, so every rank makes exactly
one optimizer step per episode, as in the authors' code (gradients accumulated
over all layers, then one step).
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from prunenet.errors import ConfigurationError


class LayerIndices(Dataset):
    """Dataset whose item i is the layer index i (an int)."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = int(num_layers)

    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, i: int) -> int:
        return i


class LayerShardSampler(DistributedSampler):
    """Strided, unpadded shard of the layer indices for one rank.

    Subclasses ``DistributedSampler`` so Lightning keeps it as the distributed sampler.
    """

    def __init__(self, dataset: LayerIndices, num_replicas: int, rank: int, indices: list[int] | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        indices = list(range(len(dataset))) if indices is None else indices
        self._indices = indices[rank::num_replicas]

    def __iter__(self):
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)


def collate_layers(items: list[int]) -> torch.Tensor:
    """Batch of layer indices -> LongTensor of shape (layers in this shard,)."""
    return torch.tensor(items, dtype=torch.long)


class LayerDataModule(L.LightningDataModule):
    """Serves each rank its shard of layer indices, as one batch per episode.

    The number of layers comes from the LightningModule (``num_layers``).

    Args:
        layers: train on these layer indices only (default: all). For debugging and for
            benchmarks that time a few layers of a big model; the final slicing still
            covers every layer.
    """

    def __init__(self, layers: list[int] | None = None) -> None:
        super().__init__()
        self.layers = None if layers is None else [int(i) for i in layers]

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        num_layers = int(trainer.lightning_module.num_layers)
        indices = list(range(num_layers)) if self.layers is None else self.layers
        bad = [i for i in indices if not 0 <= i < num_layers]
        if bad or not indices:
            raise ConfigurationError(f"data.layers must be non-empty indices in [0, {num_layers}), got {self.layers}")
        world, rank = trainer.world_size, trainer.global_rank
        if world > len(indices):
            raise ConfigurationError(
                f"{world} processes for {len(indices)} layers; use at most {len(indices)} devices")
        dataset = LayerIndices(num_layers)
        sampler = LayerShardSampler(dataset, num_replicas=world, rank=rank, indices=indices)
        return DataLoader(dataset, batch_size=len(sampler), sampler=sampler, collate_fn=collate_layers)
