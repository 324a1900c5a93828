"""Knowledge separation: orthogonality losses vs dense references, the λ2 schedule, feature grouping,
condition numbers and principal angles, early stopping, group biases, and training on planted data."""
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import activations
import experiment
import interventions
from experiment import (AllPairsOrthogonalityLoss, AutoEncoderTopK, CrossGroupOrthogonalityLoss,
                        FeatureGrouper, KappaEarlyStopping, TrainerTopK, condition_number,
                        cross_group_penalty, principal_angles)


def unit_rows(n, d, seed=0):
    return F.normalize(
        torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def naive_cross_group(W_F, W_R, sign, alpha, target, w_F=None, w_R=None):
    """Textbook form: dense P (n_F x n_R) with the partner signs on the diagonal, loops over pairs, each
    pair's squared error weighted by its two rows' membership weights."""
    n_F, n_R = len(W_F), len(W_R)
    if n_F == 0 or n_R == 0:
        return torch.zeros((), dtype=W_F.dtype)
    total = 0
    for i in range(n_F):
        for j in range(n_R):
            c = W_F[i] @ W_R[j]
            if target == "hinge":
                e = torch.relu(c.abs() - alpha)
            else:
                e = c - (alpha * sign[i] if i == j and i < len(sign) else 0.0)
            weight = 1.0 if w_F is None else w_F[i] * w_R[j]
            total = total + weight * e ** 2
    return total / (n_F * n_R)


@pytest.mark.parametrize("target", ["partner", "hinge"])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("n_F, n_R", [(5, 9), (9, 5), (0, 4), (4, 0), (1, 1)])
def test_cross_group_loss_and_gradient_match_naive(target, alpha, n_F, n_R):
    d = 6
    W = unit_rows(n_F + n_R, d, seed=n_F * 10 + n_R).requires_grad_()
    W_F, W_R = W[:n_F], W[n_F:]
    m = min(n_F, n_R)
    sign = torch.where(torch.arange(m) % 2 == 0, 1.0, -1.0).double()
    value = cross_group_penalty(W_F, W_R, sign, alpha, target)
    if n_F == 0 or n_R == 0:  # empty group: exactly zero, and adding it keeps a backward graph well defined
        assert value.item() == 0.0
        return
    grad, = torch.autograd.grad(value, W)
    ref = naive_cross_group(W[:n_F], W[n_F:], sign, alpha, target)
    ref_grad, = torch.autograd.grad(ref, W)
    torch.testing.assert_close(value, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_partner_target_is_minimised_at_alpha():
    """Two partners at cos = α·sign and orthogonal to everything else cost nothing."""
    alpha = 0.2
    f = torch.tensor([[1.0, 0, 0]], dtype=torch.float64)
    r = torch.tensor([[-alpha, (1 - alpha ** 2) ** 0.5, 0]], dtype=torch.float64)
    assert (cross_group_penalty(f, r, torch.tensor([-1.0]), alpha, "partner").item()
            == pytest.approx(0, abs=1e-15))
    assert (cross_group_penalty(f, r, torch.tensor([1.0]), alpha, "partner").item()
            == pytest.approx(4 * alpha ** 2))
    assert (cross_group_penalty(f, r, torch.tensor([1.0]), alpha, "hinge").item()
            == pytest.approx(0, abs=1e-15))


def test_allpairs_penalty_is_the_mean_nearest_neighbour_cos2_with_its_gradient():
    """L = (1/F) Σ_i max_{j≠i} cos²(W_i, W_j) against a dense F×F reference; the gradient is that of the
    reference with the argmax held fixed (a max is differentiated through its argmax)."""
    W = unit_rows(50, 8).float().requires_grad_()
    C = W @ W.T
    mask = torch.eye(50, dtype=torch.bool)
    j = C.detach().abs().masked_fill(mask, -1).argmax(dim=1)
    reference = C[torch.arange(50), j].pow(2).mean()
    assert reference.item() == pytest.approx(
        C.detach().pow(2).masked_fill(mask, 0).max(dim=1).values.mean().item())
    ref_grad, = torch.autograd.grad(reference, W)
    lam, value = AllPairsOrthogonalityLoss(3.0)(W, None, t=0)
    grad, = torch.autograd.grad(value, W)
    assert lam == 3.0
    torch.testing.assert_close(value, reference)
    torch.testing.assert_close(grad, ref_grad)


def test_lambda2_schedule():
    loss = CrossGroupOrthogonalityLoss(lambda2_max=8.0, t0=100, alpha=0.1, target="partner")
    assert [loss.lambda2(t) for t in (0, 50, 100, 200)] == [0.0, 4.0, 8.0, 8.0]
    fixed = experiment.make_ortho(experiment.Config(variant="fixed_ortho", lambda2_max=8.0, alpha=0.3))
    assert (fixed.lambda2(0), fixed.alpha, fixed.target) == (8.0, 0.0, "partner")  # constant, α = 0
    assert AllPairsOrthogonalityLoss(8.0).lambda2(0) == 8.0


def test_condition_numbers_and_principal_angles_match_numpy_scipy():
    torch.manual_seed(0)
    U = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    W = torch.diag(torch.tensor([10.0, 4.0, 2.0], dtype=torch.float64)) @ U[:3]  # [3, 6], σ = 10, 4, 2
    assert condition_number(W) == pytest.approx(5.0)
    tall = torch.randn(20, 6, dtype=torch.float64)  # more rows than d: κ over its d singular values
    assert condition_number(tall) == pytest.approx(np.linalg.cond(tall.numpy()))
    assert np.isnan(condition_number(torch.zeros(0, 6)))
    for seed, (n_a, n_b) in enumerate([(2, 3), (3, 3), (1, 4), (4, 4)]):
        rng = np.random.default_rng(seed)
        A, B = rng.normal(size=(n_a, 6)), rng.normal(size=(n_b, 6))
        np.testing.assert_allclose(principal_angles(torch.from_numpy(A), torch.from_numpy(B)).numpy(),
                                   scipy.linalg.subspace_angles(A.T, B.T), atol=1e-7)
    e = torch.eye(4, dtype=torch.float64)  # known angles: span(e0, e1) vs span(e1, cos·e0 + sin·e2)
    B = torch.stack([e[1], np.cos(0.3) * e[0] + np.sin(0.3) * e[2]])
    np.testing.assert_allclose(principal_angles(e[:2], B).numpy(), [0.3, 0.0], atol=1e-7)


def test_early_stopping_fires_on_ill_conditioned_group_only():
    healthy = unit_rows(10, 16)  # fewer rows than d, so two parallel rows make the group rank deficient
    sick = healthy.clone()
    sick[1] = F.normalize(sick[0] + 1e-6 * sick[1], dim=0)  # two nearly parallel rows: κ ~ 1e6
    grouper = FeatureGrouper(20, every=1, threshold=0.5, min_freq=0)
    W = torch.cat([healthy, sick])
    stopper = KappaEarlyStopping(kappa_max=1e3, patience=2)
    grouper.forget_idx, grouper.retain_idx = torch.arange(10), torch.arange(10, 20)
    m = experiment.separation_metrics(W, grouper)
    assert m["kappa_forget"] < 100 and m["kappa_retain"] > 1e4
    assert not stopper.check(m, 100) and stopper.check(m, 200) and "retain" in stopper.reason
    healthy_stopper = KappaEarlyStopping(kappa_max=1e3, patience=2)
    grouper.retain_idx = torch.arange(2, 10)
    m = experiment.separation_metrics(W, grouper)
    assert not any(healthy_stopper.check(m, s) for s in range(5))


def planted_data(n_forget=8, n_retain=8, n_shared=8, d=32, seed=0):
    """Tokens = positive mix of 3 unit directions: forget tokens draw from forget ∪ shared directions,
    retain tokens from retain ∪ shared. Forget and retain directions are made to overlap (cos ~0.4 with
    a partner) so that orthogonality has something to do."""
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(n_forget + n_retain + n_shared, d, generator=g), dim=1)
    dirs[n_forget:n_forget + n_retain] = F.normalize(
        dirs[n_forget:n_forget + n_retain] + 0.6 * dirs[:n_retain], dim=1)
    forget_ids = torch.cat([torch.arange(n_forget), torch.arange(n_forget + n_retain, len(dirs))])
    retain_ids = torch.arange(n_forget, len(dirs))

    def sample(b, gen):
        labels = (torch.rand(b, generator=gen) < 0.5).long()  # 1 = FORGET, 0 = RETAIN
        pool = torch.where(labels[:, None] == activations.FORGET, forget_ids, retain_ids)
        pick = torch.rand(b, len(forget_ids), generator=gen).argsort(dim=1)[:, :3]
        ids, weights = pool.gather(1, pick), 0.5 + torch.rand(b, 3, generator=gen)
        w = torch.zeros(b, len(dirs)).scatter(1, ids, weights)
        return w @ dirs, labels, (weights, ids)
    return dirs, sample


def test_grouper_finds_planted_forget_and_retain_directions():
    """Feed the grouper the true codes of planted tokens (an oracle SAE whose latents are the true
    directions): its bincount EMAs must put forget-only directions in forget, retain-only in retain and
    leave shared ones out."""
    dirs, sample = planted_data()
    gen = torch.Generator().manual_seed(1)
    grouper = FeatureGrouper(len(dirs), every=20, threshold=0.5, min_freq=0.01)
    for _ in range(20):
        _, labels, (values, indices) = sample(512, gen)
        grouper.update(values, indices, labels)
    grouper.assign(dirs)
    assert sorted(grouper.forget_idx.tolist()) == list(range(8))
    assert sorted(grouper.retain_idx.tolist()) == list(range(8, 16))
    assignment = grouper.assignment()
    assert (assignment[16:] == experiment.SHARED).all()
    # partners: each forget direction i was mixed into retain direction 8 + i, the greedy matching finds
    # that pairing
    pairs = dict(zip(grouper.forget_idx[:8].tolist(), grouper.retain_idx[:8].tolist()))
    assert pairs == {i: 8 + i for i in range(8)} and (grouper.partner_sign > 0).all()


def test_group_biases_decode_and_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    sae = AutoEncoderTopK(8, 12, 3, group_biases=True)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(8))
        sae.group_bias.copy_(torch.randn(2, 8))
        sae.feature_group.copy_(torch.tensor([1, 1, 1, 0, 0, 0, -1, -1, -1, 1, 0, -1]))
    x = torch.randn(5, 8)
    values, indices, *_ = sae.encode(x)
    expected = torch.zeros(5, 8)
    for b in range(5):  # by hand: Σ v_j W_dec[j] + b_dec + Σ_g (mass in g / total mass) b_g
        total = values[b].sum()
        mass = {0: 0.0, 1: 0.0}
        for v, j in zip(values[b], indices[b]):
            expected[b] += v * sae.W_dec[j]
            g = int(sae.feature_group[j])
            if g >= 0:
                mass[g] += v
        expected[b] += sae.b_dec + mass[0] / total * sae.group_bias[0] + mass[1] / total * sae.group_bias[1]
    torch.testing.assert_close(sae.decode(values, indices), expected, rtol=1e-5, atol=1e-5)
    scale = 3.0
    sae.save(tmp_path / "sae", scale, {"model_name": "m", "hook_name": "blocks.0.hook_resid_post",
                                       "hook_layer": 0, "context_size": 16, "prepend_bos": True})
    # the saved SAE is a registered SAE-Lens class: SAE-Lens itself loads the group biases
    from sae_lens import SAE
    loaded = SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    assert (isinstance(loaded, experiment.GroupBiasTopKSAE)
            and loaded.cfg.architecture() == "topk_group_biases")
    assert (loaded.feature_group.dtype == torch.long
            and loaded.feature_group.tolist() == sae.feature_group.tolist())
    raw = scale * x
    with torch.no_grad():
        torch.testing.assert_close(loaded(raw), scale * sae(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(experiment.load_sae(tmp_path / "sae")(raw), scale * sae(x), rtol=1e-4,
                                   atol=1e-4)
        # its plain TopK view differs by exactly the group-bias term
        plain = loaded.without_group_biases()
        f = loaded.encode(raw)
        w = experiment.group_weights(f, loaded.feature_group)
        torch.testing.assert_close(loaded.decode(f) - plain.decode(f), w @ loaded.group_bias, rtol=1e-4,
                                   atol=1e-4)


def _old_group_weights(f, groups):
    """The formula before the bound: w_g = Σ_{j∈g} f_j / max(Σ_j f_j, 1e-12), on signed codes."""
    mass = torch.stack([(f * (groups == g)).sum(-1) for g in (0, 1)], -1)
    return mass / f.sum(-1, keepdim=True).clamp_min(1e-12)


def _clamp(f, features, multiplier):
    """SAE-Bench's clamp: each selected feature set to -multiplier where it is > 0."""
    f2 = f.clone()
    sel = f2[..., features]
    f2[..., features] = torch.where(sel > 0, torch.full_like(sel, -multiplier), sel)
    return f2


def _saved_group_sae(tmp_path, zero_biases=False):
    torch.manual_seed(1)
    sae = AutoEncoderTopK(16, 64, 8, group_biases=True)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(16))
        sae.group_bias.copy_(torch.zeros(2, 16) if zero_biases else 3 * torch.randn(2, 16))
        sae.feature_group.copy_(torch.randint(-1, 2, (64,)))
    sae.save(tmp_path / "sae", 1.0, {"model_name": "m", "hook_name": "blocks.0.hook_resid_post",
                                     "hook_layer": 0, "context_size": 16, "prepend_bos": True})
    return experiment.load_sae(tmp_path / "sae")


@pytest.mark.parametrize("multiplier", [1.0, 25.0, 200.0, 1e3, 1e4])
def test_group_bias_part_of_a_clamp_edit_is_bounded(tmp_path, multiplier):
    """For any clamp, the group-bias part of decode(f') - decode(f) is at most
    ‖b_0‖ + ‖b_1‖ <= 2 max_g ‖b_g‖, on both the dense (saved) and the sparse (training) decode;
    the formula it replaced breaks this bound."""
    sae = _saved_group_sae(tmp_path)
    x = 5 * torch.randn(400, 16)
    with torch.no_grad():
        f = sae.encode(x)
        counts = (f > 0).sum(0)
        # the features that fire most, as a selection would pick
        features = counts.argsort(descending=True)[:10]
        f2 = _clamp(f, features, multiplier)
        groups, bound = sae.feature_group, 2 * sae.group_bias.norm(dim=1).max()
        part = (experiment.group_weights(f2, groups) - experiment.group_weights(f, groups)) @ sae.group_bias
        assert part.norm(dim=1).max() <= bound * (1 + 1e-6)
        plain = sae.without_group_biases()  # the full dense decode minus its TopK part is exactly that term
        torch.testing.assert_close((sae.decode(f2) - plain.decode(f2))
                                   - (sae.decode(f) - plain.decode(f)), part, rtol=1e-4, atol=1e-3)
        values, indices = f2.topk(8, dim=1)  # the sparse path: the same codes as (values, indices)
        sparse = experiment.group_weights(values, groups[indices])
        torch.testing.assert_close(sparse, experiment.group_weights(f2, groups))
        old = (_old_group_weights(f2, groups) - _old_group_weights(f, groups)) @ sae.group_bias
    if multiplier >= 200:  # the old formula: Σf crosses 0 on some tokens and the bias term explodes
        assert old.norm(dim=1).max() > 100 * bound


def test_clamp_on_zero_group_biases_equals_the_plain_topk_clamp(tmp_path):
    """With zero group biases both readings of a clamp's edit reduce to the plain TopK SAE's edit."""
    sae = _saved_group_sae(tmp_path, zero_biases=True)
    resid = 5 * torch.randn(3, 7, 16)
    features = [0, 5, 9, 17, 33]
    plain = sae.without_group_biases()
    with torch.no_grad():
        expected, active = interventions.clamp_residual(plain, resid, features, 100.0)
        for edit in experiment.GROUP_BIAS_EDITS:
            got, got_active = interventions.clamp_residual(experiment.intervention_sae(sae, edit), resid,
                                                        features, 100.0)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
            assert torch.equal(got_active, active)


def test_held_edit_is_the_feature_direction_edit(tmp_path):
    """The default reading: resid' = resid + (f' - f) W_dec, the group-bias term held at the codes before
    the clamp; the relu reading moves the bias by (w(f') - w(f)) B on top of that."""
    sae = _saved_group_sae(tmp_path)
    resid = 5 * torch.randn(2, 9, 16)
    with torch.no_grad():
        f = sae.encode(resid)
        features = (f > 0).flatten(0, 1).sum(0).argsort(descending=True)[:6].tolist()
        f[:, 0] = 0
        f2 = _clamp(f, features, 50.0)
        held, _ = interventions.clamp_residual(experiment.intervention_sae(sae, "held"), resid,
                                               features, 50.0)
        torch.testing.assert_close(held, resid + (f2 - f) @ sae.W_dec, rtol=1e-5, atol=1e-3)
        relu, _ = interventions.clamp_residual(experiment.intervention_sae(sae, "relu"), resid,
                                               features, 50.0)
        shift = (experiment.group_weights(f2, sae.feature_group)
                 - experiment.group_weights(f, sae.feature_group))
        torch.testing.assert_close(relu, held + shift @ sae.group_bias, rtol=1e-5, atol=1e-3)
        assert (shift.abs() > 1e-3).any()  # the two readings differ on this SAE


@pytest.mark.parametrize("variant, target", [("adaptive_ortho", "partner"), ("adaptive_ortho", "hinge"),
                                             ("fixed_ortho", "partner"), ("allpairs_ortho", "partner")])
def test_step_gradient_of_the_ortho_term_equals_autograd_through_W_dec(variant, target):
    """The trainer's W_dec gradient (backward, then ortho.add_gradient) equals autograd of
    recon + AuxK + λ2·L_ortho written on W_dec itself, with two rows still ramping into their groups."""
    torch.manual_seed(0)
    d, n = 12, 40
    sae = AutoEncoderTopK(d, n, 4, group_biases=experiment.VARIANTS[variant].grouped)
    grouper = FeatureGrouper(n, every=10, threshold=0.5, min_freq=1e-3)
    grouper.forget_idx, grouper.retain_idx = torch.tensor([3, 7, 1, 30, 22]), torch.tensor([5, 0, 9, 11])
    grouper.partner_sign = torch.tensor([1.0, -1.0, 1.0, -1.0])
    grouper.paired_at = torch.tensor([-100, -100, -100, 0])  # the last pair half way to its target
    grouper.joined.fill_(-100)
    grouper.joined[7], grouper.joined[9] = 5, 0  # at t = 5: weight 0 (just joined) and 0.5 (half way in)
    cfg = experiment.Config(variant=variant, lambda2_max=5.0, allpairs_lambda2=3.0, t0=10, alpha=0.2,
                            ortho_target=target)
    ortho = experiment.make_ortho(cfg)
    trainer = TrainerTopK(sae, steps=100, lr=1e-3, warmup_steps=1, decay_start=0.8, auxk_alpha=1 / 32,
                          dead_window_tokens=10**9, ortho=ortho, grouper=grouper)
    trainer.steps_done = 5  # λ2 halfway up its ramp for adaptive_ortho
    x, labels = torch.randn(64, d), (torch.rand(64) < 0.5).long()
    total, stats = trainer.loss(x, labels)
    total.backward()
    ortho.add_gradient(sae.W_dec)
    ours = sae.W_dec.grad.clone()
    sae.zero_grad()
    without, _ = TrainerTopK(sae, steps=100, lr=1e-3, warmup_steps=1, decay_start=0.8, auxk_alpha=1 / 32,
                             dead_window_tokens=10**9).loss(x, labels)
    W_F, W_R = sae.W_dec[grouper.forget_idx], sae.W_dec[grouper.retain_idx]
    w_F, w_R = torch.tensor([1, 0, 1, 1, 1.0]), torch.tensor([1, 1, 0.5, 1.0])
    if variant == "allpairs_ortho":
        C = sae.W_dec @ sae.W_dec.T
        j = C.detach().abs().fill_diagonal_(-1).argmax(dim=1)
        penalty, lambda2 = C[torch.arange(n), j].pow(2).mean(), 3.0
    else:
        alpha, lambda2 = (0.2, 2.5) if variant == "adaptive_ortho" else (0.0, 5.0)
        sign = torch.tensor([1.0, -1.0, 1.0, -0.5])  # the last pair's target at half its ramp
        penalty = naive_cross_group(W_F, W_R, sign, alpha, target, w_F, w_R)
    (without + lambda2 * penalty).backward()
    assert stats["ortho"] == pytest.approx(penalty.item(), rel=1e-5) and stats["ortho"] > 0
    torch.testing.assert_close(ours, sae.W_dec.grad, rtol=1e-5, atol=1e-6)


def test_topk_variant_has_no_group_biases_and_ortho_is_none():
    assert experiment.make_ortho(experiment.Config(variant="topk")) is None
    assert AutoEncoderTopK(4, 8, 2).group_bias is None
    assert len(list(AutoEncoderTopK(4, 8, 2).parameters())) == 4


def train_planted(variant, steps=300, seed=0):
    dirs, sample = planted_data(d=32)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    sae = AutoEncoderTopK(32, 48, 3, group_biases=variant == "adaptive_ortho")
    with torch.no_grad():
        sae.b_dec.copy_(experiment.geometric_median(sample(1024, gen)[0]))
    grouper = FeatureGrouper(48, every=25, threshold=0.5, min_freq=0.005)
    cfg = experiment.Config(variant=variant, lambda2_max=50.0, t0=50, alpha=0.0)
    trainer = TrainerTopK(sae, steps, lr=3e-3, warmup_steps=20, decay_start=0.8, auxk_alpha=1 / 32,
                          dead_window_tokens=128 * 20, ortho=experiment.make_ortho(cfg), grouper=grouper)
    evs = []
    for _ in range(steps):
        x, labels, _ = sample(128, gen)
        evs.append(trainer.step(x, labels)["explained_variance"])
        if trainer.steps_done % grouper.every == 0:
            grouper.assign(sae.W_dec, trainer.steps_done)
            sae.set_groups(grouper.assignment())
    return experiment.separation_metrics(sae.W_dec, grouper), float(np.mean(evs[-50:]))


def test_adaptive_ortho_lowers_cross_group_cosine_on_planted_data():
    """Forget and retain directions overlap by construction; the topk SAE copies that overlap into its
    decoder, the adaptive_ortho SAE (α = 0) pushes its forget and retain latents apart at comparable
    reconstruction."""
    topk, ev_topk = train_planted("topk")
    ortho, ev_ortho = train_planted("adaptive_ortho")
    assert (topk["n_forget"] >= 4 and topk["n_retain"] >= 4
            and ortho["n_forget"] >= 4 and ortho["n_retain"] >= 4)
    assert ortho["cross_abs_cos_mean"] < 0.7 * topk["cross_abs_cos_mean"], (topk, ortho)
    assert ev_ortho > ev_topk - 0.05, (ev_topk, ev_ortho)


def test_nearest_neighbours_equals_a_naive_reference_in_any_chunking():
    torch.manual_seed(0)
    W = torch.randn(50, 6)
    unit = W / W.norm(dim=1, keepdim=True)
    C = (unit @ unit.T).abs()
    C.fill_diagonal_(-1)
    rows, cols = torch.tensor([0, 3, 7, 12, 49]), torch.tensor([3, 7, 20, 21, 40])
    naive = [max((C[i, j].item(), j) for j in cols.tolist() if j != i) for i in rows.tolist()]
    for chunk in (1, 2, 1024):
        values, index = experiment.nearest_neighbours(W, torch.arange(50), torch.arange(50), chunk)
        torch.testing.assert_close(values, C.max(1).values)
        assert index.tolist() == C.argmax(1).tolist()
        values, index = experiment.nearest_neighbours(W, rows, cols, chunk)
        torch.testing.assert_close(values, torch.tensor([v for v, _ in naive]))
        assert index.tolist() == [j for _, j in naive]
    # only candidate: itself
    lonely, at = experiment.nearest_neighbours(W, torch.tensor([5]), torch.tensor([5]))
    assert lonely.isnan().all() and at.tolist() == [-1]


def test_feature_geometry_finds_planted_duplicates():
    """Orthonormal rows, then row 1 = -row 0 (|cos| 1, both forget) and row 6 = 0.6 row 2 + 0.8 e (forget
    vs retain, |cos| 0.6): within-forget max |cos| is 1 for rows 0, 1 and 0 for the others; across, row 2
    sees 0.6."""
    d = 16
    W = torch.eye(d)[:10].clone()
    W[1] = -W[0]
    W[6] = 0.6 * W[2] + 0.8 * torch.eye(d)[12]
    groups = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, -1, -1])
    geo = experiment.feature_geometry(W, groups)
    # the overall value, directly
    full, _ = experiment.nearest_neighbours(W, torch.arange(10), torch.arange(10))
    assert geo["all"] == experiment.cos_summary(full)
    assert geo["all"]["n"] == 10 and geo["all"]["share_above_0.7"] == pytest.approx(0.2)  # rows 0 and 1
    assert geo["all"]["share_above_0.5"] == pytest.approx(0.4)  # and rows 2 and 6
    assert (geo["forget"]["within"]["mean"] == pytest.approx(0.5)
            and geo["forget"]["within"]["median"] == pytest.approx(0.5))
    # only row 2 has a neighbour outside (row 6)
    assert geo["forget"]["across"]["mean"] == pytest.approx(0.6 / 4)
    assert geo["retain"]["across"]["share_above_0.5"] == pytest.approx(0.25)
    assert geo["shared"]["within"]["mean"] == pytest.approx(0.0)


