"""plot.py on synthetic run folders: built from run_0's real final_info.json and train_log.jsonl (for the
structure), with every plotted value set here."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PathCollection
from PIL import Image

import plot

RUN_0 = Path(__file__).resolve().parent.parent / "run_0"
TEMPLATE = json.loads((RUN_0 / "final_info.json").read_text())
LOG_TEMPLATE = [json.loads(line) for line in (RUN_0 / "train_log.jsonl").read_text().splitlines()[:100]]
PER_RUN_FIGURES = ["tradeoff", "training", "unlearning_curves"]


def point(score, lower_bound=False, se=None) -> dict:
    """One score point of the unlearning metrics (the conditional clamp's, a control's)."""
    return {"score": score, "score_se": se, "lower_bound": lower_bound}


def write_run(folder: Path, variant="topk", alpha=0.0, seed=0, layer=15, val_ev=0.75, mcq=None,
              unlearning=True, log=True, early_stop=None, steps=250, held_out=None, held_out_se=None,
              typical_ev=None, separation=None, lower_bound=None, v3=None):
    """A finished run as experiment.py writes it, with the given values. held_out, held_out_se,
    lower_bound (held_out_lower_bound) and typical_ev (EV conventional without outliers) are written
    only when given, as an older run lacks them; `v3` (conditional, controls, n_lower_bounds) is merged
    into the unlearning metrics; `separation` into the knowledge separation results (e.g. lambda2_max,
    lambda2_default, group_biases). The sweep's forget ΔCE rises to held_out (0.5 without)."""
    info = copy.deepcopy(TEMPLATE)
    training = info.pop("training results for layer 15")
    training["config"] |= {"layer": layer, "seed": seed, "variant": variant, "alpha": alpha}
    training["final_info"]["val_explained_variance"] = val_ev
    sep = info["knowledge separation results"]
    ortho = variant != "topk"
    sep |= {"variant": variant, "alpha": alpha if variant == "adaptive_ortho" else 0.0,
            "ortho_target": "partner" if variant == "adaptive_ortho" else None,
            "lambda2_max": 1000.0 if ortho else 0.0, "lambda2_default": 1000.0,
            "group_biases": variant in ("fixed_ortho", "adaptive_ortho")}
    sep |= separation or {}
    sep["final"] |= {"kappa_forget": 100.0 + 10 * seed, "kappa_retain": 50.0,
                     "cross_abs_cos_mean": 0.05 - alpha / 10}
    sep["early_stopping"] |= {"applies": ortho, "stopped": early_stop is not None,
                              "step": early_stop or steps - 1}
    info["core evaluation results"]["metrics"]["reconstruction_quality"][
        "explained_variance_conventional"] = val_ev - 0.03
    info["core evaluation results"]["metrics"]["model_performance_preservation"][
        "ce_loss_score"] = 0.95 - alpha / 10
    info["core evaluation results"]["metrics"]["reconstruction_quality"].pop(
        "explained_variance_conventional_without_outliers")
    if typical_ev is not None:
        info["core evaluation results"]["metrics"]["reconstruction_quality"] |= {
            "explained_variance_conventional_without_outliers": typical_ev}
    unlearn = info.pop("unlearning evaluation results")
    if unlearning:
        scores = unlearn["eval_result_metrics"]["unlearning"]
        scores |= {"unlearning_score": mcq, "n_forget_questions": 0 if mcq is None else 40}
        # the template's v3 records go too: a run is an older one unless v3 (or held_out...) says otherwise
        for key in ("held_out_score", "held_out_score_se", "text_score", "text_score_config",
                    "held_out_lower_bound", "conditional", "controls", "n_lower_bounds"):
            scores.pop(key, None)
        scores.get("held_out", {}).get("report", {}).pop("curve", None)
        new = {"held_out_score": held_out, "held_out_score_se": held_out_se,
               "held_out_lower_bound": lower_bound}
        scores |= {k: v for k, v in new.items() if v is not None} | (v3 or {})
        details = unlearn["eval_result_details"]
        for i, row in enumerate(details["sweep"]):
            row |= {"forget_delta_ce": (held_out or 0.5) * (i + 1) / 8,
                    "retain_delta_ce": 0.005 * (i + 1)}
        if ortho:
            details["forget_group_sweep"] = [row | {"forget_delta_ce": 2 * row["forget_delta_ce"]}
                                             for row in details["sweep"]]
        info["unlearning evaluation results"] = unlearn
    info["provenance"] |= {"argv": [f"--out_dir={folder.name}"],
                           "code": {"git_commit": "0" * 40, "uncommitted_changes": False}}
    info = {f"training results for layer {layer}": training, **info}
    folder.mkdir(parents=True)
    (folder / "final_info.json").write_text(json.dumps(info))
    if log:
        last = early_stop if early_stop is not None else steps - 1
        lines = []
        for step in range(last + 1):
            rec = {k: v for k, v in LOG_TEMPLATE[step % 100].items()
                   if k not in ("separation", "val_recon", "val_explained_variance")}
            rec |= {"step": step, "recon": 0.3 / (1 + step / 50), "dead_latents": step % 7,
                    "regrouped": step % 100 == 99}
            if ortho:
                rec |= {"ortho": 1e-3 / (1 + step), "lambda2": 1000.0 * min(1.0, step / 300)}
            if rec["regrouped"]:
                rec["separation"] = LOG_TEMPLATE[99]["separation"] | {"step": step,
                                                                      "kappa_forget": 10.0 * (step + 1)}
            if step % 50 == 0:
                rec |= {"val_recon": 0.3, "val_explained_variance": val_ev * step / last if last else val_ev}
            lines.append(json.dumps(rec))
        (folder / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "run_1", "topk", held_out=1.2345)
    write_run(root / "run_2", "fixed_ortho", held_out=0.8, early_stop=180)
    write_run(root / "run_3", "adaptive_ortho", alpha=0.0, held_out=3.0, mcq=0.25)
    for seed, (val_ev, score) in enumerate([(0.70, 1.0), (0.72, 2.0), (0.77, 4.0)]):
        write_run(root / f"run_{4 + seed}", "adaptive_ortho", alpha=0.1, seed=seed, val_ev=val_ev,
                  held_out=score)
    write_run(root / "run_7", "adaptive_ortho", alpha=0.2, unlearning=False)
    write_run(root / "run_8", "adaptive_ortho", alpha=0.3, held_out=2.5, log=False)
    write_run(root / "run_9", "topk", layer=3, held_out=0.4)  # another layer: not comparable
    (root / "run_10").mkdir()  # unfinished: no final_info.json
    (root / "run_10" / "train_log.jsonl").write_text("")
    old = write_run(root / "run_11")  # written before the separation results existed
    info = json.loads((old / "final_info.json").read_text())
    del info["knowledge separation results"]
    (old / "final_info.json").write_text(json.dumps(info))
    return root


