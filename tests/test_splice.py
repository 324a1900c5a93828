"""A saved SAE spliced in at every position with SAE-Lens's own HookedSAETransformer.run_with_saes gets
the CE recovered of the run's core eval on the same text, because it leaves attention sinks alone.

The tiny random model has planted sinks: the embeddings of BOS and EOS are scaled up so that their
residuals have norms ~100x the median, as a real model's BOS does. SAE-Bench's core eval splices the SAE
in only at non-special positions; the saved SAE passes through every position above training's outlier
threshold, which here are exactly those, so the two must agree to float precision. Without the
passthrough the damaged sinks move every later token's loss, so the test can fail.
"""
import random

import pytest
import torch
from sae_lens import HookedSAETransformer
from transformer_lens import HookedTransformerConfig

import core_eval
import experiment
from models import special_token_ids

D, LAYER, HOOK = 32, 0, "blocks.0.hook_resid_post"
CFG = core_eval.CoreEvalConfig(context_length=32, batch_size_prompts=4, n_eval_reconstruction_batches=3,
                               n_eval_sparsity_variance_batches=2)
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
SINK_SCALE = 300.0


@pytest.fixture(scope="module")
def model_and_texts(make_word_tokenizer):
    rng = random.Random(0)
    words = [f"w{i}" for i in range(96)]
    texts = [" ".join(rng.choices(words, k=rng.randint(12, 25))) for _ in range(60)]
    tokenizer = make_word_tokenizer(SPECIALS + words)
    model = HookedSAETransformer(HookedTransformerConfig(
        n_layers=2, d_model=D, n_ctx=64, d_head=8, n_heads=4, d_mlp=64, d_vocab=len(tokenizer),
        act_fn="gelu", normalization_type="LN", device="cpu", seed=0), tokenizer=tokenizer).eval()
    with torch.no_grad():  # the sinks
        for token in (tokenizer.bos_token_id, tokenizer.eos_token_id):
            model.W_E[token] *= SINK_SCALE
    return model, texts


def hook_norms(model, batches) -> tuple:
    """(norms at the hook of every position [n], whether its token is special [n])."""
    tokens = torch.cat(batches)
    _, cache = model.run_with_cache(tokens, names_filter=HOOK, stop_at_layer=LAYER + 1)
    special = torch.isin(tokens, torch.tensor(special_token_ids(model.tokenizer)))
    return cache[HOOK].norm(dim=-1).flatten(), special.flatten()


def saved_sae(tmp_path, group_biases: bool, passthrough_norm: float):
    """A random tied TopK SAE (a mediocre reconstruction, as a short training gives), saved in model units."""
    torch.manual_seed(3)
    sae = experiment.AutoEncoderTopK(D, 4 * D, 6, group_biases=group_biases)
    if group_biases:
        with torch.no_grad():
            sae.group_bias.normal_(0, 0.3)
            sae.feature_group.copy_(torch.randint(-1, 2, (4 * D,)))
    sae.save(tmp_path / "sae", 1.0, {"model_name": "tiny", "hook_name": HOOK, "hook_layer": LAYER,
                                     "context_size": CFG.context_length, "prepend_bos": True},
             passthrough_norm=passthrough_norm)
    return tmp_path / "sae"


def spliced_ce_recovered(model, sae, batches) -> float:
    """SAE-Bench's ce_loss_score, (CE_zero − CE_sae) / (CE_zero − CE_clean), with the SAE spliced in by
    run_with_saes at every position and the hook zero-ablated at every position; the per-token losses
    averaged over the positions whose token is not special, as SAE-Bench does."""
    special = torch.tensor(special_token_ids(model.tokenizer))
    zero = [(HOOK, lambda act, hook: torch.zeros_like(act))]
    losses = {"clean": [], "sae": [], "zero": []}
    with torch.no_grad():
        for tokens in batches:
            keep = ~torch.isin(tokens, special)[:, :-1]
            per_token = {"clean": model(tokens, return_type="loss", loss_per_token=True),
                         "sae": model.run_with_saes(tokens, saes=[sae], return_type="loss",
                                                    loss_per_token=True),
                         "zero": model.run_with_hooks(tokens, fwd_hooks=zero, return_type="loss",
                                                      loss_per_token=True)}
            for name, loss in per_token.items():
                losses[name].append(loss[keep])
    clean, spliced, zeroed = (torch.cat(losses[name]).mean().item() for name in ("clean", "sae", "zero"))
    return (zeroed - spliced) / (zeroed - clean)


@pytest.mark.parametrize("group_biases", [False, True], ids=["topk", "group_biases"])
def test_splice_at_every_position_gets_the_core_evals_ce_recovered(model_and_texts, tmp_path, group_biases):
    model, texts = model_and_texts
    store = core_eval.make_store(model, experiment.load_sae(saved_sae(tmp_path / "probe", False, None)),
                                 texts, CFG, "cpu")
    batches = [store.get_batch_tokens(CFG.batch_size_prompts)
               for _ in range(CFG.n_eval_reconstruction_batches)]  # the core eval's CE batches
    norms, special = hook_norms(model, batches)
    limit = 10 * norms.median().item()  # training's rule: max_norm_multiple x the median norm
    assert torch.equal(norms > limit, special) and special.any()  # the sinks are the special tokens
    path = saved_sae(tmp_path, group_biases, limit)

    sae = experiment.load_sae(path)
    assert type(sae) is (experiment.GroupBiasTopKSAE if group_biases else experiment.SinkSafeTopKSAE)
    assert sae.cfg.passthrough_norm == pytest.approx(limit)
    core = core_eval.run_core_eval(experiment.load_sae(path, passthrough=False), model, texts, CFG, "cpu")
    core_score = core["metrics"]["model_performance_preservation"]["ce_loss_score"]
    spliced = spliced_ce_recovered(model, sae, batches)
    assert spliced == pytest.approx(core_score, abs=1e-6)
    assert 0.1 < core_score < 0.99  # a mediocre SAE: the score has room to move either way

    # the same SAE reconstructing the sinks too, as before the passthrough: a random model attends to
    # its sinks little, so the damage is small here, but far outside the agreement above
    unsafe = spliced_ce_recovered(model, experiment.load_sae(path, passthrough=False), batches)
    assert abs(unsafe - core_score) > 100 * 1e-6


def test_passthrough_keeps_exactly_the_sink_positions_and_nothing_else(tmp_path):
    """decode(encode(x)) is x at the positions with ‖x‖ > passthrough_norm and the SAE's reconstruction
    elsewhere, for batched [B, L, d] input; codes of another shape decode as usual."""
    path = saved_sae(tmp_path, True, 50.0)
    sae, plain = experiment.load_sae(path), experiment.load_sae(path, passthrough=False)
    torch.manual_seed(0)
    x = torch.randn(3, 7, D)
    x[0, 0] *= 100
    x[2, 4] *= 100
    sink = x.norm(dim=-1) > 50.0
    assert sink.sum() == 2
    with torch.no_grad():
        out, reference = sae.decode(sae.encode(x)), plain.decode(plain.encode(x))
        torch.testing.assert_close(out[sink], x[sink])
        torch.testing.assert_close(out[~sink], reference[~sink])
        assert not torch.allclose(reference[sink], x[sink], rtol=0.1)
        other = sae.encode(torch.randn(5, D))
        torch.testing.assert_close(sae.decode(other), plain.decode(other))
