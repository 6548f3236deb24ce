"""Architecture contract: every supported family prunes exactly, reloads plainly and fits.

One shared base class (:class:`ArchContract`) holds the contract; each family is a small
subclass naming its ``model_type`` (the tiny model comes from ``tests.tiny.TINY_FAMILIES``:
FFN width 37, d 24 or 32, GQA where the family has it, tied and untied heads). The contract:

- the adapter reads the config's FFN width, and the policy state of every layer is (n, d) and
  *is* the first FFN input map (checked against the module's own forward, so Conv1D's
  transposition and Phi-3's fused [gate; up] are caught);
- slicing is exact: pruned logits == dense logits with the removed neurons zeroed (a hook on
  the FFN output module's input, independent of the adapter's own slicing code), and exactly
  the removed neurons' parameters disappear;
- save + plain ``AutoModelForCausalLM.from_pretrained`` gives the same logits, no missing or
  mismatched keys;
- one fit episode through the CLI (``prunenet.fit.main``) on a folder without tokenizer files
  writes a checkpoint that reloads plainly and matches the dense model with the kept rows.

A family whose config cannot express a new FFN width (BLOOM) must refuse to slice before
anything is changed or written.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from prunenet.arch import ADAPTERS, get_adapter, markdown_table, supported_model_types
from prunenet.errors import ConfigurationError
from prunenet.export import save_pruned
from prunenet.selection import kept_width
from prunenet.slicing import count_parameters, slice_model
from tests.conftest import assert_logits_match, assert_same_weights
from tests.tiny import TINY_FAMILIES, save_tiny, tiny_model

ROOT = Path(__file__).resolve().parents[1]
RATIO = 0.3  # the fit CLI default in these tests: k = floor(0.7 * 37) = 25


# --------------------------------------------------------------------------- helpers
def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab - 3, (2, 9), generator=g)


def _random_kept(n: int, k: int, layers: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g)[:k].sort().values for _ in range(layers)]


def _plain_load(path):
    """Plain ``AutoModelForCausalLM.from_pretrained`` (no PruneNet code), with its loading info."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    return model.eval(), info


def _assert_clean_load(info) -> None:
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(key), f"{key}: {info.get(key)}"


def _fit_cli(folder: Path | str, out: Path, root: Path, *extra: str):
    """One fit episode through the CLI entry point, in-process (same code as ``python -m prunenet.fit``).

    The post-pruning evaluation (lm-eval, needs a tokenizer) is switched off where the CLI has it.
    """
    import callbacks
    from prunenet.fit import main

    no_eval = ["--evaluation.enabled=false"] if hasattr(callbacks, "PostPruningEvaluation") else []
    return main(args=[f"--model.model_name_or_path={folder}", "--trainer.max_epochs=1",
                      "--trainer.accelerator=cpu", "--trainer.devices=1", f"--slicing.output_dir={out}",
                      f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
                      "--spectrum.enabled=false", f"--model.compression_ratio={RATIO}", *no_eval, *extra])


