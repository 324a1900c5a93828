"""Speed of the unlearning sweep: residuals kept at the hook + only the remaining layers per config,
against a full forward with the clamp hook per config, on the embedded SmolLM2-135M-Instruct (layer 15)
with a random TopK SAE.

    python -m bench.bench_unlearning                 # speedup only (a few minutes on 2 shared cores)
    python -m bench.bench_unlearning --full-eval     # also run_unlearning_eval with the defaults;
                                                     # --sae DIR for a trained SAE (SAE-Lens folder),
                                                     # --out FILE for its JSON
    python -m bench.bench_unlearning --skip-speedup --prefix-ab run_1/sae   # re-run rows from their
                                                     # first edited position (cached prefix) against
                                                     # whole rows, interleaved

Both paths compute the same per-context next-token losses (checked); the kept-residual path is run with
skip_unchanged_rows off, so the ratio is the layer skipping + config batching alone, and on again to show
what skipping untouched rows adds for this SAE.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import data
import experiment
import interventions
import models
import unlearning
from interventions import Clamp


class RandomTopK(torch.nn.Module):
    """Dense-interface TopK SAE with random unit-norm decoder rows and tied encoder, in model units."""

    def __init__(self, d: int, F: int, k: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(F, d, generator=g)
        self.W_dec = W / W.norm(dim=1, keepdim=True)
        self.W_enc, self.b_dec, self.k = self.W_dec.T.clone(), torch.zeros(d), k

    def encode(self, x):
        pre = torch.relu((x - self.b_dec) @ self.W_enc)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, top.values)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec


def full_per_config(model, sae, hook_name, tokens, configs):
    out = []
    for feats, m, _ in configs:
        logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, interventions.clamp_hook(sae, feats, m))],
                                      padding_side="right")
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(),
                                                reduction="none")
        out.append(nll.view(tokens.shape[0], -1).sum(1).double())
    return out


def kept_residuals(model, sae, hook_layer, tokens, configs, cfg):
    s = unlearning.EvalSet(model, "ce", [(tokens[i:i + cfg.batch_size], None)
                                         for i in range(0, len(tokens), cfg.batch_size)],
                           hook_layer, "cpu")
    results, frac = unlearning.run_sweep(model, sae, hook_layer, {"ce": s}, configs, cfg)
    return [torch.cat(r["ce"]) for r in results], frac


def prefix_ab(model, sae, hook_layer, forget_docs, retain_docs, reps):
    """run_sweep on the eval's selection-split text (both sides) with the eval's own feature selection, 4
    configs, with a re-run row starting at its first edited position (keys and values of the prefix
    cached) and without."""
    tok, cfg = model.tokenizer, unlearning.UnlearningConfig()
    texts = {side: unlearning.held_out_text(tok, docs, cfg, tok.bos_token_id, tok.eos_token_id, side)
             for side, docs in (("forget", forget_docs), ("retain", retain_docs))}
    rates = {side: v["rates"] for side, v in unlearning.rate_split(model, sae, texts, hook_layer, cfg,
                                                                   "cpu").items()}
    configs = [Clamp(tuple(unlearning.select_features(rates["forget"], rates["retain"], th, 20)), m)
               for th in (0.001, 0.01) for m in (50, 200)]
    sets = {side: unlearning.EvalSet(model, "ce", [(texts[side]["select"][i:i + 8], None)
                                                   for i in range(0, len(texts[side]["select"]), 8)],
                                     hook_layer, "cpu")
            for side in texts}
    times = {"whole rows": [], "from first edit": []}
    results = {}
    for rep in range(reps):  # interleaved
        for name, reuse in (("whole rows", False), ("from first edit", True)):
            for s in sets.values():
                s.prefix_reuse = lambda reuse=reuse: reuse
            t = time.perf_counter()
            results[name], frac = unlearning.run_sweep(model, sae, hook_layer, sets, configs, cfg)
            times[name].append(time.perf_counter() - t)
        diff = max(float((torch.cat(a[k]) - torch.cat(b[k])).abs().max())
                   for a, b in zip(results["whole rows"], results["from first edit"]) for k in sets)
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items())
              + f"; max |difference| of a row's summed loss {diff:.1e} nats; rows re-run {frac:.0%}")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{len(texts['forget']['select'])} + {len(texts['retain']['select'])} contexts, "
          f"{len(configs)} configs, median of {reps}: whole rows {med['whole rows']:.1f} s, from first "
          f"edit {med['from first edit']:.1f} s -> {med['whole rows'] / med['from first edit']:.2f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--contexts", type=int, default=8)
    ap.add_argument("--configs", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full-eval", action="store_true")
    ap.add_argument("--skip-speedup", action="store_true")
    ap.add_argument("--sae", default=None, help="SAE-Lens folder for --full-eval (default: the random SAE)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--prefix-ab", default=None, help="a trained SAE folder: time prefix reuse on and off")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    cache = models.default_cache_dir()
    t = time.time()
    model, _ = models.load_model(models.EMBEDDED_NAME, "cpu", cache)
    print(f"model loaded in {time.time() - t:.0f} s")
    hook_name, L = f"blocks.{args.layer}.hook_resid_post", args.layer
    sae = RandomTopK(model.cfg.d_model, 8 * model.cfg.d_model, 32)
    forget = data.load_corpus(data.HPO)
    retain = data.load_corpus(data.WIKIPEDIA_LEADS)
    forget_docs = data.split_documents(forget.documents, 0.1, 0).eval
    retain_docs = data.split_documents(retain.documents, 0.1, 0).eval
    tok = model.tokenizer

    if not args.skip_speedup:
        tokens, _ = unlearning.pack_eval_contexts(tok, forget_docs, 128, args.contexts, tok.bos_token_id,
                                                  tok.eos_token_id)
        # features that fire on this text, so every config changes the residual
        f = sae.encode(unlearning.to_hook(model, tokens[:2], L))
        firing = torch.argsort((f > 0).float().mean((0, 1)), descending=True)
        configs = [Clamp(tuple(firing[10 * i:10 * i + 10].tolist()), m) for i, m in
                   zip(range(args.configs), [25, 50, 100, 200] * args.configs)]
        cfg_noskip = unlearning.UnlearningConfig(skip_unchanged_rows=False)
        cfg_skip = unlearning.UnlearningConfig(skip_unchanged_rows=True)
        times = {"full": [], "kept": [], "kept+skip": []}
        for rep in range(args.reps):  # interleaved
            t = time.perf_counter()
            ref = full_per_config(model, sae, hook_name, tokens, configs)
            times["full"].append(time.perf_counter() - t)
            t = time.perf_counter()
            got, _ = kept_residuals(model, sae, L, tokens, configs, cfg_noskip)
            times["kept"].append(time.perf_counter() - t)
            t = time.perf_counter()
            got2, frac = kept_residuals(model, sae, L, tokens, configs, cfg_skip)
            times["kept+skip"].append(time.perf_counter() - t)
            err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ref + ref, got + got2))
            print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items())
                  + f"; max rel. diff {err:.1e}")
        base = model(tokens, return_type="loss", padding_side="right").item()
        n_pred = tokens.shape[0] * (tokens.shape[1] - 1)
        print("ΔCE per config (nats/token; shows the clamps change the output): "
              + ", ".join(f"{float(r.sum()) / n_pred - base:+.3f}" for r in ref))
        med = {k: statistics.median(v) for k, v in times.items()}
        n_tok = tokens.numel()
        print(f"{args.contexts} contexts x 128 tokens, {len(configs)} configs, layer "
              f"{L}/{model.cfg.n_layers}, {args.threads} threads, median of {args.reps}:")
        print(f"  full forward per config:      {med['full']:.1f} s "
              f"({n_tok * len(configs) / med['full']:.0f} tokens/s)")
        print(f"  kept residuals (no skipping): {med['kept']:.1f} s  -> speedup "
              f"{med['full'] / med['kept']:.2f}x")
        print(f"  kept residuals + row skip:    {med['kept+skip']:.1f} s  -> speedup "
              f"{med['full'] / med['kept+skip']:.2f}x (rows re-run: {frac:.0%})")

    if args.prefix_ab:
        sae = experiment.load_sae(args.prefix_ab, passthrough=False)
        prefix_ab(model, sae, L, forget_docs, retain_docs, args.reps)

    if args.full_eval:
        if args.sae:
            from sae_lens import SAE
            sae = SAE.load_from_disk(args.sae, device="cpu")
        forget_q, retain_q, _ = data.load_questions("embedded")
        cfg = unlearning.UnlearningConfig(cache_dir=str(cache / "unlearning"))
        t = time.time()
        res = unlearning.run_unlearning_eval(sae, model, hook_name, L, forget_docs, retain_docs,
                                             forget_q, retain_q, cfg, "cpu")
        wall = time.time() - t
        d = res["eval_result_details"]
        print(f"run_unlearning_eval (defaults, {'SAE ' + args.sae if args.sae else 'random SAE'}): "
              f"{wall:.0f} s wall; "
              f"timing {json.dumps({k: round(v, 1) for k, v in d['timing_s'].items()})}")
        print(f"questions: {json.dumps(d['questions'])}")
        print(f"metrics: {json.dumps(res['eval_result_metrics'])}")
        print(f"rows re-run: {json.dumps(d['fraction_of_rows_rerun'])}; baseline {json.dumps(d['baseline'])}")
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
