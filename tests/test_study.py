"""study.py: the manifest matches the pre-registered design, and the command makes only what is
missing, then regenerates the results."""
import importlib.metadata
import subprocess
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

import data
import experiment
import models
import study


def test_manifest_is_the_design(tmp_path):
    runs = study.manifest()
    assert len(runs) == 5 * 8 + 5 * 3 + 2 * 3
    for label in ("topk", "fixed", "adaptive_a0.1", "allpairs", "lambda0"):  # the compared settings
        assert all(f"runs/{label}_s{seed}" in runs for seed in range(8))
    for name, args in runs.items():  # every run parses, and names its own out_dir
        cfg = experiment.parse_config(args)
        assert cfg.out_dir == name and f"_s{cfg.seed}" in name and cfg.llm_dtype != "auto"
        # a run the study has finished holds final_info.json: validate its options elsewhere
        experiment.validate(experiment.dataclasses.replace(cfg, out_dir=str(tmp_path / name)))
    assert experiment.parse_config(runs["runs/lambda0_s3"]).lambda2_max == 0
    assert experiment.parse_config(runs["runs/long_topk_s1"]).train_tokens == 2 * 400_000
    seeds = [experiment.parse_config(args).seed for args in runs.values()]
    assert seeds[:40] == sorted(seeds[:40]) and seeds[40:] == sorted(seeds[40:])  # seed by seed
    assert {name.split("/")[1].rsplit("_s", 1)[0] for name in list(runs)[:40]} == set(study.COMPARED)


def test_every_run_of_the_manifest_fits_the_embedded_corpora():
    """Half of a run's train_tokens come from each corpus's training documents (the defaults' split):
    the largest budget in the manifest fits both, counted with SmolLM2's own tokenizer."""
    gguf = Path(importlib.metadata.distribution(models.EMBEDDED_PACKAGE).locate_file(models.EMBEDDED_GGUF))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = experiment.Config()
    largest = max(experiment.parse_config(args).train_tokens for args in study.manifest().values())
    n_tokens = {}
    for spec in (cfg.forget_corpus, cfg.retain_corpus):
        train = data.split_documents(data.load_corpus(spec).documents, cfg.eval_fraction, cfg.data_seed,
                                     cfg.val_fraction).train
        n_tokens[spec] = sum(len(ids) + 1 for ids in tokenizer(train, add_special_tokens=False)["input_ids"])
    assert min(n_tokens.values()) >= largest // 2, n_tokens
    assert n_tokens[data.HPO] < largest, n_tokens  # why the longer runs are 2x, not 4x, the default


def test_only_unfinished_runs_are_run_then_the_results_regenerated(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "HERE", tmp_path)
    (tmp_path / "runs/topk_s0").mkdir(parents=True)
    (tmp_path / "runs/topk_s0" / "final_info.json").write_text("{}")
    (tmp_path / "runs/topk_s1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs/topk_s1" / "checkpoints" / "last.pt").write_bytes(b"")
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd[1:]))
    done = study.main(["--only", "runs/topk_s0", "runs/topk_s1", "runs/topk_s2"])
    assert done == ["runs/topk_s1", "runs/topk_s2"]
    assert [c[0] for c in calls] == ["experiment.py", "experiment.py", "plot.py"]
    assert calls[0][1] == "--out_dir=runs/topk_s1" and calls[-1] == ["plot.py", "--results=RESULTS.md",
                                                                           "--readme=README.md"]
    assert [study.state(tmp_path / f"runs/topk_s{s}") for s in range(3)] == [
        "finished", "unfinished", "missing"]


