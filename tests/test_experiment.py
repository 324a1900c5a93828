"""experiment.py end to end on the embedded model (SmolLM2-135M-Instruct, offline, CPU), at a tiny budget."""
import json
import shutil
import subprocess
import sys

import pytest

TINY = ["--model=smollm2-135m-instruct", "--train_tokens=4096", "--val_tokens=1024", "--batch_size=256",
        "--epochs=1", "--dict_size=1152", "--k=16", "--core_eval_batches=1",
        "--core_eval_sparsity_batches=1", "--core_eval_batch_prompts=2", "--harvest_batch_size=8",
        "--variant=adaptive_ortho", "--group_every=4", "--unlearning_retain_thresholds=0.01",
        "--unlearning_n_features=10", "--unlearning_multipliers=100",
        "--unlearning_questions_per_subject=2", "--unlearning_ce_contexts=6"]


def run(*args):
    result = subprocess.run([sys.executable, "experiment.py", *args], capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    log = run(f"--out_dir={root / 'run_1'}", *TINY)
    return root, log


def test_outputs_hold_the_seed_layout_and_sane_values(finished_run):
    root, _ = finished_run
    info = json.loads((root / "run_1" / "final_info.json").read_text())
    training = info["training results for layer 15"]
    assert (training["config"]["k"] == 16 and training["config"]["dict_size"] == 1152
            and training["config"]["layer"] == 15)
    final = training["final_info"]
    # ceil(2048 / 127) contexts per domain, BOS dropped
    assert final["train_tokens_harvested"] == 2 * 17 * 127
    assert final["training_steps"] == (final["train_tokens_harvested"]
                                       - final["tokens_dropped_as_outliers"]) // 256
    assert 0 < final["val_explained_variance"] < 1 and final["final_loss"] > 0
    metrics = info["core evaluation results"]["metrics"]
    assert metrics["sparsity"]["l0"] == pytest.approx(16, abs=0.5)
    assert (metrics["model_performance_preservation"]["ce_loss_without_sae"]
            < metrics["model_performance_preservation"]["ce_loss_with_ablation"])
    assert metrics["reconstruction_quality"]["explained_variance_conventional"] < 1
    provenance = info["provenance"]
    assert provenance["model"]["name"] == "smollm2-135m-instruct" and provenance["model"]["gguf_sha256"]
    assert provenance["forget_corpus"]["name"] == "hpo" and provenance["retain_corpus"]["n_words"] > 300_000
    separation = info["knowledge separation results"]
    assert separation["variant"] == "adaptive_ortho" and len(separation["regroup_history"]) >= 1
    unlearn = info["unlearning evaluation results"]
    scores = unlearn["eval_result_metrics"]["unlearning"]
    assert scores["n_forget_questions"] <= 10  # 2 sampled per forget subject: too few for an MCQ score
    assert scores["unlearning_score"] is None and "not meaningful" in scores["mcq_note"]
    assert scores["max_forget_delta_ce"] is not None and "text_score" not in scores
    assert scores["held_out"]["report"]["split"] == "report" and "n_lower_bounds" in scores
    assert set(scores["controls"]) == {"random_features", "difference_of_means", "leace"}
    assert set(scores["conditional"]) == {"rate_groups", "trained_groups"}
    for name in ("difference_of_means", "leace"):
        point = scores["controls"][name]
        assert point["score"] is not None or point["flag"], point
    qa = unlearn["eval_result_metrics"]["unlearning_question_answer_text"]  # the second text pair
    assert qa["text"]["forget"]["report_contexts"] == 6 and "held_out_score" in qa
    # SmolLM2: SAE-Bench's own eval refuses it
    assert info["SAE-Bench unlearning evaluation results"]["ran"] is False
    # removed once finished
    assert provenance["code"]["git_commit"] and not (root / "run_1" / "checkpoints").exists()
    steps = [json.loads(line) for line in (root / "run_1" / "train_log.jsonl").read_text().splitlines()]
    assert len(steps) == final["training_steps"] and "dead_latents" in steps[0]


def test_saved_sae_loads_with_sae_lens(finished_run):
    from sae_lens import SAE
    import experiment  # registers the group-bias SAE class with SAE-Lens
    root, _ = finished_run
    sae = SAE.load_from_disk(str(root / "run_1" / "sae"), device="cpu")
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == (576, 1152, 16)
    # the default variant, adaptive_ortho, comes back with its trained group biases and groups
    assert isinstance(sae, experiment.GroupBiasTopKSAE) and sae.group_bias.abs().sum() > 0
    assert set(sae.feature_group.unique().tolist()) <= {-1, 0, 1} and (sae.feature_group >= 0).any()
    assert sae.cfg.metadata.hook_name == "blocks.15.hook_resid_post"


def test_notes_entry_appended_with_real_numbers(finished_run):
    root, _ = finished_run
    info = json.loads((root / "run_1" / "final_info.json").read_text())
    notes = (root / "notes.txt").read_text()
    ce = info["core evaluation results"]["metrics"]["model_performance_preservation"]["ce_loss_score"]
    assert "run_1" in notes and f"ce_loss_score {ce:.4f}" in notes


def test_second_run_reads_the_cache_and_finished_run_is_protected(finished_run):
    root, _ = finished_run  # its activations may come from an earlier session's cache; run_2 must read them
    refused = subprocess.run([sys.executable, "experiment.py", f"--out_dir={root / 'run_1'}", *TINY],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "--overwrite" in refused.stderr
    log = run(f"--out_dir={root / 'run_2'}", "--seed=1", *TINY)
    assert "reading the cache" in log and "harvest train" not in log
    assert (root / "notes.txt").read_text().count("\n## ") == 2


def test_evaluate_only_rewrites_the_evaluations_and_keeps_the_training(finished_run, tmp_path):
    root, _ = finished_run
    run_dir = tmp_path / "run_1"
    shutil.copytree(root / "run_1", run_dir)
    before = json.loads((run_dir / "final_info.json").read_text())
    command = [sys.executable, "experiment.py", f"--out_dir={run_dir}", "--evaluate_only"]
    refused = subprocess.run(command + ["--k=8"], capture_output=True, text=True)
    assert refused.returncode != 0 and "--k: the run" in refused.stderr and "k=16" in refused.stderr
    # no evaluation flag but one: the run's own evaluation settings (its tiny core eval), unlearning off
    log = run(f"--out_dir={run_dir}", "--evaluate_only", "--unlearning=false")
    assert "re-evaluated" in log and "train SAE" not in log
    after = json.loads((run_dir / "final_info.json").read_text())
    training = next(k for k in before if k.startswith("training results"))
    assert after[training] == before[training]
    assert after["knowledge separation results"] == before["knowledge separation results"]
    assert after["provenance"]["code"] == before["provenance"]["code"]  # the training's code
    evaluation = after["provenance"]["evaluation"]
    assert evaluation["settings"]["unlearning"] is False and "git_commit" in evaluation["code"]
    assert "unlearning evaluation results" not in after  # the command line's setting, not the run's
    assert (evaluation["settings"]["core_eval_batches"], evaluation["settings"]["unlearning_ce_contexts"],
            evaluation["settings"]["unlearning_retain_thresholds"]) == (1, 6, [0.01])  # the run's
    # the same SAE and core-eval settings: the same numbers
    ev = lambda info: info["core evaluation results"]["metrics"]["reconstruction_quality"]
    assert ev(after)["explained_variance_conventional"] == pytest.approx(
        ev(before)["explained_variance_conventional"], abs=1e-6)

    shutil.rmtree(run_dir / "sae")
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode != 0 and "no saved SAE" in refused.stderr
    assert f"--out_dir={root / 'run_1'}" in refused.stderr and "--overwrite" in refused.stderr
