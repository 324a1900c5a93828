"""torchrun on CPU (gloo, 2 processes): one SAE trained data-parallel equals the single-process SAE; a sharded
harvest writes the same cache entry; a killed rank stops the job and the rerun resumes; a locked out_dir is
refused; the embedded default runs end to end and records its world size."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import test_experiment
from tests.test_robust import lock_held_elsewhere, make_entry

ROOT = Path(__file__).parent.parent

TRAIN_DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    import distributed, experiment
    from tests.test_robust import tiny_config
    entry, out, kill_step = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    distributed.init("cpu")
    torch.manual_seed(0)
    real_step = experiment.TrainerTopK.step
    def step(self, *args):
        # a real SIGKILL to rank 1 in the middle of training
        if self.steps_done == kill_step and distributed.rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(self, *args)
    experiment.TrainerTopK.step = step
    sae, scale, info, separation = experiment.train(tiny_config(out), entry, out)
    if distributed.is_main():
        save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, str(out / "sae.safetensors"))
        (out / "result.json").write_text(json.dumps({"info": info, "separation": separation}))
    distributed.shutdown()
""")

HARVEST_DRIVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer
    import activations, distributed
    tokenizer_dir, entry = sys.argv[1], Path(sys.argv[2])
    distributed.init("cpu")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=16, d_head=4, n_heads=4, n_ctx=16,
                                                      d_vocab=len(tokenizer), act_fn="gelu",
                                                      normalization_type="LN", device="cpu", seed=0),
                              tokenizer=tokenizer).eval()
    gen = torch.Generator().manual_seed(0)
    splits = {split: (torch.randint(4, len(tokenizer), (n, 9), generator=gen), torch.arange(n) % 2)
              for split, n in (("train", 23), ("val", 6))}
    activations.build_cache(entry, {"test": 1}, model, "blocks.1.hook_resid_post", 1, splits, batch_size=4)
    distributed.shutdown()
""")


def launch(script: Path, *args, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc script args` from the repository root."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", str(script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The planted entry, and the same tiny training run by 1 and by 2 processes (global batch 128 in
    both)."""
    root = tmp_path_factory.mktemp("distributed")
    entry = make_entry(root)
    driver = root / "train_driver.py"
    driver.write_text(TRAIN_DRIVER)
    for nproc in (1, 2):
        (root / f"n{nproc}").mkdir()
        result = launch(driver, entry, root / f"n{nproc}", -1, nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
    return root, entry, driver


def read(out: Path) -> tuple[dict, dict, list]:
    result = json.loads((out / "result.json").read_text())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return load_file(str(out / "sae.safetensors")), result, log


def test_two_processes_train_the_single_process_sae(trained):
    """Same weights up to float reduction order: a 2-process step sums two half-batch gradients where one
    process sums the batch at once (relative differences ~1e-7 per step). 46 Adam steps with TopK
    selection keep them near 1e-5; a wrong share (each rank's loss not halved, a missed all-reduce) gives
    differences of order 1."""
    root, _, _ = trained
    (sae_1, res_1, log_1), (sae_2, res_2, log_2) = read(root / "n1"), read(root / "n2")
    for name in sae_1:
        assert torch.allclose(sae_1[name], sae_2[name], rtol=1e-4, atol=1e-5), name
    assert res_2["info"]["world_size"] == 2 and res_1["info"]["world_size"] == 1
    assert res_1["separation"]["forget_features"] == res_2["separation"]["forget_features"]
    groups = lambda res: [(h["step"], h["n_forget"], h["n_retain"])
                          for h in res["separation"]["regroup_history"]]
    assert groups(res_1) == groups(res_2) and len(groups(res_1)) >= 5
    assert len(log_1) == len(log_2) == res_1["info"]["training_steps"]
    for a, b in zip(log_1, log_2):
        # the dead-latent counters saw the global batch
        assert a["dead_latents"] == b["dead_latents"], a["step"]
        for key in ("loss", "recon", "auxk", "explained_variance", "l0", "ortho"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
        if "val_recon" in a:
            assert b["val_recon"] == pytest.approx(a["val_recon"], rel=1e-4)


def test_a_killed_rank_stops_the_job_and_the_rerun_resumes_to_the_same_sae(trained, tmp_path):
    """SIGKILL to rank 1 at step 21: torchrun stops rank 0 and exits non-zero, the last checkpoint
    (step 20) is kept; the same command resumes and ends with the uninterrupted 2-process SAE. The
    checkpoint holds global state only, so one process can resume it as well."""
    root, entry, driver = trained
    for nproc in (2, 1):
        out = tmp_path / f"killed_then_{nproc}"
        out.mkdir()
        killed = launch(driver, entry, out, 21)
        assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
        assert not (out / "result.json").exists() and (out / "checkpoints" / "last.pt").exists()
        resumed = launch(driver, entry, out, -1, nproc=nproc)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resuming from" in resumed.stdout
        (sae_a, res_a, log_a), (sae_b, res_b, log_b) = read(root / "n2"), read(out)
        assert res_b["info"]["resumed_from_step"] == 20
        for name in sae_a:
            if nproc == 2:  # the same computation, replayed
                assert torch.equal(sae_a[name], sae_b[name]), name
            else:  # the last 26 steps by one process: float reduction order only
                assert torch.allclose(sae_a[name], sae_b[name], rtol=1e-4, atol=1e-5), name
        assert [r["step"] for r in log_b] == [r["step"] for r in log_a]


def test_two_process_harvest_writes_the_single_process_entry(tmp_path, make_word_tokenizer):
    """Rank r harvests its share of the batches into the one file; the entry's sha256s equal a 1-process
    harvest's (the same batches run, wherever they run)."""
    tokenizer = make_word_tokenizer(["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(40)])
    driver = tmp_path / "harvest_driver.py"
    driver.write_text(HARVEST_DRIVER)
    manifests = []
    for nproc in (1, 2):
        entry = tmp_path / f"entry_{nproc}"
        result = launch(driver, tokenizer.name_or_path, entry, nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        manifests.append(json.loads((entry / "manifest.json").read_text())["files"])
        assert not list(tmp_path.glob(f"entry_{nproc}.tmp-*"))  # the temporary folder was renamed into place
    assert manifests[0] == manifests[1]
    assert manifests[0]["train_acts.npy"]["shape"] == [23 * 8, 16]


# test_experiment's tiny end-to-end config, without the unlearning eval (rank 0 alone runs it)
TINY = [a for a in test_experiment.TINY if not a.startswith("--unlearning")] + ["--unlearning=false",
                                                                                "--device=cpu"]


def test_torchrun_runs_the_embedded_default_end_to_end(tmp_path):
    """experiment.py under torchrun with 2 processes: rank 0 writes final_info.json, with the world size."""
    out = tmp_path / "run_x"
    result = launch(ROOT / "experiment.py", f"--out_dir={out}", *TINY, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((out / "final_info.json").read_text())
    final = info["training results for layer 15"]["final_info"]
    assert final["world_size"] == 2 and 0 < final["val_explained_variance"] < 1
    assert len((out / "train_log.jsonl").read_text().splitlines()) == final["training_steps"]
    assert result.stdout.count("done in") == 1  # rank 0 alone prints and writes


def test_a_locked_out_dir_is_refused_on_every_rank(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with lock_held_elsewhere(out / ".lock"):
        result = launch(ROOT / "experiment.py", f"--out_dir={out}", *TINY)
    assert result.returncode != 0
    # both ranks, one line each
    assert result.stderr.count("another run is using") == 2, result.stderr[-3000:]
    assert not (out / "train_log.jsonl").exists()
