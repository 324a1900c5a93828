"""The unlearning evaluation (unlearning.py) on tiny random / planted HookedTransformers, offline.

Models here: a 3-layer random model (hook at blocks.1.hook_resid_post, so one block runs after the hook)
with a word-level tokenizer that has a chat template; and a planted 2-layer model whose blocks write
nothing, so the residual is the token embedding, in which forget words carry an extra direction u and the
unembedding predicts each word's successor from its embedding.
"""
import json
import random
from functools import partial

import numpy as np
import pytest
import torch

import interventions
import unlearning
from data import Question
from interventions import Clamp, ControlEdit

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
FORGET_WORDS = [f"f{i}" for i in range(10)]
RETAIN_WORDS = [f"r{i}" for i in range(10)]
PROMPT_WORDS = ("A B C D Answer : ( ) . ? The following are multiple choice questions with answers "
                "about biology history user model what is").split()
VOCAB = SPECIALS + PROMPT_WORDS + FORGET_WORDS + RETAIN_WORDS
TEMPLATE = ("{% for m in messages %}<bos>user {{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<bos>model {% endif %}")
HOOK_LAYER, HOOK = 1, "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def tokenizer(make_word_tokenizer):
    return make_word_tokenizer(VOCAB, split_punctuation=True, chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def model(tokenizer, make_tiny_model):
    m = make_tiny_model(tokenizer, n_layers=3, d_model=32, n_ctx=96, d_head=8, d_mlp=64)
    with torch.no_grad():  # a less flat output distribution than the default init gives
        m.W_U.mul_(8.0)
    return m


class DenseSAE(torch.nn.Module):
    """encode(x) = relu(x W_enc + b_enc), decode(f) = f W_dec + b_dec."""

    def __init__(self, W_enc, b_enc, W_dec, b_dec):
        super().__init__()
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = W_enc, b_enc, W_dec, b_dec

    def encode(self, x):
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec


def random_sae(d=32, F=24, seed=0, bias=-0.3):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, F, generator=g) / d ** 0.5
    return DenseSAE(W, torch.full((F,), bias), torch.randn(F, d, generator=g) / d ** 0.5,
                    0.1 * torch.randn(d, generator=g))


def texts(words, n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(8, 20))) for _ in range(n)]


def contexts(tokenizer, words, n=6, length=24, seed=0):
    t, _ = unlearning.pack_eval_contexts(tokenizer, texts(words, 40, seed), length, n, tokenizer.bos_token_id,
                                         tokenizer.eos_token_id)
    return t


# ------------------------------------------------------------------------------------------------- selection

def brute_force_selection(forget, retain, th, n, candidates=None):
    pool = [i for i in range(len(forget))
            if retain[i] < th and forget[i] > 0 and (candidates is None or i in candidates)]
    out = []
    while pool and len(out) < n:
        best = max(pool, key=lambda i: (forget[i], -i))  # highest rate, lowest index on ties
        out.append(best)
        pool.remove(best)
    return out


def test_selection_matches_brute_force_on_made_up_rates():
    rng = np.random.default_rng(0)
    for trial in range(30):
        F = int(rng.integers(5, 60))
        # rates on a coarse grid, so ties and zeros are common; retain rates around the thresholds
        forget = rng.choice([0.0, 0.001, 0.01, 0.02, 0.05, 0.1, 0.3], size=F)
        retain = rng.choice([0.0, 0.0005, 0.001, 0.005, 0.01, 0.05], size=F)
        candidates = sorted(rng.choice(F, size=F // 2, replace=False).tolist()) if trial % 2 else None
        for th in (0.001, 0.01):
            for n in (1, 3, 10, 20):
                assert unlearning.select_features(forget, retain, th, n, candidates) == \
                    brute_force_selection(forget, retain, th, n, candidates), (trial, th, n)
    # boundary: retain rate exactly at the threshold is dropped (SAE-Bench: retain_score >= retain_threshold)
    assert unlearning.select_features([0.5, 0.4], [0.01, 0.0], 0.01, 2) == [1]


def test_selection_agrees_with_sae_bench_when_rates_are_distinct():
    fa = pytest.importorskip("sae_bench.evals.unlearning.utils.feature_activation")
    rng = np.random.default_rng(1)
    forget, retain = rng.random(200) * (rng.random(200) < 0.7), rng.random(200) * 0.02
    for th in (0.001, 0.01):
        ref = fa.get_top_features(forget, retain, retain_threshold=th)
        for n in (10, 20):
            assert unlearning.select_features(forget, retain, th, n) == [int(i) for i in ref[:n]]


# ------------------------------------------------------------------------------------------------- clamp

def test_clamp_without_selected_features_leaves_output_unchanged(model, tokenizer):
    tokens = contexts(tokenizer, FORGET_WORDS + RETAIN_WORDS)
    sae = random_sae()
    base = model(tokens)
    assert torch.equal(
        model.run_with_hooks(tokens, fwd_hooks=[(HOOK, interventions.clamp_hook(sae, [], 50))]), base)
    # a selected feature that never fires goes through resid - decode(f) + decode(f): unchanged to float
    # tolerance
    dead = random_sae(bias=-100.0)
    out = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, interventions.clamp_hook(dead, [0, 3], 50))])
    assert (torch.allclose(out, base, atol=1e-5)
            and not torch.equal(dead.encode(torch.zeros(32)), torch.ones(24)))


