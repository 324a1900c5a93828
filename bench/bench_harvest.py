"""Speed of harvesting activations against the model's own forward up to the hook, on the same batches,
one process.

    python -m bench.bench_harvest                    # 4 batches of 16 contexts x 128 tokens, 3 reps
                                                     # (~2 min here)
    python -m bench.bench_harvest --batches 8 --reps 5 --threads 1

Embedded SmolLM2-135M-Instruct (converted once into the cache folder by a first run), layer 15, contexts
packed from HPO text by data.pack_contexts exactly as the run packs them. Timed, interleaved, medians
over --reps:
  - bare forward: model(batch, stop_at_layer=layer + 1) (the limit: harvesting cannot do less);
  - harvest: activations.harvest_split as prepare_activations calls it, writing the .npy memory map and
    labels into a temporary folder,
each on one batch at a time, alternating, so that both see the same background load; medians per batch.
The harvested rows are checked against the bare forward's residual (BOS dropped). Prints a markdown table.
"""
import argparse
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

import activations
import data
import models


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--layer", type=int, default=models.EMBEDDED_DEFAULT_LAYER)
    parser.add_argument("--batch_size", type=int, default=16,
                        help="contexts per forward (the run's --harvest_batch_size)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--context_length", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = models.default_cache_dir()
    start = time.time()
    model, _ = models.load_model(models.EMBEDDED_NAME, "cpu", cache)
    print(f"model loaded in {time.time() - start:.0f} s")
    hook_name, layer = f"blocks.{args.layer}.hook_resid_post", args.layer
    tok = model.tokenizer
    bos = models.bos_token_id(tok)
    docs = data.split_documents(data.load_corpus(data.HPO).documents, 0.1, 0).train
    n = args.batch_size * args.batches
    tokens = data.pack_contexts(tok, docs, args.context_length, n * (args.context_length - 1), bos)[:n]
    labels = torch.ones(n, dtype=torch.long)
    batches = [tokens[i:i + args.batch_size] for i in range(0, n, args.batch_size)]

    @torch.inference_mode()
    def bare(batch):
        return model(batch, stop_at_layer=layer + 1)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train_acts.npy"

        def harvest(batch):
            activations.harvest_split(model, hook_name, layer, batch, labels[:len(batch)], len(batch),
                                      path, "harvest")

        # the harvest of all batches at once, as a run does it, against the bare forward's residual
        activations.harvest_split(model, hook_name, layer, tokens, labels, args.batch_size, path, "harvest")
        reference = torch.cat([bare(batch) for batch in batches])[:, 1:].reshape(-1, model.cfg.d_model)
        err = (torch.from_numpy(np.load(path)) - reference).abs().max().item()
        print(f"harvested rows vs the bare forward's residual: max |diff| {err:.1e}")
        # timed batch by batch, alternating, so both paths see the same background load
        times = {"bare forward (stop_at_layer)": [], "activations.harvest_split": []}
        for _ in range(args.reps):
            for batch in batches:
                for name, f in (("bare forward (stop_at_layer)", bare),
                                ("activations.harvest_split", harvest)):
                    t = time.perf_counter()
                    f(batch)
                    times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(t) for name, t in times.items()}  # per batch
    n_tok = batches[0].numel()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    print(f"\n{date.today()} | {cpu}, {torch.get_num_threads()} torch threads | torch {torch.__version__} | "
          f"{models.EMBEDDED_NAME} to layer {layer}, {args.batches} batches x {args.batch_size} contexts x "
          f"{args.context_length} tokens | median over {args.reps} reps x {args.batches} batches, "
          f"interleaved\n")
    print("| path | s / batch | tokens / s |")
    print("|---|---:|---:|")
    for name, t in med.items():
        print(f"| {name} | {t:.2f} | {n_tok / t:,.0f} |")
    ratio = med["bare forward (stop_at_layer)"] / med["activations.harvest_split"]
    print(f"\n| ratio | measured | target |\n|---|---:|---|\n"
          f"| harvest rate / bare forward rate | {ratio:.3f} | >= 0.90 |")
    print("\nall times (s / batch): " + "; ".join(f"{name}: {', '.join(f'{t:.2f}' for t in ts)}"
                                               for name, ts in times.items()))


if __name__ == "__main__":
    main()
