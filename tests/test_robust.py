"""Nothing lost: checkpoints and resume (SIGKILL, Ctrl-C), refused bad checkpoints, NaN stops, bad input."""
import errno
import json
import random
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import activations
import data
import experiment
from files import sha256_file

D, N_TRAIN, N_VAL = 16, 3000, 400


def make_entry(root: Path) -> Path:
    """A cache entry as activations.build_cache writes it, from planted data: forget and retain tokens
    are sparse sums of their own domain's directions plus shared ones."""
    gen = np.random.default_rng(0)
    directions = gen.standard_normal((24, D)).astype(np.float32)
    entry = root / "entry"
    entry.mkdir()
    files = {}
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        labels = (np.arange(n) % 2).astype(np.uint8)
        codes = gen.exponential(1.0, (n, 24)) * (gen.random((n, 24)) < 0.15)
        codes[labels == 1, :8] = 0  # retain-only directions 0-7 never appear on forget tokens
        codes[labels == 0, 8:16] = 0  # forget-only directions 8-15 never appear on retain tokens
        np.save(entry / f"{split}_acts.npy", (codes @ directions).astype(np.float32))
        np.save(entry / f"{split}_labels.npy", labels)
        for suffix in ("acts", "labels"):
            path = entry / f"{split}_{suffix}.npy"
            files[path.name] = {"sha256": sha256_file(path), "shape": list(np.load(path).shape)}
    (entry / "manifest.json").write_text(json.dumps({"key": {}, "files": files}))
    return entry


def tiny_config(out: Path, **changes) -> experiment.Config:
    """A resolved config (no 0 / -1 defaults left) for a ~45-step adaptive_ortho run on the planted entry."""
    cfg = experiment.Config(out_dir=str(out), device="cpu", layer=0, dict_size=64, k=4, batch_size=128,
                            epochs=2.0, lr=3e-3, warmup_steps=5, dead_window_tokens=1000,
                            train_tokens=N_TRAIN, group_every=5, t0=10, lambda2_max=10.0,
                            checkpoint_every=4, variant="adaptive_ortho", min_freq=0.0)
    return experiment.dataclasses.replace(cfg, **changes)


DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    import experiment
    from tests.test_robust import tiny_config
    entry, out, kill_step, how = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.manual_seed(0)
    real_step = experiment.TrainerTopK.step
    def step(self, *args):
        if self.steps_done == kill_step:  # a real signal to this process, in the middle of training
            os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGINT)
        return real_step(self, *args)
    experiment.TrainerTopK.step = step
    try:
        sae, scale, info, separation = experiment.train(tiny_config(out), entry, out)
    except experiment.TrainingInterrupted as e:
        print(e)
        sys.exit(130)
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, str(out / "sae.safetensors"))
    info.pop("train_wall_time_s")
    (out / "result.json").write_text(json.dumps({"info": info, "separation": separation}))