@pytest.mark.parametrize("kind", ["dense", "sae_lens_topk"])
def test_clamp_with_planted_feature_matches_hand_computation(model, tokenizer, kind):
    tokens = contexts(tokenizer, FORGET_WORDS + RETAIN_WORDS)
    if kind == "dense":
        sae = random_sae()
        W_dec = sae.W_dec
    else:
        from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
        sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=24, k=4, dtype="float32", device="cpu"))
        torch.manual_seed(1)
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        W_dec = sae.W_dec.detach()
    _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    resid = cache[HOOK]
    f = sae.encode(resid).detach()
    j = int((f[:, 1:] > 0).float().mean((0, 1)).argmax())  # a feature that fires on some positions
    m = 37.0
    active = f[:, :, j] > 0
    active[:, 0] = False  # BOS position untouched
    assert active.any() and (~active[:, 1:]).any()
    expected = resid + (torch.where(active, -m - f[:, :, j], torch.zeros_like(f[:, :, j]))[..., None]
                        * W_dec[j])
    got, on = interventions.clamp_residual(sae, resid, [j], m)
    assert torch.equal(on, active)
    assert torch.allclose(got, expected, atol=1e-4)
    assert torch.allclose(got[:, 0], resid[:, 0], atol=1e-5)
    # through the model: the hooked logits are those of the hand-modified residual run through the rest
    hooked = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, interventions.clamp_hook(sae, [j], m))])
    by_hand = model(expected, start_at_layer=HOOK_LAYER + 1)
    assert torch.allclose(hooked, by_hand, atol=1e-3)
    assert not torch.allclose(hooked, model(tokens), atol=1e-2)


# ---------------------------------------------------------------------------------------- start_at_layer

def rotary_model(make_tiny_model, tokenizer):
    """Rotary positions, grouped-query attention and a sliding window shorter than the contexts on alternate
    layers (as Gemma-2): what a prefix's cached keys must get right."""
    m = make_tiny_model(tokenizer, n_layers=3, d_model=32, n_ctx=96, d_head=8, n_key_value_heads=2, d_mlp=64,
                        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8,
                        attn_types=["global", "local", "global"], window_size=5, seed=1)
    with torch.no_grad():
        m.W_U.mul_(8.0)
    return m


def test_tail_from_a_cached_prefix_equals_the_full_tail(tokenizer, make_tiny_model):
    for m in (rotary_model(make_tiny_model, tokenizer),):
        tokens = contexts(tokenizer, FORGET_WORDS + RETAIN_WORDS, n=3)
        resid = unlearning.to_hook(m, tokens, HOOK_LAYER)
        full, kv = unlearning.tail(m, resid, HOOK_LAYER, record=True)
        edited = resid.clone()
        edited[:, 9:] += torch.randn_like(edited[:, 9:])  # positions 9.. changed
        expected = unlearning.tail(m, edited, HOOK_LAYER)
        for start in (0, 4, 9):
            past = {i: (k[:, :start], v[:, :start]) for i, (k, v) in kv.items()}
            got = unlearning.tail(m, edited[:, start:], HOOK_LAYER, past=past)
            assert torch.allclose(got, expected[:, start:], atol=1e-4), start
        assert not torch.allclose(expected[:, 9:], full[:, 9:], atol=1e-2)


def test_kept_residual_path_equals_full_forward(model, tokenizer, make_tiny_model):
    for m in (model, rotary_model(make_tiny_model, tokenizer)):
        check_kept_residual_path(m, tokenizer)


def check_kept_residual_path(model, tokenizer):
    tokens = contexts(tokenizer, FORGET_WORDS + RETAIN_WORDS, n=5)
    resid = unlearning.to_hook(model, tokens, HOOK_LAYER)
    final = unlearning.tail(model, resid, HOOK_LAYER)
    assert torch.allclose(unlearning.logits_from_final_resid(model, final), model(tokens), atol=1e-5)
    per_token = model(tokens, return_type="loss", loss_per_token=True)
    assert torch.allclose(unlearning.ce_sums(model, final, tokens, chunk_tokens=30),
                          per_token.sum(1).double(), atol=1e-4)
    # a re-run from the last position (its only edit): nothing left to predict, the loss is that of the prefix
    last = unlearning.token_nll(model, final[:, -1:], tokens[:, -1:])
    assert (last.shape == (len(tokens), 0)
            and unlearning.ce_sums(model, final[:, -1:], tokens[:, -1:]).eq(0).all())
    # the sweep (kept residuals, configs batched, unchanged rows skipped) against a full forward with the hook
    sae = random_sae()
    s = unlearning.EvalSet(model, "ce", [(tokens[:3], None), (tokens[3:], None)], HOOK_LAYER, "cpu")
    # the kept values carry no autograd graph (the model's weights require grad; a graph would keep every
    # logits chunk of the baseline pass alive)
    assert all(b["nll"].grad_fn is None and b["base"].grad_fn is None for b in s.batches)
    configs = [Clamp((), 25), Clamp((2, 5), 25), Clamp((2, 5, 7), 100), Clamp((11,), 50)]
    starts, rerun = [], s.rerun
    s.rerun = lambda *args: starts.append(args[-1]) or rerun(*args)  # record where each re-run batch starts
    for skip in (True, False):
        cfg = unlearning.UnlearningConfig(tail_batch_size=3, skip_unchanged_rows=skip)
        starts.clear()
        results, frac = unlearning.run_sweep(model, sae, HOOK_LAYER, {"ce": s}, configs, cfg)
        assert (max(starts) > 0) == skip  # with skipping, some rows start after a cached prefix
        for (feats, m, _), r in zip(configs, results):
            hooked = model.run_with_hooks(tokens, return_type="loss", loss_per_token=True,
                                          fwd_hooks=[(HOOK, interventions.clamp_hook(sae, list(feats), m))])
            assert torch.allclose(torch.cat(r["ce"]), hooked.sum(1).double(), atol=1e-3), (feats, m, skip)


