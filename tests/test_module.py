"""PruneNetModule + LayerDataModule under a real Lightning Trainer on a tiny saved model."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from prunenet.artifacts import PLAN_FILE, POLICY_FILE
from callbacks import StructuralSlicing
from prunenet.data import LayerDataModule
from prunenet.errors import ConfigurationError, ModelLoadError, UnsupportedModelError
from prunenet.learner import LEARNERS
from prunenet.module import PruneNetModule
from prunenet.policy import POLICIES
from prunenet.slicing import count_parameters
from tests.conftest import assert_logits_match
from tests.tiny import save_tiny, tiny_llama

N, D, LAYERS = 37, 24, 3


@pytest.fixture(scope="module")
def big_vocab_dir(tmp_path_factory):
    """Tiny LLaMA with a larger vocabulary, so the LLM clearly outweighs the policy on disk."""
    return save_tiny(tiny_llama(seed=0, vocab_size=2000), tmp_path_factory.mktemp("bigvocab") / "llama")


def _fit(model_dir, root, seed=0, epochs=2, ratio=0.3, monkeypatch=None, **module_kwargs):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # restored after the test; seed_everything overwrites it
    L.seed_everything(seed, verbose=False)
    module = PruneNetModule(str(model_dir), compression_ratio=ratio, **module_kwargs)
    initial = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, default_root_dir=str(root),
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=LayerDataModule())
    return module, trainer, initial


def test_fit_trains_policy_and_checkpoint_holds_only_the_policy(big_vocab_dir, tmp_path, monkeypatch):
    module, trainer, initial = _fit(big_vocab_dir, tmp_path, monkeypatch=monkeypatch)

    # states: one (n, d) FFN input matrix per layer, the gate_proj weights of the model
    assert module.num_layers == LAYERS
    ref = tiny_llama(seed=0, vocab_size=2000)
    for w, layer in zip(module.states, ref.model.layers):
        assert tuple(w.shape) == (N, D)
        assert torch.equal(w, layer.mlp.gate_proj.weight)
    assert module.kept_width == math.floor(0.7 * N)

    # trained: finite loss each episode, and the policy moved
    assert trainer.current_epoch == 2 and len(module.history) == 2
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["reward_mean"]) for h in module.history)
    assert math.isfinite(float(trainer.callback_metrics["loss"]))
    assert all(0.0 <= ks <= 1.0 for ks in module.last_ks.values()) and len(module.last_ks) == LAYERS
    after = module.policy.state_dict()
    assert any(not torch.equal(initial[k], after[k]) for k in initial)
    # the policy is the only trainable thing
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {
        "policy.proj_intermediate.weight", "policy.proj_intermediate.bias", "policy.row_sparsities"}

    # the Lightning checkpoint holds the policy, not the LLM
    ckpts = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert ckpts, list(tmp_path.rglob("*"))
    ckpt = torch.load(ckpts[-1], map_location="cpu", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all(k.startswith("policy.") for k in keys), keys
    for k, v in after.items():
        assert torch.equal(ckpt["state_dict"][f"policy.{k}"], v)
    assert len(ckpt["prunenet_history"]) == 2
    llm_bytes = (big_vocab_dir / "model.safetensors").stat().st_size
    assert ckpts[-1].stat().st_size * 5 < llm_bytes, (ckpts[-1].stat().st_size, llm_bytes)
    ckpt_numel = sum(v.numel() for v in ckpt["state_dict"].values())
    assert ckpt_numel == N * D + N + N
    assert ckpt_numel * 20 < count_parameters(ref)


def test_same_seed_same_kept_indices(tiny_dir, tmp_path, monkeypatch):
    a, _, init_a = _fit(tiny_dir, tmp_path / "a", seed=3, monkeypatch=monkeypatch)
    b, _, init_b = _fit(tiny_dir, tmp_path / "b", seed=3, monkeypatch=monkeypatch)
    c, _, _ = _fit(tiny_dir, tmp_path / "c", seed=4, monkeypatch=monkeypatch)
    assert all(torch.equal(init_a[k], init_b[k]) for k in init_a)
    ka, kb, kc = a.kept_indices(), b.kept_indices(), c.kept_indices()
    assert len(ka) == LAYERS
    for x, y in zip(ka, kb):
        assert x.shape == (a.kept_width,) and torch.equal(x, y)
    assert any(not torch.equal(x, y) for x, y in zip(ka, kc))  # the seed does matter
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]


def test_pruned_checkpoint_round_trip(tiny_dir, tmp_path, monkeypatch, plain_load):
    module, _trainer, _ = _fit(tiny_dir, tmp_path / "logs", monkeypatch=monkeypatch)
    slicing = StructuralSlicing(output_dir=str(tmp_path / "pruned"))
    out = slicing.export(module).path
    assert out == tmp_path / "pruned" and slicing.export(module) is slicing.exported  # once per fit
    k = module.kept_width
    reloaded, info, messages = plain_load(out)
    assert reloaded.config.intermediate_size == k == math.floor(0.7 * N)
    assert not info["mismatched_keys"] and not info["missing_keys"] and not info["unexpected_keys"]
    assert not [m for m in messages if "mismatch" in m.lower()]

    plan = json.loads((out / PLAN_FILE).read_text())
    kept = module.kept_indices()
    assert plan["kept_indices"] == {str(i): idx.tolist() for i, idx in enumerate(kept)}
    assert plan["kept_width"] == k and plan["intermediate_size"] == N and plan["num_layers"] == LAYERS
    assert plan["params_pruned"] == count_parameters(reloaded) < plan["params_dense"]
    assert (out / POLICY_FILE).is_file() and (out / "tokenizer.json").is_file()

    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    assert_logits_match(reloaded, tiny_llama(seed=0), ids, kept)


def test_topk_selection_keeps_highest_alpha(tiny_dir, tmp_path, monkeypatch):
    module, _, _ = _fit(tiny_dir, tmp_path, epochs=1, monkeypatch=monkeypatch)
    for w, idx in zip(module.states, module.kept_indices("topk")):
        z = module.policy.logits(w)
        mask = torch.ones(N, dtype=torch.bool)
        mask[idx] = False
        assert float(z[idx].min()) >= float(z[mask].max())


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"compression_ratio": -0.1}, ConfigurationError, "-0.1"),
    ({"compression_ratio": 1.0}, ConfigurationError, "1.0"),
    ({"compression_ratio": 0.99}, ConfigurationError, "0.99"),
    ({"learner": {"class_path": "PaperLearner", "init_args": {"gamma": 0.0}}}, ConfigurationError, "gamma"),
    ({"reward": {"class_path": "ks_gate", "init_args": {"spectra_dtype": "float16"}}}, ConfigurationError, "float16"),
    ({"policy": {"class_path": "row_mlp", "init_args": {"widht": 3}}}, ConfigurationError,
     "model.policy: .*unexpected keyword argument 'widht'"),
    ({"policy": {"class_path": "row_mlp", "init_args": {"width": 0}}}, ConfigurationError, "width must be"),
    ({"learning_rate": 0.0}, ConfigurationError, "learning_rate"),
])
def test_module_rejects_bad_arguments(tiny_dir, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PruneNetModule(str(tiny_dir), **kwargs)


def test_module_rejects_missing_and_unsupported_models(tmp_path, unsupported_dir):
    with pytest.raises(ModelLoadError, match="nope"):
        PruneNetModule(str(tmp_path / "nope"))
    model_type, folder = unsupported_dir
    with pytest.raises(UnsupportedModelError, match=repr(model_type)):
        PruneNetModule(str(folder))


@pytest.mark.parametrize("learner,use_kld", [(name, kld) for name in LEARNERS for kld in (False, True)])
@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_folded_episode_gradient_equals_the_full_graph_gradient(tiny_dir, policy_name, learner, use_kld, monkeypatch):
    """training_step backpropagates per layer to the row logits and hands dL/dz to the policy's
    surrogate (the paper's policy folds it so the graph never holds the weights; others use
    autograd). For every policy x learner the episode gradient must equal autograd through the
    full graph of sum_i L_i."""
    from prunenet.reward import ks_statistic, singular_values, spectral_reward
    from prunenet.selection import layer_generator, sample_rows

    import copy

    grads, before = {}, {}

    class Capture(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            before["learner"] = copy.deepcopy(pl_module.learner)  # its state as the episode's loss sees it

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({n: p.grad.detach().clone() for n, p in pl_module.policy.named_parameters()})

    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    L.seed_everything(3, verbose=False)
    learner_args = {"use_kld": use_kld, **({"gamma": 0.9} if learner == "paper" else {})}
    # a FeaturePolicy reads activation features on a little of the model's own text
    policy_arg = {"class_path": policy_name, "init_args": {"samples": 2, "length": 8}} \
        if policy_name == "features" else policy_name
    module = PruneNetModule(str(tiny_dir), compression_ratio=0.3, policy=policy_arg,
                            learner={"class_path": learner, "init_args": learner_args})
    policy = type(module.policy)(N, D)
    policy.load_state_dict(module.policy.state_dict())
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Capture()])
    trainer.fit(module, datamodule=LayerDataModule())

    reference = 0.0
    for i, w in enumerate(module.states):
        gen = layer_generator(module.seed, 0, i)
        p, z = policy(module.policy_input(i, w), generator=gen)  # the full graph, through W_i (or the features)
        drawn = sample_rows(p.detach(), module.kept_width, generator=gen, layer=i, ordered=True)
        kept = drawn.sort().values
        r = spectral_reward(ks_statistic(singular_values(w), singular_values(w.index_select(0, kept))))
        reference = reference + before["learner"].loss(z=z, p=p, kept=kept, drawn=drawn, reward=r, layer=i)
    reference.backward()
    # float32 forward over 3 layers of (37, 24): relative 1e-5 is ~100 float32 ulps
    assert module.history[0]["loss"] == pytest.approx(float(reference), rel=1e-5)
    assert set(grads) == {n for n, _ in policy.named_parameters()}
    for name, param in policy.named_parameters():
        assert param.grad.abs().max() > 0, name
        # two float32 summation orders of the same gradient (W^T dz folded vs through the graph)
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("use_kld", [False, True])
def test_paper_learner_is_the_paper_loss(use_kld):
    """L_i = -gamma^i r_i sum_{j in kept} log p_j (+ the authors' KL term), Section 3."""
    from prunenet.learner import PaperLearner, kl_regulariser

    g = torch.Generator().manual_seed(0)
    z = torch.randn(37, generator=g, dtype=torch.float64)
    p = torch.sigmoid(z)
    kept = torch.tensor([1, 4, 9, 30])
    expected = -(0.9**2) * 4.5 * torch.log(p[kept]).sum() + (kl_regulariser(z) if use_kld else 0.0)
    got = PaperLearner(gamma=0.9, use_kld=use_kld).loss(z=z, p=p, kept=kept, drawn=kept.flip(0), reward=4.5, layer=2)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same float64 operations


def test_ordered_draw_likelihood_is_a_distribution_over_draws():
    """Summed over every ordered draw of k of n rows, exp(log-likelihood) is 1, and the first row
    drawn has probability p_j / sum(p): the law torch.multinomial(replacement=False) samples from."""
    import itertools

    from prunenet.learner import ordered_draw_log_likelihood

    p = torch.tensor([0.9, 0.2, 0.55, 0.05, 0.7], dtype=torch.float64)
    total, first = 0.0, torch.zeros(5, dtype=torch.float64)
    for draw in itertools.permutations(range(5), 3):
        prob = float(ordered_draw_log_likelihood(p, torch.tensor(draw)).exp())
        total += prob
        first[draw[0]] += prob
    assert total == pytest.approx(1.0, abs=1e-12)  # 60 float64 terms
    torch.testing.assert_close(first, p / p.sum(), rtol=0, atol=1e-12)


def test_ordered_draw_likelihood_stays_exact_when_the_draw_holds_almost_all_the_weight():
    """The last steps divide by the few rows left: sum(p) - cumsum(drawn) would cancel to 0 or below
    (1e8 + 1e8 - 2e8 leaves float64 rounding of ~3e-8 or 0, not 2e-10) and give inf or NaN."""
    from prunenet.learner import ordered_draw_log_likelihood

    p = torch.tensor([1e8, 1e-10, 1e8, 1e-10], dtype=torch.float64, requires_grad=True)
    drawn = torch.tensor([0, 2, 1])
    got = ordered_draw_log_likelihood(p, drawn)
    # Oracle: each step's weight over the plain sum of the rows not drawn yet.
    values, expected, left = p.detach().tolist(), 0.0, [0, 1, 2, 3]
    for row in drawn.tolist():
        expected += math.log(values[row] / sum(values[j] for j in left))
        left.remove(row)
    assert float(got) == pytest.approx(expected, rel=1e-12)  # a few float64 sums of 4 terms
    got.backward()
    assert torch.isfinite(p.grad).all()


def test_baseline_learner_advantage_state_and_checkpoint():
    from prunenet.learner import BaselineLearner, ordered_draw_log_likelihood

    learner = BaselineLearner(momentum=0.5)
    with pytest.raises(ConfigurationError, match="no baseline for layer 0"):
        learner.advantage(0, 5.0)
    learner.set_random_reference(0, 4.0)  # b = 4, s = 0.04
    assert learner.advantage(0, 5.0) == pytest.approx(25.0)
    z = torch.zeros(6, requires_grad=True)
    p = torch.sigmoid(z)
    drawn = torch.tensor([4, 1, 2])
    loss = learner.loss(z=z, p=p, kept=drawn.sort().values, drawn=drawn, reward=5.0, layer=0)
    assert float(loss) == pytest.approx(-25.0 * float(ordered_draw_log_likelihood(p, drawn)))
    learner.end_episode({0: 5.0})  # mean 0.5*4 + 0.5*5, var 0.5*0.04^2 + 0.5*1^2
    assert learner.mean[0] == pytest.approx(4.5) and learner.std[0] == pytest.approx((0.5 * 0.0016 + 0.5) ** 0.5)
    learner.set_random_reference(0, 100.0)  # a resumed fit keeps its state
    restored = BaselineLearner(momentum=0.5)
    restored.load_state_dict(learner.state_dict())
    assert restored.mean == learner.mean and restored.std == learner.std
    with pytest.raises(ConfigurationError, match="momentum"):
        BaselineLearner(momentum=1.0)


def test_plug_points_by_name_and_unknown_names(tiny_dir):
    module = PruneNetModule(str(tiny_dir), policy="row_mlp", reward="ks_gate", learner="paper")
    assert type(module.policy).__name__ == "RowMLP"
    assert module.hparams.policy == {"class_path": "prunenet.policy.RowMLP", "init_args": {"width": 16}}
    for key, bad in (("policy", "linear"), ("reward", "ks_down"), ("learner", "ppo")):
        with pytest.raises(ConfigurationError, match=rf"model.{key} must be one of .* got '{bad}'"):
            PruneNetModule(str(tiny_dir), **{key: bad})
    # A class of another plug point is refused too.
    with pytest.raises(ConfigurationError, match="subclass, got 'prunenet.learner.PaperLearner'"):
        PruneNetModule(str(tiny_dir), policy="prunenet.learner.PaperLearner")


def test_plug_points_by_class_path_with_their_own_hyperparameters(tiny_dir):
    """A class_path with init_args (as LightningCLI passes it) builds the class with those arguments; the
    short name, the class name and the class_path describe the same thing (what resume compares)."""
    from prunenet import plugins
    from prunenet.learner import BaselineLearner

    module = PruneNetModule(str(tiny_dir), policy={"class_path": "prunenet.policy.RowMLP", "init_args": {"width": 5}},
                            learner={"class_path": "BaselineLearner", "init_args": {"momentum": 0.5}},
                            reward={"class_path": "ks_gate", "init_args": {"spectra_method": "svdvals"}})
    assert module.policy.hidden.out_features == 5 and module.learner.momentum == 0.5
    assert module.reward.method == "svdvals"
    assert module.plug_points() == {
        "policy": {"class_path": "prunenet.policy.RowMLP", "init_args": {"width": 5}},
        "reward": {"class_path": "prunenet.reward.KSGateReward",
                   "init_args": {"spectra_dtype": "float32", "spectra_method": "svdvals"}},
        "learner": {"class_path": "prunenet.learner.BaselineLearner", "init_args": {"use_kld": False, "momentum": 0.5}}}
    for spec in ("baseline", "BaselineLearner", {"class_path": "prunenet.learner.BaselineLearner"}):
        assert plugins.canonical("learner", spec) == plugins.describe(BaselineLearner())
    assert plugins.canonical("policy", "row_mlp") == {"class_path": "prunenet.policy.RowMLP", "init_args": {"width": 16}}


def test_plug_points_passed_as_objects_are_saved_as_plain_records(tiny_dir, tmp_path):
    """Objects and callables given from Python are stored in the hyperparameters as their canonical records, so
    the checkpoint loads with ``weights_only=True`` (what resume reads); a passed object is copied, not shared."""
    import functools

    from prunenet.policy import RowMLP
    from prunenet.resume import _stored_settings
    from prunenet.reward import KSGateReward

    reward = KSGateReward(spectra_dtype="float64")
    module = PruneNetModule(str(tiny_dir), reward=reward, policy=functools.partial(RowMLP, width=8))
    assert module.reward is not reward and module.policy.width == 8
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=LayerDataModule())
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    stored = _stored_settings(tmp_path / "x.ckpt")
    assert stored is not None and stored["policy"] == {"class_path": "prunenet.policy.RowMLP", "init_args": {"width": 8}}
    assert stored["reward"]["init_args"]["spectra_dtype"] == "float64"


