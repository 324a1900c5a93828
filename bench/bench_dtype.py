"""Drift of one setting against another over paired seeds, from finished run folders, and the rule that
decides whether the second may be the default.

    python -m bench.bench_dtype --base /tmp/dtype/llm_float32_seed{0,1,2} \
                                --other /tmp/dtype/llm_bfloat16_seed{0,1,2}

Runs are paired by seed. Per metric: each side's mean ± std over seeds, the mean paired difference
(other − base) and its standard error (std of the differences / √n). The rule (the default may change only
if both hold): |Δ held-out score| < the held-out score's own SE (the mean of the runs' SEs), and
|Δ EV| < 0.002 for both validation EV and conventional EV. Where the two sides read different activation
cache entries, also the harvested activations' drift: per token ‖x_other − x_base‖ / ‖x_base‖ over the
validation split (median, max).
"""
import argparse
import json
from pathlib import Path

import numpy as np

import activations
import results

METRICS = ("val_ev", "conv_ev", "conv_ev_typical", "ce_loss_score", "held_out_score",
           "conditional_score", "dom_score", "wall_min")
EV_TOLERANCE = 0.002


def load(folders: list) -> dict:
    """{seed: (flat metrics, final_info)} of finished runs."""
    runs = {}
    for folder in folders:
        info = json.loads((Path(folder) / "final_info.json").read_text())
        flat = results.flatten(info)
        runs[flat["seed"]] = (flat, info)
    return runs


def activation_drift(base_entry: Path, other_entry: Path, split: str = "val") -> dict:
    """Per-token relative drift ‖x_o − x_b‖ / ‖x_b‖ between two cache entries of the same contexts."""
    xb, lb = activations.load_split(base_entry, split, verify=False)
    xo, lo = activations.load_split(other_entry, split, verify=False)
    if xb.shape != xo.shape or not np.array_equal(lb, lo):
        raise ValueError(f"{base_entry} and {other_entry} do not hold the same tokens")
    rel = []
    for i in range(0, len(xb), 65536):
        b, o = (activations.as_float32(a[i:i + 65536]).astype(np.float64) for a in (xb, xo))
        rel.append(np.linalg.norm(o - b, axis=1) / np.linalg.norm(b, axis=1))
    rel = np.concatenate(rel)
    return {"split": split, "n_tokens": len(rel), "median": float(np.median(rel)),
            "p99": float(np.quantile(rel, 0.99)), "max": float(rel.max())}


def compare(base: dict, other: dict) -> dict:
    seeds = sorted(set(base) & set(other))
    if len(seeds) < 2:
        raise SystemExit(f"need at least two seeds run on both sides; paired seeds: {seeds}")
    table = {}
    for m in METRICS:
        b = np.array([base[s][0][m] for s in seeds], dtype=float)
        o = np.array([other[s][0][m] for s in seeds], dtype=float)
        d = o - b
        table[m] = {"base": (b.mean(), b.std(ddof=1)), "other": (o.mean(), o.std(ddof=1)),
                    "diff": d.mean(), "diff_se": d.std(ddof=1) / np.sqrt(len(d))}
    score_se = np.mean([r[0]["held_out_score_se"] for side in (base, other) for s, r in side.items()
                        if s in seeds])
    passes = {"held_out_score": abs(table["held_out_score"]["diff"]) < score_se,
              "val_ev": abs(table["val_ev"]["diff"]) < EV_TOLERANCE,
              "conv_ev": abs(table["conv_ev"]["diff"]) < EV_TOLERANCE}
    return {"seeds": seeds, "table": table, "held_out_se": score_se, "passes": passes}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", nargs="+", required=True, help="run folders of the reference setting")
    parser.add_argument("--other", nargs="+", required=True, help="run folders of the candidate setting")
    args = parser.parse_args()
    base, other = load(args.base), load(args.other)
    result = compare(base, other)
    print(f"paired seeds: {result['seeds']}")
    print("| metric | base mean ± std | other mean ± std | other − base ± SE |")
    print("|---|---:|---:|---:|")
    for m, row in result["table"].items():
        print(f"| {m} | {row['base'][0]:.4f} ± {row['base'][1]:.4f} | {row['other'][0]:.4f} ± "
              f"{row['other'][1]:.4f} | {row['diff']:+.4f} ± {row['diff_se']:.4f} |")
    print(f"rule: |Δ held-out| < its SE ({result['held_out_se']:.4f}): {result['passes']['held_out_score']}; "
          f"|Δ val EV| < {EV_TOLERANCE}: {result['passes']['val_ev']}; "
          f"|Δ conv EV| < {EV_TOLERANCE}: {result['passes']['conv_ev']}")
    entry = lambda runs: Path(next(iter(runs.values()))[1]["provenance"]["activation_cache"]["entry"])
    if entry(base) != entry(other):
        drift = activation_drift(entry(base), entry(other))
        print(f"harvested activations, ‖Δx‖/‖x‖ per token over {drift['n_tokens']:,} {drift['split']} "
              f"tokens: median {drift['median']:.4f}, 99th percentile {drift['p99']:.4f}, "
              f"max {drift['max']:.4f}")


if __name__ == "__main__":
    main()
