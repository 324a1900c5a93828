"""SAE-Bench's feature-absorption eval (sae_bench 0.6.0, `sae_bench.evals.absorption`) on an already loaded
HookedTransformer and a SAE-Lens SAE (experiment.load_sae's TopKSAE or GroupBiasTopKSAE), fully offline.

SAE-Bench's `main.run_eval` loads its model from the hub by name, so we replicate only its glue and call
SAE-Bench's functions for the work:
  1. first-letter probe: for each single-token word w of the tokenizer's vocabulary
     (vocab.get_alpha_tokens), the prompt is 10 ICL lines "{ex} has the first letter: {EX[0]}" then
     "{w} has the first letter:"; the residual x [d] at blocks.L.hook_resid_post at the word's token is
     read, and a 26-way one-vs-rest logistic probe is trained on 80% of the words
     (common.create_and_train_probe); its F1 per letter is taken on the other 20%;
  2. k-sparse probing (k_sparse_probing.run_k_sparse_probing_experiment): per letter, the k = 1..max_k
     latents with the largest L1-probe weights; k grows while the test F1 jumps by > f1_jump_threshold
     ("split" latents);
  3. absorption (feature_absorption.run_feature_absortion_experiment), on each test word its letter's
     probe flags, in a fresh ICL prompt: with p the unit probe direction, a [F] the SAE code and
     c_i = cos(p, W_dec[i]), main = sum_{i in split} a_i c_i, abs = sum of the top 3 a_i c_i > 0 over
     other latents with c_i >= 0.1; absorption fraction = 0 if main >= x.p or abs < 0.4 x.p, else 1 if
     main <= 0, else m / (m + main) with m = min(abs, x.p - main); full absorption: every split a_i = 0
     and the latent with the largest a_i c_i has c_i >= 0.025 and a_i c_i >= 0.4 x.p;
  4. per letter, the mean fraction and full-absorption rate over those words; then means and standard
     deviations over letters whose probe F1 > min_GT_probe_f1, as main.run_eval aggregates them.
It refuses (as main.run_eval does) when fewer than min_feats_for_eval letters have such a probe.
Step 3 draws its ICL examples from SAE-Bench's word list in the tokenizer's dict order, which differs
between processes, so results vary slightly from one process to the next; the probe split (on our sorted
list) does not.
"""
import collections
import contextlib
import dataclasses
import importlib.metadata
import json
import random
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sae_bench.evals.absorption.common import create_and_train_probe
from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
from sae_bench.evals.absorption.eval_output import (EVAL_TYPE_ID_ABSORPTION, AbsorptionEvalOutput,
                                                    AbsorptionMeanMetrics, AbsorptionMetricCategories,
                                                    AbsorptionResultDetail)
from sae_bench.evals.absorption.feature_absorption import run_feature_absortion_experiment
from sae_bench.evals.absorption.k_sparse_probing import run_k_sparse_probing_experiment
from sae_bench.evals.absorption.main import _aggregate_results_df
from sae_bench.evals.absorption.prompting import create_icl_prompt, first_letter_formatter
from sae_bench.evals.absorption.vocab import LETTERS, convert_tokens_to_string, get_alpha_tokens
from sae_bench.sae_bench_utils import get_eval_uuid, get_sae_lens_version
from sae_bench.sae_bench_utils.general_utils import load_and_format_sae
from sae_lens import SAE
from transformer_lens import HookedTransformer

SAE_BENCH_DEFAULTS = AbsorptionEvalConfig()
MAX_ICL_EXAMPLES = 10  # ICL lines per prompt in both SAE-Bench prompt builders (probe data and absorption)
PROBE_LR = 1e-2  # SAE-Bench's train_and_save_probes
MIN_MODEL_PARAMS = 1e9  # SAE-Bench's README: not recommended on LLMs with less than 1B parameters
MIN_SAE_LATENTS = 16384  # SAE-Bench's README: not recommended on SAEs with less than 16k latents
MIN_WORDS_PER_LETTER = 10  # in a subsample, so that the 80/20 split leaves every letter in both parts


