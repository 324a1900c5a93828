"""RESULTS.md's tables are plot.py's output from the run folders, never typed; the README stays short;
results_block and plot.py --results on synthetic runs (test_plot.write_run's fake run folders)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

import plot
import study
import study_stats
from test_plot import write_run

HERE = Path(plot.__file__).resolve().parent
RESULTS, README = HERE / "RESULTS.md", HERE / "README.md"
ARCHIVE = HERE / "runs" / "bigbench-wikipedia"
REGENERATE = "run `python plot.py`"
L15, L3 = "smollm2-135m-instruct_L15", "smollm2-135m-instruct_L3"


def test_results_md_is_what_plot_py_computes_from_the_run_folders():
    """RESULTS.md's block between the markers equals results_block of plot.py's default set (run_0 and the
    study manifest's runs), as plot.py --results RESULTS.md writes it: a typed or stale number fails."""
    text = RESULTS.read_bytes().decode()
    try:
        start, end = plot.results_span(text)
    except ValueError as err:
        pytest.fail(f"RESULTS.md has no generated results block ({err}): {REGENERATE}")
    dirs = plot.find_run_dirs([])
    manifest = [HERE / name for name in study.manifest()]
    assert dirs == [d for d in [HERE / "run_0", *manifest] if d.is_dir()]  # no other folder
    runs, _ = plot.load_runs(dirs)
    assert {run["dir"] for run in runs} >= {d for d in manifest if (d / "final_info.json").is_file()}
    expected = plot.replace_results(text, plot.results_block(plot.group_runs(runs)))
    e_start, e_end = plot.results_span(expected)
    assert text[start:end] == expected[e_start:e_end], \
        f"RESULTS.md's results block is not what plot.py computes from run_0 and runs/: {REGENERATE}"


def test_readme_headline_is_what_plot_py_computes_from_the_run_folders():
    """The README's generated headline equals headline_block of plot.py's default set, with the figure in
    plots/, as plot.py --readme README.md writes it."""
    text = README.read_bytes().decode()
    try:
        start, end = plot.results_span(text, plot.HEADLINE_MARKERS)
    except ValueError as err:
        pytest.fail(f"README.md has no generated headline ({err}): {REGENERATE} --readme README.md")
    runs, _ = plot.load_runs(plot.find_run_dirs([]))
    block = plot.headline_block(plot.group_runs(runs), HERE / "plots", README)
    assert text[start:end] == "\n" + block.strip("\n") + "\n\n", \
        f"README.md's headline is not what plot.py computes from the runs: {REGENERATE} --readme README.md"
    figure = text[start:end].split("](", 1)[1].split(")", 1)[0]
    assert (HERE / figure).is_file()


def archived_study_runs() -> dict:
    """The first realization's runs (archived, retain corpus BIG-bench's articles), keyed by the manifest
    names they had."""
    dirs = [ARCHIVE / name.split("/", 1)[1] for name in study.manifest()]
    runs, _ = plot.load_runs([d for d in dirs if d.is_dir()])
    return {f"{study.RUNS}/{run['dir'].name}": run for run in runs}


def test_the_archived_findings_prose_holds_on_the_archived_runs():
    """The archived RESULTS.md "What the study finds" and the README's Results paragraph state the first
    realization's pre-registered answer in words: check each claim on its runs."""
    runs = archived_study_runs()
    assert all(study.run_name(label, seed) in runs for label in study.COMPARED for seed in study.MAIN_SEEDS)
    fam = study.contrast_family(runs, "held-out score")
    significant = surviving(fam)
    assert not significant & set(study.CONTRASTS)  # "no orthogonal variant scores above topk"
    assert {("fixed conditional", "fixed"), ("adaptive_a0.1 conditional", "adaptive_a0.1")} <= significant
    means = {label: np.mean(list(study.seed_scores(runs, label, "held_out_score").values()))
             for label in study.COMPARED}
    assert study.control_value(runs, "dom_score") > max(means.values())  # DoM above every SAE
    assert study.control_value(runs, "leace_score") < min(means.values())
    static = study.static_family(runs, "held_out_score")  # the static-only indication
    assert surviving(static) >= {
        ("adaptive_a0.1", "topk"), ("fixed", "topk")}
    qa = study.contrast_family(runs, "question-answer text (secondary)")
    assert not surviving(qa) & set(study.CONTRASTS)
    for label in ("fixed", "adaptive_a0.1", "allpairs"):  # the cost: EV lost against topk; none at λ2 = 0
        assert all(r["conv_ev_typical"] < runs[study.run_name("topk", r["seed"])]["conv_ev_typical"]
                   for r in study.setting_runs(runs, label))
    ev_lost = [runs[study.run_name("topk", r["seed"])]["conv_ev_typical"] - r["conv_ev_typical"]
               for r in study.setting_runs(runs, "lambda0")]
    assert abs(np.mean(ev_lost)) < 0.001  # "loses none": a tenth of what the penalised variants lose, at most
    assert "**The pre-registered answer: no.**" in (ARCHIVE / "RESULTS.md").read_text()


def study_runs() -> dict:
    """The re-run's finished runs under runs/, keyed by manifest name."""
    dirs = [HERE / name for name in study.manifest()]
    runs, _ = plot.load_runs([d for d in dirs if (d / "final_info.json").is_file()])
    return {f"{study.RUNS}/{run['dir'].name}": run for run in runs}


def unlearning_results(run: dict) -> dict:
    """A run's unlearning results as final_info.json holds them."""
    info = json.loads((run["dir"] / "final_info.json").read_text())
    return info["unlearning evaluation results"]["eval_result_metrics"]["unlearning"]


def surviving(family: dict) -> set:
    """The (a, b) contrasts of a family that survive Holm."""
    return {(r["a"], r["b"]) for r in family["contrasts"] if r["significant"]}


def setting_mean(runs: dict, label: str, field: str) -> float:
    return float(np.mean([r[field] for r in study.setting_runs(runs, label)]))


def test_the_findings_prose_holds_on_the_study_runs():
    """RESULTS.md "What the study finds" and the README's Results paragraph state the re-run's
    pre-registered answer in words: check each claim on its runs."""
    runs = study_runs()
    assert all(study.run_name(label, seed) in runs for label in study.COMPARED for seed in study.MAIN_SEEDS)
    fam = study.contrast_family(runs, "held-out score")
    rows = {(r["a"], r["b"]): r for r in fam["contrasts"]}
    assert not surviving(fam) & set(study.CONTRASTS)  # "no orthogonal variant is shown to score above topk"
    for label in ("fixed", "adaptive_a0.1"):  # "neither shows a gain nor rules one out"
        low, high = rows[(label, "topk")]["ci95"]
        assert low < 0 and high > 1
    assert {(f"{label} conditional", label) for label in study.GATED} <= surviving(fam)  # topk included
    assert fam["best"] == "adaptive_a0.1"
    assert {("adaptive_a0.1", "difference of means"), ("adaptive_a0.1", "LEACE")} <= surviving(fam)
    means = {label: setting_mean(runs, label, "held_out_score") for label in study.COMPARED}
    dom, leace = (study.control_value(runs, m) for m in ("dom_score", "leace_score"))
    assert leace < min(means.values())
    assert means["lambda0"] < dom < means["topk"]  # "among the SAE settings, between topk and λ2 = 0"
    spreads = [np.std([r["held_out_score"] for r in study.setting_runs(runs, label)], ddof=1)
               for label in ("adaptive_a0.1", "fixed")]
    assert abs(means["adaptive_a0.1"] - means["fixed"]) < 0.1 * min(spreads)  # "far less than its spread"
    best_dom, best_topk = rows[("adaptive_a0.1", "difference of means")], rows[("adaptive_a0.1", "topk")]
    assert best_dom["se"] < best_topk["se"] / 2  # its own spread, not the pooled one
    dom_curve = [unlearning_results(run)["controls"]["difference_of_means"]["curve"] for run in runs.values()]
    tolerance = unlearning_results(runs[study.run_name("topk", 0)])["ce_tolerance"]
    assert all(0.9 * tolerance < curve[0]["retain_delta_ce"] < tolerance for curve in dom_curve)  # "starts at"
    assert abs(best_dom["estimate"] / best_topk["estimate"] - 1) < 0.2  # "about the same size"
    static = study.static_family(runs, "held_out_score")  # the static-only indication
    assert surviving(static) == {("adaptive_a0.1", "topk"), ("fixed", "topk")}
    paired = study.conditional_paired(runs)  # conditional rows spread several-fold more than static ones
    assert min(paired["spreads"][f"{label} conditional"] for label in study.GATED) > 2 * max(
        paired["spreads"][label] for label in study.COMPARED)
    assert {f"{label} conditional" for label in study.GATED} <= fam["bounded"]  # grid-edge bounds
    over_random = study.static_family(runs, "over_random_score")
    assert not surviving(over_random) & {("adaptive_a0.1", "topk"), ("fixed", "topk")}
    for label in ("fixed", "adaptive_a0.1"):  # how: rare latents, the threshold they allow, random pools
        assert setting_mean(runs, label, "retain_below_0.001") > 2 * setting_mean(runs, "topk",
                                                                                   "retain_below_0.001")
        assert all(r["retain_threshold"] == 0.001 for r in study.setting_runs(runs, label))
        assert setting_mean(runs, label, "random_score") > setting_mean(runs, "topk", "random_score")
    static_knobs = [(r["held_out_knob"], r["held_out_score"]) for r in runs.values()
                    if r["held_out_knob"] is not None]
    assert spearmanr(*zip(*static_knobs)).statistic > 0.5  # "the score follows the multiplier"
    for label in study.GATED:  # the gate tells the two sources apart, topk's included
        assert all(r["conditional_auroc"] > 0.97 for r in study.setting_runs(runs, label))
    qa = study.contrast_family(runs, "question-answer text (secondary)")
    assert not surviving(qa) & set(study.CONTRASTS)
    assert not {(qa["best"], "difference of means")} & surviving(qa)  # its lead, short of significance
    qa_means = {label: setting_mean(runs, label, "qa_score") for label in study.COMPARED}
    assert min(qa_means["lambda0"], qa_means["topk"]) > max(qa_means["fixed"], qa_means["adaptive_a0.1"])
    assert study.control_value(runs, "qa_dom_score") > max(qa_means.values())
    for label in ("fixed", "adaptive_a0.1", "allpairs"):  # the cost: EV lost against topk; none at λ2 = 0
        assert all(r["conv_ev_typical"] < runs[study.run_name("topk", r["seed"])]["conv_ev_typical"]
                   for r in study.setting_runs(runs, label))
    ev_lost = [runs[study.run_name("topk", r["seed"])]["conv_ev_typical"] - r["conv_ev_typical"]
               for r in study.setting_runs(runs, "lambda0")]
    assert abs(np.mean(ev_lost)) < 0.001
    archive = archived_study_runs()  # "against the first retain corpus": three readings changed
    old, old_qa = (study.contrast_family(archive, endpoint) for endpoint in study.ENDPOINTS)
    old_best_dom = next(r for r in old["contrasts"] if (r["a"], r["b"]) == (old["best"], "difference of means"))
    assert old_best_dom["significant"] and old_best_dom["estimate"] < 0 < best_dom["estimate"]
    assert study.control_value(archive, "dom_score") > dom
    assert ("topk conditional", "topk") not in surviving(old)
    assert (old_qa["best"], "difference of means") in surviving(old_qa)
    assert not surviving(old) & set(study.CONTRASTS)
    assert "**The pre-registered answer: not shown.**" in RESULTS.read_text()
    assert "**Its pre-registered test does not show**" in " ".join(README.read_text().split())


def test_the_descriptive_runs_prose_holds_on_the_study_runs():
    """RESULTS.md's "Descriptive runs" bullet (α sweep, no group biases, 2× training; seeds 0–2)."""
    runs = study_runs()
    assert all(name in runs for name in study.manifest())  # "read once all 61 runs were in"
    field = lambda label, key: [runs[study.run_name(label, s)][key] for s in study.SWEEP_SEEDS]
    mean = lambda label, key: float(np.mean(field(label, key)))
    spread = np.std([r["held_out_score"] for r in study.setting_runs(runs, "adaptive_a0.1")], ddof=1)
    alphas = ["adaptive_a0", "adaptive_a0.05", "adaptive_a0.1", "adaptive_a0.2", "adaptive_a0.3"]
    for label in alphas + ["nobias"]:
        assert abs(mean(label, "held_out_score") - mean("adaptive_a0.1", "held_out_score")) < spread
        assert mean(label, "held_out_score") > mean("topk", "held_out_score")
        assert abs(mean(label, "conv_ev_typical") - mean("adaptive_a0.1", "conv_ev_typical")) < 0.001
    for group in ("kappa_forget", "kappa_retain"):  # "lowers the condition number several-fold"
        kappas = [mean(label, group) for label in alphas]
        assert kappas == sorted(kappas, reverse=True) and kappas[0] > 3 * kappas[-1]
    for label in ("topk", "adaptive_a0.1"):  # val EV rises about equally: the EV cost stays
        assert mean(f"long_{label}", "val_ev") - mean(label, "val_ev") > 0.03
    ev_cost = [mean(f"{length}topk", "val_ev") - mean(f"{length}adaptive_a0.1", "val_ev")
               for length in ("", "long_")]
    assert ev_cost[0] > 0 and abs(ev_cost[1] - ev_cost[0]) < 0.002
    gain = {length: np.subtract(field(f"{length}adaptive_a0.1", "held_out_score"),
                                field(f"{length}topk", "held_out_score")) for length in ("", "long_")}
    assert all(gain[""] > 0)  # "positive at the default length on these three seeds"
    center, half, _ = study_stats.ci95(list(gain["long_"]))
    low, high = center - half, center + half
    assert low < -1 and high > 1  # "more than a nat below zero to more than a nat above"
    top = int(np.argmax(np.abs(gain["long_"])))
    assert abs(gain["long_"][top]) > 3 * np.delete(np.abs(gain["long_"]), top).sum()
    seed = study.SWEEP_SEEDS[top]
    held_out = unlearning_results(runs[study.run_name("long_adaptive_a0.1", seed)])["held_out"]
    assert held_out["report"]["knob"] > 3 * held_out["selection"]["knob"]  # the multiplier ran far


def test_readme_stays_short():
    """The README holds the question, the commands and the way in; the method and results have their files."""
    assert len(README.read_bytes()) <= 15 * 1024


@pytest.fixture
def root(tmp_path):
    """topk: 3 seeds; fixed_ortho: 1 seed; adaptive_ortho α = 0.3: seed 0 twice and seed 1; one run each of
    adaptive_ortho α = 0.1, its no-group-biases ablation and allpairs_ortho (numbered out of table
    order); one adaptive_ortho run of another layer (a group with no reference)."""
    root = tmp_path / "runs"
    for seed, (score, ev) in enumerate([(0.3, 0.80), (0.5, 0.81), (0.7, 0.82)]):
        write_run(root / f"run_{seed}", "topk", seed=seed, held_out=score, held_out_se=0.1, typical_ev=ev)
    write_run(root / "run_3", "fixed_ortho", held_out=0.6, held_out_se=0.2, typical_ev=0.79)
    for name, seed, score, se, ev in [("run_4", 0, 1.0, 0.2, 0.75), ("run_5", 1, 5.0, 0.5, 0.78),
                                      ("run_6", 0, 3.0, 0.4, 0.77)]:
        write_run(root / name, "adaptive_ortho", alpha=0.3, seed=seed, held_out=score, held_out_se=se,
                  typical_ev=ev)
    write_run(root / "run_7", "adaptive_ortho", alpha=0.3, held_out=2.0, separation={"group_biases": False})
    write_run(root / "run_8", "allpairs_ortho", held_out=0.4,
              separation={"lambda2_max": 15.0, "lambda2_default": 15.0})
    write_run(root / "run_9", "adaptive_ortho", alpha=0.1, held_out=1.5)
    write_run(root / "run_10", "adaptive_ortho", alpha=0.1, layer=3, held_out=1.0)
    return root


@pytest.fixture
def block(root):
    runs, skipped = plot.load_runs(plot.find_run_dirs([str(root / "run_*")]))
    assert len(runs) == 11 and not skipped
    return plot.results_block(plot.group_runs(runs))


def lines_starting(block: str, prefix: str) -> list:
    return [line for line in block.splitlines() if line.startswith(prefix)]


def test_difference_standard_error_is_welch_over_seed_means(block):
    """adaptive α = 0.3: seed means (1 + 3)/2 = 2 and 5, so mean 3.5, s² = 4.5, n 2; topk 0.3, 0.5,
    0.7: mean 0.5, s² = 0.04, n 3. Difference 3.0, SE = sqrt(4.5/2 + 0.04/3)."""
    se = math.sqrt(4.5 / 2 + 0.04 / 3)
    assert f"{se:.4f}" == "1.5044"
    row, = lines_starting(block, "| adaptive_ortho | 0.3 | − topk |")
    assert row.split(" | ")[3] == "+3.0000 ± 1.5044 (n 2 vs 3)"
    # EV without outliers: seed means 0.76, 0.78 against 0.80, 0.81, 0.82
    ev_se = math.sqrt(0.0002 / 2 + 0.0001 / 3)
    assert row.split(" | ")[7] == f"-0.0400 ± {ev_se:.4f} (n 2 vs 3)"  # Welch, then paired, per metric


def test_a_repeated_seed_is_averaged_first(block):
    """Seed 0 ran twice (held-out 1.0 and 3.0, SE 0.2 and 0.4): one seed of 2.0 (SE 0.3) beside seed 1's 5.0
    (SE 0.5), so n = 2 seeds, not 3 runs."""
    row, geometry_row = lines_starting(block, "| adaptive_ortho | 0.3 | 2 |")  # the two per-variant tables
    assert "run_" not in geometry_row
    assert row.startswith("| adaptive_ortho | 0.3 | 2 | run_4 + run_6, run_5 | 3.5000 ± 2.1213 | "
                          "0.4000 ± 0.1414 |")
    assert f"{math.sqrt(4.5):.4f} | {math.sqrt(0.02):.4f}" == "2.1213 | 0.1414"


def test_one_seed_gives_no_standard_error(block):
    assert "| fixed_ortho | – | − topk | +0.1000 ± n/a (n 1 vs 3) |" in block
    assert "| adaptive_ortho | 0.3 | − fixed_ortho | +2.9000 ± n/a (n 2 vs 1) |" in block
    row, = lines_starting(block, "| allpairs_ortho λ2=15 | – | − topk |")
    # n/a: no EV w/o outliers
    assert row.split(" | ")[3] == "-0.1000 ± n/a (n 1 vs 3)" and row.endswith(" | n/a |")


def test_rows_order_references_and_groups(block):
    means = [line.split(" | ")[:2] for line in lines_starting(block, "| ")  # the tables with a runs column
             if " | − " not in line and not line.startswith("| variant") and "run_" in line]
    assert means == [["| topk", "–"], ["| fixed_ortho", "–"], ["| allpairs_ortho λ2=15", "–"],
                         ["| adaptive_ortho", "0.1"], ["| adaptive_ortho", "0.3"],
                         ["| adaptive_ortho no-group-biases", "0.3"], ["| adaptive_ortho", "0.1"]]  # L3
    assert (not lines_starting(block, "| topk | – | −")
            and "| fixed_ortho | – | − fixed_ortho |" not in block)
    assert len(lines_starting(block, "| adaptive_ortho no-group-biases | 0.3 | − ")) == 2
    assert f"**Group {L15}**" in block and f"**Group {L3}**" in block
    assert block.rstrip().endswith("`run_10`: `python experiment.py --out_dir=run_10` (commit 0000000)")
    assert "No differences in this group: they need a topk or fixed_ortho run and another setting." in block
    prose = block.replace("\n", " ")
    assert prose.count("± = sample std over seeds") == 2
    assert prose.count("± = standard error of the difference") == 1


def test_a_mean_over_a_lower_bound_is_marked(tmp_path):
    """topk seed 1's held-out score is a lower bound: the topk mean (0.5 + 1.5)/2 = 1 is one too; the
    adaptive_ortho row, with no bound, is unmarked."""
    root = tmp_path / "runs"
    write_run(root / "run_0", "topk", seed=0, held_out=0.5, held_out_se=0.1, lower_bound=False)
    write_run(root / "run_1", "topk", seed=1, held_out=1.5, held_out_se=0.1, lower_bound=True)
    write_run(root / "run_2", "adaptive_ortho", alpha=0.1, held_out=2.0, held_out_se=0.2,
              lower_bound=False)
    runs, _ = plot.load_runs(plot.find_run_dirs([str(root / "run_*")]))
    block = plot.results_block(plot.group_runs(runs))
    assert lines_starting(block, "| topk | – | 2 | run_0, run_1 | ≥1.0000 ± 0.7071 | 0.1000 ± 0.0000 |")
    assert lines_starting(block, "| adaptive_ortho | 0.1 | 1 | run_2 | 2.0000 | 0.2000 |")
    assert "≥: some seed's value is a lower bound" in block.replace("\n", " ")


def test_results_option_replaces_only_the_block(root, block, tmp_path):
    before = "# Title ünïcode\r\nprose 1.234\n\n" + plot.RESULTS_START + "\nold typed 9.99\n\n"
    after = plot.RESULTS_END + "\nafter\n  no final newline"
    readme = tmp_path / "README.md"
    readme.write_bytes((before + after).encode())
    out = tmp_path / "plots"
    plot.main([str(root / "run_*"), f"--out_dir={out}", "--results", str(readme)])
    text = readme.read_bytes()
    head = before[:before.index(plot.RESULTS_START) + len(plot.RESULTS_START) + 1]
    assert text.startswith(head.encode()) and text.endswith(after.encode())
    assert text.decode()[len(head):-len(after)] == "\n" + block.strip("\n") + "\n\n"
    assert plot.replace_results(text.decode(), block) == text.decode()  # a second run changes nothing
    assert block in (out / "results.md").read_text()


def test_plot_with_no_runs_named_regenerates_the_documents_beside_it(monkeypatch, tmp_path):
    """`python plot.py`: run_0 beside plot.py (a study run would do as well) → RESULTS.md's block and the
    README's headline beside plot.py are rewritten; with a run named, or the figures written elsewhere, they
    are left alone (the README would link the other folder's figure)."""
    monkeypatch.setattr(plot, "HERE", tmp_path)
    write_run(tmp_path / "run_0", "topk", held_out=0.5)
    results = tmp_path / "RESULTS.md"
    readme = tmp_path / "README.md"
    results.write_text(f"# R\n{plot.RESULTS_START}\nold 9.99\n{plot.RESULTS_END}\n")
    readme.write_text(f"# T\n{plot.HEADLINE_MARKERS[0]}\nold 8.88\n{plot.HEADLINE_MARKERS[1]}\n")
    before = results.read_text(), readme.read_text()
    plot.main([str(tmp_path / "run_0"), f"--out_dir={tmp_path / 'named'}"])
    assert (results.read_text(), readme.read_text()) == before
    plot.main([f"--out_dir={tmp_path / 'elsewhere'}"])
    assert (results.read_text(), readme.read_text()) == before
    plot.main([f"--out_dir={tmp_path / 'plots'}"])
    runs, _ = plot.load_runs([tmp_path / "run_0"])
    assert plot.results_block(plot.group_runs(runs)) in results.read_text()
    assert "old 9.99" not in results.read_text() and "old 8.88" not in readme.read_text()


@pytest.mark.parametrize("text", ["# no markers\n", f"{plot.RESULTS_START}\nno end\n",
                                  f"{plot.RESULTS_END}\n{plot.RESULTS_START}\n",
                                  f"{plot.RESULTS_START}\n{plot.RESULTS_START}\n{plot.RESULTS_END}\n",
                                  f"see `{plot.RESULTS_START}` and `{plot.RESULTS_END}` in prose\n"])
def test_missing_markers_are_a_clear_error(root, tmp_path, text):
    readme = tmp_path / "README.md"
    readme.write_text(text)
    out = tmp_path / "plots"
    with pytest.raises(SystemExit) as err:
        plot.main([str(root / "run_*"), f"--out_dir={out}", "--results", str(readme)])
    assert plot.RESULTS_START in str(err.value) and plot.RESULTS_END in str(err.value)
    assert readme.read_text() == text and not out.exists()  # checked before any work


def test_paired_difference_is_the_mean_per_seed_difference():
    """Seeds 0, 1, 2 on both sides, seed 3 on one: d = 0.5, 0.1, 0.3 → mean 0.3,
    SE std(d)/√3 = 0.2/√3."""
    run = lambda seed, v: {"seed": seed, "held_out_score": v}
    a = {0: [run(0, 1.5)], 1: [run(1, 2.1)], 2: [run(2, 0.3)], 3: [run(3, 9.0)]}
    b = {0: [run(0, 1.0)], 1: [run(1, 2.0)], 2: [run(2, 0.0)]}
    d, se, n, _ = plot.paired_difference(a, b, "held_out_score")
    assert (d, n) == (pytest.approx(0.3), 3) and se == pytest.approx(0.2 / math.sqrt(3))
    assert plot.paired_difference({0: [run(0, 1.0)]}, {0: [run(0, 0.5)]}, "held_out_score")[:2] == (0.5, None)
    assert plot.paired_difference({0: [run(0, 1.0)]}, {1: [run(1, 0.5)]}, "held_out_score") is None


def test_readme_headline_holds_the_figures_points_and_the_controls(root, tmp_path):
    """Group L15 (more runs than L3): one row per headline point, its score the seed mean with the
    95% CI t(0.975, n−1)·s/√n and the EV minus topk's paired by seed; topk is the reference. adaptive
    α = 0.3: seeds 2.0 (seed 0's two runs averaged) and 5.0; EV 0.76 and 0.78 against topk's 0.80, 0.81."""
    from scipy.stats import t as student_t
    readme = tmp_path / "docs" / "README.md"
    readme.parent.mkdir()
    readme.write_text(f"# Title\n{plot.HEADLINE_MARKERS[0]}\nold 9.99\n{plot.HEADLINE_MARKERS[1]}\nafter\n")
    out = tmp_path / "plots"
    plot.main([str(root / "run_*"), f"--out_dir={out}", "--readme", str(readme)])
    text = readme.read_text()
    assert "old 9.99" not in text and text.startswith("# Title\n") and text.endswith("\nafter\n")
    assert f"](../plots/headline_{L15}.png)" in text and (out / f"headline_{L15}.png").is_file()
    half = lambda values: (student_t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1)
                           / np.sqrt(len(values)))
    h, e = half([2.0, 5.0]), half([-0.04, -0.03])
    row, = lines_starting(text, "| adaptive_ortho α=0.3 |")
    assert row == (f"| adaptive_ortho α=0.3 | 2 | 3.500 [{3.5 - h:.3f}, {3.5 + h:.3f}] | "
                   f"-0.0350 [{-0.035 - e:.4f}, {-0.035 + e:.4f}] |")
    topk, = lines_starting(text, "| topk |")
    t = half([0.3, 0.5, 0.7])
    assert topk == f"| topk | 3 | 0.500 [{0.5 - t:.3f}, {0.5 + t:.3f}] | the reference |"
    fixed, = lines_starting(text, "| fixed_ortho |")
    assert fixed.startswith("| fixed_ortho | 1 | 0.600 | ")  # one seed: no interval
    assert not lines_starting(text, "| allpairs_ortho")  # no EV with outliers dropped: not a point


