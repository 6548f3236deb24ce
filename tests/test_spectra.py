"""The Gram spectra back end (prunenet/spectra.py, ours) against float64 ``svdvals``: singular values
within their stated error bound, KS statistics and rewards equal up to the tolerance that bound
implies, the seeded fit unchanged, and the reference spectra read back from the on-disk cache.

The tolerance, derived once here and used by every assert below:

* Each eigenvalue of a Gram matrix computed in dtype with unit roundoff u is off by at most
  ``δλ = p(s) u λ_max`` (s the Gram's size, λ_max the largest eigenvalue of the Gram whose rounding
  it carries: for the kept rows, that of the full ``WᵀW``, because the downdate subtracts from it).
  ``spectra.gram_error`` takes the worst-case ``p(s) = s`` for its fallback rule, which must hold for
  any matrix; that bound is 12x above the errors measured on SmolLM2 and makes a vacuous KS
  tolerance (above 1). Here ``p(s) = 4 sqrt(s)``: rounding errors that add like a random walk, with
  a factor 2 over the largest measured (about 2 sqrt(s) u λ_max, SmolLM2 float32). It is not
  assumed: every computed singular value is asserted within it, so a matrix where it failed would
  fail the test. Since ``|√a - √b| <= min(|a - b| / √b, √|a - b|)``, the singular value ``σ_i`` is
  off by at most ``δσ_i = min(δλ / σ_i, √δλ)`` (σ_i the float64 value).
* A matrix sent to the ``svdvals`` fallback is off by at most ``s u σ_max`` per value (backward
  stable SVD, Weyl); the bound used is the larger of the two, so it holds whichever route ran.
* KS = sup_t |F_x(t) - F_y(t)|, and |sup|D'| - sup|D|| <= sup_t |D'(t) - D(t)|. A computed value
  x'_i is on the other side of a point t than x_i only if |x_i - t| <= δx_i, so at any t the
  empirical CDF of the m reference values moves by at most (their number straddling t) / m, that of
  the k kept values likewise. Hence ``|KS - KS_64| <= max_t [A(t)/m + B(t)/k]``, A(t) (B(t)) the
  reference (kept) values whose interval contains t; the max is reached at an interval end.
  Moreover KS depends only on the merged order of the two samples, so when no reference interval
  meets a kept interval the KS statistic must be exactly the float64 one.
* The reward 1 / KS then agrees to ``tol / (KS (KS - tol))`` (and both are capped alike at KS = 0).
"""

from __future__ import annotations

import pytest
import torch

from prunenet import reward as R
from prunenet.reward import ks_statistic, spectral_reward
from prunenet.spectra import full_gram, gram_singular_values, kept_singular_values, singular_values
from tests.conftest import private_cache


def _value_bounds(sv64: torch.Tensor, top: float, size: int, dtype: torch.dtype) -> torch.Tensor:
    """δσ_i of the module docstring: the larger of the Gram route's and the svdvals fallback's bounds."""
    u = torch.finfo(dtype).eps / 2
    dlam = 4 * size**0.5 * u * top
    gram_bound = torch.minimum(dlam / sv64.clamp_min(1e-300), torch.full_like(sv64, dlam**0.5))
    return torch.maximum(gram_bound, torch.full_like(sv64, size * u * top**0.5))


def _ks_tolerance(x: torch.Tensor, dx: torch.Tensor, y: torch.Tensor, dy: torch.Tensor) -> float:
    """max_t [A(t)/m + B(t)/k] of the module docstring, 0 when no interval of x meets one of y."""
    if not bool(((x[:, None] - y[None, :]).abs() <= dx[:, None] + dy[None, :]).any()):
        return 0.0
    ends = torch.cat([x - dx, x + dx, y - dy, y + dy])
    a = ((x[None, :] - ends[:, None]).abs() <= dx[None, :]).sum(1) / x.numel()
    b = ((y[None, :] - ends[:, None]).abs() <= dy[None, :]).sum(1) / y.numel()
    return float((a + b).max())


