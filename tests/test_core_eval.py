"""core_eval against SAEs whose metrics are known in closed form, on a tiny random model, offline.

The model is a 2-layer random HookedTransformer with a word-level tokenizer built here; the SAE reads
blocks.0.hook_resid_post, to which a constant offset is added (via blocks.0.mlp.b_out) so the activations
have a large mean, as real residual streams do. That is what separates the zero-referenced and the
conventional explained variance.
"""
import json
import random
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

import core_eval

D, LAYER, HOOK = 32, 0, "blocks.0.hook_resid_post"
CFG = core_eval.CoreEvalConfig(context_length=32, batch_size_prompts=4, n_eval_reconstruction_batches=2,
                               n_eval_sparsity_variance_batches=3)
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


@pytest.fixture(scope="module")
def model_and_texts(make_word_tokenizer, make_tiny_model):
    rng = random.Random(0)
    words = [f"w{i}" for i in range(296)]
    texts = [" ".join(rng.choices(words, k=rng.randint(12, 25))) for _ in range(50)]
    tokenizer = make_word_tokenizer(SPECIALS + words)
    model = make_tiny_model(tokenizer, n_layers=2, d_model=D, n_ctx=64, d_head=8, d_mlp=64)
    with torch.no_grad():
        model.blocks[0].mlp.b_out.copy_(5.0 * torch.ones(D) / D ** 0.5 + torch.linspace(-1, 1, D))
    return model, texts


def save_sae(path, W_enc, W_dec, b_enc, b_dec, k):
    sae = TopKSAE(TopKSAEConfig(d_in=W_enc.shape[0], d_sae=W_enc.shape[1], k=k, dtype="float32", device="cpu",
                                apply_b_dec_to_input=True, normalize_activations="none",
                                metadata=SAEMetadata(model_name="tiny", hook_name=HOOK, hook_layer=LAYER,
                                                     context_size=CFG.context_length, prepend_bos=True)))
    sae.load_state_dict({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec})
    sae.save_model(str(path))
    return sae


def perfect_sae(path):
    """W_enc = [I, −I], W_dec = [I; −I], k = d: the top d pre-activations of [x, −x] are the
    non-negative one of each pair, so the code is [relu(x), relu(−x)] and x̂ = relu(x) − relu(−x) = x
    exactly."""
    eye = torch.eye(D)
    return save_sae(path, torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0), torch.zeros(2 * D),
                    0.3 * torch.randn(D), k=D)


def kept_activations(model, batches):
    """Per batch, the hook activations [n_kept, d] at non-special positions, computed here without
    core_eval."""
    special = torch.tensor([model.tokenizer.bos_token_id, model.tokenizer.eos_token_id,
                            model.tokenizer.pad_token_id])
    out = []
    for tokens in batches:
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
        out.append(cache[HOOK][~torch.isin(tokens, special)])
    return out