# ------------------------------------------------------------------------------------------------- MCQ

QUESTIONS = [Question("what is f1 ?", ["f2", "r3", "f4", "r5"], 0, "biology"),
             Question("what is r1 r2 r3 ?", ["f2", "r3", "f4 f5 f6", "r5"], 2, "biology"),
             Question("what is f7 f8 ?", ["r1", "f3", "f4", "r9 r8"], 3, "history"),
             Question("what is ?", ["r2", "f2", "r4", "f9"], 1, "history")]


def test_prompt_format_follows_sae_bench_and_chat_template(tokenizer, make_word_tokenizer):
    body, ans = unlearning.question_text(QUESTIONS[1], (2, 0, 1, 3))
    assert body == ("The following are multiple choice questions (with answers) about biology.\n"
                    "what is r1 r2 r3 ?\nA. f4 f5 f6\nB. f2\nC. r3\nD. r5") and ans == 0
    ids, _ = unlearning.prompt_tokens(tokenizer, QUESTIONS[1], (2, 0, 1, 3))
    assert tokenizer.decode(ids).split() == ("<bos> user " + body + " <eos> <bos> model Answer : (").replace(
        ".", " . ").replace("(", " ( ").replace(")", " ) ").replace("?", " ? ").replace(":", " : ").split()
    plain = make_word_tokenizer(VOCAB, split_punctuation=True)
    ids, _ = unlearning.prompt_tokens(plain, QUESTIONS[1])
    assert ids[0] == plain.bos_token_id and plain.convert_ids_to_tokens(ids[-2:]) == ["Answer", ":"]
    assert unlearning.letter_token_ids(tokenizer) == [[VOCAB.index(l)] for l in "ABCD"]
    assert ([len(set(o)) for o in unlearning.answer_orders(24)] == [4] * 24
            and len(set(unlearning.answer_orders(24))) == 24)
    assert unlearning.answer_orders(4) == [(0, 1, 2, 3), (1, 2, 3, 0), (2, 3, 0, 1), (3, 0, 1, 2)]


def direct_letter_probs(model, ids, letter_ids):
    p = model(torch.tensor([ids]))[0, -1].softmax(-1)
    return torch.tensor([max(float(p[i]) for i in v) for v in letter_ids])


def test_mcq_scoring_matches_direct_letter_probabilities(model, tokenizer):
    letter_ids = unlearning.letter_token_ids(tokenizer)
    seqs = [unlearning.prompt_tokens(tokenizer, q, o)[0]
            for q in QUESTIONS for o in unlearning.answer_orders(3)]
    assert len({len(s) for s in seqs}) > 2  # padding is exercised
    direct = torch.stack([direct_letter_probs(model, s, letter_ids) for s in seqs])
    assert torch.allclose(unlearning.full_letter_probs(model, seqs, letter_ids, 5, "cpu"), direct, atol=1e-5)
    # kept-residual baseline and a clamped config, against full forwards one prompt at a time
    batches = [unlearning.pad_right([seqs[i] for i in b], tokenizer.pad_token_id)
               for b in unlearning.length_batches(seqs, 4)]
    order = [i for b in unlearning.length_batches(seqs, 4) for i in b]
    s = unlearning.EvalSet(model, "mcq", batches, HOOK_LAYER, "cpu", letter_ids)
    assert torch.allclose(torch.cat([b["base"] for b in s.batches]), direct[order], atol=1e-5)
    sae, cfg = random_sae(), unlearning.UnlearningConfig(tail_batch_size=5)
    (r,), _ = unlearning.run_sweep(model, sae, HOOK_LAYER, {"mcq": s}, [Clamp((1, 4), 60)], cfg)
    hook = [(HOOK, interventions.clamp_hook(sae, [1, 4], 60))]
    with model.hooks(fwd_hooks=hook):
        clamped = torch.stack([direct_letter_probs(model, seqs[i], letter_ids) for i in order])
    assert torch.allclose(torch.cat(r["mcq"]), clamped, atol=1e-4)
    assert not torch.allclose(clamped, direct[order], atol=1e-3)


