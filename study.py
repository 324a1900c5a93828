"""The study: every run's arguments (the manifest) and one command that makes whatever is missing.

    python study.py                 # train and evaluate each missing or unfinished run, one at a time,
                                    # then regenerate the figures, RESULTS.md's generated block and
                                    # the README's headline
    python study.py --list          # the manifest, each run with its state
    python study.py --only runs/topk_s0 runs/topk_s1

A run is finished when its folder holds final_info.json; an unfinished one (a checkpoint, no
final_info.json) resumes where it stopped, since experiment.py resumes from out_dir/checkpoints. The
design (RESULTS.md, "Pre-registered comparisons") is in SETTINGS; the manifest is what it expands to, one
out_dir under runs/ per (setting, seed): the compared settings seed by seed first, so that an
interrupted study holds whole seeds of them.
"""
import argparse
import collections
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

import study_stats

HERE = Path(__file__).resolve().parent
# every run pins what `auto` would otherwise pick per machine
COMMON = ["--llm_dtype=float32"]
MAIN_SEEDS, SWEEP_SEEDS = range(8), range(3)
# The longer training harvests 2x the CPU default of 400k tokens, not the 4x first planned: half of the
# tokens come from the forget corpus, and the HPO definitions' training documents hold ~509k tokens.
LONG_FACTOR = 2
# label: (experiment.py arguments, seeds). The first five carry the pre-registered comparisons; the α
# sweep, the no-group-biases ablation and the longer training are descriptive.
SETTINGS = {
    "topk": (["--variant=topk"], MAIN_SEEDS),
    "fixed": (["--variant=fixed_ortho"], MAIN_SEEDS),
    "adaptive_a0.1": (["--variant=adaptive_ortho", "--alpha=0.1"], MAIN_SEEDS),
    "allpairs": (["--variant=allpairs_ortho", "--allpairs_lambda2=0.3"], MAIN_SEEDS),
    "lambda0": (["--variant=adaptive_ortho", "--alpha=0.1", "--lambda2_max=0"], MAIN_SEEDS),
    **{f"adaptive_a{alpha}": (["--variant=adaptive_ortho", f"--alpha={alpha}"], SWEEP_SEEDS)
       for alpha in ("0", "0.05", "0.2", "0.3")},
    "nobias": (["--variant=adaptive_ortho", "--alpha=0.1", "--group_biases=false"], SWEEP_SEEDS),
    "long_topk": (["--variant=topk", f"--train_tokens={LONG_FACTOR * 400_000}"], SWEEP_SEEDS),
    "long_adaptive_a0.1": (["--variant=adaptive_ortho", "--alpha=0.1",
                            f"--train_tokens={LONG_FACTOR * 400_000}"], SWEEP_SEEDS),
}


COMPARED = tuple(SETTINGS)[:5]  # the pre-registered comparisons' settings; the rest are descriptive
RUNS = "runs"  # the study's run folders, apart from the repository's own run_0 and a user's runs


def run_name(label: str, seed: int) -> str:
    return f"{RUNS}/{label}_s{seed}"


def manifest() -> dict:
    """{out_dir: experiment.py arguments} for every run of the study: the five compared settings seed
    by seed, then the descriptive ones seed by seed."""
    order = [(seed, label) for part in (COMPARED, tuple(SETTINGS)[5:])
             for seed in MAIN_SEEDS for label in part if seed in SETTINGS[label][1]]
    return {run_name(label, seed): [f"--out_dir={run_name(label, seed)}", *SETTINGS[label][0],
                                    f"--seed={seed}", *COMMON] for seed, label in order}


# The pre-registered family (RESULTS.md, "Pre-registered comparisons"): differences of setting means paired
# by seed; the conditional − static clamp for GATED; the best compared setting − each non-SAE control.
CONTRASTS = [("adaptive_a0.1", "topk"), ("fixed", "topk"), ("adaptive_a0.1", "fixed"),
             ("allpairs", "topk"), ("lambda0", "topk")]
GATED = ("topk", "fixed", "adaptive_a0.1")
NAMES = {"topk": "topk", "fixed": "fixed_ortho", "adaptive_a0.1": "adaptive α=0.1",
         "allpairs": "allpairs λ2=0.3", "lambda0": "λ2=0 ablation"}
