"""study.py: the manifest matches the pre-registered design, and the command makes only what is
missing, then regenerates the results."""
import subprocess

import experiment
import study


def test_manifest_is_the_design():
    runs = study.manifest()
    assert len(runs) == 5 * 8 + 5 * 3 + 2 * 3
    for label in ("topk", "fixed", "adaptive_a0.1", "allpairs", "lambda0"):  # the compared settings
        assert all(f"run_{label}_s{seed}" in runs for seed in range(8))
    for name, args in runs.items():  # every run parses, and names its own out_dir
        cfg = experiment.parse_config(args)
        assert cfg.out_dir == name and f"_s{cfg.seed}" in name and cfg.llm_dtype != "auto"
        experiment.validate(cfg)
    assert experiment.parse_config(runs["run_lambda0_s3"]).lambda2_max == 0
    assert experiment.parse_config(runs["run_long_topk_s1"]).train_tokens == 4 * 400_000


def test_only_unfinished_runs_are_run_then_the_readme_regenerated(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "HERE", tmp_path)
    (tmp_path / "run_topk_s0").mkdir()
    (tmp_path / "run_topk_s0" / "final_info.json").write_text("{}")
    (tmp_path / "run_topk_s1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run_topk_s1" / "checkpoints" / "last.pt").write_bytes(b"")
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd[1:]))
    done = study.main(["--only", "run_topk_s0", "run_topk_s1", "run_topk_s2"])
    assert done == ["run_topk_s1", "run_topk_s2"]
    assert [c[0] for c in calls] == ["experiment.py", "experiment.py", "plot.py"]
    assert calls[0][1] == "--out_dir=run_topk_s1" and calls[-1] == ["plot.py", "--readme=README.md"]
    assert [study.state(tmp_path / f"run_topk_s{s}") for s in range(3)] == [
        "finished", "unfinished", "missing"]