def test_ablation_switches_turn_off_one_component_each():
    """--group_biases=false: adaptive_ortho without group biases; --lambda2_max=0: grouping and group
    biases, no orthogonality force (its term adds exactly zero gradient)."""
    assert not experiment.uses_group_biases(experiment.Config(variant="adaptive_ortho", group_biases=False))
    assert experiment.uses_group_biases(experiment.Config(variant="adaptive_ortho"))
    assert not experiment.uses_group_biases(experiment.Config(variant="topk"))
    torch.manual_seed(0)
    sae = AutoEncoderTopK(12, 40, 4, group_biases=True)
    grouper = FeatureGrouper(40, every=10**9, threshold=0.5, min_freq=1e-3)
    grouper.joined.fill_(-10**9)  # members long since: full weight
    grouper.forget_idx, grouper.retain_idx = torch.tensor([3, 7, 1]), torch.tensor([5, 0, 9])
    grouper.partner_sign = torch.tensor([1.0, -1.0, 1.0])
    grouper.paired_at = torch.full((3,), -10**9)
    x, labels = torch.randn(64, 12), (torch.rand(64) < 0.5).long()
    grads = {}
    for lambda2 in (0.0, 5.0):
        ortho = experiment.make_ortho(experiment.Config(variant="adaptive_ortho", lambda2_max=lambda2, t0=0))
        trainer = TrainerTopK(sae, steps=10, lr=1e-3, warmup_steps=1, decay_start=0.8, auxk_alpha=1 / 32,
                              dead_window_tokens=10**9, ortho=ortho, grouper=grouper)
        total, _ = trainer.loss(x, labels)
        sae.zero_grad()
        total.backward()
        ortho.add_gradient(sae.W_dec)
        grads[lambda2] = sae.W_dec.grad.clone()
    plain = TrainerTopK(sae, steps=10, lr=1e-3, warmup_steps=1, decay_start=0.8, auxk_alpha=1 / 32,
                        dead_window_tokens=10**9, ortho=None, grouper=grouper)
    total, _ = plain.loss(x, labels)
    sae.zero_grad()
    total.backward()
    torch.testing.assert_close(grads[0.0], sae.W_dec.grad)  # λ2 = 0: the same gradient as no ortho term
    assert not torch.allclose(grads[5.0], sae.W_dec.grad)