# endpoint: (score, the conditional clamp's score or None, {control: its score}), results.flatten names
ENDPOINTS = {
    "held-out score": ("held_out_score", "conditional_score",
                       {"difference of means": "dom_score", "LEACE": "leace_score"}),
    "question-answer text (secondary)": ("qa_score", None,
                                         {"difference of means": "qa_dom_score", "LEACE": "qa_leace_score"}),
}


def seed_scores(runs: dict, label: str, metric: str) -> dict:
    """{seed: metric} of one setting's finished runs that have the metric ({name: flattened run})."""
    return {seed: runs[name][metric] for seed in MAIN_SEEDS
            if (name := run_name(label, seed)) in runs and runs[name][metric] is not None}


def setting_runs(runs: dict, label: str) -> list:
    """One setting's finished runs, by seed."""
    return [runs[name] for seed in MAIN_SEEDS if (name := run_name(label, seed)) in runs]


def testable(table: dict) -> bool:
    """Whether a {row: {seed: score}} table has the two shared seeds a pooled test needs."""
    return len(set.intersection(*(set(scores) for scores in table.values()))) >= 2


def control_value(runs: dict, metric: str) -> float:
    """A non-SAE control's score: it does not depend on the SAE, so every run must carry the same one."""
    values = {name: r[metric] for name, r in runs.items() if r.get(metric) is not None}
    if not values or max(values.values()) - min(values.values()) > 1e-9 * max(1.0, abs(min(values.values()))):
        raise ValueError(f"{metric} should be one number over the study's runs: {values}")
    return next(iter(values.values()))


def family_table(runs: dict, endpoint: str) -> dict:
    """{row: {seed: score}} of the two-way table: the compared settings' scores, and the gated settings'
    conditional-clamp scores where the endpoint has them."""
    return {row: seed_scores(runs, row.split(" ")[0], metric) for row, metric in family_rows(endpoint).items()}


def contrast_family(runs: dict, endpoint: str) -> dict:
    """The pre-registered family on one endpoint: study_stats.pooled_contrasts over the compared (and
    gated) settings' shared seeds, the best compared setting − each control (constant_contrast), Holm
    over all of them."""
    score, conditional, controls = ENDPOINTS[endpoint]
    table = family_table(runs, endpoint)
    pairs = list(CONTRASTS) + ([(f"{label} conditional", label) for label in GATED] if conditional else [])
    out = study_stats.pooled_contrasts(table, pairs)
    seeds = out["seeds"]
    best = max(COMPARED, key=lambda label: np.mean([table[label][s] for s in seeds]))
    rows = out["contrasts"] + [study_stats.constant_contrast(best, {s: table[best][s] for s in seeds}, name,
                                                             control_value(runs, metric))
                               for name, metric in controls.items()]
    return out | {"contrasts": study_stats.holm(rows), "best": best,
                  "bounded": bounded_rows(runs, family_rows(endpoint), seeds)}


def bounded_rows(runs: dict, rows: dict, seeds: list) -> set:
    """The rows ({row: results.flatten score}) with a lower bound among the seeds' scores."""
    return {row for row, metric in rows.items() for s in seeds
            if runs[run_name(row.split(" ")[0], s)].get(bound_field(metric))}


def bound_field(metric: str) -> str:
    """The results.flatten flag saying a score is a lower bound ("qa_score" → "qa_lower_bound")."""
    return metric.replace("_score", "_lower_bound")


def family_rows(endpoint: str) -> dict:
    """{row of the endpoint's two-way table: the results.flatten score it holds}."""
    score, conditional, _ = ENDPOINTS[endpoint]
    return {label: score for label in COMPARED} | (
        {f"{label} conditional": conditional for label in GATED} if conditional else {})


# the per-setting table's columns: (results.flatten field, its lower-bound flag or None, header)
COLUMNS = [("held_out_score", "held_out_lower_bound", "held-out score"),
           ("conditional_score", "conditional_lower_bound", "conditional clamp"),
           ("conditional_auroc", None, "its detector's AUROC"),
           ("random_score", "random_lower_bound", "random features"),
           ("over_random_score", None, "score − random features"),
           ("qa_score", "qa_lower_bound", "question-answer text"),
           ("conv_ev_typical", None, "EV (outliers dropped)"), ("val_ev", None, "val EV")]