def test_answer_order_filter_keeps_exactly_the_questions_right_under_every_order():
    rng = random.Random(0)
    qs = [Question(f"q{i}", ["a", "b", "c", "d"], rng.randrange(4), "biology") for i in range(60)]
    orders = unlearning.answer_orders(24)
    # made-up model: question i is answered right under order o unless (i, o) is in `wrong`; some
    # questions fail only under the very last order, some under several, some never
    wrong = {(i, o) for i in range(60) for o in orders
             if (i % 3 == 1 and rng.random() < 0.2) or (i % 7 == 0 and o == orders[-1])}
    calls = []

    def score(pairs):
        calls.append(len(pairs))
        out = torch.zeros(len(pairs), 4)
        for row, (q, o) in enumerate(pairs):
            right = list(o).index(q.answer)
            out[row, right if (qs.index(q), o) not in wrong else (right + 1) % 4] = 1.0
        return out

    kept, n_scored = unlearning.filter_questions(qs, orders, score)
    brute = [i for i in range(60) if all((i, o) not in wrong for o in orders)]
    assert kept == brute and 0 < len(kept) < 60 and any(i % 7 == 0 for i in range(60) if i not in kept)
    assert n_scored == sum(calls) < 60 * 24


def test_filter_on_tiny_model_matches_brute_force(model, tokenizer):
    letter_ids = unlearning.letter_token_ids(tokenizer)
    orders = unlearning.answer_orders(4)
    qs = [Question(f"what is {a} {b} ?", [c, d, "f1", "r2"], k, "biology")
          for a, b, c, d, k in zip(FORGET_WORDS, RETAIN_WORDS, RETAIN_WORDS[::-1], FORGET_WORDS[::-1],
                                   [0, 1, 2, 3] * 3)]
    cfg = unlearning.UnlearningConfig(answer_orders=4, batch_size=3)
    kept, _ = unlearning.surviving_questions(model, qs, cfg, letter_ids, "cpu")
    brute = [i for i, q in enumerate(qs) if all(
        int(direct_letter_probs(model, unlearning.prompt_tokens(tokenizer, q, o)[0], letter_ids).argmax())
        == list(o).index(q.answer) for o in orders)]
    assert kept == brute


def curve_from_means(means: dict, n=4, spread=0.0, label=None, tag=0):
    """(curve, deltas): a curve whose edit at knob k has the given per-split mean ΔCEs,
    means {k: {"forget_select": mean, ...}}; each split gets n contexts at its mean ± spread (alternating
    signs), so the SE is computed, not assumed."""
    offsets = torch.tensor([spread * (1 if i % 2 else -1) for i in range(n)], dtype=torch.float64)
    curve = unlearning.Curve(label or {"tag": tag}, lambda k: Clamp((tag,), k), tuple(sorted(means)))
    return curve, {curve.make(k): {name: v + offsets for name, v in m.items()} for k, m in means.items()}


def split_means(fs, rs, fr=None, rr=None):
    return {"forget_select": fs, "retain_select": rs, "forget_report": fs if fr is None else fr,
            "retain_report": rs if rr is None else rr}


def no_measure(edits, extra_sets=None):
    """Every edit is already in the deltas."""
    return {}


def test_mcq_score_follows_sae_bench_rule():
    cfg = unlearning.UnlearningConfig()
    rows = [{"forget_accuracy": fa, "retain_accuracy": ra}
            for fa, ra in [(0.9, 1.0), (0.6, 0.99), (0.1, 0.95), (None, None)]]  # the last: no questions
    s = unlearning.mcq_score(rows, cfg, 30, 40)
    assert s["unlearning_score"] == pytest.approx(0.4)  # the ×100 row fails the retain check
    s = unlearning.mcq_score(rows, cfg, 19, 40)
    assert s["unlearning_score"] is None and "not meaningful" in s["mcq_note"]


def test_tolerance_point_brackets_the_first_crossing_and_never_extrapolates():
    assert unlearning.tolerance_point([0.0, 0.01, 0.03, 0.5], 0.02) == (1, pytest.approx(0.5), None)
    # first one
    assert unlearning.tolerance_point([0.0, 0.03, 0.01, 0.5], 0.02) == (0, pytest.approx(2 / 3), None)
    assert (unlearning.tolerance_point([0.0, 0.005, 0.01], 0.02)
            == (2, 0.0, "below_tolerance_at_every_multiplier"))
    assert (unlearning.tolerance_point([0.05, 0.1], 0.02)
            == (None, None, "above_tolerance_at_smallest_multiplier"))


def test_mean_and_se_is_the_paired_standard_error():
    d = torch.tensor([0.3, -0.1, 0.25, 0.05, 0.4])
    mean, se = unlearning.mean_and_se(d)
    assert mean == pytest.approx(float(np.mean(d.numpy())))
    assert se == pytest.approx(float(np.std(d.numpy(), ddof=1) / np.sqrt(5)))
    assert unlearning.mean_and_se(torch.tensor([0.2]))[1] is None