def test_perfect_sae_scores_perfectly_and_result_is_json(model_and_texts, tmp_path):
    model, texts = model_and_texts
    perfect_sae(tmp_path)
    result = core_eval.run_core_eval(SAE.load_from_disk(str(tmp_path)), model, texts, CFG, "cpu")
    m = result["metrics"]
    rq = m["reconstruction_quality"]
    assert rq["explained_variance_conventional"] == pytest.approx(1.0, abs=1e-6)
    assert rq["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert rq["mse"] == pytest.approx(0.0, abs=1e-8)
    assert rq["cossim"] == pytest.approx(1.0, abs=1e-5)
    perf = m["model_performance_preservation"]
    # A random model may even do better ablated; the score is only meaningful if ablation changes the
    # loss at all.
    assert abs(perf["ce_loss_with_ablation"] - perf["ce_loss_without_sae"]) > 0.05
    assert perf["ce_loss_with_sae"] == pytest.approx(perf["ce_loss_without_sae"], abs=1e-5)
    assert perf["ce_loss_score"] == pytest.approx(1.0, abs=1e-3)
    assert m["model_behavior_preservation"]["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-6)
    assert m["model_behavior_preservation"]["kl_div_score"] == pytest.approx(1.0, abs=1e-4)
    assert m["shrinkage"]["l2_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert m["token_stats"] == {"total_tokens_eval_reconstruction": 2 * 4 * 32,
                                "total_tokens_eval_sparsity_variance": 3 * 4 * 32}
    assert set(result) == {"unique_id", "sae_set", "sae_id", "eval_cfg", "metrics",
                           "featurewise_weight_based_metrics", "wall_time_s"}
    assert set(m) == {"model_behavior_preservation", "model_performance_preservation",
                      "reconstruction_quality", "shrinkage", "sparsity", "token_stats"}
    assert result["unique_id"] == "tiny_layer_0_sae_custom_sae"
    assert (result["eval_cfg"]["context_size"] == 32
            and result["eval_cfg"]["n_eval_sparsity_variance_batches"] == 3)
    assert "conventional" in rq["explained_variance_note"]
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert result["wall_time_s"] > 0


@pytest.mark.filterwarnings("ignore:Decoder weights are not normalized")
def test_mean_only_sae_explains_nothing_conventionally_but_much_from_zero(model_and_texts, tmp_path):
    """x̂ = b_dec = x̄ (decoder all zeros): conventional EV is exactly 0, SAE-Bench's zero-referenced one
    is not."""
    model, texts = model_and_texts
    batches = core_eval.sparsity_variance_batches(model, perfect_sae(tmp_path / "p"), texts, CFG, "cpu")
    x_bar = torch.cat(kept_activations(model, batches)).double().mean(0).float()
    save_sae(tmp_path / "mean", torch.randn(D, 2 * D), torch.zeros(2 * D, D), torch.zeros(2 * D), x_bar, k=4)
    rq = core_eval.run_core_eval(SAE.load_from_disk(str(tmp_path / "mean")), model, texts, CFG,
                                 "cpu")["metrics"]["reconstruction_quality"]
    assert rq["explained_variance_conventional"] == pytest.approx(0.0, abs=1e-5)
    assert rq["explained_variance"] > 0.5


def test_ev_matches_numpy_and_saebench_sees_the_same_tokens(model_and_texts, tmp_path):
    """A random TopK SAE: conventional EV equals a numpy computation on activations taken here, and
    SAE-Bench's own explained_variance is reproduced from the same per-batch activations, which proves
    the tokens agree."""
    model, texts = model_and_texts
    batches = core_eval.sparsity_variance_batches(model, perfect_sae(tmp_path / "p"), texts, CFG, "cpu")
    tokens, tok = torch.cat(batches), model.tokenizer
    # Packed as in training: BOS first, documents joined by EOS, no padding.
    assert (tokens[:, 0] == tok.bos_token_id).all() and not (tokens[:, 1:] == tok.bos_token_id).any()
    assert (tokens == tok.eos_token_id).any() and not (tokens == tok.pad_token_id).any()
    acts = kept_activations(model, batches)
    torch.manual_seed(1)  # tied random dictionary around the data mean: a mediocre but sane SAE
    W_dec = torch.nn.functional.normalize(torch.randn(4 * D, D), dim=1)
    sae = save_sae(tmp_path / "sae", W_dec.T.clone(), W_dec, 0.1 * torch.randn(4 * D),
                   torch.cat(acts).mean(0), k=6)
    norms = torch.cat(acts).norm(dim=1)
    max_norm = norms.quantile(0.9).item()  # drop the top tenth of token norms, as training drops sinks
    rq = core_eval.run_core_eval(SAE.load_from_disk(str(tmp_path / "sae")), model, texts, CFG, "cpu",
                                 max_norm=max_norm)["metrics"]["reconstruction_quality"]

    assert sum(len(a) for a in acts) < 3 * 4 * 32  # BOS/EOS positions were dropped
    with torch.no_grad():
        recons = [sae.decode(sae.encode(a)) for a in acts]
    x, x_hat = (np.concatenate([t.numpy() for t in ts]).astype(np.float64) for ts in (acts, recons))
    ev = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert rq["explained_variance_conventional"] == pytest.approx(ev, abs=1e-6)
    assert 0.05 < ev < 0.95, ev
    typical = (norms <= max_norm).numpy()
    xt, rt = x[typical], (x - x_hat)[typical]
    ev_typical = 1 - (rt ** 2).sum() / ((xt - xt.mean(0)) ** 2).sum()
    assert rq["explained_variance_conventional_without_outliers"] == pytest.approx(ev_typical, abs=1e-6)
    assert rq["outlier_tokens_dropped"] == int((~typical).sum()) > 0 and abs(ev_typical - ev) > 1e-4

    # SAE-Bench 0.6.0's formula, literally: per-batch means, averaged over batches.
    sq = np.mean([(a.double() ** 2).sum(-1).mean().item() for a in acts])
    sq_per_dim = np.mean([(a.double() ** 2).mean().item() for a in acts])
    resid = np.mean([((a - r).double() ** 2).sum(-1).mean().item() for a, r in zip(acts, recons)])
    assert rq["explained_variance"] == pytest.approx(1 - resid / (sq - sq_per_dim ** 2), abs=1e-5)
    assert rq["explained_variance"] > ev + 0.1  # zero-referenced reads higher on this offset stream


def test_conventional_ev_reuses_saebench_activations_or_recomputes_the_same(model_and_texts, tmp_path,
                                                                            monkeypatch):
    """The conventional EV runs no forward pass of its own: it uses the activations recorded from
    SAE-Bench's sparsity/variance pass. Where none were recorded it runs the model itself, to exactly the
    same numbers."""
    model, texts = model_and_texts
    batches = core_eval.sparsity_variance_batches(model, perfect_sae(tmp_path / "p"), texts, CFG, "cpu")
    acts = torch.cat(kept_activations(model, batches))
    max_norm = acts.norm(dim=1).quantile(0.9).item()
    torch.manual_seed(2)
    W_dec = torch.nn.functional.normalize(torch.randn(4 * D, D), dim=1)
    save_sae(tmp_path / "sae", W_dec.T.clone(), W_dec, 0.1 * torch.randn(4 * D), acts.mean(0), k=6)
    keys = ("explained_variance_conventional", "explained_variance_conventional_without_outliers",
            "outlier_tokens_dropped", "ev_tokens")

    def conventional_ev():
        rq = core_eval.run_core_eval(SAE.load_from_disk(str(tmp_path / "sae")), model, texts, CFG, "cpu",
                                     max_norm=max_norm)["metrics"]["reconstruction_quality"]
        return {k: rq[k] for k in keys}

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("core_eval ran the model for the conventional EV")

    with monkeypatch.context() as m:
        m.setattr(core_eval, "hook_activations", no_forward_pass)
        reused = conventional_ev()
    assert "run_with_cache" not in vars(model)  # the recording wrapper is gone again

    @contextmanager
    def records_nothing(*args):
        yield []

    monkeypatch.setattr(core_eval, "recording_hook_activations", records_nothing)
    with pytest.warns(UserWarning, match="recomputing"):
        recomputed = conventional_ev()
    assert reused == recomputed
    assert reused["outlier_tokens_dropped"] > 0 and 0 < reused["explained_variance_conventional"] < 1


def test_too_little_text_fails_before_evaluating(model_and_texts, tmp_path):
    model, texts = model_and_texts
    perfect_sae(tmp_path)
    with pytest.raises(ValueError, match="texts fill only"):
        core_eval.run_core_eval(SAE.load_from_disk(str(tmp_path)), model, texts[:5], CFG, "cpu")


def test_weight_based_metrics_are_sae_benchs_and_match_the_decoder(model_and_texts, tmp_path):
    """The perfect SAE's decoder rows are ±e_i: each row's largest signed cosine to another row is 0 (its
    negative partner gives -1, every other row 0), and encoder and decoder vectors coincide (cosine 1)."""
    model, texts = model_and_texts
    perfect_sae(tmp_path)
    w = core_eval.run_core_eval(SAE.load_from_disk(str(tmp_path)), model, texts, CFG,
                                "cpu")["featurewise_weight_based_metrics"]
    assert w["max_decoder_cosine_sim"] == {"mean": 0.0, "median": 0.0, "min": 0.0, "max": 0.0}
    assert (w["encoder_decoder_cosine_sim"]["min"] == pytest.approx(1.0)
            and w["encoder_norm"]["max"] == pytest.approx(1.0))
