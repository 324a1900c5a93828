"""The benchmark scripts run (tiny shapes, one repetition; the timings themselves are not checked)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_bench_runs_and_checks_against_dense():
    out = subprocess.run([sys.executable, "-m", "bench.bench_train_step", "--d", "16", "--dict_size",
                          "64", "--k", "4", "--batch", "64", "--reps", "1", "--steps", "1", "--n_forget",
                          "20", "--n_retain", "20", "--dead", "10", "--no_peers"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    errors = out.stdout.split("dense reference (max |diff| / max |ref|): ")[1].splitlines()[0]
    assert all(float(e.split()[1]) < 1e-4 for e in errors.split(", ")), errors
    assert ("| ours: topk step |" in out.stdout
            and "| topk step rate / encoder product rate (x @ W_enc) |" in out.stdout)


def test_same_training_finds_a_checkout_identical_to_itself_and_a_changed_weight(tmp_path):
    script = [sys.executable, "bench/same_training.py"]
    for name in ("a", "b"):
        assert subprocess.run(script + [str(tmp_path / name)], cwd=ROOT, capture_output=True).returncode == 0
    same = subprocess.run(script + ["--compare", str(tmp_path / "a"), str(tmp_path / "b")], cwd=ROOT,
                          capture_output=True, text=True)
    assert same.returncode == 0 and same.stdout.count("weights identical, train_log identical") == 4
    import torch
    weights = torch.load(tmp_path / "b" / "adaptive_ortho.pt")
    weights["W_dec"][0, 0] += 1e-6
    torch.save(weights, tmp_path / "b" / "adaptive_ortho.pt")
    changed = subprocess.run(script + ["--compare", str(tmp_path / "a"), str(tmp_path / "b")], cwd=ROOT,
                             capture_output=True, text=True)
    assert changed.returncode == 1 and "adaptive_ortho: weights DIFFER" in changed.stdout