@pytest.fixture
def result(runs, tmp_path, capsys):
    out = tmp_path / "plots"
    summary = plot.main([str(runs / "run_*"), f"--out_dir={out}", "--per-run"])
    return summary, out, capsys.readouterr().out


def is_png(path: Path) -> bool:
    with Image.open(path) as image:
        image.verify()
        return image.format == "PNG" and image.size[0] > 300 and image.size[1] > 300


def test_every_figure_and_the_table_are_written(result, runs, tmp_path):
    summary, out, printed = result
    assert set(summary["groups"]) == {"smollm2-135m-instruct_L15", "smollm2-135m-instruct_L3"}
    for label in summary["groups"]:
        # not the headline nor the curves by variant: these runs predate the EV and the curves they plot
        for name in PER_RUN_FIGURES:
            assert is_png(out / f"{name}_{label}.png"), f"{name}_{label}.png"
    assert is_png(out / "alpha_sweep_smollm2-135m-instruct_L15.png")
    # L3 holds one topk run: no α to sweep, so no figure (and none left from an earlier call)
    assert not (out / "alpha_sweep_smollm2-135m-instruct_L3.png").exists()
    assert "alpha_sweep_smollm2-135m-instruct_L3.png: not written" in printed
    assert (out / "results.md").is_file()
    by_variant = plot.main([str(runs / "run_*"), f"--out_dir={tmp_path / 'default'}"])  # no --per-run
    assert {name.split("_smollm2")[0] for name in by_variant["figures"]} == {"alpha_sweep"}


def test_table_holds_the_planted_numbers_and_seed_statistics(result):
    _, out, printed = result
    table = (out / "results.md").read_text()
    assert "| run_1 | topk | – | 0 | 0.7500 | 0.7200 | n/a | 0.9500 |" in table  # n/a: no EV w/o outliers
    assert "1.2345" in table and "3.0000" in table
    assert "| adaptive_ortho | 0.1 | 3 | run_4, run_5, run_6 |" in table
    scores, evs = [1.0, 2.0, 4.0], [0.70, 0.72, 0.77]
    assert f"{np.mean(scores):.4f} ± {np.std(scores, ddof=1):.4f}" == "2.3333 ± 1.5275"
    assert "2.3333 ± 1.5275" in table and f"{np.mean(evs):.4f} ± {np.std(evs, ddof=1):.4f}" in table
    # the one meaningful MCQ score
    assert "| run_3 | adaptive_ortho | 0 | 0 |" in table and "| 0.2500 |" in table
    assert table in printed  # the same table on the terminal