def test_readme_headline_counts_the_study_runs_of_every_group(tmp_path, monkeypatch):
    """The headline's figure and table are one group's, its study lines are the whole study's: the longer
    training's runs (2× tokens) form a group of their own and still count."""
    monkeypatch.setattr(study, "HERE", tmp_path)
    write_run(tmp_path / study.run_name("topk", 0), "topk", held_out=0.5, typical_ev=0.8)
    write_run(tmp_path / study.run_name("fixed", 0), "fixed_ortho", held_out=0.7, typical_ev=0.79)
    long = write_run(tmp_path / study.run_name("long_topk", 0), "topk", held_out=0.6, typical_ev=0.81)
    info = json.loads((long / "final_info.json").read_text())
    tokens = info["training results for layer 15"]["config"]["train_tokens"]
    info["training results for layer 15"]["config"]["train_tokens"] = tokens * study.LONG_FACTOR
    (long / "final_info.json").write_text(json.dumps(info))
    runs, _ = plot.load_runs(sorted(d.parent for d in tmp_path.glob("runs/*/final_info.json")))
    groups = plot.group_runs(runs)  # the larger group keeps the name; the other adds how it differs
    assert {label: len(group) for label, group in groups.items()} == {
        L15: 2, f"{L15}_train-tokens-{tokens * study.LONG_FACTOR}-x-4-epochs": 1}
    block = plot.headline_block(groups, tmp_path / "plots", tmp_path / "README.md")
    assert f"**Study v3**: 3 of the {len(study.manifest())} runs finished." in block
    assert f"1 of the {2 * len(study.SWEEP_SEEDS)} runs at {study.LONG_FACTOR}× tokens finished" in block


def test_readme_headline_says_when_there_is_nothing_to_compare(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "run_0", "topk", held_out=0.5, typical_ev=0.8)
    runs, _ = plot.load_runs(plot.find_run_dirs([str(root / "run_*")]))
    block = plot.headline_block(plot.group_runs(runs), tmp_path / "plots", tmp_path / "README.md")
    assert block == f"No headline yet: group {L15} has no variant beside a topk run.\n"
