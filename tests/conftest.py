"""Shared fixtures: tiny word-level tokenizers and tiny random HookedTransformers, built offline."""
import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer, PreTrainedTokenizerFast

# no test goes online to wandb, whatever key this machine has configured (subprocesses inherit it)
os.environ["WANDB_MODE"] = "disabled"
# the suite's own cache folder (the converted embedded model, activation entries),
# apart from the user's runs' cache: filled by the first test that needs each input, reused after
os.environ["ORTHO_SAE_CACHE"] = str(Path(os.environ.get("ORTHO_SAE_TEST_CACHE",
                                                        "~/.cache/orthogonal_sae_tests")).expanduser())

SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}


@pytest.fixture(scope="session")
def make_word_tokenizer(tmp_path_factory):
    """Factory: make(vocab, split_punctuation=False, chat_template=None) -> a word-level tokenizer whose
    ids are the positions in `vocab`; those of <bos> <eos> <pad> <unk> in `vocab` are its special tokens.
    Words are split on whitespace (pre_tokenizers.WhitespaceSplit: "letter:" is one token) or, with
    split_punctuation, also at punctuation (pre_tokenizers.Whitespace: "Answer:" is two). Saved to a
    folder and loaded back, as the real model's: TransformerLens re-loads the tokenizer by
    name_or_path."""
    def make(vocab: list, split_punctuation: bool = False, chat_template: "str | None" = None):
        tok = Tokenizer(tok_models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
        tok.pre_tokenizer = (pre_tokenizers.Whitespace() if split_punctuation
                             else pre_tokenizers.WhitespaceSplit())
        fast = PreTrainedTokenizerFast(tokenizer_object=tok,
                                       **{name: t for name, t in SPECIAL_TOKENS.items() if t in vocab})
        if chat_template:
            fast.chat_template = chat_template
        folder = tmp_path_factory.mktemp("tokenizer")
        fast.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)
    return make


@pytest.fixture(scope="session")
def make_tiny_model():
    """Factory: make(tokenizer, **config) -> a random HookedTransformer in eval mode; `config`
    (HookedTransformerConfig fields: n_layers, d_model, ...) over the defaults 4 heads, gelu, LayerNorm,
    CPU, seed 0, d_vocab = the tokenizer's size."""
    def make(tokenizer, **config) -> HookedTransformer:
        defaults = {"n_heads": 4, "d_vocab": len(tokenizer), "act_fn": "gelu", "normalization_type": "LN",
                    "device": "cpu", "seed": 0}
        return HookedTransformer(HookedTransformerConfig(**(defaults | config)), tokenizer=tokenizer).eval()
    return make