def test_a_checkpoint_from_before_the_plug_points_keeps_its_settings():
    """Fits saved with module-level gamma / use_kld / spectra_dtype are compared through the init arguments that
    hold them now: another value is a mismatch, the defaults are not."""
    from prunenet.resume import checkpoint_settings, settings_mismatch

    hp = {"model_name_or_path": "m", "compression_ratio": 0.3, "policy": "sparsity_predictor", "reward": "ks_gate",
          "learner": "paper", "gamma": 0.5, "use_kld": True, "spectra_dtype": "float64"}
    stored = checkpoint_settings({"hyper_parameters": hp})
    assert stored["learner"]["init_args"] == {"gamma": 0.5, "use_kld": True}
    assert stored["reward"]["init_args"]["spectra_dtype"] == "float64"
    now = checkpoint_settings({"hyper_parameters": {**hp, "gamma": 0.99, "use_kld": False, "spectra_dtype": "float32"}})
    assert "learner=" in settings_mismatch(stored, now) and "reward=" in settings_mismatch(stored, now)
    assert settings_mismatch(now, {**now, "learner": {"class_path": "prunenet.learner.PaperLearner",
                                                      "init_args": {"gamma": 0.99, "use_kld": False}}}) == ""


def test_a_checkpoint_from_before_the_generate_batch_was_recorded_is_its_old_text():
    """Its self-generated text was sampled 16 sequences a call: a resume with today's default (64) is refused and
    names the batch; one with batch 16 matches. A corpus has no sampling: its batch never differs."""
    from prunenet.resume import checkpoint_settings, settings_mismatch

    old = {"class_path": "prunenet.reward.ReconstructionReward", "init_args": {"source": "self", "samples": 8}}
    hp = {"model_name_or_path": "m", "compression_ratio": 0.3, "reward": old}
    stored = checkpoint_settings({"hyper_parameters": hp})
    assert stored["reward"]["init_args"]["batch"] == 16
    now = checkpoint_settings({"hyper_parameters": {**hp, "reward": "ReconstructionReward"}})
    assert now["reward"]["init_args"]["batch"] == 64 and "batch" in settings_mismatch(stored, now)
    assert settings_mismatch(stored, {**now, "reward": {**now["reward"], "init_args": {
        **now["reward"]["init_args"], "samples": 8, "batch": 16}}}) == ""
    wiki = {**hp, "reward": {**old, "init_args": {"source": "wiki"}}}
    assert settings_mismatch(checkpoint_settings({"hyper_parameters": wiki}), checkpoint_settings(
        {"hyper_parameters": {**wiki, "reward": {**old, "init_args": {"source": "wiki", "batch": 64}}}})) == ""


