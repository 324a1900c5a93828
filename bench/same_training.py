"""Does another commit train the same SAEs? Train the planted tiny config (tests/test_robust.py) of every
variant with this checkout's code, then compare two such folders bit for bit.

    python bench/same_training.py /tmp/new                      # in this checkout
    (cd ../other_checkout && python /path/to/bench/same_training.py /tmp/old)
    python bench/same_training.py --compare /tmp/old /tmp/new   # weights and train_log.jsonl, per variant

The study's runs name their commit; RESULTS.md lists the commits whose training was checked this way.
"""
import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path[:0] = [".", "tests"]  # the checkout it runs in: its experiment.py and its planted test data
from test_robust import make_entry, tiny_config  # noqa: E402

VARIANTS = ("topk", "fixed_ortho", "allpairs_ortho", "adaptive_ortho")


def train_all(root: Path) -> None:
    import experiment
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    entry = make_entry(root)
    for variant in VARIANTS:
        out = root / variant
        out.mkdir()
        torch.manual_seed(0)
        sae, _, info, _ = experiment.train(tiny_config(out, variant=variant), entry, out)
        torch.save(sae.state_dict(), root / f"{variant}.pt")
        print(f"{variant}: {info['training_steps']} steps, validation loss {info['val_recon']:.6f}")


def compare(a: Path, b: Path) -> bool:
    same = True
    for variant in VARIANTS:
        wa, wb = torch.load(a / f"{variant}.pt"), torch.load(b / f"{variant}.pt")
        weights = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        log = (a / variant / "train_log.jsonl").read_bytes() == (b / variant / "train_log.jsonl").read_bytes()
        print(f"{variant}: weights {'identical' if weights else 'DIFFER'}, train_log "
              f"{'identical' if log else 'DIFFERS'}")
        same &= weights and log
    return same


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--compare", action="store_true", help="compare two folders instead of training")
    args = parser.parse_args()
    if args.compare:
        sys.exit(0 if compare(*args.folders) else 1)
    train_all(args.folders[0])
