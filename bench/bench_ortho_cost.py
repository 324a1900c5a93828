"""Cost of the adaptive orthogonality term: a topk training step vs an adaptive_ortho step, one process.

    python -m bench.bench_ortho_cost [--reps 7] [--steps 5]

CPU defaults (d=576, F=4608, k=32, batch 2048) on random inputs. The adaptive_ortho trainer gets realistic groups
(~700 forget and ~800 retain latents with partners, the sizes the default run reaches) and λ2 = λ2_max, so every
step pays the full loss. Repetitions alternate topk / adaptive_ortho blocks of --steps steps; the median step time of
each and their ratio are printed (issue 3 asks for <= 1.15x).
"""
import argparse
import statistics
import time

import torch

import experiment


def make_trainer(variant: str, d: int, n: int, k: int, n_forget: int, n_retain: int):
    torch.manual_seed(0)
    sae = experiment.AutoEncoderTopK(d, n, k, group_biases=variant == "adaptive_ortho")
    grouper = experiment.FeatureGrouper(n, every=10**9, threshold=0.5, min_freq=1e-3)  # never regroups while timed
    grouper.joined.fill_(-10**9)  # members long since: the penalty at full weight
    perm = torch.randperm(n)
    grouper.forget_idx, grouper.retain_idx = perm[:n_forget], perm[n_forget:n_forget + n_retain]
    grouper.partner_sign = torch.ones(min(n_forget, n_retain))
    if variant == "adaptive_ortho":
        sae.feature_group.copy_(grouper.assignment())
    cfg = experiment.Config(variant=variant)
    return experiment.TrainerTopK(sae, steps=10**6, lr=1e-4, warmup_steps=1, decay_start=1.0, auxk_alpha=1 / 32,
                                  dead_window_tokens=10**9, ortho=experiment.make_ortho(cfg), grouper=grouper), cfg


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--n_forget", type=int, default=700)
    parser.add_argument("--n_retain", type=int, default=800)
    args = parser.parse_args()
    d, n, k, batch = 576, 4608, 32, 2048
    trainers = {v: make_trainer(v, d, n, k, args.n_forget, args.n_retain) for v in ("topk", "adaptive_ortho")}
    for trainer, cfg in trainers.values():
        trainer.t = max(cfg.t0, 1)  # λ2(t) at its maximum
    x, labels = torch.randn(batch, d) / d ** 0.5, (torch.rand(batch) < 0.5).long()
    for trainer, _ in trainers.values():  # warm up
        trainer.step(x, labels)
    times = {v: [] for v in trainers}
    for _ in range(args.reps):
        for variant, (trainer, _) in trainers.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.step(x, labels)
            times[variant].append((time.perf_counter() - start) / args.steps)
    med = {v: statistics.median(t) for v, t in times.items()}
    print(f"threads {torch.get_num_threads()} | groups {args.n_forget} forget / {args.n_retain} retain | "
          f"{args.reps} reps x {args.steps} steps")
    for v in med:
        print(f"{v:>15}: median {1e3 * med[v]:.1f} ms/step  (all: {', '.join(f'{1e3 * t:.0f}' for t in times[v])})")
    print(f"ratio adaptive_ortho / topk: {med['adaptive_ortho'] / med['topk']:.3f}x (target <= 1.15x)")


if __name__ == "__main__":
    main()
