"""The study: every run's arguments (the manifest) and one command that makes whatever is missing.

    python study.py                 # train and evaluate each missing or unfinished run, one at a time,
                                    # then regenerate the figures and the README's results block
    python study.py --list          # the manifest, each run with its state
    python study.py --only run_topk_s0 run_topk_s1

A run is finished when its folder holds final_info.json; an unfinished one (a checkpoint, no
final_info.json) resumes where it stopped, since experiment.py resumes from out_dir/checkpoints. The
design (README, "Pre-registered comparisons") is in SETTINGS and SEEDS; the manifest is what they expand
to, one out_dir per (setting, seed).
"""
import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# every run pins what `auto` would otherwise pick per machine
COMMON = ["--llm_dtype=float32"]
MAIN_SEEDS, SWEEP_SEEDS = range(8), range(3)
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
    "long_topk": (["--variant=topk", "--train_tokens=1600000"], SWEEP_SEEDS),
    "long_adaptive_a0.1": (["--variant=adaptive_ortho", "--alpha=0.1", "--train_tokens=1600000"],
                           SWEEP_SEEDS),
}


def manifest() -> dict:
    """{out_dir: experiment.py arguments} for every run of the study."""
    return {f"run_{label}_s{seed}": [f"--out_dir=run_{label}_s{seed}", *args, f"--seed={seed}",
                                     *COMMON]
            for label, (args, seeds) in SETTINGS.items() for seed in seeds}


def state(out_dir: Path) -> str:
    if (out_dir / "final_info.json").exists():
        return "finished"
    return "unfinished" if (out_dir / "checkpoints" / "last.pt").exists() else "missing"


def main(argv=None) -> list:
    """Runs what is not finished (in manifest order), then plot.py --readme; returns the out_dirs run."""
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
    subprocess.run([sys.executable, "plot.py", "--readme=README.md"], cwd=HERE, check=True)
    return todo


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:  # the run printed its own error; rerun to resume
        sys.exit(f"study: stopped at `{' '.join(map(str, e.cmd[1:]))}` (exit {e.returncode}); "
                 f"python study.py resumes it")