def _stat(values: list, bound: bool, digits: int = 3) -> str:
    """mean ± sample std; ≥ when some value is a lower bound."""
    if not values:
        return "n/a"
    spread = f" ± {np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else ""
    return f"{'≥ ' if bound else ''}{np.mean(values):.{digits}f}{spread}"


def _cell(runs: list, field: str, flag, digits: int = 3) -> str:
    """_stat over the runs (one per seed) that have the field."""
    have = [r for r in runs if r[field] is not None]
    return _stat([r[field] for r in have], bool(flag) and any(r[flag] for r in have), digits)


def _thresholds(runs: list) -> str:
    """How often each retain threshold was chosen (on the selection split) over the runs."""
    counts = collections.Counter(r["retain_threshold"] for r in runs if r["retain_threshold"] is not None)
    return ", ".join(f"{th:g} ×{n}" for th, n in sorted(counts.items())) or "n/a"


def display(label: str) -> str:
    """A row label as the tables print it ("adaptive_a0.1 conditional" → "adaptive α=0.1 conditional")."""
    return " ".join(NAMES.get(part, part) for part in label.split(" "))


BOUND_NOTE = ("†: a seed's score in a row of this contrast is a lower bound (≥), entered as its value as "
              "pre-registered; the contrast's CI and p treat it as measured.")


def _contrast_name(r: dict, bounded=()) -> str:
    return f"{display(r['a'])} − {display(r['b'])}" + (" †" if {r["a"], r["b"]} & set(bounded) else "")


def _contrast_lines(rows: list, bounded=()) -> list:
    lines = ["| contrast | estimate (nats) | 95% CI | t (df) | p | p, Holm | survives Holm |",
             "|---|---|---|---|---|---|---|"] + [
        f"| {_contrast_name(r, bounded)} | {r['estimate']:+.3f} | [{r['ci95'][0]:+.3f}, "
        f"{r['ci95'][1]:+.3f}] | {r['t']:.2f} ({r['df']}) | {r['p']:.3g} | {r['p_holm']:.3g} | "
        f"{'yes' if r['significant'] else 'no'} |" for r in rows]
    return lines + (["", BOUND_NOTE] if any({r["a"], r["b"]} & set(bounded) for r in rows) else [])


def _family_markdown(runs: dict, endpoint: str) -> str:
    table = family_table(runs, endpoint)
    seeds = {label: sorted(scores) for label, scores in table.items()}
    if not testable(table):
        return (f"**{endpoint}**: no test yet: it needs seeds that every row of its table has, two at least "
                f"(eight pre-registered). Seeds so far: "
                + "; ".join(f"{display(label)} {s}" for label, s in seeds.items()) + ".")
    fam = contrast_family(runs, endpoint)  # a control that differs between runs is an error, not a note
    interim = ("" if len(fam["seeds"]) == len(MAIN_SEEDS) else
               f" INTERIM: {len(fam['seeds'])} of the {len(MAIN_SEEDS)} pre-registered seeds; "
               f"not the pre-registered test.")
    head = (f"**Pre-registered contrasts, {endpoint}.** Seeds {fam['seeds']} (those every compared setting "
            f"has).{interim} Pooled residual variance {fam['residual_variance']:.4f} on {fam['df']} df: "
            f"SE of a paired contrast {fam['se']:.3f}. Control contrasts: one-sample t over the best setting's "
            f"seeds ({display(fam['best'])}), the control taken as a constant. Holm over the "
            f"{len(fam['contrasts'])} contrasts. The CIs are over training seeds: every run is scored on the "
            f"same evaluation text.")
    return "\n".join([head, "", *_contrast_lines(fam["contrasts"], fam["bounded"])])


def interval_text(stat: tuple, digits: int, bound: str = "", signed: bool = False) -> str:
    """A study_stats.ci95 triple as "mean [low, high]" ("mean" alone with one seed); signed: "+" on
    non-negative numbers, as for a difference."""
    mean, half, _ = stat
    fmt = f"{'+' if signed else ''}.{digits}f"
    return f"{bound}{mean:{fmt}}" + ("" if half is None else f" [{mean - half:{fmt}}, {mean + half:{fmt}}]")