#: Kept rows of the tiny LLaMA (seed 0) after a 3-episode fit at r = 0.5 with seed 0, recorded on
#: the code before the pipeline was split into modules (issue 13): refactors must not change them.
PINNED_KEPT = {"0": [0, 1, 2, 3, 4, 6, 7, 8, 10, 12, 18, 21, 23, 25, 27, 29, 31, 34],
               "1": [0, 3, 5, 6, 7, 10, 14, 16, 18, 19, 20, 21, 22, 24, 26, 28, 29, 31],
               "2": [2, 5, 6, 8, 10, 11, 13, 14, 16, 22, 23, 24, 25, 26, 32, 33, 34, 35]}
#: Mean reward per episode of that fit: means of 1 / KS, and KS is a multiple of 1 / 18 here, so
#: these are exact up to the float64 mean (1e-6 is far below the gap between two KS values).
PINNED_REWARDS = [4.7, 4.156863, 4.323529]


def test_kept_indices_of_a_seeded_fit_are_pinned(tmp_path, extra_args, monkeypatch, one_thread):
    from tests.conftest import fit_in_process

    source = save_tiny(tiny_llama(seed=0), tmp_path / "m")
    cli = fit_in_process([f"--model.model_name_or_path={source}", "--trainer.max_epochs=3",
                          f"--trainer.default_root_dir={tmp_path / 'logs'}", f"--slicing.output_dir={tmp_path / 'out'}",
                          "--model.compression_ratio=0.5", "--seed_everything=0"], extra_args, monkeypatch)
    assert json.loads((tmp_path / "out" / PLAN_FILE).read_text())["kept_indices"] == PINNED_KEPT
    assert [h["reward_mean"] for h in cli.model.history] == pytest.approx(PINNED_REWARDS, abs=1e-6)
