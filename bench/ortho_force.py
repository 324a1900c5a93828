"""The λ2 that gives allpairs_ortho the same force per penalised decoder row as the cross-group loss.

    python -m bench.ortho_force [--sae RUN/sae] [--seeds 3]

Force on row i = ‖tangential part of ∂(λ2·L)/∂W_i‖ (the trainer removes the radial part and
renormalises rows).
Cross-group loss (fixed_ortho, adaptive_ortho at t >= t0): mean over the n_F + n_R grouped rows at
λ2 = lambda2_max, groups of max_group_fraction·d latents each with greedily matched partners.
allpairs_ortho: mean over all F rows at λ2 = 1. Their ratio is the allpairs λ2 of equal mean force. Rows:
random unit vectors (the CPU default shape, d = 576, F = 4608; several seeds), or a trained SAE's decoder
with random groups of the capped size (--sae).
"""
import argparse

import torch
import torch.nn.functional as F

import experiment


def tangential_force(W: torch.Tensor, loss: torch.Tensor, rows: torch.Tensor) -> float:
    grad, = torch.autograd.grad(loss, W)
    g = grad[rows]
    g = g - (g * W[rows].detach()).sum(dim=1, keepdim=True) * W[rows].detach()
    return g.norm(dim=1).mean().item()


def forces(W: torch.Tensor, n_group: int, alpha: float, lambda2: float, seed: int) -> tuple[float, float]:
    """(cross-group force at lambda2, all-pairs force at λ2 = 1) on unit rows W [F, d]."""
    perm = torch.randperm(len(W), generator=torch.Generator().manual_seed(seed))
    forget, retain = perm[:n_group], perm[n_group:2 * n_group]
    rows, cols = experiment.match_partners(W[forget] @ W[retain].T)
    forget = torch.cat([forget[rows], forget[~torch.isin(torch.arange(n_group), rows)]])
    retain = torch.cat([retain[cols], retain[~torch.isin(torch.arange(n_group), cols)]])
    sign = (W[forget[:len(rows)]] * W[retain[:len(rows)]]).sum(1).sign()
    W = W.clone().requires_grad_()
    cross = lambda2 * experiment.cross_group_penalty(W[forget], W[retain], sign, alpha, "partner")
    _, allpairs = experiment.AllPairsOrthogonalityLoss(1.0)(W, None, 0)
    return (tangential_force(W, cross, torch.cat([forget, retain])),
            tangential_force(W, allpairs, torch.arange(len(W))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sae", help="a run's sae/ folder: use its decoder rows instead of random ones")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    cfg = experiment.Config()
    if args.sae:
        W = F.normalize(experiment.load_sae(args.sae).W_dec.detach().float(), dim=1)
    else:
        W = None
    for seed in range(args.seeds):
        rows = W if W is not None else F.normalize(
            torch.randn(4608, 576, generator=torch.Generator().manual_seed(seed)), dim=1)
        n_group = int(cfg.max_group_fraction * rows.shape[1])
        cross, allpairs = forces(rows, n_group, cfg.alpha, cfg.lambda2_max, seed)
        print(f"seed {seed}: F {len(rows)}, d {rows.shape[1]}, groups {n_group} + {n_group} | "
              f"cross-group force at λ2 {cfg.lambda2_max:g}: {cross:.3e} | all-pairs force at λ2 1: "
              f"{allpairs:.3e} | equal-force all-pairs λ2: {cross / allpairs:.2f}")


if __name__ == "__main__":
    main()