def _contrast_text(r: dict, bounded=()) -> str:
    return (f"{_contrast_name(r, bounded)} {r['estimate']:+.3f} [{r['ci95'][0]:+.3f}, "
            f"{r['ci95'][1]:+.3f}] (p, Holm {r['p_holm']:.3g})")


def _endpoint_findings(runs: dict, endpoint: str) -> list:
    """Which pre-registered contrasts survive Holm and which do not; the compared settings ordered by
    their mean over the family's seeds; how many settings' means exceed each non-SAE control."""
    if not testable(family_table(runs, endpoint)):
        return [f"- **{endpoint}**: no test yet (it needs two seeds that every compared setting has)."]
    fam = contrast_family(runs, endpoint)
    survive = [r for r in fam["contrasts"] if r["significant"]]
    rest = [r for r in fam["contrasts"] if not r["significant"]]
    interim = ("" if len(fam["seeds"]) == len(MAIN_SEEDS) else
               f" (INTERIM: seeds {fam['seeds']}, not the pre-registered test)")
    score = ENDPOINTS[endpoint][0]
    means = {label: float(np.mean([seed_scores(runs, label, score)[s] for s in fam["seeds"]]))
             for label in COMPARED}
    order = sorted(COMPARED, key=lambda label: -means[label])
    controls = [f"{name} (no SAE) {value:.3f}: {sum(means[label] > value for label in COMPARED)} of the "
                f"{len(COMPARED)} settings' means above it"
                for name, value in ((name, control_value(runs, metric))
                                    for name, metric in ENDPOINTS[endpoint][2].items())]
    text = lambda rows: "; ".join(_contrast_text(r, fam["bounded"]) for r in rows)
    return [f"- **{endpoint}**{interim}: {len(survive)} of the {len(fam['contrasts'])} pre-registered "
            f"contrasts survive Holm" + (": " + text(survive) if survive else "")
            + ". Not surviving: " + (text(rest) or "none") + "."
            + (" " + BOUND_NOTE if any({r["a"], r["b"]} & fam["bounded"] for r in fam["contrasts"]) else ""),
            "  Settings by mean: " + " > ".join(f"{display(label)} {means[label]:.3f}" for label in order)
            + ". " + "; ".join(controls) + "."]


def _long_training_findings(runs: dict) -> str:
    """adaptive α=0.1 − topk, paired by seed, at the default length and at LONG_FACTOR× the tokens (seeds
    both lengths have), with each setting's validation EV."""
    longer = f"{LONG_FACTOR}× tokens"
    pairs = {"default length": ("adaptive_a0.1", "topk"), longer: ("long_adaptive_a0.1", "long_topk")}
    n_long = sum(run_name(label, seed) in runs for label in pairs[longer] for seed in SWEEP_SEEDS)
    long_seeds = [s for s in SWEEP_SEEDS if all(run_name(label, s) in runs for pair in pairs.values()
                                                for label in pair)]
    if len(long_seeds) < 2:
        return (f"- **Longer training**: {n_long} of the {2 * len(SWEEP_SEEDS)} runs at {longer} finished; "
                f"no comparison yet.")
    parts = []
    for length, (a, b) in pairs.items():
        score = lambda label, seed: runs[run_name(label, seed)]["held_out_score"]
        gain = study_stats.ci95([score(a, s) - score(b, s) for s in long_seeds])
        ev = [float(np.mean([runs[run_name(label, s)]["val_ev"] for s in long_seeds])) for label in (a, b)]
        parts.append(f"{length} {interval_text(gain, 3, signed=True)} (val EV {ev[0]:.3f} and {ev[1]:.3f})")
    return (f"- **Longer training** (descriptive; seeds {long_seeds}): adaptive α=0.1 − topk held-out "
            f"score, paired by seed, mean [95% CI]: " + "; ".join(parts) + ".")