def _check_layer(w: torch.Tensor, kept: torch.Tensor, dtype: torch.dtype, reference: torch.Tensor,
                 sv: torch.Tensor, ref64: torch.Tensor | None = None) -> tuple[float, float]:
    """Assert the spectra of one layer (reference and kept) and its KS / reward against float64 svdvals
    (``ref64``: those of the dense matrix, if known); returns (|KS difference|, tolerance)."""
    w64 = w.double()
    ref64 = torch.linalg.svdvals(w64) if ref64 is None else ref64
    kept64 = torch.linalg.svdvals(w64.index_select(0, kept))
    top = float(ref64[0]) ** 2  # the full Gram's largest eigenvalue bounds the kept Gram's too
    d_ref = _value_bounds(ref64, top, min(w.shape), dtype)
    d_kept = _value_bounds(kept64, top, min(kept.numel(), w.shape[1]), dtype)
    assert reference.dtype == dtype and sv.dtype == dtype
    assert bool(((reference.double() - ref64).abs() <= d_ref).all())
    assert bool(((sv.double() - kept64).abs() <= d_kept).all())
    ks64 = float(ks_statistic(ref64, kept64))
    ks = float(ks_statistic(reference, sv))
    tol = _ks_tolerance(ref64, d_ref, kept64, d_kept)
    assert abs(ks - ks64) <= tol + 1e-12
    if tol == 0:
        assert ks == ks64
    r, r64 = spectral_reward(ks), spectral_reward(ks64)
    if ks64 > tol:
        assert abs(r - r64) <= tol / (ks64 * (ks64 - tol)) + 1e-9 * r64
    return abs(ks - ks64), tol


def _draws(n: int, k: int, layers: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g)[:k].sort().values for _ in range(layers)]


@pytest.fixture(scope="module")
def smollm2_states():
    from prunenet.states import load_ffn_states

    return list(load_ffn_states("smollm2-135m")[0])


@pytest.fixture(scope="module")
def smollm2_svdvals64(smollm2_states):
    return [torch.linalg.svdvals(w.double()) for w in smollm2_states]


#: 0.3: the downdate (fewer rows removed than kept), all 30 layers; 0.7: the kept rows' own Gram, every
#: third layer (float64 svdvals of every matrix is what makes this test take seconds).
@pytest.mark.parametrize("ratio,step", [(0.3, 1), (0.7, 3)])
def test_smollm2_layers_match_float64_svdvals(smollm2_states, smollm2_svdvals64, ratio, step, monkeypatch,
                                              one_thread):
    """SmolLM2 gate matrices (1536 x 576), float32 Gram route, batched, with the full Grams given:
    every singular value within its bound, KS and reward as from float64 svdvals. No layer needs the
    float32 svdvals fallback (counted), so this is the route the fit takes."""
    calls = []
    svdvals = torch.linalg.svdvals
    states, ref64 = smollm2_states[::step], smollm2_svdvals64[::step]
    n = states[0].shape[0]
    k = int((1 - ratio) * n)
    monkeypatch.setattr(torch.linalg, "svdvals", lambda a: calls.append(a.dtype) or svdvals(a))
    references = [singular_values(w) for w in states]
    contexts = [full_gram(w, torch.float32, ref) for w, ref in zip(states, references)]
    kept = _draws(n, k, len(states), 0)
    spectra = kept_singular_values(states, kept, torch.float32, "gram", contexts)
    assert torch.float32 not in calls  # the Gram route for every layer, no fallback
    worst = [_check_layer(w, idx, torch.float32, ref, sv, r64)
             for w, idx, ref, sv, r64 in zip(states, kept, references, spectra, ref64)]
    # Measured: the KS statistics are identical to float64 svdvals in every layer (worst difference 0).
    print(f"worst |KS - KS_float64| = {max(d for d, _ in worst):.3g}, largest tolerance {max(t for _, t in worst):.3g}")


@pytest.mark.slow
def test_gemma_layers_match_float64_svdvals():
    """Gemma-3-270M's 18 gate matrices (2048 x 640), float32, r = 0.3, the same checks."""
    from prunenet.states import load_ffn_states

    states = list(load_ffn_states("gemma3-270m")[0])
    kept = _draws(states[0].shape[0], int(0.7 * states[0].shape[0]), len(states), 0)
    references = [singular_values(w) for w in states]
    contexts = [R.KSGateReward().context(w, ref) for w, ref in zip(states, references)]
    spectra = kept_singular_values(states, kept, torch.float32, "gram", contexts)
    for w, idx, ref, sv in zip(states, kept, references, spectra):
        _check_layer(w, idx, torch.float32, ref, sv)