def test_score_at_tolerance_interpolates_between_the_bracketing_multipliers():
    # retain ΔCE 0.01 at ×50, 0.05 at ×100: the tolerance sits a quarter of the way, at ×62.5
    curve, deltas = curve_from_means({25: split_means(0.2, 0.0), 50: split_means(1.0, 0.01),
                                      100: split_means(3.0, 0.05), 200: split_means(6.0, 0.4)},
                                     n=6, spread=0.1)
    p = unlearning.at_tolerance(curve, deltas, 0.02, "select")
    assert p["knob"] == pytest.approx(62.5) and p["flag"] is None and not p["lower_bound"]
    assert p["score"] == pytest.approx(0.75 * 1.0 + 0.25 * 3.0)
    assert p["retain_delta_ce"] == pytest.approx(0.02)
    # the curve it is read on: each multiplier's mean ΔCEs, as planted
    assert [v for c in p["curve"] for v in (c["knob"], c["forget_delta_ce"], c["retain_delta_ce"])] == \
        pytest.approx([25, 0.2, 0.0, 50, 1.0, 0.01, 100, 3.0, 0.05, 200, 6.0, 0.4])
    # per context (0.75 d_50 + 0.25 d_100) = mean ± 0.1: the SE of 6 values ±0.1
    expected_se = np.std([0.1 * (1 if i % 2 else -1) for i in range(6)], ddof=1) / np.sqrt(6)
    assert p["score_se"] == pytest.approx(expected_se)


def test_report_split_is_read_at_its_own_tolerance_between_other_multipliers():
    """The selection split crosses the tolerance between ×50 and ×100 (at ×75); the report split, whose
    retain ΔCE is higher, between ×25 and ×50 (at ×37.5). The held-out point is read on the report split at
    ×37.5, with both ΔCEs from the report split: forget 1.5, retain 0.02."""
    cfg = unlearning.UnlearningConfig(ce_tolerance=0.02)
    curve, deltas = curve_from_means({25: split_means(2.0, 0.0, 1.0, 0.01),
                                      50: split_means(4.0, 0.01, 2.0, 0.03),
                                      100: split_means(8.0, 0.03, 4.0, 0.05)})
    choice = unlearning.choose([curve], deltas, no_measure, cfg)
    assert choice.point["knob"] == pytest.approx(75.0) and choice.point["score"] == pytest.approx(6.0)
    point = unlearning.report(choice.curve, deltas, no_measure, cfg)
    assert point["split"] == "report" and point["knob"] == pytest.approx(37.5)
    assert point["score"] == pytest.approx(1.5) and point["retain_delta_ce"] == pytest.approx(0.02)
    assert point["score_se"] == pytest.approx(0.0) and not point["lower_bound"]
    assert point["n_contexts"] == {"forget": 4, "retain": 4}


def test_held_out_score_is_chosen_on_the_selection_split_and_measured_on_the_report_split():
    """Curve A looks best on the selection text; curve B would look best on the report text. The held-out
    score is A's report value, not the best report value."""
    cfg = unlearning.UnlearningConfig(ce_tolerance=0.02)
    a, da = curve_from_means({25: split_means(2.0, 0.0, 0.5, 0.0), 50: split_means(4.0, 0.04, 1.0, 0.04)},
                             tag=1)
    b, db = curve_from_means({25: split_means(1.0, 0.0, 2.0, 0.0), 50: split_means(1.5, 0.04, 3.0, 0.04)},
                             tag=2)
    deltas = da | db
    choice = unlearning.choose([a, b], deltas, no_measure, cfg)
    assert choice.curve.label == {"tag": 1} and choice.point["score"] == pytest.approx(3.0)
    assert [p["score"] for p in choice.candidates] == [pytest.approx(3.0), pytest.approx(1.25)]
    assert unlearning.report(choice.curve, deltas, no_measure, cfg)["score"] == pytest.approx(0.75)
    above, d_above = curve_from_means({25: split_means(1.0, 0.5)}, tag=3)
    no_extension = unlearning.UnlearningConfig(ce_tolerance=0.02, max_extensions=0)
    none = unlearning.choose([above], d_above, no_measure, no_extension)
    assert none.curve is None and none.candidates[0]["flag"] == "above_tolerance_at_smallest_multiplier"
    assert unlearning.report(none.curve, d_above, no_measure, no_extension)["score"] is None


def test_extension_stops_at_the_first_multiplier_past_the_tolerance_and_obeys_the_cap():
    """retain ΔCE = knob / 10,000 crosses 0.02 first at ×400: one doubling, then stop. A curve whose
    retain ΔCE stays below continues to 200·2^4 = 3200 and is reported as a lower bound; one that changes
    no retain context at all goes there at once; one already above at ×25 halves until it is below
    (retain = knob / 1,000: ×12.5)."""
    cfg = unlearning.UnlearningConfig(ce_tolerance=0.02, max_extensions=4)
    retain = {1: lambda k: k / 10_000, 2: lambda k: 1e-6 * k, 3: lambda k: k / 1_000, 4: lambda k: 0.0}
    curves = [unlearning.Curve({"tag": t}, partial(Clamp, (t,)), (25, 50, 100, 200)) for t in retain]
    deltas, batches = {}, []

    def measure(edits, extra_sets=None):
        todo = [e for e in edits if e not in deltas]
        batches.append(sorted((e.features[0], e.multiplier) for e in todo))
        for e in todo:
            r = retain[e.features[0]](e.multiplier)
            deltas[e] = {"retain_select": torch.full((4,), r, dtype=torch.float64),
                         "forget_select": torch.full((4,), e.multiplier / 100, dtype=torch.float64)}
    out = unlearning.extend(curves, deltas, "select", measure, cfg)
    assert out[0].knobs == (25, 50, 100, 200, 400)
    assert out[1].knobs == (25, 50, 100, 200, 400, 800, 1600, 3200)
    assert out[2].knobs == (12.5, 25, 50, 100, 200)
    assert out[3].knobs == (25, 50, 100, 200, 3200)
    assert batches[1:] == [[(1, 400), (2, 400), (3, 12.5), (4, 3200)], [(2, 800)], [(2, 1600)], [(2, 3200)]]
    for capped in (unlearning.at_tolerance(out[i], deltas, 0.02, "select") for i in (1, 3)):
        assert capped["lower_bound"] and capped["knob"] == 3200 and capped["score"] == pytest.approx(32.0)
    assert unlearning.at_tolerance(out[0], deltas, 0.02, "select")["knob"] == pytest.approx(200.0)
    low = unlearning.at_tolerance(out[2], deltas, 0.02, "select")
    assert low["knob"] == pytest.approx(20.0) and not low["lower_bound"]


