"""The edits of interventions.py against hand computations: the causal detector and its gate, the
difference-of-means clamp, LEACE's erasure, and the gated clamp through the sweep's kept-residual path."""
import numpy as np
import pytest
import torch

import interventions
import unlearning
from interventions import Clamp, ControlEdit
from test_unlearning import (FORGET_WORDS, HOOK, HOOK_LAYER, RETAIN_WORDS, contexts, model,  # noqa: F401
                             random_sae, tokenizer)


def test_causal_detector_is_the_prefix_mean_of_the_detector_share():
    f = torch.tensor([[[9.0, 9.0, 9.0], [1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 2.0]]])
    f[:, 0] = 0.0  # encode_for_clamp zeroes the first position
    d = interventions.causal_detector(f, [0, 2])
    # shares: position 1: 1/4, position 2: none fires (0), position 3: 4/4
    assert torch.allclose(d, torch.tensor([[0.0, 0.25, 0.125, (0.25 + 0.0 + 1.0) / 3]]))


def test_causal_detector_never_uses_a_later_position():
    g = torch.Generator().manual_seed(0)
    f = torch.relu(torch.randn(3, 12, 20, generator=g))
    f[:, 0] = 0.0
    before = interventions.causal_detector(f, [1, 4, 7])
    for t in range(12):
        later = f.clone()
        later[:, t + 1:] = torch.relu(torch.randn(3, 11 - t, 20, generator=g)) * 5
        after = interventions.causal_detector(later, [1, 4, 7])
        assert torch.equal(after[:, :t + 1], before[:, :t + 1])
        assert t == 11 or not torch.equal(after, before)


