"""Speed of one SAE training step against the encoder-product limit and the peers, in one process.

    python -m bench.bench_train_step                        # d=576, F=4608, k=32, batch 4096, torch's
                                                            # default threads
    python -m bench.bench_train_step --threads 1 --reps 9   # other options: --batch --d --dict_size --k
                                                            # --dead --steps

Timed, interleaved (each repetition runs every workload in turn, --steps steps each; medians over --reps):
  - the encoder product x @ W_enc [B, d] x [d, F] alone, the part no TopK SAE can skip: as the expression
    allocates it (the reference) and into a preallocated output (the bare GEMM);
  - the same product in bfloat16 (x and W_enc as bf16 copies), the limit of a step whose encoder product
    runs in bf16 (--encoder_dtype=bfloat16);
  - our step, `experiment.TrainerTopK.step`, for `topk` (float32 and bf16 encoder product) and
    `adaptive_ortho` (groups of --n_forget /
    --n_retain latents with partners and λ2 at its maximum, as in bench_ortho_cost); the grouper watches
    in both, as in a run;
  - dictionary_learning 0.1.0 `TopKTrainer.update` (the reference TopK trainer);
  - EleutherAI sparsify 1.3.3 `SparseCoder` forward + backward + Adam, with its decoder-norm upkeep as
    its trainer does it.
The peers come from bench/requirements.txt (`pip install --no-deps -r bench/requirements.txt`); they are
not runtime dependencies. All steps see the same random batch; with --dead N the first N latents count as
dead in every trainer, so AuxK runs too (default 0: none dead, the steady state of a default run).
Before timing, our step's loss and every parameter gradient are compared with the dense textbook TopK SAE
on the same batch (the tests do the same at small shapes, tests/test_sae.py). The script ends with a
markdown table for BENCHMARKS.md.
"""
import argparse
import importlib.util
import platform
import statistics
import sys
import types
from datetime import date

import torch
import torch.nn.functional as F

import experiment
from bench.common import make_trainer, random_batch, time_interleaved


def dense_reference_check(trainer: experiment.TrainerTopK, x: torch.Tensor, dead: int) -> dict:
    """Relative max error of our loss and gradients against the dense [B, F] textbook form, on batch x."""
    sae = trainer.sae
    trainer.tokens_since_fired.zero_()
    trainer.tokens_since_fired[:dead] = trainer.dead_window_tokens
    total, _ = trainer.loss(x)
    sae.zero_grad(set_to_none=True)
    total.backward()
    ours = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad(set_to_none=True)
    pre = F.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    kth = pre.topk(sae.k, dim=-1).values[:, -1:]
    code = pre * (pre >= kth)
    x_hat = code @ sae.W_dec + sae.b_dec
    residual = x - x_hat
    reference = residual.pow(2).sum(-1).mean()
    if dead:
        masked = torch.full_like(pre, -float("inf"))
        masked[:, :dead] = pre[:, :dead]
        vals, idx = masked.topk(min(trainer.k_aux, dead), dim=-1)
        e = residual.detach()
        aux = (e - torch.zeros_like(pre).scatter(-1, idx, vals) @ sae.W_dec).pow(2).sum(-1).mean()
        reference = reference + trainer.auxk_alpha * aux / (e - e.mean(0)).pow(2).sum(-1).mean()
    reference.backward()
    errors = {"loss": abs(total.item() - reference.item()) / abs(reference.item())}
    for n, p in sae.named_parameters():
        if n in ours:
            errors[n] = ((ours[n] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)).item()
    sae.zero_grad(set_to_none=True)
    trainer.tokens_since_fired.zero_()
    return errors


def import_dictionary_learning():
    """dictionary_learning's TopK trainer module alone: its package __init__ imports nnsight (a tracing
    library the trainer does not use), so the package is registered without running it."""
    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None:
        return None
    if "dictionary_learning" not in sys.modules:
        package = types.ModuleType("dictionary_learning")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["dictionary_learning"] = package
    from dictionary_learning.trainers.top_k import TopKTrainer
    return TopKTrainer


def dictionary_learning_step(d, n, k, x, dead):
    TopKTrainer = import_dictionary_learning()
    if TopKTrainer is None:
        return None
    torch.manual_seed(0)
    trainer = TopKTrainer(steps=10**6, activation_dim=d, dict_size=n, k=k, layer=0, lm_name="bench",
                          warmup_steps=1000, device="cpu")
    counter = iter(range(1, 10**9))  # step 0 would recompute b_dec's geometric median

    def step():
        if dead:
            trainer.num_tokens_since_fired[:dead] = trainer.dead_feature_threshold
        trainer.update(next(counter), x)
    return step