def test_repeats_of_a_seed_count_once_in_the_seed_statistics():
    """Two runs of seed 0 (one command run twice) and one of seed 1: the seed-0 repeats are averaged
    first, so the mean and std are over 2 seeds, not 3 runs."""
    run = lambda name, seed, score: {"name": name, "setting": "adaptive_ortho", "alpha": 0.1, "seed": seed,
                                     **{m: None for m in plot.METRICS}, "held_out_score": score,
                                     "held_out_lower_bound": False}
    row, = plot.aggregate([run("run_5", 0, 1.0), run("run_14", 0, 3.0), run("run_6", 1, 5.0)])
    assert row["runs"] == ["run_5 + run_14", "run_6"]
    assert row["held_out_score"] == pytest.approx((3.5, np.std([2.0, 5.0], ddof=1)))
    assert row["val_ev"] is None


def test_runs_of_another_layer_form_their_own_group_and_are_never_drawn_with_the_rest(result):
    summary, _, printed = result
    assert summary["groups"]["smollm2-135m-instruct_L3"] == ["run_9"]
    assert "run_9" not in summary["groups"]["smollm2-135m-instruct_L15"]
    assert "- group smollm2-135m-instruct_L3: run_9 (model smollm2-135m-instruct, layer 3," in printed
    assert "the groups differ in: layer (15 / 3)" in printed
    for name, drawn in summary["figures"].items():
        assert drawn == ["run_9"] if name.endswith("_L3.png") else "run_9" not in drawn


def test_missing_unlearning_results_log_and_final_info(result):
    summary, out, printed = result
    table = (out / "results.md").read_text()
    header, row = (next(line for line in table.splitlines() if line.startswith(start))
                   for start in ("| run |", "| run_7 |"))
    cells = dict(zip(header.split(" | "), row.split(" | ")))
    assert all(cells[plot.METRICS[m][0]] == "n/a"
               for m in ("held_out_score", "held_out_score_se", "mcq"))
    for name in ("tradeoff", "unlearning_curves"):
        assert "run_7" not in summary["figures"][f"{name}_smollm2-135m-instruct_L15.png"]
    assert "run_7" in summary["figures"]["training_smollm2-135m-instruct_L15.png"]
    assert "- no unlearning results, left out of the trade-off and unlearning figures: run_7\n" in printed
    assert "run_8" not in summary["figures"]["training_smollm2-135m-instruct_L15.png"]
    assert "- no train_log.jsonl, left out of the training curves: run_8\n" in printed
    assert ("skip " in printed and "run_10: no final_info.json" in printed
            and "run_10" not in str(summary["groups"]))
    assert "run_11: final_info.json has no knowledge separation results" in printed
    assert "run_11" not in str(summary["groups"])
    assert "Skipped (no final_info.json, or an incomplete one): " in table and "run_11" in table


def test_mcq_scores_that_are_not_meaningful_are_left_out_not_zero():
    assert plot.mean_std([None, 0.5, None]) == (0.5, None)
    assert plot.mean_std([None, None]) is None
    assert plot.fmt(None) == "n/a"


def test_the_default_set_is_run_0_and_the_study_manifests_runs(tmp_path, monkeypatch):
    """With no folders named, plot.py reads run_0 and the manifest's runs that exist, in manifest order; a
    user's own folders beside them (run_37, another folder under runs/, out/...) are read only when named."""
    monkeypatch.setattr(plot, "HERE", tmp_path)
    first, second = list(plot.study.manifest())[:2]
    write_run(tmp_path / "run_0", "topk")
    write_run(tmp_path / second, "fixed_ortho")
    write_run(tmp_path / first, "topk")
    default = plot.find_run_dirs([])
    assert default == [tmp_path / "run_0", tmp_path / first, tmp_path / second]
    for extra in ("run_37", "runs/mine_s0", "out/run_20261205-000000"):
        write_run(tmp_path / extra, "adaptive_ortho", alpha=0.1)
    assert plot.find_run_dirs([]) == default
    assert plot.find_run_dirs([str(tmp_path / "run_*")]) == [tmp_path / "run_0", tmp_path / "run_37"]