""")


def drive(entry: Path, out: Path, kill_step: int = -1, how: str = "kill") -> subprocess.CompletedProcess:
    out.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-c", DRIVER, str(entry), str(out), str(kill_step), how],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    entry = make_entry(root)
    result = drive(entry, root / "clean")
    assert result.returncode == 0, result.stderr[-2000:]
    return entry, root / "clean"


def assert_same_outcome(a: Path, b: Path) -> None:
    """Bit-identical SAE, training info (but the wall time and resume marker) and training log."""
    sae_a, sae_b = load_file(str(a / "sae.safetensors")), load_file(str(b / "sae.safetensors"))
    assert sae_a.keys() == sae_b.keys()
    for name in sae_a:
        assert torch.equal(sae_a[name], sae_b[name]), name
    res_a, res_b = json.loads((a / "result.json").read_text()), json.loads((b / "result.json").read_text())
    for res in (res_a, res_b):
        res["info"].pop("resumed_from_step")
    assert res_a == res_b
    assert (a / "train_log.jsonl").read_bytes() == (b / "train_log.jsonl").read_bytes()


def test_sigkill_at_a_random_step_then_rerun_gives_the_uninterrupted_result(uninterrupted, tmp_path):
    entry, clean = uninterrupted
    steps = json.loads((clean / "result.json").read_text())["info"]["training_steps"]
    kill_step = random.Random().randint(5, steps - 2)
    killed = drive(entry, tmp_path / "run", kill_step, "kill")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "run" / "result.json").exists()
    ckpt = experiment.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt",
                                      tiny_config(tmp_path / "run"))
    assert ckpt["step"] == kill_step // 4 * 4 and not ckpt["finished"]  # the last periodic checkpoint
    resumed = drive(entry, tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert (json.loads((tmp_path / "run" / "result.json").read_text())["info"]["resumed_from_step"]
            == ckpt["step"])
    assert_same_outcome(clean, tmp_path / "run")


def test_ctrl_c_writes_a_checkpoint_at_that_step_and_the_rerun_resumes(uninterrupted, tmp_path):
    entry, clean = uninterrupted
    interrupted = drive(entry, tmp_path / "run", 11, "int")
    assert interrupted.returncode == 130, interrupted.stderr[-2000:]
    assert ("SIGINT at step 12" in interrupted.stdout
            and f"resume with the same command and --out_dir={tmp_path / 'run'}" in interrupted.stdout)
    ckpt = experiment.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt",
                                      tiny_config(tmp_path / "run"))
    # the signal arrived as step 11 began; that step finished, then training stopped
    assert ckpt["step"] == 12
    assert drive(entry, tmp_path / "run").returncode == 0
    assert_same_outcome(clean, tmp_path / "run")


def test_finished_training_is_not_redone_after_a_crash_in_the_evaluations(uninterrupted, tmp_path):
    entry, _ = uninterrupted
    out = tmp_path / "run"
    out.mkdir()
    first, _, first_info, _ = experiment.train(tiny_config(out), entry, out)
    ckpt = experiment.load_checkpoint(out / "checkpoints" / "last.pt", tiny_config(out))
    assert ckpt["finished"] and ckpt["step"] == first_info["training_steps"]
    log_before = (out / "train_log.jsonl").read_bytes()
    # as a rerun after a crash in the evals would
    sae, _, info, _ = experiment.train(tiny_config(out), entry, out)
    assert (info["steps_run"] == info["training_steps"]
            and (out / "train_log.jsonl").read_bytes() == log_before)
    assert info["val_recon"] == first_info["val_recon"]
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in sae.state_dict().items())


def test_checkpoint_from_another_config_is_refused_naming_the_fields(uninterrupted, tmp_path):
    entry, _ = uninterrupted
    assert drive(entry, tmp_path / "run", 9, "int").returncode == 130
    # unlearning does not affect training
    other = tiny_config(tmp_path / "run", k=5, alpha=0.2, unlearning=False)
    with pytest.raises(experiment.ConfigError) as e:
        experiment.prepare_out_dir(other)
    assert ("k: 4 -> 5" in str(e.value) and "alpha: 0.1 -> 0.2" in str(e.value)
            and "unlearning" not in str(e.value))
    assert "--overwrite" in str(e.value)
    fresh = experiment.prepare_out_dir(experiment.dataclasses.replace(other, overwrite=True))
    assert not (fresh / "checkpoints").exists()  # --overwrite starts afresh


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_is_refused(uninterrupted, tmp_path, damage):
    entry, _ = uninterrupted
    assert drive(entry, tmp_path / "run", 9, "int").returncode == 130
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:len(raw) // 2]
    else:
        raw[len(raw) // 2] ^= 0xFF  # inside tensor data: torch.load alone would load it silently
    path.write_bytes(bytes(raw))
    with pytest.raises(experiment.ConfigError, match="truncated or corrupted"):
        experiment.load_checkpoint(path, tiny_config(tmp_path / "run"))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(uninterrupted, tmp_path,
                                                                            monkeypatch):
    entry, _ = uninterrupted
    real_step = experiment.TrainerTopK.step

    def step(self, *args):
        stats = real_step(self, *args)
        # steps_done counts done steps
        return stats | {"loss": float("nan"), "ortho": float("nan")} if self.steps_done == 10 else stats
    monkeypatch.setattr(experiment.TrainerTopK, "step", step)
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(FloatingPointError, match=r"step 9: loss is nan .*ortho nan"):
        experiment.train(tiny_config(out), entry, out)
    ckpt = experiment.load_checkpoint(out / "checkpoints" / "last.pt", tiny_config(out))
    assert ckpt["step"] == 8 and not ckpt["finished"]


def test_a_non_finite_parameter_is_never_checkpointed(uninterrupted, tmp_path, monkeypatch):
    """A NaN in the weights that the step's loss does not show: the next checkpoint is refused, naming
    the parameter, and the previous one stays."""
    entry, _ = uninterrupted
    real_step = experiment.TrainerTopK.step

    def step(self, *args):
        stats = real_step(self, *args)
        if self.steps_done == 12:  # steps_done counts done steps: after step 11, just before its checkpoint
            with torch.no_grad():
                self.sae.W_dec[3, 0] = float("nan")
        return stats
    monkeypatch.setattr(experiment.TrainerTopK, "step", step)
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(FloatingPointError, match=r"non-finite SAE parameters \(W_dec\)"):
        experiment.train(tiny_config(out, lambda2_max=0.0), entry, out)
    ckpt = experiment.load_checkpoint(out / "checkpoints" / "last.pt", tiny_config(out, lambda2_max=0.0))
    assert ckpt["step"] == 8 and all(torch.isfinite(p).all() for p in ckpt["sae"].values())


def test_resumed_batch_stream_continues_the_same_batches():
    acts = np.arange(50, dtype=np.float32)[:, None].repeat(2, 1)
    labels = np.zeros(50, dtype=np.uint8)
    full = activations.shuffled_batches(acts, labels, 8, seed=3)
    expected = [next(full)[0] for _ in range(20)]  # 6 batches per epoch: crosses three epoch boundaries
    for skip in (0, 5, 6, 13):
        resumed = activations.shuffled_batches(acts, labels, 8, seed=3, skip=skip)
        for want in expected[skip:]:
            assert torch.equal(next(resumed)[0], want)


# --- bad input: one-line errors before heavy work, no partial output


def test_unwritable_out_dir_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(experiment.ConfigError, match="--out_dir: cannot write"):
        experiment.prepare_out_dir(tiny_config(blocker / "run"))


@contextmanager
def lock_held_elsewhere(lock: Path):
    """Another process holds an exclusive flock on `lock` for the duration of the block."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
                               "print('held', flush=True); time.sleep(300)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_an_out_dir_in_use_is_refused_and_freed_when_its_run_exits(tmp_path):
    """A second run in the same out_dir (here: another process holding the lock) is refused before it
    touches the folder, also with --overwrite; once the holder exits, the folder can be used again."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "final_info.json").write_text("{}")
    with lock_held_elsewhere(out / ".lock"):
        with pytest.raises(experiment.ConfigError, match="another run is using"):
            experiment.prepare_out_dir(tiny_config(out, overwrite=True))
        assert (out / "final_info.json").exists()  # --overwrite did not get to delete anything
    assert experiment.prepare_out_dir(tiny_config(out, overwrite=True)) == out
    assert not (out / "final_info.json").exists()


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    ("", "holds no documents"),
    ('{"text": "fine"}\n{"title": "no text field"}\n', "line 2: not a JSON object with a 'text' field"),
    ('{"text": "fine"}\nnot json\n', "line 2"),
])
def test_bad_corpus_file_gives_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "forget.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(experiment.ConfigError, match=message) as e:
        experiment.load_corpus_or_explain("forget_corpus", str(path), tiny_config(tmp_path / "run"))
    assert str(e.value).startswith("--forget_corpus:") and "\n" not in str(e.value)


def test_a_missing_corpus_fails_before_the_model_loads(tmp_path, monkeypatch):
    def load_model(*args):
        raise AssertionError("the model was loaded before the corpora were checked")
    monkeypatch.setattr(experiment.models, "load_model", load_model)
    cfg = tiny_config(tmp_path / "run", forget_corpus=str(tmp_path / "missing.jsonl"))
    with pytest.raises(experiment.ConfigError, match="^--forget_corpus:.*does not exist"):
        experiment.load_inputs(cfg, "tiny", "requested by name")


def test_malformed_question_rows_are_counted_by_reason():
    rows = [json.dumps({"question": "q", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
                        "correct_answer": letter, "topic": "human aging"}) for letter in ("B", "answer", "E")]
    rows += ["{not json", json.dumps({"question": "q", "topic": "x", "correct_answer": "A"}),
             json.dumps([1, 2]), ""]
    by_subject, skipped = data.parse_mcq_rows(rows)
    assert [q.answer for q in by_subject["human_aging"]] == [1]
    assert skipped == {"correct_answer not one of A-D": 2, "not valid JSON": 1,
                       "missing or non-text fields": 2}


def test_disk_full_while_harvesting_removes_partial_files(tmp_path, monkeypatch):
    def harvest(model, hook_name, layer, tokens, labels, batch_size, acts_path, desc):
        acts_path.write_bytes(b"\0" * 1000)  # a partial shard
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(activations, "harvest_split", harvest)
    model = type("M", (), {"cfg": type("C", (), {"d_model": 8, "dtype": torch.bfloat16})()})()
    splits = {"train": (torch.zeros(4, 5, dtype=torch.long), torch.zeros(4))}
    entry = tmp_path / "activations" / "key"
    entry.parent.mkdir()
    with pytest.raises(OSError, match="disk full while writing the activation cache") as e:
        activations.build_cache(entry, {}, model, "hook", 0, splits, 2)
    assert e.value.errno == errno.ENOSPC and "--cache_dir" in str(e.value)
    assert list(entry.parent.iterdir()) == []  # neither the entry nor its temporary folder is left


def test_a_killed_harvests_folder_is_removed_by_the_next_one(tmp_path, monkeypatch):
    """A harvest killed outright leaves <entry>.tmp-<pid>; the next build_cache of that key removes it
    when the pid is gone, and keeps a live run's folder (pid 1's)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    monkeypatch.setattr(activations, "harvest_split", lambda *args: None)
    monkeypatch.setattr(activations, "sha256_file", lambda path: "")
    monkeypatch.setattr(activations.np, "load", lambda *args, **kwargs: np.zeros(1))
    entry = tmp_path / "activations" / "key"
    orphan, live = entry.with_name(f"key.tmp-{dead}"), entry.with_name("key.tmp-1")  # pid 1: init, alive
    other = entry.with_name(f"other.tmp-{dead}")  # another key's: not this harvest's business
    for folder in (orphan, live, other):
        folder.mkdir(parents=True)
        (folder / "train_acts.npy").write_bytes(b"\0" * 100)
    splits = {"train": (torch.zeros(4, 5, dtype=torch.long), torch.zeros(4))}
    activations.build_cache(entry, {}, None, "hook", 0, splits, 2)
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted(["key", live.name, other.name])


