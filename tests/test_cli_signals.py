"""The command line itself (python experiment.py), stopped by SIGTERM and by SIGINT in the middle of
training: exit code 130, a checkpoint at the step it stopped, and the same command resumes it to the
same SAE. A tiny local Llama and local corpora keep it offline and quick."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import experiment
from test_models import TEXT, save_tiny, tiny_tokenizer

ROOT = Path(experiment.__file__).resolve().parent


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(tiny model folder, forget corpus, retain corpus, cache folder)."""
    root = tmp_path_factory.mktemp("cli")
    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                      tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    model = save_tiny(LlamaForCausalLM(cfg), tok, root / "llama")
    words = TEXT.split()
    corpora = []
    for name, offset in (("forget", 0), ("retain", 7)):
        path = root / f"{name}.jsonl"
        docs = [" ".join(words[(offset + 3 * i + j) % len(words)] for j in range(40)) for i in range(200)]
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        corpora.append(path)
    return model, *corpora, root / "cache"


def command(inputs, out: Path) -> list:
    model, forget, retain, cache = inputs
    # lr and dead_window_tokens explicit: the parsed config is then the resolved one the checkpoint holds
    return [sys.executable, "experiment.py", f"--out_dir={out}", f"--model={model}",
            f"--forget_corpus={forget}", f"--retain_corpus={retain}", f"--cache_dir={cache}", "--layer=1",
            "--context_length=32", "--train_tokens=6000", "--val_tokens=512", "--dict_size=64", "--k=4",
            "--batch_size=32", "--epochs=12", "--lr=0.003", "--dead_window_tokens=300",
            "--checkpoint_every=1000", "--variant=topk", "--unlearning=false", "--core_eval_batches=1",
            "--core_eval_sparsity_batches=1", "--core_eval_batch_prompts=2"]


def run_until(inputs, out: Path, send=None, after_lines: int = 40) -> subprocess.CompletedProcess:
    """Runs the command; with `send`, sends that signal once the training log has `after_lines` lines."""
    process = subprocess.Popen(command(inputs, out), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    log = out / "train_log.jsonl"
    deadline = time.time() + 600
    while send is not None and process.poll() is None and time.time() < deadline:
        if log.exists() and log.read_text().count("\n") >= after_lines:
            process.send_signal(send)
            break
        time.sleep(0.02)
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def sae_weights(out: Path) -> dict:
    return load_file(str(out / "sae" / "sae_weights.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "run"
    result = run_until(inputs, out)
    assert result.returncode == 0, result.stderr[-2000:]
    return sae_weights(out)


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_cli_with_a_checkpoint_and_the_same_command_resumes_it(inputs, uninterrupted,
                                                                                   tmp_path, sent):
    out = tmp_path / "run"
    stopped = run_until(inputs, out, send=sent)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert (f"{sent.name} at step" in stopped.stderr
            and f"resume with the same command and --out_dir={out}" in stopped.stderr)
    ckpt = experiment.load_checkpoint(out / "checkpoints" / "last.pt",
                                      experiment.parse_config(command(inputs, out)[2:]))
    assert not ckpt["finished"] and ckpt["step"] >= 40 and not (out / "final_info.json").exists()
    # the checkpoint is at the step the log ends: nothing after it was logged
    assert (out / "train_log.jsonl").read_text().count("\n") == ckpt["step"]
    resumed = run_until(inputs, out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    info = json.loads((out / "final_info.json").read_text())
    assert info["training results for layer 1"]["final_info"]["resumed_from_step"] == ckpt["step"]
    resumed_sae = sae_weights(out)  # bit-identical to the run nobody stopped
    assert resumed_sae.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed_sae[k], uninterrupted[k]) for k in resumed_sae)
