"""How a clamp treats an adaptive_ortho SAE's group biases, measured on a finished run.

    python -m bench.group_bias_edit run_1            # a default adaptive_ortho run (writes nothing)

On the run's held-out text (the same documents, packing and feature selection as its unlearning eval:
retain threshold 0.001, 20 features, the selection split's ΔCE contexts), the forget and retain ΔCE of
SAE-Bench's clamp at each multiplier under three decodes:
  replaced: the group weights before they were bounded, w_g = Σ_{j∈g} f_j / max(Σ_j f_j, 1e-12) on
            signed codes;
  held:     the default edit, (f' − f)·W_dec;
  relu:     group weights from relu(f').
It also prints, on the forget contexts, the share of tokens whose Σ_j f'_j ≤ 0 and the largest
group-bias part of decode(f') − decode(f) under the replaced and the relu weights, against the bound
‖b_retain‖ + ‖b_forget‖.
"""
import argparse
import json
from pathlib import Path

import torch

import data
import experiment
import models
import unlearning
from interventions import Clamp


class ReplacedGroupWeights(experiment.GroupBiasTopKSAE):
    """The decode these runs used before the group weights were bounded (for comparison only)."""

    def decode(self, f):
        mass = torch.stack([(f * (self.feature_group == g)).sum(-1) for g in (0, 1)], -1)
        return (f @ self.W_dec + self.b_dec
                + (mass / f.sum(-1, keepdim=True).clamp_min(1e-12)) @ self.group_bias)


def clamp(f, features, multiplier):
    f2 = f.clone()
    sel = f2[..., features]
    f2[..., features] = torch.where(sel > 0, torch.full_like(sel, -float(multiplier)), sel)
    return f2


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    info = json.loads((args.run / "final_info.json").read_text())
    cfg = experiment.Config(**{k: v for k, v in next(v for k, v in info.items()
                                                     if k.startswith("training results"))["config"].items()
                               if k in experiment.Config.__dataclass_fields__})
    sae = experiment.load_sae(args.run / "sae", passthrough=False)
    if not isinstance(sae, experiment.GroupBiasTopKSAE):
        raise SystemExit(f"{args.run} has no group biases (variant {cfg.variant})")
    replaced = ReplacedGroupWeights(sae.cfg)
    replaced.load_state_dict(sae.state_dict())
    model, _ = models.load_model(info["provenance"]["model"]["name"], "cpu", Path(cfg.cache_dir))
    ucfg = unlearning.UnlearningConfig(n_ce_contexts=cfg.unlearning_ce_contexts,
                                       context_length=cfg.context_length)
    tok = model.tokenizer
    texts = {}
    for side, spec in (("forget", cfg.forget_corpus), ("retain", cfg.retain_corpus)):
        docs = data.split_documents(data.load_corpus(spec).documents, cfg.eval_fraction,
                                    cfg.data_seed).eval
        texts[side] = unlearning.held_out_text(tok, docs, ucfg, tok.bos_token_id, tok.eos_token_id, side)
    rates = {s: v["rates"] for s, v in unlearning.rate_split(model, sae, texts, cfg.layer, ucfg, "cpu").items()}
    features = unlearning.select_features(rates["forget"], rates["retain"], 0.001, 20)
    sets = {s: unlearning.EvalSet(model, "ce", [(texts[s]["select"][i:i + 8], None)
                                                for i in range(0, len(texts[s]["select"]), 8)],
                                  cfg.layer, "cpu")
            for s in texts}
    multipliers = (25, 50, 100, 200)
    print(f"{args.run}: retain threshold 0.001, {len(features)} features, {len(texts['forget']['select'])} "
          f"selection contexts a side; ΔCE (nats/token) ± paired SE")
    print("| decode | " + " | ".join(f"×{m} forget / retain" for m in multipliers) + " |")
    print("|---|" + "---|" * len(multipliers))
    for name, edit_sae in (("replaced", replaced), ("held", experiment.intervention_sae(sae, "held")),
                           ("relu", experiment.intervention_sae(sae, "relu"))):
        results, _ = unlearning.run_sweep(model, edit_sae, cfg.layer, sets,
                                          [Clamp(tuple(features), m) for m in multipliers], ucfg)
        cells = []
        for r in results:
            (fm, fs), (rm, rs) = (unlearning.mean_and_se(unlearning.context_deltas(r[s], sets[s]))
                                  for s in sets)
            cells.append(f"{fm:.2f} ± {fs:.2f} / {rm:.3f} ± {rs:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    f = sae.encode(unlearning.to_hook(model, texts["forget"]["select"], cfg.layer))[:, 1:]
    bound = sae.group_bias.norm(dim=1).sum()
    for m in multipliers:
        f2 = clamp(f, features, m)
        part = lambda s: ((s.decode(f2) - s.decode(f)) - (f2 - f) @ sae.W_dec).norm(dim=-1).max()
        print(f"×{m}: forget tokens with Σf' ≤ 0: {(f2.sum(-1) <= 0).float().mean():.1%}; largest "
              f"group-bias part of the edit: replaced {part(replaced):.3g}, relu {part(sae):.3g} "
              f"(bound ‖b_r‖ + ‖b_f‖ = {bound:.3g})")


if __name__ == "__main__":
    main()
