"""The evaluations' own dtype drift: one finished run's saved SAE evaluated with the model's forwards
in another dtype, everything else as the run had it. Separates what bf16 forwards do to the numbers
from what a bf16-trained SAE does (a different SAE: training is chaotic, as a new seed is).

    python -m bench.dtype_eval_drift /tmp/ortho_sae_dtype/llm_float32_seed0 --llm_dtype=bfloat16

Prints the run's numbers beside those of the re-evaluation; writes nothing into the run folder.
"""
import argparse
import dataclasses
import json
from pathlib import Path

import experiment
import results

KEYS = ("conv_ev", "conv_ev_typical", "ce_loss_score", "held_out_score", "held_out_score_se",
        "conditional_score", "random_score", "dom_score", "leace_score")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--llm_dtype", default="bfloat16")
    args = parser.parse_args()
    info = json.loads((args.run / "final_info.json").read_text())
    training = results.training_section(info)
    fields = {f.name for f in dataclasses.fields(experiment.Config)}
    cfg = experiment.Config(**{k: v for k, v in training["config"].items() if k in fields})
    cfg = dataclasses.replace(cfg, llm_dtype=args.llm_dtype, out_dir=str(args.run))
    experiment.set_seed(cfg.seed)
    inputs = experiment.load_inputs(cfg, info["provenance"]["model"]["name"], "the run's model")
    sae = experiment.load_sae(args.run / "sae", cfg.device, passthrough=False)
    evaluations = experiment.evaluate(cfg, args.run, sae, inputs, training["final_info"],
                                      info["knowledge separation results"])
    again = dict(info) | evaluations
    before, after = results.flatten(info), results.flatten(again)
    print(f"| metric | as run ({info['provenance']['model'].get('dtype', 'float32')}) | "
          f"re-evaluated ({args.llm_dtype}) | difference |")
    print("|---|---:|---:|---:|")
    for k in KEYS:
        b, a = before[k], after[k]
        diff = "" if a is None or b is None else f"{a - b:+.4f}"
        print(f"| {k} | {b:.4f} | {a:.4f} | {diff} |")


if __name__ == "__main__":
    main()
