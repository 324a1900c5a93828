"""Figures and a results table from finished runs (issue #5).

    python plot.py [RUN_DIR_OR_GLOB ...] [--out_dir=plots]

Reads each run folder's final_info.json and train_log.jsonl; default: every run_* folder beside this file. Runs are
grouped by what makes their numbers comparable (model, layer, corpora, token budget, dict_size, k, context length,
data seed): a figure only ever shows one group, and its file name ends in the group's label. Nothing else in a run
folder is read (run_0's SAE-Bench reference numbers are another model's and stay out of every comparison).
Writes tradeoff_, alpha_sweep_, training_ and unlearning_curves_<group>.png and results.md into out_dir, and prints
the grouping and the tables.
"""
import argparse
import glob
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_LAMBDA2 = 1000.0  # experiment.py's --lambda2_max default; other values are named in the setting label
METRICS = {  # run field: (table column, axis label with units)
    "val_ev": ("val EV", "validation explained variance (fraction)"),
    "conv_ev": ("EV conventional", "explained variance, conventional (fraction)"),
    "ce_loss_score": ("ce_loss_score", "CE-loss score (fraction of CE recovered)"),
    "l0": ("L0", "L0 (active latents per token)"),
    "cross_cos": ("cross-group |cos| mean", "cross-group |cos| mean (unitless)"),
    "nn_cos": ("nearest-neighbour |cos| mean", "decoder rows' max |cos| to another row, mean (unitless)"),
    "absorption": ("mean absorption fraction", "SAE-Bench mean absorption fraction (lower is better)"),
    "kappa_forget": ("κ forget", "κ forget group (σmax/σmin)"),
    "kappa_retain": ("κ retain", "κ retain group (σmax/σmin)"),
    "held_out_score": ("held-out score (nats)", "forget ΔCE at retain ΔCE = tolerance, held out (nats/token)"),
    "text_score": ("text score (nats)", "text score (nats/token)"),
    "mcq": ("MCQ score", "MCQ score (1 − forget accuracy)"),
}
TEXT_SCORE = "text score = largest forget ΔCE among the sweep's configs whose retain ΔCE ≤ tolerance"
SWEEP_METRICS = ["val_ev", "conv_ev", "ce_loss_score", "held_out_score", "text_score", "mcq", "cross_cos", "nn_cos", "absorption",
                 "kappa_forget", "kappa_retain"]
LOG_SCALE = {"kappa_forget", "kappa_retain"}
SECTIONS = ["core evaluation results", "knowledge separation results", "provenance"]  # final_info.json needs these


# -----------------------------------------------------------------------------
# Reading runs


def find_run_dirs(args: list) -> list:
    """Folders named on the command line (globs expanded), or every run_* beside this file."""
    if not args:
        return sorted((p for p in HERE.glob("run_*") if p.is_dir()), key=natural_key)
    dirs = []
    for arg in args:
        matches = sorted(glob.glob(arg), key=natural_key) if glob.has_magic(arg) else [arg]
        if not matches:
            print(f"skip {arg}: matches nothing")
        for m in map(Path, matches):
            if not m.is_dir():
                print(f"skip {m}: not a directory")
            elif m.resolve() not in {d.resolve() for d in dirs}:
                dirs.append(m)
    return dirs