def test_a_search_from_the_static_crossing_reads_what_the_whole_sequence_reads():
    """Gated curves and random draws start at the knob just past the static curve's crossing (×100 here)
    and search x2 or ÷2 from there: a weaker edit (retain = knob / 20,000) and a stronger one (knob / 2,000)
    are read at the same point as from the whole sequence, with fewer edits."""
    cfg = unlearning.UnlearningConfig(ce_tolerance=0.02, max_extensions=4)
    static, deltas = curve_from_means({25: split_means(0.1, 0.0), 50: split_means(0.2, 0.01),
                                       100: split_means(0.4, 0.03), 200: split_means(0.8, 0.1)})
    start = unlearning.around_crossing(static, deltas, "select", 0.02)
    assert start.knobs == (100,) and start.base == (25, 50, 100, 200)
    for tag, slope in ((5, 1 / 20_000), (6, 1 / 2_000)):
        def measure(edits, extra_sets=None):
            for e in edits:
                deltas.setdefault(e, {"retain_select": torch.full((4,), slope * e.multiplier, dtype=torch.float64),
                                      "forget_select": torch.full((4,), e.multiplier / 100, dtype=torch.float64)})
        make = partial(Clamp, (tag,))
        (searched,) = unlearning.extend([start._replace(make=make)], deltas, "select", measure, cfg)
        (whole,) = unlearning.extend([static._replace(make=make)], deltas, "select", measure, cfg)
        a, b = (unlearning.at_tolerance(c, deltas, 0.02, "select") for c in (searched, whole))
        assert a["knob"] == pytest.approx(b["knob"]) and a["score"] == pytest.approx(b["score"])
        assert len(searched.knobs) < len(whole.knobs)
        assert a["knob"] == pytest.approx(400.0 if tag == 5 else 40.0)


def test_random_feature_draws_are_seeded_and_drawn_from_the_eligible_set():
    forget = np.array([0.0, 0.1, 0.2, 0.05, 0.3, 0.0, 0.01, 0.02, 0.4, 0.1])
    retain = np.array([0.0, 0.0, 0.02, 0.0, 0.0, 0.0, 0.005, 0.0, 0.0, 0.009])
    eligible = unlearning.eligible_features(forget, retain, 0.01)
    assert eligible.tolist() == [1, 3, 4, 6, 7, 8, 9]  # retain < 0.01 and forget > 0
    draws = unlearning.random_features(eligible, 3, 5, seed=0)
    assert draws == unlearning.random_features(eligible, 3, 5, seed=0)
    assert draws != unlearning.random_features(eligible, 3, 5, seed=1) and len(set(draws)) > 1
    assert all(len(set(d)) == 3 and set(d) <= set(eligible.tolist()) and list(d) == sorted(d) for d in draws)
    assert unlearning.random_features(eligible[:2], 3, 2, seed=0) == [(1, 3), (1, 3)]


# ------------------------------------------------------------------------------------ planted end to end

@pytest.fixture(scope="module")
def planted(make_word_tokenizer, make_tiny_model):
    """Blocks write nothing (W_O, W_out, biases, W_pos zero; no normalisation), so every residual is
    W_E[token]. W_E[t] = e_t (+ a·u for forget words), W_U[:, next(t)] = k·W_E[t] with words following
    a cycle per domain; the SAE's feature 0 reads u (fires on forget words only), features 1-4 read
    retain words, feature 5 always fires."""
    tok = make_word_tokenizer(VOCAB, split_punctuation=True, chat_template=TEMPLATE)
    V, D, a, k = len(VOCAB), len(VOCAB) + 2, 1.0, 6.0
    m = make_tiny_model(tok, n_layers=2, d_model=D, n_ctx=64, d_head=4, n_heads=2, d_mlp=16, act_fn="relu",
                        normalization_type=None)
    u = torch.zeros(D)
    u[V] = 1.0
    with torch.no_grad():
        for name, p in m.named_parameters():
            if any(s in name for s in ("W_O", "b_O", "W_out", "b_out", "W_pos", "b_U")):
                p.zero_()
        E = torch.eye(V, D)
        ids = {w: VOCAB.index(w) for w in FORGET_WORDS + RETAIN_WORDS}
        for w in FORGET_WORDS:
            E[ids[w]] += a * u
        m.W_E.copy_(E)
        W_U = torch.zeros(D, V)
        for words in (FORGET_WORDS, RETAIN_WORDS):
            for w, nxt in zip(words, words[1:] + words[:1]):
                W_U[:, ids[nxt]] = k * E[ids[w]]
        m.W_U.copy_(W_U)
    F = 6
    W_enc, b_enc, W_dec = torch.zeros(D, F), torch.zeros(F), torch.zeros(F, D)
    W_enc[:, 0], b_enc[0], W_dec[0] = u, -a / 2, u
    for j in range(1, 5):
        W_enc[ids[RETAIN_WORDS[j]], j], b_enc[j], W_dec[j] = 1.0, -0.5, E[ids[RETAIN_WORDS[j]]]
    b_enc[5] = 1.0
    sae = DenseSAE(W_enc, b_enc, W_dec, torch.zeros(D))

    def cycle_docs(words, n, seed):
        rng = random.Random(seed)
        docs = []
        for _ in range(n):
            s = rng.randrange(len(words))
            docs.append(" ".join(words[(s + i) % len(words)] for i in range(rng.randint(6, 14))))
        return docs
    return m, sae, cycle_docs(FORGET_WORDS, 60, 1), cycle_docs(RETAIN_WORDS, 60, 2)


