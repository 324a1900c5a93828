"""Data-parallel training step: 1 process vs N processes under torchrun (gloo on this CPU), and a
projection to GPUs.

    python -m bench.bench_distributed [--nproc 2] [--reps 5] [--steps 5]

Each repetition launches a 1-process and an N-process torchrun job in turn (alternated, since the machine is
shared and noisy); every job times `--steps` adaptive_ortho training steps on one global batch of 2048 random
rows (d=576, F=4608, k=32: the CPU default) and the gradient all-reduce alone. The threads are split
between the processes (cores / N each), so both jobs use the same cores. Printed: median step times,
their ratio, the all-reduce volume per step, and the projected GPU step time

    t_N = t_compute / N + t_allreduce,
    t_allreduce = 2 (N − 1) / N · bytes / bandwidth   (ring all-reduce)

with t_compute = 6·B·d·F FLOPs (encoder forward and backward; the sparse decoder is k/F of that) over a
stated sustained throughput. The projection is a model with stated inputs, not a measurement.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

D, F, K, BATCH = 576, 4608, 32, 2048


def worker(steps: int) -> None:
    """One rank of a timing job: prints {"step_s", "allreduce_s", "bytes"} as JSON (rank 0)."""
    import distributed
    from bench.common import make_trainer, random_batch
    distributed.init("cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // distributed.local_world_size()))
    trainer = make_trainer("adaptive_ortho", D, F, K, 288, 288)
    torch.manual_seed(1)
    x, labels = random_batch(BATCH, D)
    part = distributed.shard(BATCH)
    step = lambda: trainer.step(x[part], labels[part])
    step()  # warm up
    distributed.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    step_s = (time.perf_counter() - start) / steps
    params = list(trainer.sae.parameters())
    distributed.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        distributed.reduce_gradients(params)
    allreduce_s = (time.perf_counter() - start) / steps
    if distributed.is_main():
        print(json.dumps({"step_s": step_s, "allreduce_s": allreduce_s,
                          "bytes": sum(p.numel() * p.element_size() for p in params)}))
    distributed.shutdown()


def launch(nproc: int, steps: int) -> dict:
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", "-m", "bench.bench_distributed", "--worker",
                             f"--steps={steps}"], capture_output=True, text=True, check=True,
                            env=os.environ | {"PYTHONPATH": os.getcwd()})
    return json.loads(result.stdout.strip().splitlines()[-1])


def projection(bytes_: float, batch: int, d: int, f: int, tflops: float, bandwidth_gbs: float,
               n: int) -> float:
    """Projected seconds per step on n GPUs (see the module docstring)."""
    compute = 6 * batch * d * f / (tflops * 1e12)
    return compute / n + (2 * (n - 1) / n * bytes_ / (bandwidth_gbs * 1e9) if n > 1 else 0.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help="internal: one rank of a timing job")
    parser.add_argument("--tflops", type=float, default=50.0,
                        help="sustained GPU matmul throughput for the projection "
                             "(TF32 on an H100 runs ~50-400)")
    args = parser.parse_args()
    if args.worker:
        return worker(args.steps)
    runs = {1: [], args.nproc: []}
    for _ in range(args.reps):
        for n in runs:
            runs[n].append(launch(n, args.steps))
    med = {n: {key: statistics.median(r[key] for r in rs) for key in ("step_s", "allreduce_s")}
           for n, rs in runs.items()}
    volume = runs[1][0]["bytes"]
    print(f"CPU, {os.cpu_count()} cores | d={D} F={F} k={K} global batch {BATCH} | {args.reps} reps x "
          f"{args.steps} steps | gradient all-reduce: {volume / 1e6:.1f} MB per step")
    for n, m in med.items():
        print(f"N={n}: median {1e3 * m['step_s']:.1f} ms/step, of which the all-reduce alone "
              f"{1e3 * m['allreduce_s']:.1f} ms")
    print(f"ratio N={args.nproc} / N=1: {med[args.nproc]['step_s'] / med[1]['step_s']:.3f}x")
    print(f"projection (stated inputs: {args.tflops:.0f} TFLOP/s per GPU; NVLink 300 GB/s in a node, "
          f"InfiniBand 25 GB/s across nodes):")
    for name, (d, f, batch) in {"this CPU default": (D, F, BATCH), "Pythia-70M, 32x": (512, 16384, 4096),
                                "Gemma-2-2B, 16k": (2304, 16384, 4096)}.items():
        grad_bytes = 4 * (2 * d * f + d + f)
        cells = [f"N={n}: {1e3 * projection(grad_bytes, batch, d, f, args.tflops, bw, n):.2f} ms ({where})"
                 for n, bw, where in ((1, 300, "1 GPU"), (8, 300, "1 node"), (16, 25, "2 nodes"))]
        print(f"  {name} (d={d}, F={f}, batch {batch}, {grad_bytes / 1e6:.0f} MB): " + "; ".join(cells))


if __name__ == "__main__":
    main()