def natural_key(path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def read_log(path: Path):
    """train_log.jsonl as a list of records, None when the run has none."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else None


def comparability_key(cfg: dict, provenance: dict) -> dict:
    """What two runs must share for their numbers to go on one axis."""
    corpus = lambda c: f"{c['name']} {c['version']} ({c['n_documents']} docs)"
    return {"model": provenance["model"]["name"], "layer": cfg["layer"],
            "forget corpus": corpus(provenance["forget_corpus"]), "retain corpus": corpus(provenance["retain_corpus"]),
            "train tokens": f"{cfg['train_tokens']} x {cfg['epochs']:g} epochs", "dict_size": cfg["dict_size"],
            "k": cfg["k"], "context length": cfg["context_length"], "data seed": cfg["data_seed"]}


def setting_label(separation: dict) -> str:
    """The variant, with its orthogonality target and λ2_max where they are not the defaults (α is kept apart)."""
    label = separation["variant"]
    if separation["variant"] == "adaptive_ortho" and separation["ortho_target"] != "partner":
        label += f"/{separation['ortho_target']}"
    if separation["variant"] != "topk" and separation["lambda2_max"] != DEFAULT_LAMBDA2:
        label += f" λ2={separation['lambda2_max']:g}"
    return label


def load_run(path: Path, name: str):
    """The numbers plot.py uses from one run folder, flat; None (and why) when it has no complete final_info.json."""
    if not (path / "final_info.json").is_file():
        print(f"skip {path}: no final_info.json (an unfinished run?)")
        return None
    info = json.loads((path / "final_info.json").read_text())
    missing = [s for s in SECTIONS if s not in info]
    if missing:
        print(f"skip {path}: final_info.json has no {', '.join(missing)} (written by an older experiment.py?)")
        return None
    training = next(v for k, v in info.items() if k.startswith("training results for layer"))
    cfg, core = training["config"], info["core evaluation results"]["metrics"]
    sep, provenance = info["knowledge separation results"], info["provenance"]
    run = {"name": name, "key": comparability_key(cfg, provenance), "variant": sep["variant"],
           "setting": setting_label(sep), "alpha": sep["alpha"] if sep["variant"] == "adaptive_ortho" else None,
           "seed": cfg["seed"], "batch_size": cfg["batch_size"],
           "val_ev": training["final_info"]["val_explained_variance"],
           "conv_ev": core["reconstruction_quality"]["explained_variance_conventional"],
           "ce_loss_score": core["model_performance_preservation"]["ce_loss_score"], "l0": core["sparsity"]["l0"],
           "cross_cos": sep["final"]["cross_abs_cos_mean"], "kappa_forget": sep["final"]["kappa_forget"],
           "kappa_retain": sep["final"]["kappa_retain"],
           "nn_cos": sep["geometry"]["all"]["mean"] if "geometry" in sep else None,
           "absorption": absorption_fraction(info), "wall_min": provenance["wall_time_s"] / 60,
           "early_stop_step": sep["early_stopping"]["step"] if sep["early_stopping"]["stopped"] else None,
           "log": read_log(path / "train_log.jsonl"), "notes": []}
    unlearning = info.get("unlearning evaluation results")
    scores = unlearning["eval_result_metrics"]["unlearning"] if unlearning else {}
    details = unlearning["eval_result_details"] if unlearning else {}
    run |= {"held_out_score": scores.get("held_out_score"),
            "text_score": scores.get("text_score"), "text_config": scores.get("text_score_config"),
            "ce_tolerance": scores.get("ce_tolerance"), "mcq": scores.get("unlearning_score"),
            "n_forget_questions": scores.get("n_forget_questions"),
            "sweep": details.get("sweep"), "group_sweep": details.get("forget_group_sweep")}
    if unlearning is None:
        run["notes"].append("no unlearning results, left out of the trade-off and unlearning figures")
    elif run["mcq"] is None:
        run["notes"].append(f"MCQ score not meaningful ({run['n_forget_questions']} forget questions survive), not plotted")
    if run["log"] is None:
        run["notes"].append("no train_log.jsonl, left out of the training curves")
    return run


def absorption_fraction(info: dict):
    """SAE-Bench's mean absorption fraction, where the run measured one (None if off or refused)."""
    result = info.get("absorption evaluation results") or {}
    return result["eval_result_metrics"]["mean"]["mean_absorption_fraction_score"] if "eval_result_metrics" in result \
        else None


def group_runs(runs: list) -> dict:
    """{label: runs} by comparability key; the label is model_L<layer>, numbered where two groups share it."""
    by_key = {}
    for run in runs:
        by_key.setdefault(tuple(run["key"].items()), []).append(run)
    bases = [re.sub(r"[^A-Za-z0-9._]+", "-", f"{dict(k)['model']}_L{dict(k)['layer']}") for k in by_key]
    return {base if bases.count(base) == 1 else f"{base}-{bases[:i].count(base) + 1}": group
            for i, (base, group) in enumerate(zip(bases, by_key.values()))}


def grouping_report(groups: dict) -> str:
    """Which runs went into which group, and the fields that set the groups apart."""
    lines = [f"{sum(map(len, groups.values()))} runs in {len(groups)} group(s); runs of different groups are never "
             f"drawn on one axis."]
    for label, runs in groups.items():
        key = ", ".join(f"{k} {v}" for k, v in runs[0]["key"].items())
        lines.append(f"- group {label}: {', '.join(r['name'] for r in runs)} ({key})")
    keys = [g[0]["key"] for g in groups.values()]
    differ = [f"{k} ({' / '.join(str(key[k]) for key in keys)})" for k in keys[0] if len({str(key[k]) for key in keys}) > 1]
    if differ:
        lines.append(f"- the groups differ in: {'; '.join(differ)}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Tables


def fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 1e4 else f"{value:.3g}"


def alpha_text(alpha) -> str:
    return "–" if alpha is None else f"{alpha:g}"  # α applies to adaptive_ortho only


def mean_std(values: list):
    """(mean, sample std) of the values that exist; std None for a single value; None when there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def fmt_mean_std(stats) -> str:
    if stats is None or stats[1] is None:
        return fmt(stats and stats[0])
    return f"{fmt(stats[0])} ± {fmt(stats[1])}"


def aggregate(runs: list) -> list:
    """One row per (setting, α): mean and std over seeds of every metric. Runs that repeat a seed (the same command
    again, e.g. at another commit) are averaged into one value for that seed first, so n and the std count seeds;
    "runs" lists one entry per seed ("run_5 + run_14" for a repeat)."""
    by_setting = {}
    for run in runs:
        by_setting.setdefault((run["setting"], run["alpha"]), {}).setdefault(run["seed"], []).append(run)
    def seed_mean(repeats: list, m: str):
        stats = mean_std([r[m] for r in repeats])
        return stats and stats[0]

    return [{"setting": setting, "alpha": alpha, "runs": [" + ".join(r["name"] for r in rs) for rs in seeds.values()],
             **{m: mean_std([seed_mean(rs, m) for rs in seeds.values()]) for m in METRICS}}
            for (setting, alpha), seeds in by_setting.items()]


def text_config(run: dict) -> str:
    c = run["text_config"]
    if run["sweep"] is None:
        return "no unlearning eval"
    if c is None:
        return f"no config within retain ΔCE ≤ {run['ce_tolerance']}"
    return (f"th {c['retain_threshold']:g}, {c['n_features']} feat., ×{c['multiplier']:g}, "
            f"retain ΔCE {c['retain_delta_ce']:.4f}")


def markdown_table(header: list, rows: list) -> str:
    line = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"  # a bare | ends a cell
    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(row) for row in rows])


def results_markdown(groups: dict, skipped: list) -> str:
    """The grouping, per group a table of runs and one of seed means ± std, and the per-run notes."""
    cols = [m for m in METRICS if m != "mcq"]
    parts = ["# Results", grouping_report(groups)]
    if skipped:
        parts.append("Skipped (no final_info.json, or an incomplete one): " + ", ".join(map(str, skipped)))
    for label, runs in groups.items():
        header = ["run", "variant", "α", "seed", *(METRICS[m][0] for m in cols), "text-score config", "MCQ score",
                  "wall time (min)"]
        rows = [[r["name"], r["setting"], alpha_text(r["alpha"]), r["seed"], *(fmt(r[m]) for m in cols), text_config(r),
                 fmt(r["mcq"]), f"{r['wall_min']:.1f}"] for r in runs]
        parts += [f"## Group {label}: runs", markdown_table(header, rows)]
        agg_rows = [[a["setting"], alpha_text(a["alpha"]), len(a["runs"]), ", ".join(a["runs"]),
                     *(fmt_mean_std(a[m]) for m in METRICS)] for a in aggregate(runs)]
        parts += [f"## Group {label}: mean ± std over seeds (sample std; none for one seed; repeats of a seed averaged first)",
                  markdown_table(["variant", "α", "n", "runs", *(METRICS[m][0] for m in METRICS)], agg_rows)]
        notes = {}
        for run in runs:
            for note in run["notes"]:
                notes.setdefault(note, []).append(run["name"])
        if notes:
            parts += [f"## Group {label}: notes",
                      "\n".join(f"- {note}: {', '.join(names)}" for note, names in notes.items())]
    return "\n\n".join(parts) + "\n"


# -----------------------------------------------------------------------------
# Figures: each takes one group's runs and a path, and returns the names of the runs it drew ([]: nothing written)


def setting_colors(runs: list) -> dict:
    """topk black, fixed_ortho grey, each adaptive setting its own colour."""
    settings = sorted({r["setting"] for r in runs}, key=lambda s: (not s.startswith("topk"), not s.startswith("fixed"), s))
    palette = iter(plt.cm.tab10.colors)
    return {s: "black" if s.startswith("topk") else "tab:gray" if s.startswith("fixed") else next(palette) for s in settings}


def run_colors(runs: list) -> dict:
    colors = plt.cm.tab10.colors if len(runs) <= 10 else plt.cm.tab20.colors
    return {r["name"]: colors[i % len(colors)] for i, r in enumerate(runs)}


def point_label(run: dict, runs: list) -> str:
    """Variant and α, and the seed where the group has several."""
    label = run["setting"] + (f" α={run['alpha']:g}" if run["alpha"] is not None else "")
    return label + (f" s{run['seed']}" if len({r["seed"] for r in runs}) > 1 else "")


def save(fig, path: Path, title: str) -> None:
    fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plain_ticks(axis, linthresh: float = 0.0) -> None:
    """Plain-number ticks at 1-2-3-5 steps on a log axis (symlog with linthresh > 0), set once the data are drawn;
    evenly spaced ones where fewer than two such steps fit."""
    lo, hi = axis.get_view_interval()
    steps = [m * 10.0 ** e for e in range(-6, 7) for m in (1, 2, 3, 5)]
    candidates = {0.0, *steps, *(-t for t in steps)} if linthresh else set(steps)
    ticks = sorted(t for t in candidates if lo <= t <= hi and (t == 0 or abs(t) >= linthresh / 2))
    if len(ticks) >= 2:
        axis.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    else:
        axis.set_major_locator(MaxNLocator(5))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_locator(NullLocator())


def label_points(ax, points: list) -> None:
    """Annotate (x, y, text) points, each label at the first of eight places around its point whose box overlaps
    no label placed before (points taken top to bottom), so that close points keep readable labels."""
    ax.figure.canvas.draw()  # fixes the axis limits, so data -> pixel positions are final
    renderer, placed = ax.figure.canvas.get_renderer(), []
    offsets = [(5, 4, "left"), (5, -11, "left"), (-5, 4, "right"), (-5, -11, "right"),
               (5, 14, "left"), (5, -21, "left"), (-5, 14, "right"), (-5, -21, "right")]
    for x, y, text in sorted(points, key=lambda p: -p[1]):
        for dx, dy, ha in offsets:
            note = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8, ha=ha)
            box = note.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed) or (dx, dy, ha) == offsets[-1]:
                placed.append(box)
                break
            note.remove()


def plot_tradeoff(runs: list, path: Path, label: str) -> list:
    """Unlearning effect (text score; MCQ where meaningful) against reconstruction quality, one point per run."""
    runs = [r for r in runs if r["sweep"] is not None]
    if not runs:
        print(f"{path.name}: not written, no run in group {label} has unlearning results")
        return []
    with_mcq = [r for r in runs if r["mcq"] is not None]
    ys = ["text_score"] + (["mcq"] if with_mcq else [])
    colors = setting_colors(runs)
    fig, axes = plt.subplots(len(ys), 2, figsize=(12, 4.8 * len(ys)), squeeze=False, sharey="row", layout="constrained")
    for row, y in enumerate(ys):
        for col, x in enumerate(["conv_ev", "ce_loss_score"]):
            ax = axes[row, col]
            shown = with_mcq if y == "mcq" else runs
            for run in shown:
                ax.scatter(run[x], run[y], color=colors[run["setting"]], s=45, zorder=3)
            ax.set_xlabel(METRICS[x][1] + "  → better")
            if col == 0:
                ax.set_ylabel(METRICS[y][1] + "  → better")
            ax.margins(0.25)
            label_points(ax, [(run[x], run[y], f"{run['name']}: {point_label(run, runs)}") for run in shown])
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=s) for s, c in colors.items()]
    fig.legend(handles=handles, title="variant", loc="outside lower center", ncols=len(handles))
    mcq_note = "" if with_mcq else "\nMCQ score not meaningful for any run (too few questions survive): not shown"
    save(fig, path, f"Unlearning vs reconstruction, group {label}\n{TEXT_SCORE}{mcq_note}")
    return [r["name"] for r in runs]


def plot_alpha_sweep(runs: list, path: Path, label: str) -> list:
    """Each key metric against α for adaptive_ortho (mean ± std over seeds), other variants as reference lines."""
    metrics = [m for m in SWEEP_METRICS if any(r[m] is not None for r in runs)]
    rows = aggregate(runs)
    colors = setting_colors(runs)
    alphas = [r["alpha"] for r in runs if r["alpha"] is not None] or [0.0, 1.0]
    pad = 0.05 * (max(alphas) - min(alphas)) or 0.05
    nrows = -(-len(metrics) // 3)
    fig, axes = plt.subplots(nrows, 3, figsize=(15, 3.6 * nrows), squeeze=False, layout="constrained")
    for ax, m in zip(axes.flat, metrics):
        for setting in colors:
            points = sorted((a["alpha"] or 0.0, *a[m]) for a in rows if a["setting"] == setting and a[m] is not None)
            if not points:
                continue
            n_seeds = sorted({len(a["runs"]) for a in rows if a["setting"] == setting and a[m] is not None})
            seeds = f"{n_seeds[0]}" if len(n_seeds) == 1 else f"{n_seeds[0]}–{n_seeds[-1]}"
            name = f"{setting} ({'1 seed' if n_seeds == [1] else f'mean ± std over {seeds} seeds'})"
            if setting.startswith("adaptive"):
                x, mean, std = zip(*points)
                ax.errorbar(x, mean, yerr=[s or 0 for s in std], color=colors[setting], marker="o", capsize=3, label=name)
            else:
                _, mean, std = points[0]
                ax.axhline(mean, color=colors[setting], ls="--" if setting.startswith("topk") else ":", label=name)
                if std:
                    ax.axhspan(mean - std, mean + std, color=colors[setting], alpha=0.12)
        ax.set(xlabel="α (cosine allowed to the matched partner)", ylabel=METRICS[m][1],
               xlim=(min(alphas) - pad, max(alphas) + pad))
        if m in LOG_SCALE:
            ax.set_yscale("log")
            plain_ticks(ax.yaxis)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(metrics):]:
        ax.remove()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)))
    notes = [TEXT_SCORE] + ([] if any(r["variant"] == "adaptive_ortho" for r in runs) else
                            ["no adaptive_ortho run in this group: reference lines only"]) + \
            ([] if "mcq" in metrics else ["MCQ score not meaningful for any run: not shown"])
    save(fig, path, f"α sweep, group {label}" + "".join(f"\n{n}" for n in notes))
    return [r["name"] for r in runs]


def smooth(values: np.ndarray, window: int = 20) -> np.ndarray:
    """Trailing mean over `window` steps (fewer at the start)."""
    cumulative = np.insert(np.cumsum(values), 0, 0.0)
    first = np.maximum(np.arange(len(values)) - window + 1, 0)
    return (cumulative[1:] - cumulative[first]) / (np.arange(1, len(values) + 1) - first)


def series(log: list, key: str) -> tuple:
    """(steps, values) of `key` over the records that have it, None as nan."""
    pairs = [(rec["step"], np.nan if rec[key] is None else rec[key]) for rec in log if key in rec]
    return tuple(np.array(v, dtype=float) for v in zip(*pairs)) if pairs else (np.array([]), np.array([]))


def separation_series(log: list, key: str) -> tuple:
    """(steps, values) of separation[key] at the regroups, None as nan."""
    seps = [rec["separation"] for rec in log if rec.get("separation")]
    return (np.array([s["step"] for s in seps], dtype=float),
            np.array([np.nan if s[key] is None else s[key] for s in seps], dtype=float))


def plot_training(runs: list, path: Path, label: str) -> list:
    """Loss terms, λ2(t), dead latents, validation EV, group κ and cross-group |cos| over steps, with events."""
    runs = [r for r in runs if r["log"] is not None]
    if not runs:
        print(f"{path.name}: not written, no run in group {label} has a train_log.jsonl")
        return []
    colors = run_colors(runs)
    panels = [("recon", "reconstruction loss ‖x − x̂‖²\n(input scaled to E‖x‖² = 1; 20-step mean)", "log"),
              ("auxk", "AuxK loss (normalised residual;\n20-step mean)", "linear"),
              ("ortho", "orthogonality loss L_ortho (per-pair mean\nsquared cosine deviation; 20-step mean)", "log"),
              ("lambda2", "λ2(t) (weight of L_ortho)", "linear"),
              ("dead_latents", "dead latents (count)", "linear"),
              ("val_explained_variance", "validation explained variance\n(fraction)", "linear"),
              ("kappa", "κ per group at regroups (σmax/σmin)", "log"),
              ("cross_abs_cos_mean", "cross-group |cos| mean at regroups", "linear")]
    fig, axes = plt.subplots(4, 2, figsize=(13, 15), sharex=True, layout="constrained")
    for ax, (key, ylabel, scale) in zip(axes.flat, panels):
        drawn = False
        for run in runs:
            color = colors[run["name"]]
            if key == "kappa":
                for group, ls in (("forget", "-"), ("retain", "--")):
                    steps, values = separation_series(run["log"], f"kappa_{group}")
                    ax.plot(steps, values, color=color, ls=ls, marker="o", ms=4)
                    drawn |= bool(np.isfinite(values).any())
                continue
            steps, values = separation_series(run["log"], key) if key == "cross_abs_cos_mean" else series(run["log"], key)
            if key in ("recon", "auxk", "ortho"):
                values = smooth(values)
            if scale == "log":
                values = np.where(values > 0, values, np.nan)
            sparse = key in ("val_explained_variance", "cross_abs_cos_mean")  # logged every 50 / 100 steps: markers
            ax.plot(steps, values, color=color, lw=1.2, marker="o" if sparse else None, ms=3)
            drawn |= bool(np.isfinite(values).any())
        ax.set_ylabel(ylabel)
        if scale == "log" and drawn:
            ax.set_yscale("log")
            plain_ticks(ax.yaxis)
        if not drawn:
            ax.text(0.5, 0.5, "not logged by these runs\n(topk has no orthogonality term)", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")
            ax.set_yticks([])
    regroup_steps = sorted({rec["step"] for r in runs for rec in r["log"] if rec.get("regrouped")})
    batch = {r["batch_size"] for r in runs}
    for ax in axes.flat:
        for step in regroup_steps:
            ax.axvline(step, color="0.6", ls=":", lw=0.8, zorder=0)
        for run in runs:
            if run["early_stop_step"] is not None:
                ax.axvline(run["early_stop_step"], color=colors[run["name"]], ls="-.", lw=1.5)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel(f"training step (batch of {min(batch):,} tokens)" if len(batch) == 1 else "training step")
    handles = [plt.Line2D([], [], color=colors[r["name"]], label=f"{r['name']}: {point_label(r, runs)}") for r in runs]
    handles += [plt.Line2D([], [], color="k", ls="-", marker="o", ms=4, label="κ forget group"),
                plt.Line2D([], [], color="k", ls="--", marker="o", ms=4, label="κ retain group"),
                plt.Line2D([], [], color="0.6", ls=":", label="regroup"),
                plt.Line2D([], [], color="k", ls="-.", label="early stop (in the run's colour)")]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=9)
    save(fig, path, f"Training, group {label}")
    return [r["name"] for r in runs]


def plot_unlearning_curves(runs: list, path: Path, label: str) -> list:
    """Forget ΔCE against retain ΔCE over the clamping sweep: every config a point, each run's upper frontier its
    curve, the text score a star; a second panel for the ortho runs' sweep restricted to their own forget group."""
    runs = [r for r in runs if r["sweep"] is not None]
    if not runs:
        print(f"{path.name}: not written, no run in group {label} has unlearning results")
        return []
    colors = run_colors(runs)
    sweeps = [("sweep", "features chosen among all latents")]
    if any(r["group_sweep"] for r in runs):
        sweeps.append(("group_sweep", "features chosen within the SAE's forget group"))
    fig, axes = plt.subplots(1, len(sweeps), figsize=(8 * len(sweeps), 6.5), squeeze=False, sharex=True, sharey=True,
                             layout="constrained")
    for ax, (key, title) in zip(axes[0], sweeps):
        ax.set_xscale("symlog", linthresh=0.01)  # ΔCE can be ≤ 0
        ax.set_yscale("symlog", linthresh=0.1)
        for run in (r for r in runs if r[key]):
            x, y = np.array(sorted((row["retain_delta_ce"], row["forget_delta_ce"]) for row in run[key])).T
            ax.scatter(x, y, color=colors[run["name"]], s=14, alpha=0.45)
            ax.plot(x, np.maximum.accumulate(y), color=colors[run["name"]], label=f"{run['name']}: {point_label(run, runs)}")
            if key == "sweep" and run["text_config"] is not None:
                ax.scatter(run["text_config"]["retain_delta_ce"], run["text_score"], color=colors[run["name"]],
                           marker="*", s=180, edgecolor="k", zorder=4)
        for tolerance in sorted({r["ce_tolerance"] for r in runs}):
            ax.axvline(tolerance, color="k", ls=":", label=f"retain ΔCE tolerance ({tolerance:g} nats/token)")
        ax.set(title=title, xlabel="retain ΔCE (nats/token; axis linear below 0.01, log above)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("forget ΔCE (nats/token; axis linear below 0.1, log above)")
    for ax in axes[0]:
        plain_ticks(ax.xaxis, 0.01)
        plain_ticks(ax.yaxis, 0.1)
    axes[0, 0].scatter([], [], marker="*", s=180, color="w", edgecolor="k", label="text score (and the config it came from)")
    axes[0, 0].scatter([], [], s=14, color="0.5", label="one sweep config")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=9)
    save(fig, path, f"Unlearning sweep (retain threshold × n features × multiplier), group {label}\n"
                    f"curve = the run's best forget ΔCE up to that retain ΔCE")
    return [r["name"] for r in runs]


FIGURES = {"tradeoff": plot_tradeoff, "alpha_sweep": plot_alpha_sweep, "training": plot_training,
           "unlearning_curves": plot_unlearning_curves}


# -----------------------------------------------------------------------------


def main(argv=None) -> dict:
    """Write the figures and results.md; returns {"groups": {label: run names}, "figures": {file: run names}}."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", help="run folders or globs (default: every run_* beside plot.py)")
    parser.add_argument("--out_dir", default=str(HERE / "plots"), help="folder for the PNGs and results.md")
    args = parser.parse_args(argv)
    dirs = find_run_dirs(args.runs)
    names = [d.name for d in dirs]
    names = names if len(set(names)) == len(names) else [str(d) for d in dirs]
    loaded = [load_run(d, name) for d, name in zip(dirs, names)]
    runs = [run for run in loaded if run is not None]
    if not runs:
        raise SystemExit("no finished run (a folder with a complete final_info.json) to plot")
    skipped = [d for d, run in zip(dirs, loaded) if run is None]
    groups = group_runs(runs)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    for label, group in groups.items():
        for prefix, plot in FIGURES.items():
            path = out / f"{prefix}_{label}.png"
            path.unlink(missing_ok=True)  # a figure this group no longer has must not outlive it
            if drawn := plot(group, path, label):
                figures[path.name] = drawn
    table = results_markdown(groups, skipped)
    (out / "results.md").write_text(table)
    print(table)
    print(f"wrote {', '.join(figures)} and results.md to {out}")
    return {"groups": {label: [r["name"] for r in group] for label, group in groups.items()}, "figures": figures}


if __name__ == "__main__":
    main()