def findings_markdown(runs: dict) -> str:
    """The generated findings ({manifest name: flattened run}): per endpoint what survives Holm, the order
    of the settings and the controls; the conditional clamp's detector AUROC; the longer training."""
    auroc = {label: [r["conditional_auroc"] for r in setting_runs(runs, label) if r["conditional_auroc"]]
             for label in GATED}
    lines = ["**Findings** (generated from the runs; estimates in nats/token with 95% CIs over training seeds, "
             "every run scored on the same evaluation text)."]
    for endpoint in ENDPOINTS:
        lines += _endpoint_findings(runs, endpoint)
    if all(auroc.values()):
        lines.append("- **Conditional clamp**: its detector (`rate_groups`) tells forget from retain tokens "
                     "on the report split with AUROC " + ", ".join(
                         f"{np.mean(values):.3f} ({display(label)})" for label, values in auroc.items())
                     + " (seed means; 1 = the two text sources apart).")
    lines += [line for line in (_sensitivity_findings(runs), _long_training_findings(runs)) if line]
    return "\n".join(lines)


def _exploratory_markdown(runs: dict) -> str:
    """What the held-out score is made of; added after interim looks at the first realization (on
    BIG-bench's articles), so not pre-registered: per setting the retain threshold chosen, and every sweep
    config's point on the selection split (where no choice between configs is made); the pre-registered
    SAE contrasts on the score with the static rows' pooled variance alone, and on score − random features
    (features drawn from the chosen threshold's eligible pool), Holm within each; later additions: the
    rare-latent census and the multiplier each score is read at."""
    configs = sorted({c for r in runs.values() for c in r["config_scores"]},
                     key=lambda c: tuple(map(float, c.split("/"))))
    lines = ["| setting | seeds | retain threshold chosen | " + " | ".join(configs) + " |",
             "|---|---|---|" + "---|" * len(configs)]
    for label in SETTINGS:
        rs = setting_runs(runs, label)
        points = [[r["config_scores"][c] for r in rs if r["config_scores"].get(c, (None,))[0] is not None]
                  for c in configs]
        if rs:
            lines.append(f"| {display(label)} | {len(rs)} | {_thresholds(rs)} | "
                         + " | ".join(_stat([v for v, _ in p], any(b for _, b in p)) for p in points) + " |")
    head = ("**Exploratory (not pre-registered; added after an interim look at the first realization): "
            "what the score is made of.** Each sweep config (retain threshold / n features) read at the "
            "tolerance on the selection split, where no choice between configs is made: mean ± sample std "
            "over seeds, and how often each retain threshold won the selection.")
    census = ("**Rare latents** (exploratory, as above): how many of the SAE's latents fire on none of the "
              "rate split's tokens of a side, how many have a retain rate < 0.001 (the features at that "
              "threshold are chosen from these), and how many training counted dead (no firing in its last "
              "dead_window_tokens); mean ± sample std over seeds.")
    multipliers = ("**The multiplier each score is read at** (exploratory, added after an interim look "
                   "at the first realization): the clamp's knob where the report split's retain ΔCE meets "
                   "the tolerance, median [min, max] over seeds. The conditional clamp edits only the "
                   "tokens its detector gates, so retain text pays for a larger multiplier only through the "
                   "gate's false positives: the table shows how far each multiplier went, and ρ whether the "
                   "score follows it.")
    parts = [head, "\n".join(lines), census, _census_table(runs), multipliers, _knob_table(runs)]
    for metric, what in (("held_out_score", "the held-out score, its variance pooled over the five static "
                                            "rows only (the pre-registered table adds the three conditional "
                                            "rows)"),
                         ("over_random_score", "score − random features")):
        if fam := static_family(runs, metric):
            parts += [f"The pre-registered SAE contrasts on {what}, seeds {fam['seeds']}: pooled residual "
                      f"variance {fam['residual_variance']:.4f} on {fam['df']} df, SE of a paired contrast "
                      f"{fam['se']:.3f}; Holm over these {len(fam['contrasts'])} only.",
                      "\n".join(_contrast_lines(fam["contrasts"], fam["bounded"]))]
    if fam := conditional_paired(runs):
        spreads = ", ".join(f"{display(row)} {spread:.3f}" for row, spread in fam["spreads"].items())
        parts += [f"Conditional − static clamp, each as a paired t-test on its own per-seed differences (df "
                  f"{len(fam['seeds']) - 1}), Holm over these three, seeds {fam['seeds']}: the "
                  f"pre-registered table pools one residual variance over rows whose sample std over seeds "
                  f"differ ({spreads}).",
                  "\n".join(_contrast_lines(fam["contrasts"], fam["bounded"]))]
    return "\n\n".join(parts)