def test_interrupted_model_conversion_leaves_no_partial_copy_and_is_redone(tmp_path, monkeypatch):
    import models

    class Fake:
        config, hf_quantizer = type("Cfg", (), {})(), None

        def __init__(self, fail):
            self.fail = fail

        def save_pretrained(self, folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "model.safetensors").write_bytes(b"\0" * 100)
            if self.fail:
                raise KeyboardInterrupt  # Ctrl-C in the middle of writing the weights
    fail = [True]
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: Fake(fail[0]))
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: Fake(False))
    folder = tmp_path / "models" / "m-fp32"
    folder.parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        models._convert_gguf(tmp_path / "x.gguf", "abc", folder)
    assert list(folder.parent.iterdir()) == []  # no partial copy, no half folder
    fail[0] = False
    models._convert_gguf(tmp_path / "x.gguf", "abc", folder)  # the next run converts again
    assert models._is_complete(folder, "abc") and [p.name for p in folder.parent.iterdir()] == ["m-fp32"]


@pytest.mark.parametrize("text, value", [("true", True), ("YES", True), ("1", True), ("false", False),
                                         ("No", False), ("0", False)])
def test_booleans_parse_from_the_six_spellings(text, value):
    assert experiment.parse_config([f"--absorption={text}"]).absorption is value
    assert experiment.parse_config(["--absorption"]).absorption is True