def test_nothing_to_plot_is_an_error(tmp_path):
    (tmp_path / "run_1").mkdir()
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "run_1"), f"--out_dir={tmp_path / 'plots'}"])


def test_new_fields_load_and_older_runs_give_none(tmp_path):
    new = plot.load_run(write_run(tmp_path / "new", held_out=1.5, held_out_se=0.25, typical_ev=0.8), "new")
    assert (new["held_out_score"], new["held_out_score_se"], new["conv_ev_typical"]) == (1.5, 0.25, 0.8)
    old = plot.load_run(write_run(tmp_path / "old"), "old")
    assert (old["held_out_score"], old["held_out_score_se"], old["conv_ev_typical"]) == (None, None, None)


V3 = {"conditional": {"rate_groups": point(1.25, se=0.125),
                     "trained_groups": point(1.5, lower_bound=True)},
      "controls": {"random_features": {"score": 0.25, "score_std": 0.05, "n_draws": 3,
                                       "n_lower_bounds": 1,
                                       "draws": [point(0.2), point(0.25, lower_bound=True), point(0.3)]},
                   "difference_of_means": point(0.75), "leace": point(0.5, lower_bound=True)},
      "n_lower_bounds": 3}  # conditional trained_groups, one random draw, LEACE


def set_report_flag(folder: Path, flag) -> Path:
    """An older run's only record of a lower bound: held_out.report.flag."""
    info = json.loads((folder / "final_info.json").read_text())
    info["unlearning evaluation results"]["eval_result_metrics"]["unlearning"]["held_out"]["report"][
        "flag"] = flag
    (folder / "final_info.json").write_text(json.dumps(info))
    return folder


def test_v3_fields_load_and_an_older_run_derives_its_lower_bound(tmp_path):
    new = plot.load_run(write_run(tmp_path / "new", held_out=1.5, lower_bound=True, v3=V3), "new")
    expected = {
        "held_out_lower_bound": True, "conditional_score": 1.25, "conditional_score_se": 0.125,
        "conditional_lower_bound": False, "conditional_trained_score": 1.5,
        "conditional_trained_lower_bound": True, "random_score": 0.25, "random_score_std": 0.05,
        "random_lower_bound": True, "dom_score": 0.75, "dom_lower_bound": False, "leace_score": 0.5,
        "leace_lower_bound": True}
    assert {k: new[k] for k in expected} == expected
    # the run's own flag wins over the report point's
    v3_false = write_run(tmp_path / "v3_false", held_out=1.5, lower_bound=False)
    assert plot.load_run(set_report_flag(v3_false, "below_tolerance_at_every_multiplier"),
                         "v3_false")["held_out_lower_bound"] is False
    old = write_run(tmp_path / "old", held_out=1.5)
    assert plot.load_run(old, "old")["held_out_lower_bound"] is False  # run_0's report flag: None
    old = plot.load_run(set_report_flag(old, "below_tolerance_at_every_multiplier"), "old")
    assert old["held_out_lower_bound"] is True
    assert all(old[k] is None for k in expected if k != "held_out_lower_bound")
    above = set_report_flag(write_run(tmp_path / "above", held_out=1.5),
                            "above_tolerance_at_smallest_multiplier")
    assert plot.load_run(above, "above")["held_out_lower_bound"] is False
    none = plot.load_run(write_run(tmp_path / "none", unlearning=False), "none")
    assert none["held_out_lower_bound"] is None and none["random_lower_bound"] is None