def grouper_with_rates(p_f, p_r, every=10, max_group_size=0):
    """A FeatureGrouper whose bias-corrected firing rates are exactly p_f, p_r [F]."""
    grouper = FeatureGrouper(len(p_f), every=every, threshold=0.5, min_freq=1e-3,
                             max_group_size=max_group_size)
    grouper.ema[activations.FORGET], grouper.ema[activations.RETAIN] = torch.tensor(p_f), torch.tensor(p_r)
    grouper.updates.fill_(10**6)  # 1 − β^t = 1
    return grouper


def test_a_pair_re_matched_between_members_ramps_in():
    """Forget 0 <-> retain 2 and forget 1 <-> retain 3 at the first grouping; retain 4 is a member without
    a partner. Retain 3 then turns shared: forget 1 is re-matched with retain 4, both members already.
    The new pair's target is 0 at the regroup (what it had as two unpaired members) and α·sign one
    period later; the kept pair keeps its full target."""
    p_f = [0.19, 0.18, 0.01, 0.01, 0.02]
    p_r = [0.01, 0.02, 0.19, 0.18, 0.19]
    W = unit_rows(5, 16).float()
    W[2] = F.normalize(W[0] + 0.5 * W[2], dim=0)
    W[3] = F.normalize(W[1] + 0.5 * W[3], dim=0)
    W[4] = F.normalize(W[4] - (W[4] @ W[1]) * W[1], dim=0)
    W[4] = F.normalize(W[4] + 0.05 * W[1], dim=0)  # cos(1, 4) = 0.05: far from the target α = 0.3
    grouper = grouper_with_rates(p_f, p_r)
    grouper.assign(W, t=10)
    assert grouper.partner_targets(10).tolist() == [1.0, 1.0]
    W_F, W_R = W[grouper.forget_idx], W[grouper.retain_idx]
    before = cross_group_penalty(W_F, W_R, grouper.partner_targets(20), 0.3, "partner",
                                 *grouper.member_weights(20)) * len(W_F) * len(W_R)
    grouper.ema[activations.FORGET, 3], grouper.ema[activations.RETAIN, 3] = 0.1, 0.1  # 3 turns shared
    grouper.assign(W, t=20)
    pairs = list(zip(grouper.forget_idx.tolist(), grouper.retain_idx.tolist()))
    assert pairs == [(0, 2), (1, 4)] and grouper.partner_sign.tolist() == [1.0, 1.0]
    for t, ramp in ((20, 0.0), (25, 0.5), (30, 1.0)):
        assert grouper.partner_targets(t).tolist() == [1.0, ramp]
    W_F, W_R = W[grouper.forget_idx], W[grouper.retain_idx]
    after = cross_group_penalty(W_F, W_R, grouper.partner_targets(20), 0.3, "partner",
                                *grouper.member_weights(20)) * len(W_F) * len(W_R)
    # Σ w·w·E²: retain 3's terms left; (1, 4) keeps the target 0 it had unpaired
    kept = cross_group_penalty(W_F, W_R, torch.tensor([1.0, 0.0]), 0.3, "partner") * 4
    assert after.item() == pytest.approx(kept.item()) and after.item() < before.item()
    # without the ramp the new pair would enter at full weight: a jump of (cos − α)² − cos²
    jump = cross_group_penalty(W_F, W_R, grouper.partner_sign, 0.3, "partner") * 4
    cos = (W[1] @ W[4]).item()
    assert jump.item() - after.item() == pytest.approx((cos - 0.3) ** 2 - cos ** 2, rel=1e-4)
    assert (cos - 0.3) ** 2 - cos ** 2 > 0.05