@pytest.mark.parametrize("text", ["on", "off", "ture", ""])
def test_a_mistyped_boolean_is_refused_not_read_as_false(text, capsys):
    with pytest.raises(SystemExit):
        experiment.parse_config([f"--absorption={text}"])
    assert f"'{text}' is not a boolean: use true/false, 1/0 or yes/no" in capsys.readouterr().err


def test_wandb_stays_off_in_tests_even_with_a_key(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert experiment.open_wandb(experiment.Config(out_dir=str(tmp_path))) is None


def test_no_out_dir_means_a_new_folder_no_committed_run_can_hold(tmp_path, monkeypatch):
    """`python experiment.py` with no --out_dir writes into out/run_<UTC date-time>, a folder git ignores;
    a second run in the same second gets its own."""
    class Frozen(experiment.datetime):
        @classmethod
        def now(cls, tz=None):
            return experiment.datetime(2026, 12, 4, 22, 30, 5, tzinfo=tz)

    monkeypatch.setattr(experiment, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    first = experiment.new_out_dir()
    assert first == "out/run_20261204-223005"
    Path(first).mkdir(parents=True)
    assert experiment.new_out_dir() == "out/run_20261204-223005_2"
    repo = Path(__file__).resolve().parent.parent
    ignored = subprocess.run(["git", "check-ignore", "-q", first], cwd=repo)
    assert ignored.returncode == 0, "out/ must not be committed"
    with pytest.raises(experiment.ConfigError, match="--evaluate_only: name the finished run"):
        experiment.validate(experiment.Config(evaluate_only=True))