@dataclass
class AbsorptionConfig:
    """Cost knobs; None/defaults are SAE-Bench's. Thresholds stay SAE-Bench's (AbsorptionEvalConfig)."""
    # ~vocabulary words for the probe (80% train, 20% test); None: all, as SAE-Bench
    n_words: int | None = None
    probe_epochs: int = 50  # first-letter probe epochs (train_and_save_probes)
    probe_batch_size: int = 64  # prompts per forward pass and per probe step (train_and_save_probes)
    max_k_value: int = SAE_BENCH_DEFAULTS.max_k_value  # k-sparse probes for k = 1..max_k_value
    k_sparse_probe_num_epochs: int = SAE_BENCH_DEFAULTS.k_sparse_probe_num_epochs
    k_sparse_probe_batch_size: int = SAE_BENCH_DEFAULTS.k_sparse_probe_batch_size
    # SAE codes [n_train, F] computed once instead of per epoch: SAE-Bench's README recommends it for
    # small LLMs
    precalc_k_sparse_probe_sae_acts: bool = True
    eval_k_sparse_probe_batch_size: int = SAE_BENCH_DEFAULTS.eval_k_sparse_probe_batch_size
    llm_batch_size: int = SAE_BENCH_DEFAULTS.llm_batch_size  # prompts per forward pass in the absorption step
    random_seed: int = SAE_BENCH_DEFAULTS.random_seed


# For tests and smoke runs. On SmolLM2 (layer 15) 1000 words give too weak a probe (13 letters pass): it
# refuses.
FAST = AbsorptionConfig(n_words=1000, probe_epochs=20, max_k_value=3, k_sparse_probe_num_epochs=20,
                        k_sparse_probe_batch_size=128, llm_batch_size=32)


class Refused(Exception):
    """SAE-Bench cannot give a meaningful absorption number here; the message says why."""


def prompt_token_pos(tokenizer, words: list[str], template: str = SAE_BENCH_DEFAULTS.prompt_template,
                     seed: int = 0) -> int:
    """Position, counted from the end (< 0), of the token of the word being spelled in SAE-Bench's prompts.

    Builds one prompt per word as SAE-Bench does (create_icl_prompt, 10 ICL examples from `words`,
    separator first), tokenizes it as TransformerLens's to_tokens does (special tokens added), and finds
    the token holding the word's last character. Raises ValueError unless, for every word, that token is
    the whole word (SAE-Bench's own token-to-string conversion), sits at the same position, and all
    prompts have the same length (batches are right-padded, so a longer prompt would move the others'
    word off the position).
    """
    suffix = template[template.index("{word}") + len("{word}"):]
    state = random.getstate()  # create_icl_prompt draws from the global `random`; leave it as it was
    random.seed(seed)
    try:
        prompts = [create_icl_prompt(w, examples=words, base_template=template,
                                     max_icl_examples=MAX_ICL_EXAMPLES,
                                     prepend_separator_to_first_example=True).base for w in words]
    finally:
        random.setstate(state)
    enc = tokenizer(prompts, return_offsets_mapping=True)
    positions, lengths, not_whole = set(), set(), []
    for word, prompt, ids, offsets in zip(words, prompts, enc["input_ids"], enc["offset_mapping"]):
        last_char = len(prompt) - len(suffix) - 1
        holding = [j for j, (start, end) in enumerate(offsets) if start <= last_char < end]
        lengths.add(len(ids))
        if not holding or convert_tokens_to_string(tokenizer.convert_ids_to_tokens(ids[holding[-1]]),
                                                   tokenizer) != word:
            not_whole.append(word)
        else:
            positions.add(holding[-1] - len(ids))
    if not_whole or len(positions) > 1 or len(lengths) > 1:
        raise ValueError(f"no single prompt_token_pos for this tokenizer: {len(not_whole)} of "
                         f"{len(words)} words are not one token in the prompt (e.g. {not_whole[:5]}), "
                         f"word positions {sorted(positions)}, prompt lengths {sorted(lengths)}")
    return positions.pop()


def sample_words(vocab: list[str], n_words: int, seed: int) -> list[str]:
    """About n_words of `vocab`, sorted, drawn per first letter in proportion to the vocabulary but at least
    MIN_WORDS_PER_LETTER of each letter (or all it has): rare letters (x: 0.2% of SmolLM2's) must not
    vanish."""
    by_letter = collections.defaultdict(list)
    for word in vocab:
        by_letter[word.strip()[0].lower()].append(word)
    rng, words = random.Random(seed), []
    for letter, group in sorted(by_letter.items()):
        quota = max(MIN_WORDS_PER_LETTER, round(n_words * len(group) / len(vocab)))
        words += rng.sample(group, min(len(group), quota))
    return sorted(words)


