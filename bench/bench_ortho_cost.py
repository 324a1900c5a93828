"""Cost of the orthogonality terms: a topk training step vs an adaptive_ortho and an allpairs_ortho step,
one process.

    python -m bench.bench_ortho_cost [--reps 7] [--steps 5]

CPU defaults (d=576, F=4608, k=32, batch 2048) on random inputs. The adaptive_ortho trainer gets groups
of the capped size (288 forget and 288 retain latents with partners) and λ2 = λ2_max, so every step pays
the full loss; allpairs_ortho searches every row's nearest neighbour each step. Repetitions alternate the
variants' blocks of --steps steps; the median step time of each and its ratio to topk are printed
(adaptive_ortho's target: <= 1.15x).
"""
import argparse
import functools
import statistics

import torch

from bench.common import make_trainer, random_batch, time_interleaved


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--n_forget", type=int, default=288)
    parser.add_argument("--n_retain", type=int, default=288)
    args = parser.parse_args()
    d, n, k, batch = 576, 4608, 32, 2048
    variants = ("topk", "adaptive_ortho", "allpairs_ortho")
    trainers = {v: make_trainer(v, d, n, k, args.n_forget, args.n_retain) for v in variants}
    x, labels = random_batch(batch, d)
    times = time_interleaved({v: functools.partial(trainer.step, x, labels)
                              for v, trainer in trainers.items()}, args.reps, args.steps)
    med = {v: statistics.median(t) for v, t in times.items()}
    print(f"threads {torch.get_num_threads()} | groups {args.n_forget} forget / {args.n_retain} retain | "
          f"{args.reps} reps x {args.steps} steps")
    for v in med:
        print(f"{v:>15}: median {1e3 * med[v]:.1f} ms/step  "
              f"(all: {', '.join(f'{1e3 * t:.0f}' for t in times[v])})")
    for v in variants[1:]:
        print(f"ratio {v} / topk: {med[v] / med['topk']:.3f}x"
              + (" (target <= 1.15x)" if v == "adaptive_ortho" else ""))


if __name__ == "__main__":
    main()