#: (n, d, k, rank or None): k < d (the (k, k) Gram), k > d, k = 1, k = n, rank-deficient (svdvals fallback).
AWKWARD = [(60, 50, 20, None), (80, 30, 55, None), (37, 24, 1, None), (37, 24, 37, None), (24, 37, 17, None),
           (40, 20, 30, 3), (50, 10, 40, 1), (7, 5, 4, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d,k,rank", AWKWARD)
def test_awkward_random_matrices_match_float64_svdvals(n, d, k, rank, dtype):
    g = torch.Generator().manual_seed(n * 100 + d + k)
    w = torch.randn(n, d, generator=g)
    if rank is not None:
        w = (torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g)) / rank**0.5
    w = w.to(dtype)
    kept = torch.randperm(n, generator=g)[:k].sort().values
    reference = singular_values(w, dtype)
    context = R.KSGateReward(str(dtype).removeprefix("torch.")).context(w, reference)
    (sv,) = kept_singular_values([w], [kept], dtype, "gram", [context])
    assert reference.shape == (min(n, d),) and sv.shape == (min(k, d),)
    assert bool((sv[:-1] >= sv[1:]).all()) and bool((sv >= 0).all())
    _check_layer(w, kept, dtype, reference, sv)


def test_rank_deficient_and_zero_matrices_take_svdvals_exactly():
    """Where the Gram route is unsafe (the smallest eigenvalue within its error of 0), the numbers are
    exactly those of the svdvals path, so degenerate layers behave as before."""
    g = torch.Generator().manual_seed(0)
    rank1 = torch.randn(37, 1, generator=g) @ torch.randn(1, 24, generator=g)
    for w in (rank1, torch.zeros(37, 24)):
        for dtype in (torch.float32, torch.float64):
            assert torch.equal(singular_values(w, dtype), singular_values(w, dtype, "svdvals"))
            kept = torch.arange(0, 37, 2)
            (sv,) = kept_singular_values([w], [kept], dtype)
            assert torch.equal(sv, torch.linalg.svdvals(w.index_select(0, kept).to(dtype)))


def test_batched_equals_one_layer_at_a_time(smollm2_states):
    """One batched call over layers (and chunks of any budget) gives each layer's own spectrum."""
    states = smollm2_states[:6]
    kept = _draws(states[0].shape[0], 1000, len(states), 3)
    together = kept_singular_values(states, kept)
    chunked = kept_singular_values(states, kept, batch_bytes=1)  # one layer per call
    alone = [kept_singular_values([w], [idx])[0] for w, idx in zip(states, kept)]
    for a, b, c in zip(together, chunked, alone):
        torch.testing.assert_close(a, c, rtol=0, atol=float(c[0]) * 1e-5)
        torch.testing.assert_close(b, c, rtol=0, atol=float(c[0]) * 1e-5)


def test_dense_spectrum_and_its_gram_come_from_one_gram(smollm2_states):
    """``dense_singular_values`` returns the reference spectrum and the full Gram it was computed from."""
    from prunenet.spectra import dense_singular_values

    w = smollm2_states[0]
    sv, context = dense_singular_values(w)
    torch.testing.assert_close(sv, singular_values(w), rtol=0, atol=1e-5 * float(sv[0]))
    torch.testing.assert_close(context.matrix, w.mT @ w, rtol=1e-5, atol=1e-5 * float(sv[0]) ** 2)
    assert float(context.top) == pytest.approx(float(sv[0]) ** 2, rel=1e-6)
    wide, none = dense_singular_values(w.mT)
    assert none is None and wide.shape == sv.shape
    assert dense_singular_values(w, method="svdvals")[1] is None


def test_gram_singular_values_matches_svdvals_shape_and_order():
    rows = torch.randn(3, 9, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sv = gram_singular_values(rows)
    torch.testing.assert_close(sv, torch.linalg.svdvals(rows), rtol=1e-10, atol=1e-12)
    wide = rows.mT.contiguous()
    torch.testing.assert_close(gram_singular_values(wide), torch.linalg.svdvals(wide), rtol=1e-10, atol=1e-12)


def test_bad_arguments_are_one_line_errors():
    w = torch.ones(5, 3)
    with pytest.raises(ValueError, match="spectra method must be one of"):
        singular_values(w, method="qr")
    with pytest.raises(ValueError, match="float32"):
        kept_singular_values([w], [torch.arange(2)], torch.float16)
    with pytest.raises(ValueError, match="2 states and 1 index sets"):
        kept_singular_values([w, w], [torch.arange(2)])
    with pytest.raises(ValueError, match="gram_singular_values expects"):
        gram_singular_values(w)
    with pytest.raises(ValueError, match="spectra_method must be one of gram, svdvals, got 'eig'"):
        R.KSGateReward(spectra_method="eig")


def test_module_rejects_unknown_spectra_method(tiny_dir):
    from prunenet.errors import ConfigurationError
    from prunenet.module import PruneNetModule

    with pytest.raises(ConfigurationError, match="model.reward.init_args.spectra_method must be one of"):
        PruneNetModule(str(tiny_dir), reward={"class_path": "ks_gate", "init_args": {"spectra_method": "eig"}})


# ----------------------------------------------------------------------------- the fit
def _fit(model: str, root, spectra_method: str, episodes: int, monkeypatch, **kwargs):
    import lightning as L

    from prunenet.data import LayerDataModule
    from prunenet.module import PruneNetModule

    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    L.seed_everything(0, verbose=False)
    module = PruneNetModule(model, compression_ratio=0.3, **kwargs,
                            reward={"class_path": "ks_gate", "init_args": {"spectra_method": spectra_method}})
    trainer = L.Trainer(max_epochs=episodes, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        default_root_dir=str(root))
    trainer.fit(module, datamodule=LayerDataModule())
    return module


@pytest.mark.slow
def test_seeded_smollm2_fit_keeps_the_same_rows_as_svdvals(smollm2_states, tmp_path, monkeypatch, one_thread):
    """SmolLM2, r = 0.3, 3 episodes, seed 0: the Gram back end and svdvals give the same KS in every
    layer and episode, hence the same updates and the same kept rows. No reference spectrum is cached
    (each fit computes its own); the model converted for ``smollm2_states`` is reused."""
    monkeypatch.setenv("PRUNENET_CACHE", str(private_cache(tmp_path / "cache")))
    fast = _fit("smollm2-135m", tmp_path / "a", "gram", 3, monkeypatch)
    slow = _fit("smollm2-135m", tmp_path / "b", "svdvals", 3, monkeypatch)
    assert [h["ks_mean"] for h in fast.history] == [h["ks_mean"] for h in slow.history]
    assert fast.last_ks == slow.last_ks
    for a, b in zip(fast.kept_indices(), slow.kept_indices()):
        assert torch.equal(a, b)


def count_reference_computations(monkeypatch) -> list[int]:
    """A list that gets one item each time a dense reference spectrum is computed (not read from the cache)."""
    from prunenet.reward import KSGateReward

    computed: list[int] = []
    original = KSGateReward.reference_and_context
    monkeypatch.setattr(KSGateReward, "reference_and_context", lambda self, w: computed.append(1) or original(self, w))
    return computed


def test_second_fit_reads_the_reference_spectra_from_the_cache(tiny_dir, tmp_path, monkeypatch):
    """Reference spectra are computed once per model (keyed by the FFN fingerprint): a second fit of
    the same model computes none, a model with other weights computes its own."""
    from prunenet import reference_cache
    from tests.tiny import save_tiny, tiny_llama

    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "cache"))
    computed = count_reference_computations(monkeypatch)
    first = _fit(str(tiny_dir), tmp_path / "a", "gram", 1, monkeypatch)
    assert len(computed) == first.num_layers
    files = list(reference_cache.cache_folder(first.ffn_sha256(), first.reward.cache_key).glob("*.entry"))
    assert len(files) == first.num_layers
    computed.clear()
    second = _fit(str(tiny_dir), tmp_path / "b", "gram", 2, monkeypatch)
    assert computed == []
    assert second.history[0]["ks_mean"] == first.history[0]["ks_mean"]  # same numbers, warm or cold cache
    other = save_tiny(tiny_llama(seed=5), tmp_path / "other")
    _fit(str(other), tmp_path / "c", "gram", 1, monkeypatch)
    assert len(computed) == second.num_layers
    # a damaged entry is a miss, recomputed
    files[0].write_bytes(b"not a tensor")
    computed.clear()
    _fit(str(tiny_dir), tmp_path / "d", "gram", 1, monkeypatch)
    assert len(computed) == 1


@pytest.mark.parametrize("low_memory", [False, True])
def test_tiny_fit_same_as_svdvals_held_or_streamed(tmp_path, monkeypatch, low_memory):
    """Held states (batched spectra, full Grams kept) and streamed ones (one layer at a time, the full
    Gram only for the step that formed it) give the KS statistics and kept rows of the svdvals path."""
    from tests.tiny import save_tiny, tiny_llama

    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "cache"))
    # n = 64, d = 16: a tall, well-conditioned gate matrix, so the Gram route (not its fallback) runs.
    model = save_tiny(tiny_llama(seed=1, intermediate_size=64, hidden_size=16), tmp_path / "m")
    runs = {method: _fit(str(model), tmp_path / method, method, 2, monkeypatch, low_memory=low_memory)
            for method in ("gram", "svdvals")}
    assert runs["gram"].streams_layers is low_memory
    assert runs["gram"].history[1]["ks_mean"] == runs["svdvals"].history[1]["ks_mean"]
    assert runs["gram"].last_ks == runs["svdvals"].last_ks
    for a, b in zip(runs["gram"].kept_indices(), runs["svdvals"].kept_indices()):
        assert torch.equal(a, b)