def flat_runs(effects: dict, seeds=range(8), **extra) -> dict:
    """{manifest name: a results.flatten-like run}: score = effect + seed/10 ± 0.05 (the sign alternating
    over seeds, so that it averages out of every setting's mean over an even number of seeds),
    conditional = score + 0.5 ± 0.05 (alternating in pairs of seeds), question-answer score = score / 2,
    random features 0.1, retain threshold 0.001 at even seeds and 0.01 at odd ones, selection-split
    config points score + 1 (0.001/10) and score − 0.2 (0.01/10, a lower bound at seed 0), one fixed
    pair of non-SAE controls, and a latent census (silent on forget text 10·i + 2·seed for the i-th
    setting, retain rate < 0.001 400 + i, missing at seed 0)."""
    runs = {}
    for i, (label, effect) in enumerate(effects.items()):
        for seed in seeds:
            score = effect + seed / 10 + 0.05 * (-1) ** (seed + i)
            runs[study.run_name(label, seed)] = {
                "held_out_score": score, "held_out_lower_bound": False,
                "conditional_score": score + 0.5 + 0.05 * (-1) ** (seed // 2 + i),
                "conditional_lower_bound": False, "conditional_auroc": 0.9, "random_score": 0.1,
                "over_random_score": score - 0.1, "retain_threshold": 0.01 if seed % 2 else 0.001,
                "config_scores": {"0.01/10": (score - 0.2, seed == 0), "0.001/10": (score + 1, False)},
                "random_lower_bound": False, "qa_score": score / 2, "qa_lower_bound": False,
                "conv_ev_typical": 0.8, "val_ev": 0.78, "dom_score": 1.8, "dom_lower_bound": False,
                "leace_score": 0.07, "leace_lower_bound": False, "qa_dom_score": 0.9,
                "qa_dom_lower_bound": False, "qa_leace_score": 0.05, "qa_leace_lower_bound": True,
                "silent_forget": 10 * i + 2 * seed, "silent_retain": 5,
                "retain_below_0.001": 400 + i if seed else None, "dead_latents": 1,
                "held_out_knob": 100 * (seed + 1), "conditional_knob": 1000 * (score + 0.5)} | extra
    return runs


EFFECTS = {"topk": 0.5, "fixed": 0.5, "adaptive_a0.1": 1.0, "allpairs": 0.5, "lambda0": 0.5}


def test_the_family_finds_planted_effects_and_only_those():
    fam = study.contrast_family(flat_runs(EFFECTS), "held-out score")
    rows = {(r["a"], r["b"]): r for r in fam["contrasts"]}
    assert len(rows) == 5 + 3 + 2 and fam["seeds"] == list(range(8)) and fam["df"] == 7 * 7
    assert fam["best"] == "adaptive_a0.1"
    assert rows["adaptive_a0.1", "topk"]["estimate"] == pytest.approx(0.5)
    assert rows["adaptive_a0.1", "topk"]["significant"] and rows["adaptive_a0.1", "fixed"]["significant"]
    for pair in [("fixed", "topk"), ("allpairs", "topk"), ("lambda0", "topk")]:
        assert rows[pair]["estimate"] == pytest.approx(0.0, abs=1e-12) and not rows[pair]["significant"]
    for label in study.GATED:  # conditional = static + 0.5 exactly: the pooled residual is the wobble
        assert rows[f"{label} conditional", label]["estimate"] == pytest.approx(0.5)
    # the control contrast: the best setting's seed mean − the constant, SE from its own seed spread
    best = [flat_runs(EFFECTS)[study.run_name("adaptive_a0.1", s)]["held_out_score"] for s in range(8)]
    dom = rows["adaptive_a0.1", "difference of means"]
    assert dom["estimate"] == pytest.approx(np.mean(best) - 1.8)
    assert dom["se"] == pytest.approx(np.std(best, ddof=1) / np.sqrt(8)) and dom["df"] == 7
    # Holm over all ten: each p_holm at least its p, and at least the smallest p times 10
    assert all(r["p_holm"] >= r["p"] for r in rows.values())
    assert min(r["p_holm"] for r in rows.values()) >= min(r["p"] for r in rows.values()) * 10 - 1e-12
    qa = study.contrast_family(flat_runs(EFFECTS), "question-answer text (secondary)")
    assert len(qa["contrasts"]) == 5 + 2  # no conditional clamp on the second pair


def test_a_control_that_differs_between_runs_is_refused():
    runs = flat_runs(EFFECTS)
    runs[study.run_name("topk", 3)]["dom_score"] = 1.7
    with pytest.raises(ValueError, match="dom_score should be one number"):
        study.contrast_family(runs, "held-out score")


def test_readme_section_says_interim_until_every_seed_is_in():
    partial = study.results_section(flat_runs(EFFECTS, seeds=range(3)))
    assert "15 of the 61 runs" in partial and "INTERIM: 3 of the 8" in partial
    full = study.results_section(flat_runs(EFFECTS))
    assert "INTERIM" not in full and "| adaptive α=0.1 − topk | +0.5" in full
    assert "LEACE ≥ 0.050" in full  # the question-answer LEACE control is a lower bound
    assert study.results_section({}) == ""
    one_seed = study.results_section(flat_runs(EFFECTS, seeds=range(1)))
    assert ("held-out score**: no test yet: it needs seeds that every row of its table has" in one_seed
            and "topk [0]; fixed_ortho [0]" in one_seed)


def test_the_exploratory_section_reads_each_config_and_the_score_over_random_features():
    section = study.results_section(flat_runs(EFFECTS))
    exploratory = section.split("**Exploratory")[1]
    topk = [0.5 + s / 10 + 0.05 * (-1) ** s for s in range(8)]  # topk is the first setting (i = 0)
    row = next(line for line in exploratory.splitlines() if line.startswith("| topk |"))
    assert row == (f"| topk | 8 | 0.001 ×4, 0.01 ×4 | {np.mean(topk) + 1:.3f} ± {np.std(topk, ddof=1):.3f} | "
                   f"≥ {np.mean(topk) - 0.2:.3f} ± {np.std(topk, ddof=1):.3f} |")
    assert "| 0.001/10 | 0.01/10 |" in exploratory  # configs in numeric order
    # random features are 0.1 everywhere: the contrasts on score − random are those on the score
    assert exploratory.count("| adaptive α=0.1 − topk | +0.500 |") == 2  # the score, and score − random
    assert "rows only" in exploratory and "Holm over these 5 only" in exploratory


def test_the_latent_census_is_the_mean_and_std_over_seeds():
    """topk (i = 0): silent on forget text 0, 2, …, 14 → 7 ± 4.9; adaptive (i = 2) 27 ± 4.9; retain
    rate < 0.001 misses seed 0, so 7 seeds of a constant: ± 0."""
    text = study._exploratory_markdown(flat_runs(EFFECTS))
    table = text.split("**Rare latents**", 1)[1]
    row = next(line for line in table.splitlines() if line.startswith("| topk |"))
    assert row == "| topk | 8 | 7 ± 5 | 5 ± 0 | 400 ± 0 | 1 ± 0 |"
    row = next(line for line in table.splitlines() if line.startswith("| adaptive α=0.1 |"))
    assert row == "| adaptive α=0.1 | 8 | 27 ± 5 | 5 ± 0 | 402 ± 0 | 1 ± 0 |"


def test_the_multiplier_table_is_the_median_and_range_over_seeds_and_rho_ranks_it_with_the_score():
    """Static multiplier 100·(seed + 1): median 450 of 100…800 for every setting; conditional 1000·(score +
    0.5); a lower bound at some seed marks the cell ≥. Multipliers planted in the score's order give ρ = 1,
    against it ρ = −1."""
    runs = flat_runs(EFFECTS)
    runs[study.run_name("fixed", 3)]["conditional_lower_bound"] = True
    text = study._exploratory_markdown(runs).split("**The multiplier each score", 1)[1]
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    topk = [0.5 + s / 10 + 0.05 * (-1) ** s for s in range(8)]
    assert rows["| topk"] == (f"| topk | 8 | 450 [100, 800] | {1000 * (np.median(topk) + 0.5):.0f} "
                              f"[{1000 * (min(topk) + 0.5):.0f}, {1000 * (max(topk) + 0.5):.0f}] |")
    assert rows["| fixed_ortho"].endswith("] |") and "| ≥ " in rows["| fixed_ortho"]
    assert "| ≥ " not in rows["| topk"]
    for r in runs.values():  # the multiplier planted in the score's order, and against it
        r["conditional_knob"], r["held_out_knob"] = 1000 * r["conditional_score"], -r["held_out_score"]
    text = study._exploratory_markdown(runs)
    assert "the runs: static -1.00 (40 runs); conditional 1.00 (40 runs)." in text


def test_findings_name_what_survives_and_the_longer_training_gain():
    """Planted: adaptive α=0.1 is 0.5 above the other four settings, so its contrasts with topk and
    fixed_ortho are listed as surviving, fixed_ortho − topk (0) as not. At 2× tokens long_adaptive −
    long_topk = 1.0 + 0.1·(−1)^seed: 1.1, 0.9, 1.1 over seeds 0–2; at the default length adaptive −
    topk = 0.5 at every seed."""
    from scipy.stats import t as student_t
    runs = flat_runs(EFFECTS | {"long_topk": 0.5, "long_adaptive_a0.1": 1.5})
    text = study.findings_markdown(runs)
    fam = study.contrast_family(runs, "held-out score")
    survive = [r for r in fam["contrasts"] if r["significant"]]
    assert f"{len(survive)} of the {len(fam['contrasts'])} pre-registered contrasts survive Holm" in text
    assert ("adaptive α=0.1 − topk +0.500" in text.split("Not surviving")[0]
            and "adaptive α=0.1 − fixed_ortho +0.500" in text.split("Not surviving")[0])
    assert "fixed_ortho − topk +0.000" in text.split("Not surviving")[1].split("\n")[0]
    assert "Settings by mean: adaptive α=0.1 " in text and "INTERIM" not in text
    half = student_t.ppf(0.975, 2) * np.std([1.1, 0.9, 1.1], ddof=1) / np.sqrt(3)
    mean = np.mean([1.1, 0.9, 1.1])
    assert (f"default length +0.500 [+0.500, +0.500] (val EV 0.780 and 0.780); 2× tokens "
            f"+{mean:.3f} [{mean - half:+.3f}, {mean + half:+.3f}]") in text
    partial = {name: run for name, run in runs.items() if not name.startswith("runs/long_adaptive")}
    assert "3 of the 6 runs at 2× tokens finished; no comparison yet" in study.findings_markdown(partial)


def test_a_lower_bound_marks_its_contrasts():
    """adaptive α=0.1's conditional score at seed 3 is a lower bound: its contrast is marked † in the
    table and the findings, with the note; the other contrasts are not."""
    runs = flat_runs(EFFECTS)
    runs[study.run_name("adaptive_a0.1", 3)]["conditional_lower_bound"] = True
    fam = study.contrast_family(runs, "held-out score")
    assert fam["bounded"] == {"adaptive_a0.1 conditional"}
    table = study._family_markdown(runs, "held-out score")
    assert "| adaptive α=0.1 conditional − adaptive α=0.1 † |" in table and study.BOUND_NOTE in table
    assert "| topk conditional − topk |" in table and table.count("†") == 2  # the row and the note
    assert study.BOUND_NOTE not in study._family_markdown(flat_runs(EFFECTS), "held-out score")


def test_conditional_contrasts_as_paired_t_tests_match_scipy():
    """The sensitivity analysis: each conditional − static as a paired t-test over the shared seeds,
    Holm over the three, equals scipy's ttest_rel."""
    from scipy.stats import ttest_rel
    from statsmodels.stats.multitest import multipletests
    runs = flat_runs(EFFECTS)
    text = "\n".join(study._contrast_lines(study.conditional_paired(runs)["contrasts"]))
    seeds = range(8)
    expected = []
    for label in study.GATED:
        cond = [runs[study.run_name(label, s)]["conditional_score"] for s in seeds]
        static = [runs[study.run_name(label, s)]["held_out_score"] for s in seeds]
        expected.append((label, ttest_rel(cond, static)))
    p_holm = multipletests([r.pvalue for _, r in expected], method="holm")[1]
    for (label, r), ph in zip(expected, p_holm):
        name = f"{study.display(label)} conditional − {study.display(label)}"
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {r.statistic:.2f} (7) | {r.pvalue:.3g} | {ph:.3g} |" in row


def test_findings_name_the_survivors_of_both_sensitivity_analyses():
    """Planted: adaptive α=0.1 is +0.5 over every static setting and each conditional row +0.5 over its
    static one, with noise of ±0.05: the static-only pooling keeps adaptive's two contrasts with an SAE,
    and the paired tests keep all three conditional ones."""
    text = study.findings_markdown(flat_runs(EFFECTS))
    line = next(line for line in text.splitlines() if line.startswith("- **Sensitivity**"))
    assert ("static rows alone, surviving Holm: adaptive α=0.1 − topk, adaptive α=0.1 − fixed_ortho. "
            in line)
    assert line.endswith("surviving Holm: topk conditional − topk, fixed_ortho conditional − fixed_ortho, "
                         "adaptive α=0.1 conditional − adaptive α=0.1.")