def planted_classes(n=400, d=16, seed=0):
    """Two classes whose means differ along a known direction, with correlated noise."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    shift = torch.randn(d, generator=g)
    forget = torch.randn(n, d, generator=g) @ mix + shift + 3.0
    retain = torch.randn(n, d, generator=g) @ mix + 3.0
    return forget, retain


def test_difference_of_means_clamp_edits_only_along_its_direction():
    forget, retain = planted_classes()
    controls = interventions.fit_controls(forget, retain)
    u = (forget.mean(0) - retain.mean(0)).double()
    assert torch.allclose(controls.direction.double(), u / u.norm(), atol=1e-5)
    x = torch.cat([forget[:20], retain[:20]])[None]  # [1, 40, d]
    out = controls.edit("difference_of_means", 7.0, x)
    delta = out - x
    along = (delta @ controls.direction)[..., None] * controls.direction
    assert torch.allclose(delta, along, atol=1e-4)  # nothing moves orthogonally to û
    c = (x - controls.midpoint) @ controls.direction
    on = controls.mask("difference_of_means", x)
    assert torch.equal(on[0, 1:], c[0, 1:] > 0) and not on[0, 0]
    new_c = (out - controls.midpoint) @ controls.direction
    assert torch.allclose(new_c[on], torch.full_like(new_c[on], -7.0), atol=1e-4)  # set to −strength
    assert torch.equal(out[~on], x[~on])  # elsewhere (the first position too) untouched
    assert on[0, 1:20].float().mean() > 0.7 and on[0, 20:].float().mean() < 0.3


def test_full_leace_erasure_leaves_no_linear_signal():
    """After erase (strength 1), a least-squares linear probe of the label on the fit tokens does no
    better than the constant predictor; before, it does much better. Strength 0 is the identity."""
    forget, retain = planted_classes(d=12)
    controls = interventions.fit_controls(forget, retain)
    x = torch.cat([forget, retain])
    z = torch.cat([torch.ones(len(forget)), torch.zeros(len(retain))]).double()

    def probe_mse(features):
        design = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
        coef = torch.linalg.lstsq(design, z[:, None], driver="gelsd").solution
        return float(((design @ coef).flatten() - z).pow(2).mean())
    constant = float((z - z.mean()).pow(2).mean())
    # in float64: the erased direction is constant, and float32 rounding would leave a probe-readable
    # residue of ~1e-7 there
    padded = torch.cat([torch.zeros(1, x.shape[1]), x]).double()[None]  # the first position is never edited
    erased = controls.edit("leace", 1.0, padded)[0, 1:]
    assert probe_mse(x) < 0.5 * constant
    assert probe_mse(erased) == pytest.approx(constant, rel=1e-4)
    assert torch.equal(controls.edit("leace", 0.0, padded), padded)


def gated_hook(sae, features, multiplier, detector_features, threshold):
    """A forward hook applying the gated clamp from scratch (no kept residuals, no skipped rows)."""
    def hook(resid, hook):
        f, error = interventions.encode_for_clamp(sae, resid)
        gate = interventions.causal_detector(f, detector_features) >= threshold
        return interventions.clamp_from_codes(sae, f, error, features, multiplier, gate)[0]
    return hook


def test_gated_clamp_through_the_sweep_equals_a_full_forward_and_gate_zero_is_static(model, tokenizer):
    tokens = contexts(tokenizer, FORGET_WORDS + RETAIN_WORDS, n=5)
    sae = random_sae()
    detector = [0, 3, 5, 8, 11]
    s = unlearning.EvalSet(model, "ce", [(tokens[:3], None), (tokens[3:], None)], HOOK_LAYER, "cpu")
    d = interventions.causal_detector(interventions.encode_for_clamp(sae, s.batches[0]["resid"])[0], detector)
    threshold = float(d[:, 1:].median())
    edits = [Clamp((2, 5, 7), 60.0), Clamp((2, 5, 7), 60.0, ("det", 0.0)),
             Clamp((2, 5, 7), 60.0, ("det", threshold))]
    cfg = unlearning.UnlearningConfig(tail_batch_size=4)
    results, _ = unlearning.run_sweep(model, sae, HOOK_LAYER, {"ce": s}, edits, cfg, {"det": detector})
    static, gate0, gated = (torch.cat(r["ce"]) for r in results)
    # gate 0 makes the same edit to the bit; the sweep batches the two edits' rows apart, so its losses
    # agree to float rounding
    view = interventions.BatchEdits(sae, s.batches[0]["resid"], torch.ones(3, tokens.shape[1], dtype=torch.bool),
                                    {"det": detector})
    rows = torch.arange(3)
    assert torch.equal(view.mask(edits[1]), view.mask(edits[0]))
    assert torch.equal(view.apply(edits[1], rows), view.apply(edits[0], rows))
    assert torch.allclose(gate0, static, atol=1e-4, rtol=0)
    hooked = model.run_with_hooks(tokens, return_type="loss", loss_per_token=True,
                                  fwd_hooks=[(HOOK, gated_hook(sae, (2, 5, 7), 60.0, detector, threshold))])
    assert torch.allclose(gated, hooked.sum(1).double(), atol=1e-3)
    assert not torch.allclose(gated, static, atol=1e-2)


def test_controls_through_the_sweep_equal_a_full_forward(model, tokenizer):
    tokens = contexts(tokenizer, FORGET_WORDS + RETAIN_WORDS, n=4)
    resid = {side: unlearning.to_hook(model, contexts(tokenizer, words, n=4, seed=3), HOOK_LAYER)[:, 1:]
             for side, words in (("forget", FORGET_WORDS), ("retain", RETAIN_WORDS))}
    controls = interventions.fit_controls(resid["forget"].flatten(0, 1), resid["retain"].flatten(0, 1))
    s = unlearning.EvalSet(model, "ce", [(tokens, None)], HOOK_LAYER, "cpu")
    edits = [ControlEdit("difference_of_means", 3.0), ControlEdit("leace", 1.0)]
    cfg = unlearning.UnlearningConfig(tail_batch_size=3)
    results, _ = unlearning.run_sweep(model, None, HOOK_LAYER, {"ce": s}, edits, cfg, controls=controls)
    for edit, r in zip(edits, results):
        hook = lambda x, hook, e=edit: controls.edit(e.control, e.strength, x)
        hooked = model.run_with_hooks(tokens, return_type="loss", loss_per_token=True,
                                      fwd_hooks=[(HOOK, hook)])
        assert torch.allclose(torch.cat(r["ce"]), hooked.sum(1).double(), atol=1e-3), edit
        assert not torch.allclose(torch.cat(r["ce"]), s.batches[0]["base"], atol=1e-3), edit