def test_no_regroup_raises_the_summed_penalty():
    """Over random regroups (latents joining, leaving, partners re-matched) the weighted sum
    Σ w_F·w_R·E² never rises at the regroup itself: leavers drop out, joiners and new pairs enter at
    weight 0. The per-pair mean L = sum / (n_F·n_R) can rise only by the shrinking of n_F·n_R."""
    gen = torch.Generator().manual_seed(0)
    n = 60
    W = unit_rows(n, 24).float()
    grouper = FeatureGrouper(n, every=10, threshold=0.5, min_freq=1e-3)
    grouper.updates.fill_(10**6)
    summed = lambda t: (cross_group_penalty(W[grouper.forget_idx], W[grouper.retain_idx],
                                            grouper.partner_targets(t), 0.3, "partner",
                                            *grouper.member_weights(t))
                        * len(grouper.forget_idx) * len(grouper.retain_idx)).item()
    for i, t in enumerate(range(10, 200, 10)):
        grouper.ema = torch.rand(2, n, generator=gen, dtype=torch.float64) * 0.1
        before = summed(t) if i else None
        grouper.assign(W, t)
        if before is not None:
            assert summed(t) <= before + 1e-6
        W = F.normalize(W + 0.3 * torch.randn(W.shape, generator=gen), dim=1)  # training moves the rows