def static_family(runs: dict, metric: str) -> "dict | None":
    """The pre-registered SAE contrasts on one score with the variance pooled over the five static rows
    alone (study_stats.pooled_contrasts), with the rows holding a lower bound; None without two shared
    seeds."""
    table = {label: seed_scores(runs, label, metric) for label in COMPARED}
    if not testable(table):
        return None
    fam = study_stats.pooled_contrasts(table, CONTRASTS)
    return fam | {"bounded": bounded_rows(runs, {label: metric for label in COMPARED}, fam["seeds"])}


def conditional_paired(runs: dict) -> "dict | None":
    """Conditional − static clamp per gated setting as a paired t-test on its own per-seed differences
    (study_stats.constant_contrast of the differences against 0, df S − 1), Holm over the three, on the
    seeds the pre-registered table shares; with each row's sample std over those seeds. None without two
    shared seeds."""
    endpoint = next(iter(ENDPOINTS))
    table = family_table(runs, endpoint)
    if not testable(table):
        return None
    seeds = sorted(set.intersection(*(set(scores) for scores in table.values())))
    rows = study_stats.holm([study_stats.constant_contrast(
        f"{label} conditional", {s: table[f"{label} conditional"][s] - table[label][s] for s in seeds},
        label, 0.0) for label in GATED])
    return {"seeds": seeds, "contrasts": rows,
            "bounded": bounded_rows(runs, family_rows(endpoint), seeds),
            "spreads": {row: float(np.std([table[row][s] for s in seeds], ddof=1)) for row in table}}


def _sensitivity_findings(runs: dict) -> str:
    """Which contrasts survive Holm in the two exploratory re-analyses of the held-out score."""
    survivors = lambda fam: ", ".join(_contrast_name(r, fam["bounded"]) for r in fam["contrasts"]
                                      if r["significant"]) or "none"
    static, paired = static_family(runs, "held_out_score"), conditional_paired(runs)
    if not (static and paired):
        return ""
    spreads = paired["spreads"].values()
    return ("- **Sensitivity** (exploratory, not pre-registered; RESULTS.md): the pre-registered test pools "
            f"one residual variance over rows whose sample std over seeds runs from {min(spreads):.3f} to "
            f"{max(spreads):.3f}. With the five SAE contrasts pooled over the static rows alone, surviving "
            f"Holm: {survivors(static)}. With conditional − static as paired t-tests on their own "
            f"differences, surviving Holm: {survivors(paired)}.")


CENSUS = [("silent_forget", "silent on forget text"), ("silent_retain", "silent on retain text"),
          ("retain_below_0.001", "retain rate < 0.001"), ("dead_latents", "dead in training")]


def _census_table(runs: dict) -> str:
    lines = ["| setting | seeds | " + " | ".join(header for _, header in CENSUS) + " |",
             "|---|---|" + "---|" * len(CENSUS)]
    for label in SETTINGS:
        if rs := setting_runs(runs, label):
            lines.append(f"| {display(label)} | {len(rs)} | "
                         + " | ".join(_cell(rs, field, None, digits=0) for field, _ in CENSUS) + " |")
    return "\n".join(lines)


KNOBS = [("held_out_knob", "held_out_score", "held_out_lower_bound", "static"),
         ("conditional_knob", "conditional_score", "conditional_lower_bound", "conditional")]


def _knob_cell(runs: list, knob: str, bound: str) -> str:
    """median [min, max] over seeds; ≥ when some seed's point is a lower bound (the multiplier too)."""
    have = [r for r in runs if r[knob] is not None]
    if not have:
        return "n/a"
    values = [r[knob] for r in have]
    edge = "≥ " if any(r[bound] for r in have) else ""
    return f"{edge}{np.median(values):.0f} [{min(values):.0f}, {max(values):.0f}]"