def sparsify_step(d, n, k, x, dead):
    if importlib.util.find_spec("sparsify") is None:
        return None
    from sparsify import SparseCoder, SparseCoderConfig
    torch.manual_seed(0)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device="cpu")
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / (n / 2**14) ** 0.5)
    dead_mask = torch.arange(n) < dead if dead else None

    def step():
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=dead_mask)
        (out.fvu + (1 / 32) * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
    return step


def our_step(variant, d, n, k, x, labels, dead, n_forget, n_retain, encoder_dtype=torch.float32):
    trainer = make_trainer(variant, d, n, k, n_forget, n_retain)
    trainer.sae.encoder_dtype = encoder_dtype

    def step():
        if dead:
            trainer.tokens_since_fired[:dead] = trainer.dead_window_tokens
        trainer.step(x, labels)
    return step, trainer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--dict_size", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2, help="steps per workload per repetition")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--dead", type=int, default=0,
                        help="latents that count as dead (AuxK on) in every trainer")
    parser.add_argument("--n_forget", type=int, default=700)
    parser.add_argument("--n_retain", type=int, default=800)
    parser.add_argument("--no_peers", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d, n, k, B = args.d, args.dict_size, args.k, args.batch
    torch.manual_seed(0)
    x, labels = random_batch(B, d)

    topk_step, topk_trainer = our_step("topk", d, n, k, x, labels, args.dead, args.n_forget, args.n_retain)
    errors = dense_reference_check(topk_trainer, x, args.dead)
    print("our loss and gradients vs the dense reference (max |diff| / max |ref|): "
          + ", ".join(f"{name} {e:.1e}" for name, e in errors.items()))

    W_enc = topk_trainer.sae.W_enc.detach().contiguous()
    out = torch.empty(B, n)
    x_bf16, W_bf16 = x.bfloat16(), W_enc.bfloat16()
    workloads = {
        "encoder product x @ W_enc": lambda: x @ W_enc,
        "encoder product, preallocated output": lambda: torch.mm(x, W_enc, out=out),
        "encoder product in bf16": lambda: x_bf16 @ W_bf16,
        "ours: topk step": topk_step,
        "ours: topk step, bf16 encoder product": our_step("topk", d, n, k, x, labels, args.dead,
                                                          args.n_forget, args.n_retain,
                                                          torch.bfloat16)[0],
        "ours: adaptive_ortho step": our_step("adaptive_ortho", d, n, k, x, labels, args.dead,
                                              args.n_forget, args.n_retain)[0],
    }
    if not args.no_peers:
        for name, make in (("dictionary_learning 0.1.0 TopKTrainer.update", dictionary_learning_step),
                           ("sparsify 1.3.3 SparseCoder fwd+bwd+Adam", sparsify_step)):
            step = make(d, n, k, x, args.dead)
            if step is None:
                print(f"{name}: not installed (pip install --no-deps -r bench/requirements.txt); skipped")
            else:
                workloads[name] = step
    times = time_interleaved(workloads, args.reps, args.steps)
    med = {name: statistics.median(t) for name, t in times.items()}
    rate = {name: B / t for name, t in med.items()}

    ours = "ours: topk step"
    dl = "dictionary_learning 0.1.0 TopKTrainer.update"
    sp = "sparsify 1.3.3 SparseCoder fwd+bwd+Adam"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    print(f"\n{date.today()} | {cpu}, {torch.get_num_threads()} torch threads | torch {torch.__version__} | "
          f"d={d}, F={n}, k={k}, batch {B}, dead {args.dead} | median of {args.reps} interleaved reps x "
          f"{args.steps} steps\n")
    print("| step | ms / step | tokens / s | ours topk vs it |")
    print("|---|---:|---:|---:|")
    for name in workloads:
        vs = "" if name == ours else f"{rate[ours] / rate[name]:.2f}x"
        print(f"| {name} | {1e3 * med[name]:.1f} | {rate[name]:,.0f} | {vs} |")
    print()
    checks = [("topk step rate / encoder product rate (x @ W_enc)",
               rate[ours] / rate["encoder product x @ W_enc"], ">= 0.75"),
              ("topk step rate, bf16 encoder / bf16 encoder product rate",
               rate["ours: topk step, bf16 encoder product"] / rate["encoder product in bf16"], ">= 0.75"),
              ("topk step rate, bf16 encoder / topk step rate, float32",
               rate["ours: topk step, bf16 encoder product"] / rate[ours], "(info)"),
              ("topk step rate / bare GEMM rate (preallocated output)",
               rate[ours] / rate["encoder product, preallocated output"], "(info)"),
              ("adaptive_ortho step time / topk step time",
               med["ours: adaptive_ortho step"] / med[ours], "<= 1.15")]
    if dl in rate:
        checks.append(("topk step rate / dictionary_learning rate", rate[ours] / rate[dl], ">= 4"))
    if sp in rate:
        checks.append(("topk step rate / sparsify rate", rate[ours] / rate[sp], ">= 2"))
    print("| ratio | measured | target |")
    print("|---|---:|---|")
    for name, value, target in checks:
        print(f"| {name} | {value:.2f} | {target} |")
    print("\nall times (ms): " + "; ".join(f"{name}: {', '.join(f'{1e3 * t:.0f}' for t in ts)}"
                                        for name, ts in times.items()))


if __name__ == "__main__":
    main()