def test_group_cap_keeps_the_most_specific_latents():
    """s = (p_f − p_r)/(p_f + p_r): latents 0-3 forget (s 0.9, 0.6, 0.8, 0.7), 4-6 retain
    (s −0.9, −0.6, −0.8); a cap of 2 keeps forget {0, 2} and retain {4, 6}."""
    p_f = [0.19, 0.16, 0.18, 0.17, 0.01, 0.04, 0.02, 0.1]
    p_r = [0.01, 0.04, 0.02, 0.03, 0.19, 0.16, 0.18, 0.1]
    W = unit_rows(8, 16).float()
    capped, free = grouper_with_rates(p_f, p_r, max_group_size=2), grouper_with_rates(p_f, p_r)
    capped.assign(W), free.assign(W)
    assert sorted(capped.forget_idx.tolist()) == [0, 2] and sorted(capped.retain_idx.tolist()) == [4, 6]
    assert sorted(free.forget_idx.tolist()) == [0, 1, 2, 3] and sorted(free.retain_idx.tolist()) == [4, 5, 6]


def test_regroup_keeps_valid_partners_and_ramps_new_members_in():
    """The first grouping has full weight at once. At the next regroup latent 3 joins the forget group:
    its weight is 0 at the regroup and rises linearly to 1 over one period, so the penalty does not jump;
    partner pairs whose two latents stayed keep their pairing and sign even where the decoder now prefers
    another match."""
    p_f = [0.19, 0.18, 0.1, 0.1, 0.01, 0.02, 0.1]
    p_r = [0.01, 0.02, 0.1, 0.1, 0.19, 0.18, 0.1]
    d = 16
    W = unit_rows(7, d).float()
    W[4] = F.normalize(W[0] + 0.5 * W[4], dim=0)  # forget 0 <-> retain 4, forget 1 <-> retain 5 (negatively)
    W[5] = F.normalize(-W[1] + 0.5 * W[5], dim=0)
    grouper = grouper_with_rates(p_f, p_r)
    grouper.assign(W, t=10)
    pairs = dict(zip(grouper.forget_idx.tolist(), grouper.retain_idx.tolist()))
    assert pairs == {0: 4, 1: 5} and grouper.partner_sign.tolist() == [1.0, -1.0]
    assert [w.tolist() for w in grouper.member_weights(10)] == [[1.0, 1.0], [1.0, 1.0]]
    W_F, W_R = W[grouper.forget_idx], W[grouper.retain_idx]
    before = cross_group_penalty(W_F, W_R, grouper.partner_sign, 0.1, "partner", *grouper.member_weights(10))

    # latent 3 turns forget
    grouper.ema[activations.FORGET, 3], grouper.ema[activations.RETAIN, 3] = 0.19, 0.01
    W2 = W.clone()
    # now 1 <-> 4 would be the greedy match; the old pairs stay valid
    W2[4] = F.normalize(W[1] + 0.1 * W[4], dim=0)
    grouper.assign(W2, t=20)
    n = len(grouper.partner_sign)
    pairs = dict(zip(grouper.forget_idx[:n].tolist(), grouper.retain_idx[:n].tolist()))
    assert pairs == {0: 4, 1: 5} and grouper.partner_sign.tolist() == [1.0, -1.0]
    assert grouper.forget_idx.tolist() == [0, 1, 3]
    for t, w3 in ((20, 0.0), (25, 0.5), (30, 1.0), (40, 1.0)):
        w_F, w_R = grouper.member_weights(t)
        assert w_F.tolist() == [1.0, 1.0, w3] and w_R.tolist() == [1.0, 1.0]
    W_F, W_R = W[grouper.forget_idx], W[grouper.retain_idx]
    at_regroup = cross_group_penalty(W_F, W_R, grouper.partner_sign, 0.1, "partner",
                                     *grouper.member_weights(20))
    # at the regroup the new member adds nothing: same rows, same pairs, n_F grew from 2 to 3
    assert at_regroup.item() == pytest.approx(before.item() * 2 / 3)