def _seed(seed: int) -> None:
    """SAE-Bench draws ICL examples and splits from `random`, probe inits and batches from torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _sae_bench_refusals():
    """SAE-Bench's own refusals are ValueErrors (e.g. prompts of unequal token length in the absorption step,
    too few words to draw ICL examples from): report them as Refused."""
    try:
        yield
    except ValueError as e:
        raise Refused(f"SAE-Bench refused: {e}") from e


def _warnings(sae: SAE, model: HookedTransformer) -> list[str]:
    """SAE-Bench's README advice that this model/SAE falls short of (it does not stop the eval)."""
    out = []
    n_params = sum(p.numel() for p in model.parameters())
    if n_params < MIN_MODEL_PARAMS:
        out.append(f"SAE-Bench does not recommend this eval on LLMs below 1B parameters (run_eval recommends "
                   f">= 2B): {model.cfg.model_name} has {n_params / 1e6:.1f}M")
    if sae.cfg.d_sae < MIN_SAE_LATENTS:
        out.append(f"SAE-Bench does not recommend this eval on SAEs below 16k latents: this one has "
                   f"{sae.cfg.d_sae}")
    return out


def _probe_dir(work_dir: Path, cfg: AbsorptionConfig, pos: int, n_words: int,
               dtype: torch.dtype) -> Path:
    """SAE-Bench keys its probe by model name and layer only (under this folder): key the folder by what else
    shapes the probe (the model's dtype among it), so that a work_dir can be reused across SAEs without a
    stale probe."""
    return work_dir / "probes" / f"pos{pos}_words{n_words}_seed{cfg.random_seed}_epochs{cfg.probe_epochs}" \
                                 f"_batch{cfg.probe_batch_size}{_dtype_suffix(dtype)}"


def _dtype_suffix(dtype: torch.dtype) -> str:
    """'' for float32 (the folders probes trained before the dtype was a choice), else '_bfloat16'."""
    return "" if dtype == torch.float32 else "_" + str(dtype).removeprefix("torch.")


def _format_sae(sae: SAE, model: HookedTransformer, device: str, notes: dict) -> tuple:
    """(the SAE as SAE-Bench formats it, in the LLM's dtype, its sae_id, its release name); raises Refused
    for a hook the eval does not read."""
    meta = sae.cfg.metadata
    sae_release = f"{meta['model_name']}_layer_{meta['hook_layer']}_sae"
    with warnings.catch_warnings(record=True) as caught:  # its decoder-norm check warns
        warnings.simplefilter("always")
        # Copies hook_name/hook_layer/model_name from cfg.metadata onto cfg, where SAE-Bench reads them.
        sae_id, sae, _ = load_and_format_sae(sae_release, sae, device)
    notes["warnings"] += [f"SAE-Bench: {w.message}" for w in caught] + _warnings(sae, model)
    sae = sae.to(device=device, dtype=model.cfg.dtype)  # as run_eval: the SAE in the LLM's dtype
    layer, hook = sae.cfg.hook_layer, sae.cfg.hook_name
    if hook != f"blocks.{layer}.hook_resid_post":
        raise Refused(f"SAE-Bench's absorption eval reads blocks.{layer}.hook_resid_post; the SAE reads "
                      f"{hook}")
    return sae, sae_id, sae_release


def _words_and_position(model: HookedTransformer, cfg: AbsorptionConfig, notes: dict) -> tuple:
    """(the words the probes train and test on, the prompt position of the word's first token)."""
    # sorted: the tokenizer's dict order varies between runs
    vocab = sorted(get_alpha_tokens(model.tokenizer))
    words = vocab if cfg.n_words is None or cfg.n_words >= len(vocab) else \
        sample_words(vocab, cfg.n_words, cfg.random_seed)
    notes.update(n_vocab_words=len(vocab), n_words=len(words))
    try:
        pos = prompt_token_pos(model.tokenizer, words, SAE_BENCH_DEFAULTS.prompt_template,
                               seed=cfg.random_seed)
    except ValueError as e:
        raise Refused(str(e)) from e
    if pos != SAE_BENCH_DEFAULTS.prompt_token_pos:
        notes["warnings"].append(f"prompt_token_pos is {pos} for this tokenizer (SAE-Bench's default is "
                                 f"{SAE_BENCH_DEFAULTS.prompt_token_pos})")
    return words, pos