def _knob_table(runs: dict) -> str:
    """Per setting, the multiplier each score is read at, static and conditional; then Spearman's ρ between
    multiplier and score over every run with both (scipy.stats.spearmanr)."""
    lines = ["| setting | seeds | " + " | ".join(f"{name} multiplier" for *_, name in KNOBS) + " |",
             "|---|---|" + "---|" * len(KNOBS)]
    for label in SETTINGS:
        if rs := setting_runs(runs, label):
            lines.append(f"| {display(label)} | {len(rs)} | "
                         + " | ".join(_knob_cell(rs, knob, bound) for knob, _, bound, _ in KNOBS) + " |")
    rhos = []
    for knob, score, _, name in KNOBS:
        pairs = [(r[knob], r[score]) for r in runs.values()
                 if r[knob] is not None and r[score] is not None]
        if len(pairs) > 2 and all(len(set(side)) > 1 for side in zip(*pairs)):  # ρ needs two values a side
            rhos.append(f"{name} {spearmanr(*zip(*pairs)).statistic:.2f} ({len(pairs)} runs)")
    return "\n".join(lines) + ("\n\nSpearman's ρ between the multiplier and the score it is read at, over "
                               "the runs: " + "; ".join(rhos) + "." if rhos else "")


def results_section(runs: dict) -> str:
    """The study's part of the generated results block ({manifest name: results.flatten of a finished
    run}): how far it is, the findings, the pre-registered families, every setting's scores beside the
    controls, and the exploratory part."""
    if not runs:
        return ""
    done = f"**Study v3**: {len(runs)} of the {len(manifest())} runs of `python study.py --list` finished."
    table = ["| setting | seeds | " + " | ".join(c[2] for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for label in SETTINGS:
        rs = setting_runs(runs, label)
        if rs:
            table.append(f"| {display(label)} | {len(rs)} | "
                         + " | ".join(_cell(rs, *c[:2]) for c in COLUMNS) + " |")
    controls = "; ".join(f"{endpoint}: " + ", ".join(
        f"{name} {_cell(list(runs.values()), metric, bound_field(metric))}"
        for name, metric in ENDPOINTS[endpoint][2].items()) for endpoint in ENDPOINTS)
    caption = ("**Every setting beside the controls.** Mean ± sample std over seeds (nats/token; ≥: some "
               "seed's value is a lower bound, counted as its value). The conditional clamp uses the "
               "rate_groups detector, for every SAE; its AUROC separates forget from retain tokens on the "
               "report split (1 = the two text sources apart). Non-SAE controls (the same for every run): "
               + controls + ".")
    return "\n\n".join([done, findings_markdown(runs), *(_family_markdown(runs, e) for e in ENDPOINTS),
                         caption, "\n".join(table),
                         _exploratory_markdown(runs)])


def headline_section(runs: dict) -> str:
    """The README's part of the study ({manifest name: flattened run}): how far it is and the generated
    findings; the tables are in RESULTS.md."""
    if not runs:
        return ""
    done = (f"**Study v3**: {len(runs)} of the {len(manifest())} runs finished. Every setting beside the "
            f"controls, the secondary endpoint and the exploratory analyses: [RESULTS.md](RESULTS.md).")
    return "\n\n".join([done, findings_markdown(runs)])


def state(out_dir: Path) -> str:
    if (out_dir / "final_info.json").exists():
        return "finished"
    return "unfinished" if (out_dir / "checkpoints" / "last.pt").exists() else "missing"


def main(argv=None) -> list:
    """Runs what is not finished (in manifest order), then plot.py --results --readme; returns the out_dirs
    run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="print the manifest and each run's state")
    parser.add_argument("--only", nargs="+", help="these out_dirs of the manifest only")
    args = parser.parse_args(argv)
    runs = manifest()
    unknown = set(args.only or ()) - set(runs)
    if unknown:
        parser.error(f"not in the manifest: {', '.join(sorted(unknown))} (python study.py --list)")
    chosen = {name: a for name, a in runs.items() if args.only is None or name in args.only}
    if args.list:
        for name, a in chosen.items():
            print(f"{state(HERE / name):10} python experiment.py {' '.join(a)}")
        return []
    todo = [name for name in chosen if state(HERE / name) != "finished"]
    for i, name in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] python experiment.py {' '.join(chosen[name])}", flush=True)
        subprocess.run([sys.executable, "experiment.py", *chosen[name]], cwd=HERE, check=True)
    subprocess.run([sys.executable, "plot.py", "--results=RESULTS.md", "--readme=README.md"], cwd=HERE,
                   check=True)
    return todo


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:  # the run printed its own error; rerun to resume
        sys.exit(f"study: stopped at `{' '.join(map(str, e.cmd[1:]))}` (exit {e.returncode}); "
                 f"python study.py resumes it")