def test_a_mean_over_a_lower_bound_is_marked(tmp_path):
    """topk: seed 1's held-out score is a lower bound (v3 flag), seed 0's not; fixed_ortho: seed 0 an
    older run whose report flag says it is; adaptive_ortho: no bound anywhere."""
    root = tmp_path / "runs"
    write_run(root / "run_1", "topk", seed=0, held_out=1.0, lower_bound=False, v3=V3)
    write_run(root / "run_2", "topk", seed=1, held_out=2.0, lower_bound=True)
    set_report_flag(write_run(root / "run_3", "fixed_ortho", held_out=0.5),
                    "below_tolerance_at_every_multiplier")
    write_run(root / "run_4", "adaptive_ortho", alpha=0.1, held_out=0.25, lower_bound=False)
    out = tmp_path / "plots"
    plot.main([str(root / "run_*"), f"--out_dir={out}"])
    table = (out / "results.md").read_text().split("## RESULTS.md block")[0]  # the generated block: elsewhere
    rows = lambda start: [line.split(" | ") for line in table.splitlines() if line.startswith(start)]
    header, = rows("| variant | α | n | runs |")
    means = {row[0]: dict(zip(header, row)) for row in rows("| ") if row[3].startswith("run_")}
    held_out = plot.METRICS["held_out_score"][0]
    assert means["| topk"][held_out] == "≥1.5000 ± 0.7071"
    assert means["| fixed_ortho"][held_out] == "≥0.5000"
    assert means["| adaptive_ortho"][held_out] == "0.2500"
    # run_1's v3 points: LEACE and the random draws a bound, difference of means not
    leace, random, dom = (plot.METRICS[m][0] for m in ("leace_score", "random_score", "dom_score"))
    assert (means["| topk"][leace], means["| topk"][random], means["| topk"][dom]) == (
        "≥0.5000", "≥0.2500", "0.7500")
    assert plot.METRICS["held_out_score_se"][0] in header and "≥" not in means["| topk"][
        plot.METRICS["held_out_score_se"][0]]
    header, = rows("| run | variant |")
    per_run = {row[0]: dict(zip(header, row)) for row in rows("| run_")}
    assert (per_run["| run_1"][held_out], per_run["| run_2"][held_out]) == ("1.0000", "≥2.0000")