def _evaluate(sae: SAE, model: HookedTransformer, device: str, cfg: AbsorptionConfig, work_dir: Path,
              notes: dict) -> AbsorptionEvalOutput:
    """main.run_eval's steps for one SAE on `model`; fills `notes` as it goes; raises Refused."""
    meta = sae.cfg.metadata
    sae, sae_id, sae_release = _format_sae(sae, model, device, notes)
    layer, hook = sae.cfg.hook_layer, sae.cfg.hook_name
    words, pos = _words_and_position(model, cfg, notes)
    template = SAE_BENCH_DEFAULTS.prompt_template
    config = AbsorptionEvalConfig(
        model_name=meta["model_name"], random_seed=cfg.random_seed, max_k_value=cfg.max_k_value,
        prompt_token_pos=pos, llm_batch_size=cfg.llm_batch_size,
        llm_dtype=str(model.cfg.dtype).removeprefix("torch."),
        k_sparse_probe_batch_size=cfg.k_sparse_probe_batch_size,
        k_sparse_probe_num_epochs=cfg.k_sparse_probe_num_epochs,
        eval_k_sparse_probe_batch_size=cfg.eval_k_sparse_probe_batch_size,
        precalc_k_sparse_probe_sae_acts=cfg.precalc_k_sparse_probe_sae_acts)
    notes["eval_config"] = config
    sae_name = f"{sae_release}_{sae_id}".replace("/", "_")
    probes_dir = _probe_dir(work_dir, cfg, pos, len(words), model.cfg.dtype)
    probe_folder = probes_dir / model.cfg.model_name / f"layer_{layer}"  # where SAE-Bench puts it
    common = dict(model=model, sae=sae, layer=layer, sae_name=sae_name, max_k_value=config.max_k_value,
                  prompt_template=template, prompt_token_pos=pos, device=device, probes_dir=probes_dir,
                  force=True)  # SAE-Bench names every custom SAE alike: never reuse another SAE's results

    with torch.enable_grad(), _sae_bench_refusals():  # run_eval enables grad for its probe training
        _seed(cfg.random_seed)
        if not (probe_folder / "probe.pth").exists():
            # train_and_save_probes for one layer, on our word list instead of the whole vocabulary
            create_and_train_probe(model=model, formatter=first_letter_formatter(), hook_point=hook,
                                   probes_dir=probes_dir, vocab=words, batch_size=cfg.probe_batch_size,
                                   num_epochs=cfg.probe_epochs, lr=PROBE_LR, device=torch.device(device),
                                   base_template=template, pos_idx=pos)
        # SAE-Bench's k-sparse probing fails (KeyError) on a letter without training words
        missing = set(LETTERS) - {LETTERS[i]
                                  for i in pd.read_csv(probe_folder / "train_df.csv")["answer_class"]}
        if missing:
            raise Refused(f"letters {', '.join(sorted(missing))} have no word in the probe's training split "
                          f"(SAE-Bench trains a k-sparse probe per letter): give more words")
        _seed(cfg.random_seed)
        k_sparse = run_k_sparse_probing_experiment(
            **common, experiment_dir=work_dir / "k_sparse_probing",
            f1_jump_threshold=config.f1_jump_threshold,
            k_sparse_probe_l1_decay=config.k_sparse_probe_l1_decay,
            k_sparse_probe_batch_size=config.k_sparse_probe_batch_size,
            k_sparse_probe_num_epochs=config.k_sparse_probe_num_epochs,
            precalc_k_sparse_probe_sae_acts=config.precalc_k_sparse_probe_sae_acts,
            eval_batch_size=config.eval_k_sparse_probe_batch_size)
        probe_f1 = dict(zip(k_sparse["letter"], k_sparse["f1_probe"].astype(float)))
        notes["probe_f1_by_letter"] = probe_f1
        n_good = sum(f1 > config.min_GT_probe_f1 for f1 in probe_f1.values())
        if n_good < config.min_feats_for_eval:
            raise Refused(f"only {n_good} letters have a first-letter probe with test F1 > "
                          f"{config.min_GT_probe_f1} (min_GT_probe_f1); SAE-Bench needs "
                          f"{config.min_feats_for_eval} (min_feats_for_eval)")
        _seed(cfg.random_seed)
        raw = run_feature_absortion_experiment(
            **common, experiment_dir=work_dir / "feature_absorption",
            sparse_probing_experiment_dir=work_dir / "k_sparse_probing",
            feature_split_f1_jump_threshold=config.f1_jump_threshold, batch_size=config.llm_batch_size)
    return _output(raw, probe_f1, config, sae, sae_id, sae_release)