def test_planted_forget_feature_is_selected_and_raises_forget_ce_only(planted):
    m, sae, forget_docs, retain_docs = planted
    cfg = unlearning.UnlearningConfig(retain_thresholds=(0.001, 0.01), n_features=(1, 3),
                                      multipliers=(25, 100), max_extensions=2, context_length=24,
                                      n_rate_contexts=6, n_ce_contexts=6, batch_size=4, random_draws=3,
                                      leace_strengths=(0.5, 1.0), forget_group_sweep=True)
    forget_only = lambda pf, pr: [i for i in range(len(pf)) if pf[i] > 0 and pr[i] == 0]
    res = unlearning.run_unlearning_eval(sae, m, "blocks.0.hook_resid_post", 0, forget_docs, retain_docs,
                                         {}, {}, cfg, "cpu", forget_group=torch.tensor([0, 5]),
                                         detector_rule=forget_only)
    json.dumps(res)  # serialisable
    d, met = res["eval_result_details"], res["eval_result_metrics"]["unlearning"]
    # 1-4 never fire on forget, 5 on retain
    assert d["selected_features"]["all"] == {"0.001": [0], "0.01": [0]}
    assert d["selected_features"]["forget_group"] == {"0.001": [0], "0.01": [0]}
    for side, docs in (("forget", forget_docs), ("retain", retain_docs)):
        text = d["text"][side]
        assert text["select_contexts"] == text["report_contexts"] == text["rate_contexts"] == 6
        assert text["select_documents"] + text["report_documents"] + text["rate_documents"] <= len(docs)
    assert met["split_sizes_contexts"] == {"select": {"forget": 6, "retain": 6},
                                           "report": {"forget": 6, "retain": 6}}
    # no retain context changes: each curve goes straight to its cap 100·2^2 and is a lower bound
    assert {r["multiplier"] for r in d["sweep"]} == {25, 100, 400}
    for row in d["sweep"]:
        assert row["n_selected"] == 1 and row["forget_delta_ce_se"] > 0
        assert (row["forget_delta_ce"] > 1.0 and row["retain_delta_ce"] == 0.0
                and row["retain_delta_ce_se"] == 0.0)
    for curve in met["curves_at_tolerance"]:
        assert curve["flag"] == "below_tolerance_at_every_multiplier" and curve["knob"] == 400
    report = met["held_out"]["report"]
    assert met["held_out_lower_bound"] and report["lower_bound"] and report["knobs_run"] == [25, 100, 400]
    chosen = met["held_out"]["selection"]
    row = next(r for r in d["sweep"] if r["multiplier"] == 400 and r["n_features"] == chosen["n_features"]
               and r["retain_threshold"] == chosen["retain_threshold"])
    assert met["held_out_score"] == pytest.approx(row["report"]["forget_delta_ce"]) and met["held_out_score"] > 1
    assert met["held_out_score_se"] == pytest.approx(row["report"]["forget_delta_ce_se"])
    # the rate-groups detector reads feature 0 alone; it is 0 on every retain token, so no gate above 0
    # exists and the conditional clamp is the static one
    assert res["eval_config"]["detectors"]["rate_groups"] == {"n_features": 1, "gates": []}
    cond = met["conditional"]["rate_groups"]
    assert cond["score"] == pytest.approx(met["held_out_score"]) and cond["gate"] == 0.0
    # > 0 on forget positions (but a context that opens with EOS), 0 on every retain one
    assert 0.99 < cond["detector_auroc_report"] <= 1.0
    assert met["conditional"]["trained_groups"]["n_detector_features"] == 2
    # feature 0 is the only eligible one: every random draw is the chosen clamp, scored the same way
    rnd = met["controls"]["random_features"]
    assert rnd["n_eligible"] == 1 and rnd["n_draws"] == 3 and rnd["n_lower_bounds"] == 3
    assert rnd["score"] == pytest.approx(met["held_out_score"]) and rnd["score_std"] == pytest.approx(0.0)
    for name in ("difference_of_means", "leace"):
        assert met["controls"][name]["split"] == "report" and met["controls"][name]["control"] == name
    assert met["n_lower_bounds"] >= 1 + 3 + 2  # static, the draws, the conditional clamps
    assert d["baseline"]["forget_ce_select"] < 2.0  # the planted model predicts its cycles
    assert met["unlearning_score"] is None and "not meaningful" in met["mcq_note"]
    assert res["eval_result_metrics"]["unlearning_forget_group"]["held_out_score"] == pytest.approx(
        met["held_out_score"])