def test_figures_draw_a_lower_bound_open(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    write_run(root / "run_1", "topk", held_out=1.0, lower_bound=False)
    write_run(root / "run_2", "adaptive_ortho", alpha=0.1, held_out=2.0, lower_bound=True)
    write_run(root / "run_3", "adaptive_ortho", alpha=0.2, held_out=3.0, lower_bound=False)
    runs, _ = plot.load_runs(plot.find_run_dirs([str(root / "run_*")]))
    figures = {}
    monkeypatch.setattr(plot, "save", lambda fig, path, title: figures.update({path.name: (fig, title)}))
    plot.plot_tradeoff(runs, tmp_path / "tradeoff.png", "L15")
    fig, title = figures["tradeoff.png"]
    ax = fig.axes[1]  # held-out score against ce_loss_score: one errorbar per run, in run order
    faces = [line.get_markerfacecolor() for line in ax.lines if line.get_marker() == "o"]
    assert len(faces) == 3 and faces[1] == "none" and "none" not in (faces[0], faces[2])
    assert "open marker: a lower bound" in title
    plot.plot_alpha_sweep(runs, tmp_path / "alpha_sweep.png", "L15")
    fig, title = figures["alpha_sweep.png"]
    ax = next(a for a in fig.axes if a.get_ylabel() == plot.METRICS["held_out_score"][1])
    open_points = [c.get_offsets().tolist() for c in ax.collections
                   if isinstance(c, PathCollection) and not c.get_facecolor().any()]
    assert open_points == [[[0.1, 2.0]]] and "open marker" in title
    adaptive, = (line for line in ax.lines if line.get_marker() == "o" and len(line.get_xdata()) == 2)
    assert adaptive.get_markevery() == [1]  # filled: α 0.2 only


def test_the_retired_text_score_is_neither_read_nor_shown(tmp_path):
    """Old runs still hold text_score and text_score_config; flatten, the tables and the figures no longer
    read them."""
    info = copy.deepcopy(TEMPLATE)
    info["unlearning evaluation results"]["eval_result_metrics"]["unlearning"] |= {
        "text_score": 0.5, "text_score_config": {"multiplier": 50.0}}
    flat = plot.results.flatten(info)
    assert not {"text_score", "text_config"} & set(flat)
    assert not {"text_score", "text_config"} & (set(plot.METRICS) | set(plot.SWEEP_METRICS)
                                                 | set(plot.RESULTS_COLS) | set(plot.DIFF_COLS))
    source = Path(plot.__file__).read_text() + Path(plot.results.__file__).read_text()
    assert "text_score" not in source and "text score" not in source.lower()


@pytest.mark.parametrize("separation, label", [
    ({"variant": "topk", "lambda2_max": 0.0, "lambda2_default": 1000.0}, "topk"),
    ({"variant": "fixed_ortho", "lambda2_max": 1000.0, "lambda2_default": 1000.0}, "fixed_ortho"),
    ({"variant": "fixed_ortho", "lambda2_max": 10.0, "lambda2_default": 1000.0}, "fixed_ortho λ2=10"),
    ({"variant": "fixed_ortho", "lambda2_max": 1000.0, "lambda2_default": 1000.0, "group_biases": False},
     "fixed_ortho no-group-biases"),
    ({"variant": "allpairs_ortho", "lambda2_max": 15.0, "lambda2_default": 15.0}, "allpairs_ortho λ2=15"),
    ({"variant": "allpairs_ortho", "lambda2_max": 30.0, "lambda2_default": 15.0}, "allpairs_ortho λ2=30"),
    ({"variant": "adaptive_ortho", "lambda2_max": 1000.0, "lambda2_default": 1000.0,
      "ortho_target": "partner", "group_biases": True}, "adaptive_ortho"),
    ({"variant": "adaptive_ortho", "lambda2_max": 1000.0, "lambda2_default": 1000.0,
      "ortho_target": "partner", "group_biases": False}, "adaptive_ortho no-group-biases"),
    ({"variant": "adaptive_ortho", "lambda2_max": 0.0, "lambda2_default": 1000.0, "ortho_target": "partner",
      "group_biases": True}, "adaptive_ortho λ2=0"),
    ({"variant": "adaptive_ortho", "lambda2_max": 1000.0, "lambda2_default": 1000.0, "ortho_target": "hinge"},
     "adaptive_ortho/hinge"),
])
def test_setting_labels_keep_the_ablations_apart(separation, label):
    assert plot.setting_label(separation) == label


def test_setting_colours_and_order():
    settings = ["adaptive_ortho", "allpairs_ortho", "adaptive_ortho λ2=0", "fixed_ortho", "topk",
                "adaptive_ortho no-group-biases"]
    colors = plot.setting_colors([{"setting": s} for s in settings])
    assert list(colors)[:3] == ["topk", "fixed_ortho", "allpairs_ortho"]
    assert ([colors[s] for s in ("topk", "fixed_ortho", "allpairs_ortho")]
            == ["black", "tab:gray", "tab:brown"])
    adaptive = [plot.to_hex(colors[s]) for s in settings if s.startswith("adaptive")]
    assert len(set(adaptive)) == 3 and not {"#7f7f7f", "#8c564b"} & set(adaptive)  # tab:gray, tab:brown
    rows = [("adaptive_ortho", 0.3), ("adaptive_ortho no-group-biases", 0.3), ("allpairs_ortho", None),
            ("adaptive_ortho", 0.1), ("topk", None), ("fixed_ortho", None)]
    assert sorted(rows, key=lambda r: plot.setting_order(*r)) == [
        ("topk", None), ("fixed_ortho", None), ("allpairs_ortho", None), ("adaptive_ortho", 0.1),
        ("adaptive_ortho", 0.3), ("adaptive_ortho no-group-biases", 0.3)]


def test_penalty_jump_skips_the_first_grouping_and_takes_the_largest_later_rise():
    """λ2·L_ortho per step: 0 before the first grouping (step 1 → 2 rises by 5: left out), then a
    rise of 0.5 across the regroup at step 3 and a fall across the one at step 5."""
    values = [0.0, 0.0, 5.0, 4.0, 4.5, 4.4, 1.0]
    log = [{"step": s, "lambda2": 2.0, "ortho": v / 2.0} for s, v in enumerate(values)]
    for s in (1, 3, 5):
        log[s]["separation"] = {}
    assert plot.penalty_jump(log) == pytest.approx(0.5)
    assert plot.penalty_jump([{"step": 0, "recon": 1.0}]) is None  # topk: no orthogonality term


def test_headline_draws_seed_means_with_95_cis_that_equal_the_tables(tmp_path, monkeypatch):
    """topk and adaptive α=0.1 at three seeds (adaptive seed 2 twice: averaged first), fixed_ortho at one,
    and eight α values of one seed each: the axis holds at most 8 series, the most-seeded first; each
    plotted score is the table's seed mean, its bar t(0.975, n−1)·s/√n; x is the EV minus topk's, paired
    by seed; the controls are horizontal lines."""
    from scipy.stats import t as student_t
    root = tmp_path / "runs"
    v3 = {"controls": {"difference_of_means": point(1.8), "leace": point(0.07)}}
    for seed, (score, ev) in enumerate([(0.3, 0.80), (0.5, 0.81), (0.7, 0.82)]):
        write_run(root / f"run_t{seed}", "topk", seed=seed, held_out=score, typical_ev=ev, v3=v3)
    for seed, (score, ev) in enumerate([(1.0, 0.78), (2.0, 0.80), (4.0, 0.79)]):
        write_run(root / f"run_a{seed}", "adaptive_ortho", alpha=0.1, seed=seed, held_out=score,
                  typical_ev=ev, v3=v3)
    write_run(root / "run_a2b", "adaptive_ortho", alpha=0.1, seed=2, held_out=6.0, typical_ev=0.81, v3=v3)
    write_run(root / "run_f0", "fixed_ortho", held_out=0.6, typical_ev=0.79, v3=v3)
    for i, alpha in enumerate([0.0, 0.05, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]):
        write_run(root / f"run_s{i}", "adaptive_ortho", alpha=alpha, held_out=1.5, typical_ev=0.8, v3=v3)
    runs, _ = plot.load_runs(plot.find_run_dirs([str(root / "run_*")]))
    figures = {}
    monkeypatch.setattr(plot, "save", lambda fig, path, title: figures.update({path.name: (fig, title)}))
    plot.plot_headline(runs, tmp_path / "headline.png", "L15")
    fig, title = figures["headline.png"]
    ax, = fig.axes
    series = [c for c in ax.containers]  # one errorbar container per (setting, α)
    assert len(series) == plot.MAX_SERIES
    points = {(p["setting"], p["alpha"]): p for p in plot.headline_points(runs)}
    assert ("topk", None) in points and ("adaptive_ortho", 0.1) in points and len(points) == 8
    table = {(a["setting"], a["alpha"]): a for a in plot.aggregate(runs)}
    for key, p in points.items():
        assert p["score"][0] == pytest.approx(table[key]["held_out_score"][0])  # the table's mean
    adaptive = points["adaptive_ortho", 0.1]
    seeds = [1.0, 2.0, 5.0]  # seed 2's two runs averaged
    assert adaptive["score"][0] == pytest.approx(np.mean(seeds))
    assert adaptive["score"][1] == pytest.approx(student_t.ppf(0.975, 2) * np.std(seeds, ddof=1) / np.sqrt(3))
    deltas = [0.78 - 0.80, 0.80 - 0.81, 0.80 - 0.82]  # seed 2's EV: (0.79 + 0.81) / 2
    assert adaptive["delta_ev"][0] == pytest.approx(np.mean(deltas))
    drawn = {round(line.get_ydata()[0], 6) for line in ax.lines if line.get_linestyle() in ("--", ":")}
    assert drawn == {1.8, 0.07}
    assert "95% CI" in title


def test_headline_is_not_drawn_for_topk_alone(tmp_path, monkeypatch, capsys):
    """A group with topk runs only (run_0's) has one point at Δ EV 0: no headline figure."""
    root = tmp_path / "runs"
    for seed in range(2):
        write_run(root / f"run_t{seed}", "topk", seed=seed, held_out=0.3 + seed, typical_ev=0.8)
    runs, _ = plot.load_runs(plot.find_run_dirs([str(root / "run_*")]))
    assert len(plot.headline_points(runs)) == 1
    monkeypatch.setattr(plot, "save", lambda *a: pytest.fail("drawn"))
    assert plot.plot_headline(runs, tmp_path / "headline.png", "L15") == []
    assert plot.plot_alpha_sweep(runs, tmp_path / "alpha_sweep.png", "L15") == []
    assert "no variant besides topk" in capsys.readouterr().out


def test_alpha_sweep_draws_at_most_8_series_each_its_own_colour(tmp_path, monkeypatch):
    """topk at 2 seeds, adaptive_ortho at three α (one seed each), and nine allpairs_ortho weights of one
    seed each: the axes hold the sweep, topk and six allpairs weights, each in its own colour; the title
    names the three left out."""
    root = tmp_path / "runs"
    for seed in range(2):
        write_run(root / f"run_t{seed}", "topk", seed=seed, held_out=0.5 + seed)
    for i, alpha in enumerate([0.0, 0.1, 0.3]):
        write_run(root / f"run_a{i}", "adaptive_ortho", alpha=alpha, held_out=1.0)
    weights = [0.01, 0.02, 0.05, 0.1, 0.3, 0.5, 1.0, 4.0, 150.0]
    for i, weight in enumerate(weights):
        write_run(root / f"run_p{i}", "allpairs_ortho", held_out=0.7,
                  separation={"lambda2_max": weight, "lambda2_default": 0.02})
    runs, _ = plot.load_runs(plot.find_run_dirs([str(root / "run_*")]))
    figures = {}
    monkeypatch.setattr(plot, "save", lambda fig, path, title: figures.update({path.name: (fig, title)}))
    drawn = plot.plot_alpha_sweep(runs, tmp_path / "alpha_sweep.png", "L15")
    fig, title = figures["alpha_sweep.png"]
    ax = next(a for a in fig.axes if a.get_ylabel() == plot.METRICS["held_out_score"][1])
    labels = [label for label in ax.get_legend_handles_labels()[1]]
    assert len(labels) == plot.MAX_SERIES
    colours = [h.get_color() if hasattr(h, "get_color") else h.lines[0].get_color()
               for h in ax.get_legend_handles_labels()[0]]
    assert len({str(c) for c in colours}) == plot.MAX_SERIES
    left_out = title.split("at most 8 series): ")[1].split(", ")
    assert len(left_out) == 3 and all(s.startswith("allpairs_ortho λ2=") for s in left_out)
    assert {"run_t0", "run_t1", "run_a0", "run_a1", "run_a2"} <= set(drawn) and len(drawn) == 2 + 3 + 6


def test_unlearning_by_variant_draws_seed_mean_curves_through_the_tables_scores(tmp_path, monkeypatch):
    """Planted report-split curves, forget ΔCE = slope·retain ΔCE up to retain 0.04 (×25, ×50, ×100,
    ×200; the conditional's slope doubled): topk at three seeds, adaptive α=0.1 at two (seed 1 twice: averaged
    first), nine α of one seed each, and fixed_ortho without recorded curves. Each panel holds at most 8
    series; at the tolerance (0.02) a series' mean is the table's held-out score (the score each run
    records is its curve's reading there), its band t(0.975, n−1)·s/√n; fixed_ortho is named as not
    drawn."""
    from scipy.stats import t as student_t
    root = tmp_path / "runs"

    def curve(slope):
        return [{"knob": k, "forget_delta_ce": slope * r, "retain_delta_ce": r}
                for k, r in zip((25, 50, 100, 200), (0.005, 0.01, 0.03, 0.04))]

    def run(name, variant, slope, **kw):
        v3 = {"held_out": {"report": {"curve": curve(slope)}},
              "conditional": {"rate_groups": {"curve": curve(2 * slope), "score": 0.04 * slope}}}
        write_run(root / name, variant, held_out=0.02 * slope, v3=v3, **kw)

    for seed, slope in enumerate([10.0, 20.0, 40.0]):
        run(f"run_t{seed}", "topk", slope, seed=seed)
    run("run_a0", "adaptive_ortho", 30.0, alpha=0.1, seed=0)
    run("run_a1", "adaptive_ortho", 50.0, alpha=0.1, seed=1)
    run("run_a1b", "adaptive_ortho", 70.0, alpha=0.1, seed=1)
    for i, alpha in enumerate([0.0, 0.05, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5]):
        run(f"run_s{i}", "adaptive_ortho", 15.0, alpha=alpha)
    write_run(root / "run_f0", "fixed_ortho", held_out=0.6)  # written before curves were recorded
    runs, _ = plot.load_runs(plot.find_run_dirs([str(root / "run_*")]))
    figures = {}
    monkeypatch.setattr(plot, "save", lambda fig, path, title: figures.update({path.name: (fig, title)}))
    drawn = plot.plot_unlearning_by_variant(runs, tmp_path / "by_variant.png", "L15")
    fig, title = figures["by_variant.png"]
    static, conditional = fig.axes
    table = {(a["setting"], a["alpha"]): a for a in plot.aggregate(runs)}
    for ax, factor in ((static, 1), (conditional, 2)):
        assert len(ax.lines) - 1 == plot.MAX_SERIES  # the series and one tolerance line
        for line in ax.lines[:-1]:
            x, y = line.get_xdata(), line.get_ydata()
            at = int(np.flatnonzero(np.isclose(x, 0.02))[0])
            label = line.get_label()
            key = ("topk", None) if label.startswith("topk") else (
                ("adaptive_ortho", float(label.split("α=")[1].split(" ")[0])))
            expected = table[key]["held_out_score"][0] * factor
            assert y[at] == pytest.approx(expected)
            assert x.min() == pytest.approx(0.005, rel=0.1) and x.max() <= 0.04  # the measured range only
    topk_band = static.collections[0].get_paths()[0].vertices[:, 1]
    seeds = [0.2, 0.4, 0.8]
    half = student_t.ppf(0.975, 2) * np.std(seeds, ddof=1) / np.sqrt(3)
    assert topk_band.max() >= np.mean(seeds) + half - 1e-9
    assert table["adaptive_ortho", 0.1]["held_out_score"][0] == pytest.approx((0.6 + 1.2) / 2)
    assert "fixed_ortho" in title.split("not drawn")[1]
    assert "run_f0" not in drawn and {"run_t0", "run_a1b"} <= set(drawn)