def _output(raw, probe_f1: dict, config: AbsorptionEvalConfig, sae: SAE, sae_id: str,
            sae_release: str) -> AbsorptionEvalOutput:
    """SAE-Bench's output from the absorption experiment's rows (letters with a good probe only): means and
    standard deviations over letters; raises Refused where they are undefined."""
    if raw.empty:
        raise Refused("no test word is flagged by its letter's probe: nothing to measure absorption on")
    details = [AbsorptionResultDetail(first_letter=row["letter"],
                                      mean_absorption_fraction=row["mean_absorption_fraction"],
                                      full_absorption_rate=row["full_absorption_rate"],
                                      num_full_absorption=row["num_full_absorption"],
                                      num_probe_true_positives=row["num_probe_true_positives"],
                                      num_split_features=row["num_split_feats"])
               for _, row in _aggregate_results_df(raw).iterrows()
               if probe_f1[row["letter"]] > config.min_GT_probe_f1]
    if len(details) < 2:
        raise Refused(f"{len(details)} letters with a good probe have flagged test words; SAE-Bench's "
                      f"standard deviations need 2")
    fractions = [d.mean_absorption_fraction for d in details]
    full = [d.full_absorption_rate for d in details]
    splits = [d.num_split_features for d in details]
    return AbsorptionEvalOutput(
        eval_type_id=EVAL_TYPE_ID_ABSORPTION, eval_config=config, eval_id=get_eval_uuid(),
        datetime_epoch_millis=int(datetime.now().timestamp() * 1000),
        eval_result_metrics=AbsorptionMetricCategories(mean=AbsorptionMeanMetrics(
            mean_absorption_fraction_score=statistics.mean(fractions),
            mean_full_absorption_score=statistics.mean(full), mean_num_split_features=statistics.mean(splits),
            std_dev_absorption_fraction_score=statistics.stdev(fractions),
            std_dev_full_absorption_score=statistics.stdev(full),
            std_dev_num_split_features=statistics.stdev(splits))),
        eval_result_details=details,
        # SAE-Bench's get_sae_bench_version is the git HEAD of the cwd (this project's repo, not SAE-Bench's)
        sae_bench_commit_hash=f"sae-bench=={importlib.metadata.version('sae-bench')}",
        sae_lens_id=sae_id, sae_lens_release_id=sae_release, sae_lens_version=get_sae_lens_version(),
        sae_cfg_dict=sae.cfg.to_dict())


def run_absorption(sae: SAE, model: HookedTransformer, device: str,
                   cfg: AbsorptionConfig = AbsorptionConfig(), work_dir: Path | None = None) -> dict:
    """SAE-Bench's absorption eval of `sae` on `model`, as the JSON-safe dict SAE-Bench writes
    (AbsorptionEvalOutput: eval_type_id, eval_config, eval_id, datetime_epoch_millis,
    eval_result_metrics.mean, eval_result_details per letter, sae_* fields), with
    eval_result_unstructured = {warnings, knobs, n_vocab_words, n_words, probe_f1_by_letter,
    wall_time_s}.

    Where SAE-Bench cannot give a number, returns {"ran": False, "reason", "eval_type_id", "eval_config"
    (None if not reached), "eval_result_unstructured"} instead. SAE-Bench's probes and tables go to
    work_dir (a temporary folder if None); a probe there for the same model, layer and knobs is reused.
    Seeds random, numpy and torch.
    """
    started = time.time()
    notes = {"warnings": [], "knobs": dataclasses.asdict(cfg)}
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="absorption_"))
        try:
            output = _evaluate(sae, model, device, cfg, Path(work_dir), notes)
        except Refused as refusal:
            config = notes.pop("eval_config", None)
            return json.loads(json.dumps({
                "ran": False, "reason": str(refusal), "eval_type_id": EVAL_TYPE_ID_ABSORPTION,
                "eval_config": config and dataclasses.asdict(config),
                "eval_result_unstructured": {**notes, "wall_time_s": time.time() - started}}))
    notes.pop("eval_config")
    output.eval_result_unstructured = {**notes, "wall_time_s": time.time() - started}
    return json.loads(output.to_json())
