"""Setup shared by the training-step benchmarks: our trainer under the full orthogonality load, a random
batch, interleaved timing."""
import time

import torch

import experiment


def make_trainer(variant: str, d: int, n: int, k: int, n_forget: int,
                 n_retain: int) -> experiment.TrainerTopK:
    """The TrainerTopK of `variant` for a fresh [d, n] TopK SAE (seed 0): groups of n_forget / n_retain
    latents with partners, members long since and λ2(t) at its maximum, so every step pays the full
    loss; the grouper never regroups while timed."""
    torch.manual_seed(0)
    sae = experiment.AutoEncoderTopK(d, n, k, group_biases=experiment.VARIANTS[variant].grouped)
    # never regroups while timed
    grouper = experiment.FeatureGrouper(n, every=10**9, threshold=0.5, min_freq=1e-3)
    grouper.joined.fill_(-10**9)  # members long since: the penalty at full weight
    perm = torch.randperm(n)
    grouper.forget_idx, grouper.retain_idx = perm[:n_forget], perm[n_forget:n_forget + n_retain]
    grouper.partner_sign = torch.ones(min(n_forget, n_retain))
    grouper.paired_at = torch.full((len(grouper.partner_sign),), -10**9)  # pairs long since
    sae.set_groups(grouper.assignment())
    cfg = experiment.Config(variant=variant)
    trainer = experiment.TrainerTopK(sae, steps=10**6, lr=1e-4, warmup_steps=1, decay_start=1.0,
                                     auxk_alpha=1 / 32, dead_window_tokens=10**9,
                                     ortho=experiment.make_ortho(cfg), grouper=grouper)
    trainer.steps_done = max(cfg.t0, 1)  # λ2(t) at its maximum
    return trainer


def random_batch(batch: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [batch, d], entries N(0, 1/d); labels [batch], each forget with probability 1/2), from torch's
    global RNG."""
    return torch.randn(batch, d) / d ** 0.5, (torch.rand(batch) < 0.5).long()


def time_interleaved(workloads: dict, reps: int, steps: int) -> dict:
    """{name: seconds per step, one per repetition} of the callables `workloads`: each runs once to warm
    up, then every repetition runs every workload in turn, `steps` calls each."""
    for step in workloads.values():
        step()
    times = {name: [] for name in workloads}
    for _ in range(reps):
        for name, step in workloads.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - start) / steps)
    return times