# --------------------------------------------------------------------------- the contract
class ArchContract:
    """The contract every family passes; subclasses set ``model_type`` (and maybe more)."""

    model_type: str = ""
    overrides: ClassVar[dict] = {}
    width: int = 37           # the FFN width n the tiny config asks for
    sliceable: bool = True    # False: the config cannot express a new width

    @pytest.fixture(scope="class")
    def dense(self):
        return tiny_model(self.model_type, seed=0, **self.overrides)

    @pytest.fixture(scope="class")
    def folder(self, dense, tmp_path_factory):
        """The tiny model saved as safetensors, *without* tokenizer files."""
        return save_tiny(dense, tmp_path_factory.mktemp(f"dense-{self.model_type}") / "model")

    @pytest.fixture(scope="class")
    def adapter(self, dense):
        return get_adapter(dense.config)

    def _k(self, adapter, dense) -> int:
        return kept_width(adapter.intermediate_size(dense.config), RATIO)

    # ---------------------------------------------------------------- adapter facts
    def test_registered_for_its_model_type(self, dense, adapter):
        assert dense.config.model_type == self.model_type
        assert self.model_type in adapter.model_types
        assert self.model_type in supported_model_types()
        assert adapter.intermediate_size(dense.config) == self.width
        assert adapter.width_settable == self.sliceable

    def test_activation_statistics_run_the_decoder_without_the_lm_head(self, dense, adapter):
        """``calibration.activation_stats`` runs ``model.base_model``: it must hold every hooked layer and give the
        full model's statistics (the same layers on the same tokens: float64 sums of the same float32 inputs)."""
        from prunenet.calibration import activation_stats

        assert dense.base_model is not dense
        inner = {id(m) for m in dense.base_model.modules()}
        assert all(id(adapter.output_module(layer)) in inner for layer in adapter.layers(dense))
        tokens = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))
        got = activation_stats(dense, tokens, progress=False, gram=True)
        full = []
        hooks = [adapter.output_module(layer).register_forward_pre_hook(
            lambda _m, a: full.append(a[0].detach().reshape(-1, a[0].shape[-1]).double()))
            for layer in adapter.layers(dense)]
        with torch.no_grad():
            dense(input_ids=tokens, use_cache=False)
        for h in hooks:
            h.remove()
        for stats, h in zip(got, full):
            assert stats.count == 12 and torch.equal(stats.total, h.sum(0))
            torch.testing.assert_close(stats.gram, h.T @ h, rtol=1e-5, atol=1e-6)  # float32 GEMM of 12-term sums

    def test_state_is_n_by_d_and_is_the_ffn_input_map(self, dense, adapter):
        n = adapter.intermediate_size(dense.config)
        d = dense.get_input_embeddings().weight.shape[1]
        assert adapter.hidden_size(dense.config) == d
        layers = adapter.layers(dense)
        assert len(layers) == dense.config.get_text_config().num_hidden_layers
        x = torch.randn(5, d, generator=torch.Generator().manual_seed(3))
        for layer in layers:
            w = adapter.state(layer)
            assert tuple(w.shape) == (n, d)
            mod = adapter.input_modules(layer)[0]
            with torch.no_grad():
                y = mod(x)[..., :n]  # the gate half of a fused gate_up
                bias = getattr(mod, "bias", None)
                if bias is not None:
                    y = y - bias[:n]
            torch.testing.assert_close(y, x @ w.T, atol=1e-5, rtol=1e-4)
            # The output module maps n -> d.
            out = adapter.output_module(layer)
            with torch.no_grad():
                assert out(torch.zeros(1, n)).shape[-1] == d

    def test_policy_state_of_the_loaded_checkpoint(self, folder, adapter):
        from prunenet.states import load_ffn_states

        states, info = load_ffn_states(str(folder))
        n, d = self.width, states[0].shape[1]
        assert all(tuple(w.shape) == (n, d) for w in states)
        assert all(name != "?" for name in info["state_names"])

    # ---------------------------------------------------------------- slicing
    def test_slicing_is_exact(self, adapter):
        dense = tiny_model(self.model_type, seed=0, **self.overrides)
        n = adapter.intermediate_size(dense.config)
        layers = adapter.layers(dense)
        k = 23 if n == 37 else n // 2
        kept = _random_kept(n, k, len(layers))
        ids = _ids(dense.config.get_text_config().vocab_size)
        before = count_parameters(dense)
        if not self.sliceable:
            snapshot = [adapter.state(layer).clone() for layer in layers]
            with pytest.raises(ConfigurationError, match="cannot express"):
                slice_model(dense, kept)
            assert adapter.intermediate_size(dense.config) == n
            assert count_parameters(dense) == before
            assert all(torch.equal(adapter.state(layer), s) for layer, s in zip(layers, snapshot))
            return
        reference = copy.deepcopy(dense)
        # Parameters of one removed neuron: a row of each input (two for a fused gate_up, plus the
        # bias entries) and a column of the output.
        d = adapter.hidden_size(dense.config)
        per_neuron = d
        for mod in adapter.input_modules(layers[0]):
            rows = 2 if adapter.fused_gate_up else 1
            per_neuron += rows * (d + (1 if getattr(mod, "bias", None) is not None else 0))
        sliced = slice_model(dense, kept)
        assert sliced is dense
        assert adapter.intermediate_size(dense.config) == k
        assert before - count_parameters(dense) == len(layers) * (n - k) * per_neuron
        for layer, idx in zip(adapter.layers(dense), kept):
            assert tuple(adapter.state(layer).shape) == (k, d)
        assert_logits_match(dense, reference, ids, kept, adapter)
        # The check has teeth: one removed neuron kept instead of a kept one (last layer) fails it.
        wrong = [idx.clone() for idx in kept]
        wrong[-1][0] = min(set(range(n)) - set(wrong[-1].tolist()))
        with pytest.raises(AssertionError, match="Tensor-likes are not close"):
            assert_logits_match(dense, reference, ids, wrong, adapter)

    def test_save_and_plain_reload_round_trip(self, adapter, tmp_path):
        model = tiny_model(self.model_type, seed=0, **self.overrides)
        n = adapter.intermediate_size(model.config)
        kept = _random_kept(n, 23 if n == 37 else n // 2, len(adapter.layers(model)), seed=2)
        if not self.sliceable:
            with pytest.raises(ConfigurationError):
                slice_model(model, kept)
            assert not (tmp_path / "out").exists()
            return
        ids = _ids(model.config.get_text_config().vocab_size, seed=1)
        slice_model(model, kept)
        out = save_pruned(model, tmp_path / "out", {"kept_indices": {str(i): k.tolist() for i, k in enumerate(kept)}})
        reloaded, info = _plain_load(out)
        _assert_clean_load(info)
        assert type(reloaded) is type(model)
        assert reloaded.config.model_type == self.model_type
        assert adapter.intermediate_size(reloaded.config) == kept[0].numel()
        assert count_parameters(reloaded) == count_parameters(model)
        assert_same_weights(reloaded, model)
        assert_logits_match(reloaded, model, ids)

    def test_shardwise_slicing_matches_in_memory(self, dense, adapter, folder, tmp_path):
        """Slicing the safetensors files tensor by tensor (no model built) gives the same checkpoint."""
        from prunenet.loading import load_config
        from prunenet.streaming import slice_checkpoint

        n = adapter.intermediate_size(dense.config)
        kept = _random_kept(n, 23 if n == 37 else n // 2, len(adapter.layers(dense)), seed=6)
        out = tmp_path / "out"
        out.mkdir()
        if not self.sliceable:
            with pytest.raises(ConfigurationError, match="cannot express"):
                slice_checkpoint(folder, load_config(str(folder)), kept, out)
            assert not any(out.iterdir())
            return
        params = slice_checkpoint(folder, load_config(str(folder)), kept, out)
        expected = slice_model(tiny_model(self.model_type, seed=0, **self.overrides), kept)
        assert params == count_parameters(expected)
        reloaded, info = _plain_load(out)
        _assert_clean_load(info)
        ids = _ids(dense.config.get_text_config().vocab_size, seed=3)
        assert_same_weights(reloaded, expected)
        assert_logits_match(reloaded, expected, ids)

    # ---------------------------------------------------------------- the CLI
    def test_one_fit_episode_through_the_cli(self, dense, adapter, folder, tmp_path):
        out = tmp_path / "out"
        assert not any(p.name.startswith("tokenizer") for p in folder.iterdir())
        if not self.sliceable:
            with pytest.raises(ConfigurationError, match="cannot express"):
                _fit_cli(folder, out, tmp_path)
            assert not out.exists()
            return
        cli = _fit_cli(folder, out, tmp_path)
        k = self._k(adapter, dense)
        n, d = self.width, adapter.hidden_size(dense.config)
        assert tuple(cli.model.policy.shape) == (n, d)
        config = json.loads((out / "config.json").read_text())
        text = config.get("text_config", config)
        if adapter.width_key in text:
            assert text[adapter.width_key] == k
        plan = json.loads((out / "prunenet.json").read_text())
        assert plan["model_type"] == self.model_type and plan["kept_width"] == k
        assert plan["intermediate_size"] == n and plan["hidden_size"] == d
        policy = torch.load(out / "policy.pt", weights_only=True)
        assert tuple(policy["state_dict"]["proj_intermediate.weight"].shape) == (n, d)
        assert not any(p.name.startswith("tokenizer") for p in out.iterdir())
        kept = [torch.tensor(plan["kept_indices"][str(i)]) for i in range(plan["num_layers"])]
        pruned, info = _plain_load(out)
        _assert_clean_load(info)
        ids = _ids(dense.config.get_text_config().vocab_size, seed=4)
        assert_logits_match(pruned, dense, ids, kept, adapter)


# --------------------------------------------------------------------------- hub-style names
class HubStyleNames:
    """Mixed into the families whose hub checkpoints name parameters differently from what
    ``save_pretrained`` writes (``hub_rename`` maps one to the other); the others use the same names."""

    def test_hub_style_checkpoint_names_load(self, dense, adapter, tmp_path):
        from safetensors.torch import save_file

        from prunenet.loading import load_model

        # The names save_pretrained writes (tied weights once), renamed as other checkpoints have them.
        folder = save_tiny(dense, tmp_path / "ours")
        from safetensors.torch import load_file

        ours = load_file(str(folder / "model.safetensors"))
        hub = tmp_path / "hub"
        hub.mkdir()
        (hub / "config.json").write_text((folder / "config.json").read_text())
        renamed = {type(self).hub_rename(name): t.contiguous() for name, t in ours.items()}
        assert set(renamed) != set(ours)
        save_file(renamed, str(hub / "model.safetensors"), metadata={"format": "pt"})
        loaded = load_model(str(hub))
        ids = _ids(dense.config.get_text_config().vocab_size)
        assert_same_weights(loaded, dense)
        assert_logits_match(loaded, dense, ids)
        for a, b in zip(adapter.layers(loaded), adapter.layers(dense)):
            assert torch.equal(adapter.state(a), adapter.state(b))
        # The fit reads the states from these files (streamed by name where it can).
        from prunenet.states import load_ffn_states

        states, _ = load_ffn_states(str(hub))
        for w, layer in zip(states, adapter.layers(dense)):
            assert torch.equal(w, adapter.state(layer))
        # Shard-wise slicing of the hub-named files, then a plain reload.
        from prunenet.loading import load_config
        from prunenet.streaming import slice_checkpoint

        kept = _random_kept(self.width, 23, len(states), seed=7)
        out = tmp_path / "out"
        out.mkdir()
        slice_checkpoint(hub, load_config(str(hub)), kept, out)
        reloaded, info = _plain_load(out)
        _assert_clean_load(info)
        expected = slice_model(tiny_model(self.model_type, seed=0, **self.overrides), kept)
        assert_same_weights(reloaded, expected)
        assert_logits_match(reloaded, expected, ids)


# --------------------------------------------------------------------------- the families
class TestLlama(ArchContract):
    model_type = "llama"  # GQA 4/2, tied head, 3 layers

    def test_dtype_is_kept_and_tokenizer_copied(self, tmp_path):
        """A bfloat16 checkpoint with a tokenizer: fit + slice keep bf16 and copy the tokenizer."""
        from safetensors import safe_open

        model = tiny_model("llama", seed=0).to(torch.bfloat16)
        folder = save_tiny(model, tmp_path / "bf16", tokenizer=True)
        out = tmp_path / "out"
        _fit_cli(folder, out, tmp_path)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            dtypes = {f.get_tensor(name).dtype for name in f.keys()}  # noqa: SIM118
        assert dtypes == {torch.bfloat16}
        assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
        assert (out / "tokenizer.json").is_file()
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(str(out))("w5 w7")["input_ids"] == [5, 7]

    def test_gated_ffn_with_biases(self):
        """mlp_bias=True: the bias entries of gate AND up follow the kept rows."""
        dense = tiny_model("llama", seed=0, mlp_bias=True, tie_word_embeddings=False)
        adapter = get_adapter(dense.config)
        kept = _random_kept(37, 20, 3, seed=5)
        ids = _ids(101)
        reference = copy.deepcopy(dense)
        slice_model(dense, kept)
        assert_logits_match(dense, reference, ids, kept, adapter)


class TestMistral(ArchContract):
    model_type = "mistral"  # untied head


class TestQwen2(ArchContract):
    model_type = "qwen2"


class TestQwen3(ArchContract):
    model_type = "qwen3"  # q/k norms, explicit head_dim


class TestGemma(ArchContract):
    model_type = "gemma"


class TestGemma2(ArchContract):
    model_type = "gemma2"


class TestGemma3Text(ArchContract):
    model_type = "gemma3_text"  # what the Gemma-3-270M asset is


def _gemma3_new_name(name: str) -> str:
    # transformers 5 saves Gemma-3 in the hub layout (language_model.model.*, vision_tower.*, ...);
    # checkpoints written with the in-memory names (model.language_model.*) must load too.
    for old, new in (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector."),
                     ("language_model.lm_head.", "lm_head.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


class TestGemma3Multimodal(ArchContract, HubStyleNames):
    """Gemma3Config -> Gemma3ForConditionalGeneration; the decoder is model.language_model."""

    model_type = "gemma3"
    hub_rename = staticmethod(_gemma3_new_name)


class TestPhi3(ArchContract):
    model_type = "phi3"  # fused gate_up_proj


class TestPhi(ArchContract):
    model_type = "phi"  # phi-1/1.5/2: fc1/fc2 with biases


def _strip_prefix(prefix: str):
    return staticmethod(lambda name: name.removeprefix(prefix))


class TestOPT(ArchContract, HubStyleNames):
    model_type = "opt"  # fc1/fc2 with biases, ffn_dim; hub files name the base model (decoder.*)
    hub_rename = _strip_prefix("model.")


class TestFalcon(ArchContract):
    model_type = "falcon"  # new decoder architecture, GQA, biases


class TestFalconMultiQuery(ArchContract):
    """Falcon-7B style: multi-query attention, parallel attention, no biases."""

    model_type = "falcon"
    overrides: ClassVar[dict] = {"new_decoder_architecture": False, "multi_query": True, "parallel_attn": True,
                                 "bias": False}


class TestGPT2(ArchContract, HubStyleNames):
    model_type = "gpt2"  # Conv1D (in, out); hub files name the base model (h.*)
    hub_rename = _strip_prefix("transformer.")

    def test_default_width_is_written_on_slicing(self, tmp_path):
        """n_inner=None means 4 * n_embd; the pruned config must then say n_inner=k."""
        model = tiny_model("gpt2", seed=0, n_inner=None)
        adapter = get_adapter(model.config)
        assert adapter.intermediate_size(model.config) == 96
        assert tuple(adapter.state(adapter.layers(model)[0]).shape) == (96, 24)
        slice_model(model, _random_kept(96, 41, 2))
        out = save_pruned(model, tmp_path / "out", {})
        assert json.loads((out / "config.json").read_text())["n_inner"] == 41
        reloaded, info = _plain_load(out)
        _assert_clean_load(info)
        ids = _ids(101)
        assert_same_weights(reloaded, model)
        assert_logits_match(reloaded, model, ids)


class TestGPTNeoX(ArchContract):
    model_type = "gpt_neox"  # Pythia


class TestGPTJ(ArchContract):
    model_type = "gptj"


class TestCodeGen(ArchContract):
    model_type = "codegen"


class TestGPTNeo(ArchContract):
    model_type = "gpt_neo"


class TestGPTBigCode(ArchContract):
    model_type = "gpt_bigcode"  # multi-query


class TestStarcoder2(ArchContract):
    model_type = "starcoder2"


class TestStableLM(ArchContract):
    model_type = "stablelm"


class TestOlmo(ArchContract):
    model_type = "olmo"


class TestOlmo2(ArchContract):
    model_type = "olmo2"


class TestGranite(ArchContract):
    model_type = "granite"  # mlp_bias=True


class TestSmolLM3(ArchContract):
    model_type = "smollm3"


class TestCohere(ArchContract):
    model_type = "cohere"


class TestPersimmon(ArchContract):
    model_type = "persimmon"


class TestNemotron(ArchContract):
    model_type = "nemotron"  # non-gated up_proj/down_proj


class TestBloom(ArchContract):
    """BLOOM fixes its FFN width at 4 * hidden in code: states are read, slicing is refused."""

    model_type = "bloom"
    width = 96
    sliceable = False


# --------------------------------------------------------------------------- registry-wide checks
def _contract_classes():
    return [c for c in globals().values() if isinstance(c, type) and issubclass(c, ArchContract)
            and c is not ArchContract]


def test_every_registered_family_has_a_contract_test():
    tested = {c.model_type for c in _contract_classes()}
    assert set(supported_model_types()) == tested
    assert tested <= set(TINY_FAMILIES)


def test_issue_families_are_supported():
    required = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3", "opt",
                "phi", "falcon", "gpt2", "gpt_neox"}
    assert required <= set(supported_model_types())


def test_unknown_model_type_is_refused_with_the_list():
    from types import SimpleNamespace

    from prunenet.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="unsupported model_type 'mamba'.*llama"):
        get_adapter(SimpleNamespace(model_type="mamba"))


def test_docs_table_matches_the_registry():
    doc = (ROOT / "docs" / "architectures.md").read_text()
    assert markdown_table() in doc, "regenerate docs/architectures.md from prunenet.arch.markdown_table()"
    assert len(ADAPTERS) == markdown_table().count("\n") - 2


def test_every_config_file_parses():
    """Every YAML under configs/ parses against the fit CLI (types, keys), without loading a model."""
    from prunenet.data import LayerDataModule
    from prunenet.fit import TRAINER_DEFAULTS, PruneNetCLI
    from prunenet.module import PruneNetModule

    class ParseOnly(PruneNetCLI):
        def instantiate_classes(self) -> None:  # no model download, no Trainer
            pass

    files = sorted(f for f in (ROOT / "configs").glob("*.yaml") if f.stem != "recover")  # recover: its own CLI
    assert {f.stem for f in files} >= {"smollm2", "gemma3", "llama2", "llama3", "phi2", "opt", "falcon",
                                       "mistral", "qwen2"}
    for f in files:
        cli = ParseOnly(PruneNetModule, LayerDataModule, run=False, seed_everything_default=0,
                        trainer_defaults=dict(TRAINER_DEFAULTS), args=["--config", str(f)],
                        subclass_mode_model=False, subclass_mode_data=False)
        model = cli.config["model"]
        assert model["model_name_or_path"], f
        assert 0 <= model["compression_ratio"] < 1, f


def test_recover_config_parses():
    """configs/recover.yaml parses against the recover CLI (types, keys), without loading a model."""
    from prunenet.recover import TRAINER_DEFAULTS, RecoverCLI
    from prunenet.recovery import RecoveryDataModule, RecoveryModule

    class ParseOnly(RecoverCLI):
        def instantiate_classes(self) -> None:  # no model load, no Trainer
            pass

    cli = ParseOnly(RecoveryModule, RecoveryDataModule, run=False, seed_everything_default=0,
                    trainer_defaults=dict(TRAINER_DEFAULTS), args=["--config", str(ROOT / "configs" / "recover.yaml")],
                    subclass_mode_model=False, subclass_mode_data=False)
    assert cli.config["model"]["method"] == "lora" and cli.config["data"]["source"] == "self" and cli.config["model"]["loss"] == "auto"
    assert cli.config["trainer"]["max_steps"] == TRAINER_DEFAULTS["max_steps"]  # the code's default is the config's


# --------------------------------------------------------------------------- the real Gemma-3-270M
@pytest.mark.slow
def test_gemma3_270m_end_to_end(tmp_path):
    """The embedded Gemma-3-270M: gemma3_text, 18 layers, state (2048, 640); fit 2 episodes through
    the CLI, then the plainly reloaded checkpoint equals the dense model with the kept rows.
    The asset is part of ``make install``; without it ``assets.materialize`` fails with the install command."""
    from prunenet import assets
    from prunenet.loading import load_model

    folder = assets.materialize("gemma3-270m")
    dense = load_model("gemma3-270m")
    assert dense.config.model_type == "gemma3_text" and type(dense).__name__ == "Gemma3ForCausalLM"
    adapter = get_adapter(dense.config)
    layers = adapter.layers(dense)
    assert len(layers) == 18 and tuple(adapter.state(layers[0]).shape) == (2048, 640)
    out = tmp_path / "out"
    _fit_cli("gemma3-270m", out, tmp_path, "--trainer.max_epochs=2")
    plan = json.loads((out / "prunenet.json").read_text())
    assert plan["kept_width"] == kept_width(2048, RATIO) == 1433 and plan["episodes"] == 2
    assert (out / "tokenizer.json").is_file() and (folder / "tokenizer.json").is_file()
    pruned, info = _plain_load(out)
    _assert_clean_load(info)
    assert pruned.config.intermediate_size == 1433
    ids = torch.tensor([[2, 651, 6037, 576, 9405, 563, 9079, 236761]])
    kept = [torch.tensor(plan["kept_indices"][str(i)]) for i in range(18)]
    assert_logits_match(pruned, dense, ids, kept, adapter)  # tolerance: see assert_logits_match
    # One wrong neuron in one layer (a removed one kept instead of the first kept one) must fail it.
    wrong = [idx.clone() for idx in kept]
    wrong[9][0] = min(set(range(2048)) - set(wrong[9].tolist()))
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        assert_logits_match(pruned, dense, ids, wrong, adapter)