def test_question_answer_documents_are_question_then_answer_in_one_fixed_mixed_order():
    q = lambda text, subject: Question(text, ["w", "x", "y", "z"], 2, subject)
    by_subject = {"b": [q(f"b{i}?", "b") for i in range(20)], "a": [q(f"a{i}?", "a") for i in range(20)]}
    docs = unlearning.question_answer_documents(by_subject)
    assert sorted(docs) == sorted(f"{s}{i}?\ny" for s in "ab" for i in range(20))  # the correct answer
    assert docs == unlearning.question_answer_documents(dict(reversed(by_subject.items())))
    assert {d[0] for d in docs[:10]} == {"a", "b"}  # the first half holds both subjects


def test_question_answer_text_is_scored_like_the_main_text_on_its_own_halves(planted):
    """Questions made of the planted cycles: the second pair's own selection and report halves (disjoint
    by question), the main pair's selected feature, the same lower-bound score; too few questions to fill
    both halves leave the pair unscored, saying why."""
    m, sae, forget_docs, retain_docs = planted
    cfg = unlearning.UnlearningConfig(retain_thresholds=(0.01,), n_features=(1,), multipliers=(25, 100),
                                      max_extensions=2, context_length=24, n_rate_contexts=6,
                                      n_ce_contexts=6, batch_size=4, random_draws=1,
                                      leace_strengths=(1.0,), max_questions_per_subject=2, answer_orders=1)
    following = {w: words[(i + 1) % len(words)] for words in (FORGET_WORDS, RETAIN_WORDS)
                 for i, w in enumerate(words)}  # the answer continues the question's cycle
    questions = lambda docs, subject: {subject: [Question(d, [following[d.split()[-1]]] * 4, 0, subject)
                                                 for d in docs]}
    res = unlearning.run_unlearning_eval(sae, m, "blocks.0.hook_resid_post", 0, forget_docs, retain_docs,
                                         questions(forget_docs, "f"), questions(retain_docs, "r"), cfg, "cpu")
    main = res["eval_result_metrics"]["unlearning"]
    qa = res["eval_result_metrics"]["unlearning_question_answer_text"]
    for side in ("forget", "retain"):
        text = qa["text"][side]
        assert text["select_contexts"] == text["report_contexts"] == 6 and "rate_contexts" not in text
        assert text["select_documents"] + text["report_documents"] <= 60
    assert qa["held_out"]["selection"]["retain_threshold"] == 0.01 and qa["held_out"]["report"]["split"] == "report"
    assert qa["held_out_lower_bound"] and qa["held_out_score"] > 1 and main["held_out_score"] > 1
    assert qa["held_out_score"] != main["held_out_score"]  # its own text
    assert qa["baseline"]["forget_ce_report"] < 2.0
    assert {name: p["split"] for name, p in qa["controls"].items()} == {
        "difference_of_means": "report", "leace": "report"}
    short = unlearning.run_unlearning_eval(sae, m, "blocks.0.hook_resid_post", 0, forget_docs, retain_docs,
                                           questions(forget_docs[:3], "f"), questions(retain_docs, "r"), cfg,
                                           "cpu")
    skipped = short["eval_result_metrics"]["unlearning_question_answer_text"]
    assert list(skipped) == ["skipped"] and "too few held-out forget question-answer" in skipped["skipped"]


def test_planted_clamp_of_a_retain_feature_has_no_score(planted):
    """Retain text made of the forget words, forget text of both: feature 0 then fires on every retain
    word, so clamping it raises retain CE beyond the tolerance at every multiplier, even halved down."""
    m, sae, forget_docs, retain_docs = planted
    cfg = unlearning.UnlearningConfig(retain_thresholds=(1.01,), n_features=(1,), multipliers=(25,),
                                      max_extensions=2, context_length=24, n_rate_contexts=6,
                                      n_ce_contexts=6, batch_size=4, forget_group_sweep=True)
    mixed = [d for pair in zip(retain_docs, forget_docs) for d in pair]
    # retain_threshold above 1 keeps every feature; forget_group restricts the choice to feature 0
    res = unlearning.run_unlearning_eval(sae, m, "blocks.0.hook_resid_post", 0, mixed, forget_docs, {},
                                         {}, cfg, "cpu", forget_group=torch.tensor([0]))
    g = res["eval_result_metrics"]["unlearning_forget_group"]
    assert res["eval_result_details"]["selected_features"]["forget_group"] == {"1.01": [0]}
    assert [r["multiplier"] for r in res["eval_result_details"]["forget_group_sweep"]] == [6.25, 12.5, 25]
    assert all(r["retain_delta_ce"] > 0.02 for r in res["eval_result_details"]["forget_group_sweep"])
    assert g["held_out_score"] is None and g["curves_at_tolerance"][0]["flag"].startswith("above")
