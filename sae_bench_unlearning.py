"""SAE-Bench's own unlearning eval (sae_bench 0.6.0, `sae_bench.evals.unlearning.main.run_eval`) on our
SAE, for the models it supports, so that its score can be compared with the port's (unlearning.py).

What SAE-Bench's eval needs, beyond what the port needs:
  - an instruct model whose prompt format it knows: gemma-2-2b-it or gemma-2-9b-it (utils/metrics.py
    raises for any other). It loads its own copy with `HookedTransformer.from_pretrained_no_processing`,
    in its table's dtype (bfloat16), from the Hugging Face hub, where Gemma is gated;
  - WMDP's gated `bio-forget-corpus.jsonl`, which it opens at the relative path
    ./sae_bench/evals/unlearning/data/bio-forget-corpus.jsonl: forget_corpus_in_place links the user's
    file there and runs the eval from that folder;
  - the hub for its retain text (wikitext-2 test) and its questions (cais/wmdp, cais/mmlu).
So the real eval only runs where the hub is reachable; everything around it is tested offline.
"""
import contextlib
import copy
import json
import shutil
from pathlib import Path

import sae_bench.evals.unlearning.main as sae_bench_unlearning_main
from sae_bench.evals.unlearning.eval_config import UnlearningEvalConfig
from sae_bench.sae_bench_utils import activation_collection, general_utils

# The models SAE-Bench's metrics.py has a prompt format for.
SUPPORTED_MODELS = ("gemma-2-2b-it", "gemma-2-9b-it")
# WMDP's file; SAE-Bench parses one JSON 'text' per line for this name.
FORGET_CORPUS_NAME = "bio-forget-corpus.jsonl"
FORGET_CORPUS_DIR = Path("sae_bench/evals/unlearning/data")  # where SAE-Bench opens it, relative to the cwd
CUSTOM_SAE_ID = "custom_sae"  # the sae_id SAE-Bench gives every SAE passed as an object (load_and_format_sae)


def _sae_bench_name(model_name: str) -> str:
    """SAE-Bench's (and TransformerLens's) short name for a model: 'google/gemma-2-2b-it' ->
    'gemma-2-2b-it'."""
    return model_name.removeprefix("google/")


def _unsupported_model(model_name: str) -> str:
    return f"SAE-Bench's unlearning eval supports only {', '.join(SUPPORTED_MODELS)}; model is {model_name}"


def applies(model_name: str, forget_corpus: str) -> tuple[bool, str]:
    """(True, why) when SAE-Bench's unlearning eval can run on this model and forget corpus, else
    (False, why not)."""
    if _sae_bench_name(model_name) not in SUPPORTED_MODELS:
        return False, _unsupported_model(model_name)
    path = Path(forget_corpus)
    if path.name != FORGET_CORPUS_NAME:
        return False, (f"SAE-Bench's unlearning eval reads WMDP's {FORGET_CORPUS_NAME}; forget corpus "
                       f"is {forget_corpus}")
    if not path.is_file():
        return False, f"forget corpus {forget_corpus} does not exist"
    with open(path) as f:
        first_line = f.readline()
    try:
        has_text = isinstance(json.loads(first_line)["text"], str)
    except (ValueError, TypeError, KeyError):
        has_text = False
    if not has_text:  # SAE-Bench would only fail on it after loading the model
        return False, f"forget corpus {forget_corpus} is not jsonl with a 'text' field per line"
    return True, f"{model_name} with forget corpus {forget_corpus}"


def eval_config(model_name: str, device: str) -> UnlearningEvalConfig:
    """SAE-Bench's default unlearning config for model_name, with the LLM batch size and dtype from its
    own tables, as its create_config_and_selected_saes sets them. (Those tables do not depend on the
    device.)"""
    name = _sae_bench_name(model_name)
    if name not in SUPPORTED_MODELS:
        raise ValueError(_unsupported_model(model_name))
    config = UnlearningEvalConfig(model_name=name)
    # SAE-Bench's `// 8`: its batch-size table is for 128-token contexts and this eval uses 1024-token ones.
    config.llm_batch_size = activation_collection.LLM_NAME_TO_BATCH_SIZE[name] // 8
    config.llm_dtype = activation_collection.LLM_NAME_TO_DTYPE[name]
    return config


@contextlib.contextmanager
def forget_corpus_in_place(forget_corpus: Path, work_dir: Path):
    """Link work_dir/sae_bench/evals/unlearning/data/bio-forget-corpus.jsonl to forget_corpus and work in
    work_dir, where SAE-Bench's relative path finds it; the previous cwd is restored on exit. Yields the
    link."""
    link = Path(work_dir) / FORGET_CORPUS_DIR / FORGET_CORPUS_NAME
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)  # a link left by an earlier run, possibly to another file
    link.symlink_to(Path(forget_corpus).resolve())
    with contextlib.chdir(work_dir):
        yield link


def run_sae_bench_unlearning(sae, sae_name: str, model_name: str, forget_corpus: Path, device: str,
                             work_dir: Path) -> dict:
    """Run SAE-Bench's unlearning eval on `sae` (a SAE-Lens SAE: experiment.intervention_sae's)
    and return its result for this SAE as SAE-Bench writes it, plus where its results file and artifacts
    are.

    Needs the hub (SAE-Bench loads the model, wikitext and the WMDP/MMLU questions there) and, for Gemma,
    a GPU in practice. Outputs go under work_dir; SAE-Bench's errors propagate.
    """
    work_dir = Path(work_dir).resolve()
    config = eval_config(model_name, device)
    results_dir, artifacts_root = work_dir / "eval_results", work_dir / "artifacts"
    results_file = Path(general_utils.get_results_filepath(str(results_dir), sae_name, CUSTOM_SAE_ID))
    sae_artifacts = (artifacts_root / sae_bench_unlearning_main.EVAL_TYPE / config.model_name
                     / f"{sae_name}_{CUSTOM_SAE_ID}")
    # SAE-Bench skips an SAE whose results file exists, and reuses firing rates saved under its name even
    # with force_rerun: remove both so that this SAE is evaluated afresh. Its question ids depend on the
    # model only and stay cached (artifacts/unlearning/<model>/data).
    results_file.unlink(missing_ok=True)
    shutil.rmtree(sae_artifacts, ignore_errors=True)
    # SAE-Bench casts the SAE to its LLM dtype in place (bfloat16 for Gemma); the caller's SAE stays as it is.
    sae_for_sae_bench = copy.deepcopy(sae)
    with forget_corpus_in_place(forget_corpus, work_dir):
        sae_bench_unlearning_main.run_eval(config, [(sae_name, sae_for_sae_bench)], device,
                                           output_path=str(results_dir), artifacts_path=str(artifacts_root))
    result = json.loads(results_file.read_text())
    return {**result, "results_file": str(results_file), "artifacts_dir": str(sae_artifacts)}
