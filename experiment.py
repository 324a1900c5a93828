"""Train a TopK sparse autoencoder on one layer of a language model and evaluate it.

    python experiment.py                            # embedded default (CPU, no hub) into out/run_<time>
    python experiment.py --out_dir=out/alpha0.3 --alpha=0.3   # a folder of your own
    python experiment.py --help                     # every option, its meaning and default

The run: load the model (Pythia-70M-deduped from the hub when reachable, else the embedded
SmolLM2-135M-Instruct) -> harvest residual-stream activations of forget-domain (biology) and
retain-domain (general) text, cached on disk -> train the SAE -> SAE-Bench core evaluation on held-out
retain text -> out_dir/final_info.json.

The file reads top down, each part calling into the next: the config (the CLI), the run, the training
loop with its state and checkpoints, the trainer (one optimisation step), the knowledge-separation
losses and grouping, and the sparse autoencoder itself.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sae_lens import SAE, TopKSAE, TopKSAEConfig, register_sae_class
from tqdm.auto import tqdm

import activations
import data
import distributed
import models
import results
import variants
from files import json_safe, write_bytes_atomic, write_json_atomic
from variants import VARIANTS


# -----------------------------------------------------------------------------
# Config: the dataclass is the CLI (--name=value for every field)


def _opt(default, help):
    return field(default=default, metadata={"help": help, "training": True})


def _setting(default, help, parse=None, evaluation=False):
    """A field that does not change what training computes: a checkpoint resumes under another value of it.
    parse: how the CLI reads it, where its type alone does not say (a list); evaluation: it sets what an
    evaluation measures (--evaluate_only takes the run's own value unless the command line sets it)."""
    return field(default=default, metadata={"help": help, "training": False, "parse": parse,
                                            "evaluation": evaluation})


def _evaluation(default, help, parse=None):
    return _setting(default, help, parse, evaluation=True)


def number_list(kind):
    """The CLI reader of a comma-separated list of `kind` (float or int) -> tuple."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                             f"{kind.__name__}s, e.g. 1,2") from None
    parse.__name__ = f"{kind.__name__} list"  # argparse names the type in its message
    return parse


@dataclass
class Config:
    # where and how it runs: none of these changes what training computes
    out_dir: str = _setting("", "folder for final_info.json, the SAE, the training log; empty: a new "
                                "folder out/run_<UTC date-time>")
    overwrite: bool = _setting(False, "start afresh in out_dir: replace a finished run "
                               "(final_info.json) or ignore a checkpoint")
    evaluate_only: bool = _setting(False, "re-evaluate the finished run in out_dir (its saved sae/) "
                                   "with this code: the evaluation sections of final_info.json are "
                                   "rewritten, the training section kept; the model, the training "
                                   "options and the evaluation settings are the run's, except "
                                   "evaluation settings given here (not at their default)")
    checkpoint_every: int = _setting(100, "write a training checkpoint (out_dir/checkpoints/last.pt) "
                                     "every this many steps; the same command resumes from it")
    device: str = _setting("auto", "'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:N'")
    cache_dir: str = _setting(str(models.default_cache_dir()), "converted model and activation cache "
                              "(env ORTHO_SAE_CACHE)")
    wandb_mode: str = _setting("auto", "'auto' (online if a wandb API key is configured, else "
                               "disabled), 'online', 'offline', 'disabled'")
    # model and data
    model: str = _opt("auto", "'auto', 'pythia-70m-deduped', 'smollm2-135m-instruct', a hub id or a "
                      "local HF model folder")
    llm_dtype: str = _opt("float32", "dtype of every language-model forward (harvest, core eval, "
                          "unlearning, absorption): 'float32', 'bfloat16', or 'auto' (bfloat16 on a "
                          "CUDA device with bf16 or a CPU with AVX512-BF16 or AMX, else float32); the "
                          "SAE, its optimiser and every statistic stay float32. float32 by default: "
                          "bf16 fails the drift rule (BENCHMARKS.md)")
    layer: int = _opt(-1, "residual stream after this block is the SAE's input; -1: the model's "
                      "default (Pythia-70M 3, SmolLM2 15)")
    forget_corpus: str = _opt(data.HPO, "'hpo' (embedded biology text) or a local .jsonl/.txt file "
                              "such as WMDP bio-forget-corpus.jsonl")
    retain_corpus: str = _opt(data.WIKIPEDIA_LEADS, "'wikipedia-leads' (embedded), 'wikitext' "
                              "(hub) or a local .jsonl/.txt file")
    context_length: int = _opt(128, "tokens per context, BOS included (BOS activations are not trained "
                               "on)")
    train_tokens: int = _opt(0, "activations harvested for training, half forget half retain; 0: 400k "
                             "on CPU, 4M on CUDA")
    val_tokens: int = _opt(16_384, "validation activations (from the validation documents) for the "
                           "loss that picks the checkpoint")
    eval_fraction: float = _opt(0.1, "share of each corpus's documents held out for every evaluation "
                                "(core, ΔCE, firing rates, absorption)")
    val_fraction: float = _opt(0.05, "share of each corpus's documents held out from training and from "
                               "every evaluation, for the validation loss")
    data_seed: int = _opt(0, "seed of the document split and context order (part of the "
                          "activation-cache key)")
    harvest_batch_size: int = _setting(16, "contexts per model forward while harvesting")
    # SAE and trainer
    seed: int = _opt(0, "seed of the SAE initialisation and the batch order")
    dict_size: int = _opt(0, "number of SAE latents F; 0: 8 x d_model on CPU, 32 x d_model on CUDA")
    k: int = _opt(32, "active latents per token (TopK)")
    batch_size: int = _opt(2048, "activations per training step")
    encoder_dtype: str = _opt("float32", "dtype of the training step's encoder product "
                              "(x − b_dec)·W_enc and its TopK selection: 'float32' or 'bfloat16' "
                              "(weights, Adam, decoder and gradients stay float32; the saved SAE is "
                              "evaluated in float32)")
    epochs: float = _opt(4.0, "passes over the harvested training activations")
    lr: float = _opt(0.0, "Adam learning rate; 0: 2e-4 / sqrt(F / 16384) (dictionary_learning's TopK "
                     "rule)")
    warmup_steps: int = _opt(50, "linear learning-rate warmup")
    decay_start: float = _opt(0.8, "fraction of training after which the learning rate decays linearly "
                              "to 0")
    auxk_alpha: float = _opt(1 / 32, "weight of the AuxK loss on dead latents (OpenAI TopK paper)")
    dead_window_tokens: int = _opt(0, "a latent that has not fired for this many tokens is dead "
                                   "(AuxK); 0: 1/20 of the training tokens")
    val_every: int = _opt(50, "validation loss (which picks the checkpoint) every this many steps, "
                          "besides every regroup and the last step")
    max_norm_multiple: float = _opt(10.0, "drop activations whose norm exceeds this multiple of the "
                                    "median norm (attention-sink outliers); 0: keep all")
    # knowledge separation
    variant: str = _opt("adaptive_ortho", "'topk' (plain TopK SAE), 'fixed_ortho' (the cross-group "
                        "loss with λ2 = lambda2_max from step 0 and α = 0), 'allpairs_ortho' (OrtSAE's "
                        "penalty on every feature's largest cos² to any other feature, no groups), "
                        "'adaptive_ortho' (the cross-group loss with λ2 ramped over t0 and "
                        "α-controlled sharing with matched partners)")
    alpha: float = _opt(0.1, "adaptive_ortho: cosine each forget feature may share with its matched "
                        "retain partner (partner target) or the cross-group |cos| allowed before any "
                        "penalty (hinge target); 0: strict orthogonality (fixed_ortho always uses 0)")
    lambda2_max: float = _opt(1000.0, "weight of the cross-group loss (a mean squared cosine "
                              "deviation, so ~1/d per pair at random): adaptive_ortho reaches it at "
                              "t0, fixed_ortho uses it from step 0")
    allpairs_lambda2: float = _opt(0.02, "allpairs_ortho: weight of its penalty; of the v2 study's weights "
                                   "(0.02, 4, 150) the one that costs no reconstruction")
    t0: int = _opt(300, "adaptive_ortho: steps over which λ2(t) = lambda2_max·min(1, t/t0) ramps up")
    group_biases: bool = _opt(True, "fixed_ortho and adaptive_ortho: group-specific decoder biases "
                              "b_forget, b_retain (false: the ablation without them; topk and "
                              "allpairs_ortho have none)")
    ortho_target: str = _opt("partner", "adaptive_ortho: 'partner' penalises ‖W_F W_Rᵀ − α·P‖² "
                             "(P: matched partners) or 'hinge' ‖relu(|W_F W_Rᵀ| − α)‖², both per "
                             "cross-group pair")
    group_every: int = _opt(100, "regroup features into forget/retain/shared (and rematch partners, "
                            "log κ) every this many steps; also the horizon of the firing-frequency "
                            "EMAs")
    specificity_threshold: float = _opt(0.5, "a feature is forget (retain) when s = (p_f − p_r)/(p_f + "
                                        "p_r) > t (< −t); 0.5 means it fires >= 3x as often on one "
                                        "domain")
    min_freq: float = _opt(1e-3, "features firing on fewer than this fraction of tokens ((p_f + "
                           "p_r)/2) stay shared: their specificity is noise")
    max_group_fraction: float = _opt(0.5, "the forget and the retain group each hold at most this "
                                     "fraction of d_model latents (the most domain-specific), so that "
                                     "n_F + n_R <= d and strict cross-group orthogonality (α = 0) can "
                                     "be met; 0: no cap")
    kappa_max: float = _opt(1e4, "early stopping (fixed_ortho, adaptive_ortho): a group's decoder κ "
                            "above this counts as ill-conditioned (healthy runs stay below a few "
                            "thousand; orthogonality squeezes each group into fewer directions)")
    kappa_patience: int = _opt(3, "early stopping: stop after this many consecutive regroup checks "
                               "with a group's κ above kappa_max")
    # evaluation: after training, none of these changes what training computes
    core_eval_batches: int = _evaluation(4, "SAE-Bench core: reconstruction batches (each: model "
                                         "with/without SAE, with ablation)")
    core_eval_sparsity_batches: int = _evaluation(8, "SAE-Bench core: sparsity/variance batches")
    core_eval_batch_prompts: int = _evaluation(8, "SAE-Bench core: contexts per batch")
    absorption: bool = _evaluation(False, "run SAE-Bench's feature-absorption eval (first-letter probes) "
                                   "on the trained SAE; its probe is cached per model and layer")
    absorption_words: int = _evaluation(0, "absorption: vocabulary words for the first-letter probe, "
                                        "drawn per letter; 0: all (SAE-Bench's default; hours on a CPU)")
    unlearning: bool = _evaluation(True, "run the unlearning evaluation (feature clamping on held-out "
                                   "forget/retain text and questions)")
    unlearning_retain_thresholds: tuple = _evaluation((0.001, 0.01), "unlearning sweep (comma-separated): "
                                                      "drop features firing on more than this share of "
                                                      "retain tokens", parse=number_list(float))
    unlearning_n_features: tuple = _evaluation((10, 20), "unlearning sweep (comma-separated): number of "
                                               "features clamped", parse=number_list(int))
    unlearning_multipliers: tuple = _evaluation((25.0, 50.0, 100.0, 200.0), "unlearning sweep "
                                                "(comma-separated): clamped features are set to "
                                                "-multiplier (model units)", parse=number_list(float))
    unlearning_ce_tolerance: float = _evaluation(0.02, "unlearning scores: the retain ΔCE (nats/token) at "
                                                 "which forget ΔCE is read (interpolated)")
    unlearning_forget_group_sweep: bool = _evaluation(False, "unlearning: for the grouped variants, also "
                                                      "sweep features restricted to the trained forget "
                                                      "group (doubles the selection sweep)")
    unlearning_ce_contexts: int = _evaluation(24, "unlearning: held-out ΔCE contexts per side for each of "
                                              "the selection and the report split")
    unlearning_group_bias_edit: str = _evaluation("held", "how a clamp treats group biases: 'held' (edit "
                                                  "= (f' − f)·W_dec, the group-bias term kept at the "
                                                  "codes before the clamp: the same edit for every "
                                                  "variant) or 'relu' (group weights recomputed from "
                                                  "relu(f'): clamped features carry no mass)")
    unlearning_questions_per_subject: int = _evaluation(25, "multiple-choice questions sampled per "
                                                        "subject before the answer-order filter")


def parse_bool(text: str) -> bool:
    """true/false, 1/0, yes/no (any case); anything else is refused, not read as False."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: use true/false, 1/0 or yes/no")
    return value


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (not the 60-line usage, then the error)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (--help lists every option)\n")


def parse_config(argv=None) -> Config:
    parser = OneLineParser(description=__doc__.split("\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.type is bool or f.type == "bool":
            parser.add_argument(f"--{f.name}", nargs="?", const=True, default=f.default,
                                help=f.metadata["help"], type=parse_bool)
        else:
            kind = f.metadata.get("parse") or ({"int": int, "float": float, "str": str}.get(f.type, f.type)
                                               if isinstance(f.type, str) else f.type)
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"])
    return Config(**vars(parser.parse_args(argv)))


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


def recorded_config(cfg: Config) -> dict:
    """The config as final_info.json records it: every field but the variant-specific ones the run's
    variant does not read (those took no effect)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in variants.ignored(cfg.variant)}


def config_checks(cfg: Config) -> list:
    """[(passes, field, message)]: every check of a single option that needs no model."""
    return [
        (cfg.k >= 1, "k", f"k={cfg.k} must be >= 1"),
        (cfg.dict_size >= 0, "dict_size",
         f"dict_size={cfg.dict_size} must be >= 0 (0 picks the device default)"),
        (cfg.dict_size == 0 or cfg.k <= cfg.dict_size, "k",
         f"k={cfg.k} exceeds dict_size={cfg.dict_size}: lower --k or raise --dict_size"),
        (cfg.lr >= 0, "lr", f"lr={cfg.lr} must be > 0 (or 0 for the automatic rule)"),
        (cfg.train_tokens >= 0, "train_tokens",
         f"train_tokens={cfg.train_tokens} must be >= 0 (0 picks the device default)"),
        (cfg.val_tokens > 0, "val_tokens", f"val_tokens={cfg.val_tokens} must be > 0"),
        (cfg.batch_size >= 1, "batch_size", f"batch_size={cfg.batch_size} must be >= 1"),
        (cfg.val_every >= 1, "val_every", f"val_every={cfg.val_every} must be >= 1"),
        (cfg.checkpoint_every >= 1, "checkpoint_every",
         f"checkpoint_every={cfg.checkpoint_every} must be >= 1"),
        (cfg.epochs > 0, "epochs", f"epochs={cfg.epochs} must be > 0"),
        (cfg.context_length >= 2, "context_length",
         f"context_length={cfg.context_length} must be >= 2 (BOS + one token)"),
        (0 < cfg.eval_fraction < 1, "eval_fraction", f"eval_fraction={cfg.eval_fraction} must be in (0, 1)"),
        (0 < cfg.val_fraction < 1 - cfg.eval_fraction, "val_fraction",
         f"val_fraction={cfg.val_fraction} must be in (0, 1 − eval_fraction)"),
        (cfg.allpairs_lambda2 >= 0, "allpairs_lambda2",
         f"allpairs_lambda2={cfg.allpairs_lambda2} must be >= 0"),
        (0 <= cfg.max_group_fraction <= 1, "max_group_fraction",
         f"max_group_fraction={cfg.max_group_fraction} must be in [0, 1]"),
        (0 <= cfg.decay_start <= 1, "decay_start", f"decay_start={cfg.decay_start} must be in [0, 1]"),
        (cfg.auxk_alpha >= 0, "auxk_alpha", f"auxk_alpha={cfg.auxk_alpha} must be >= 0"),
        (cfg.layer >= -1, "layer", f"layer={cfg.layer} must be >= 0 (or -1 for the model's default)"),
        (cfg.wandb_mode in ("auto", "online", "offline", "disabled"), "wandb_mode",
         f"wandb_mode={cfg.wandb_mode!r}: use auto, online, offline or disabled"),
        (cfg.llm_dtype in ("auto", *models.LLM_DTYPES), "llm_dtype",
         f"llm_dtype={cfg.llm_dtype!r}: use auto, {', '.join(models.LLM_DTYPES)}"),
        (cfg.encoder_dtype in models.LLM_DTYPES, "encoder_dtype",
         f"encoder_dtype={cfg.encoder_dtype!r}: use {' or '.join(models.LLM_DTYPES)}"),
        (cfg.variant in VARIANTS, "variant", f"variant={cfg.variant!r}: use one of {', '.join(VARIANTS)}"),
        (cfg.unlearning_group_bias_edit in GROUP_BIAS_EDITS, "unlearning_group_bias_edit",
         f"unlearning_group_bias_edit={cfg.unlearning_group_bias_edit!r}: "
         f"use one of {', '.join(GROUP_BIAS_EDITS)}"),
        (len(cfg.unlearning_retain_thresholds) > 0
         and all(0 < t <= 1 for t in cfg.unlearning_retain_thresholds),
         "unlearning_retain_thresholds",
         f"unlearning_retain_thresholds={cfg.unlearning_retain_thresholds}: each must be in (0, 1]"),
        (len(cfg.unlearning_n_features) > 0 and all(n >= 1 for n in cfg.unlearning_n_features),
         "unlearning_n_features", f"unlearning_n_features={cfg.unlearning_n_features}: each must be >= 1"),
        (len(cfg.unlearning_multipliers) > 0 and all(m > 0 for m in cfg.unlearning_multipliers),
         "unlearning_multipliers", f"unlearning_multipliers={cfg.unlearning_multipliers}: each must be > 0"),
        (cfg.absorption_words >= 0, "absorption_words",
         f"absorption_words={cfg.absorption_words} must be >= 0 (0: all)"),
        (cfg.unlearning_ce_contexts >= 2, "unlearning_ce_contexts",
         f"unlearning_ce_contexts={cfg.unlearning_ce_contexts} must be >= 2 "
         f"(a standard error needs two)"),
        (cfg.ortho_target in ("partner", "hinge"), "ortho_target",
         f"ortho_target={cfg.ortho_target!r}: use partner or hinge"),
        (0 <= cfg.alpha < 1, "alpha", f"alpha={cfg.alpha} must be in [0, 1)"),
        (cfg.lambda2_max >= 0, "lambda2_max", f"lambda2_max={cfg.lambda2_max} must be >= 0"),
        (cfg.t0 >= 0, "t0", f"t0={cfg.t0} must be >= 0"),
        (cfg.group_every >= 1, "group_every", f"group_every={cfg.group_every} must be >= 1"),
        (0 <= cfg.specificity_threshold < 1, "specificity_threshold",
         f"specificity_threshold={cfg.specificity_threshold} must be in [0, 1)"),
        (cfg.min_freq >= 0, "min_freq", f"min_freq={cfg.min_freq} must be >= 0"),
        (cfg.kappa_max > 1, "kappa_max", f"kappa_max={cfg.kappa_max} must be > 1"),
        (cfg.kappa_patience >= 1, "kappa_patience", f"kappa_patience={cfg.kappa_patience} must be >= 1"),
        (cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"), "device",
         f"device={cfg.device!r}: use auto, cpu or cuda[:N]"),
    ]


def validate(cfg: Config) -> None:
    """Checks that need no model: raise ConfigError naming the field and the fix."""
    for ok, name, message in config_checks(cfg):
        if not ok:
            raise ConfigError(f"--{name}: {message}")
    defaults = Config()
    for name in variants.ignored(cfg.variant):
        if getattr(cfg, name) != getattr(defaults, name):
            owners = [v for v in VARIANTS if variants.applies(v, name)]
            raise ConfigError(f"--{name}: variant {cfg.variant} does not use it (only {', '.join(owners)} "
                              f"do); drop --{name}={getattr(cfg, name)}")
    if cfg.evaluate_only and cfg.overwrite:
        raise ConfigError("--evaluate_only: it keeps the run's training; drop --overwrite")
    if cfg.evaluate_only and not cfg.out_dir:
        raise ConfigError("--evaluate_only: name the finished run's folder with --out_dir")
    finished = cfg.out_dir and (Path(cfg.out_dir) / "final_info.json").exists()
    if finished and not (cfg.overwrite or cfg.evaluate_only):
        raise ConfigError(f"--out_dir: {cfg.out_dir} holds a finished run (final_info.json); "
                          f"pick a new out_dir or pass --overwrite")


def resolve(cfg: Config, device: str, model_desc: dict) -> Config:
    """Fill the device- and model-dependent defaults (0 / -1 fields) and check them against the model."""
    cuda = device.startswith("cuda")
    d = model_desc["d_model"]
    cfg = dataclasses.replace(
        cfg,
        device=device,
        layer=model_desc["default_layer"] if cfg.layer == -1 else cfg.layer,
        dict_size=cfg.dict_size or (32 if cuda else 8) * d,
        train_tokens=cfg.train_tokens or (4_000_000 if cuda else 400_000),
    )
    cfg = dataclasses.replace(
        cfg,
        lr=cfg.lr or 2e-4 / math.sqrt(cfg.dict_size / 2**14),
        dead_window_tokens=cfg.dead_window_tokens or cfg.train_tokens // 20,
    )
    if not 0 <= cfg.layer < model_desc["n_layers"]:
        raise ConfigError(f"--layer: layer={cfg.layer} is outside {model_desc['hf_name']} "
                          f"(layers 0..{model_desc['n_layers'] - 1})")
    if cfg.k > cfg.dict_size:
        raise ConfigError(f"--k: k={cfg.k} exceeds dict_size={cfg.dict_size}: lower --k or raise --dict_size")
    return cfg


# -----------------------------------------------------------------------------
# The run: configure, load the inputs, harvest, train, evaluate, write final_info.json


def run(cfg: Config) -> dict:
    """The whole run. Under torchrun every rank harvests its share and trains; rank 0 alone writes the outputs
    and runs the evaluations (the other ranks return None once training is done)."""
    if cfg.evaluate_only:
        return reevaluate(cfg)
    started = time.time()
    cfg, model_name, why = configure(cfg)
    if not cfg.out_dir:
        cfg = dataclasses.replace(cfg, out_dir=distributed.on_main(new_out_dir))
        print(f"out_dir: {cfg.out_dir} (after an interruption, resume with --out_dir={cfg.out_dir})")
    out = distributed.on_main(lambda: prepare_out_dir(cfg), ConfigError)
    distributed.quiet_unless_main()
    set_seed(cfg.seed)
    torch.set_num_threads(min(torch.get_num_threads(),
                              (os.cpu_count() or 1) // distributed.local_world_size() or 1))
    with distributed.main_first():  # rank 0 fills the shared cache (model, corpora), then the others read it
        inputs = load_inputs(cfg, model_name, why)
    entry, key = prepare_activations(cfg, inputs.model, inputs.model_info, inputs.hook_name, inputs.forget,
                                     inputs.retain, inputs.documents)

    sae, scale, train_info, separation = train(cfg, entry, out)
    if not distributed.is_main():
        return None
    metadata = {"model_name": inputs.model_info["name"], "hook_name": inputs.hook_name,
                "hook_layer": cfg.layer, "context_size": cfg.context_length, "prepend_bos": True}
    sae.save(out / "sae", scale, metadata, passthrough_norm=outlier_norm(cfg, train_info))
    # what every evaluation sees: the SAE as saved, in model units, reconstructing every position it scores
    saved = load_sae(out / "sae", cfg.device, passthrough=False)
    evaluations = evaluate(cfg, out, saved, inputs, train_info, separation)

    config = {"trainer_class": "TrainerTopK", "dict_class": "AutoEncoderTopK", "activation_dim": sae.d_in,
              "lm_name": inputs.model_info["name"], "submodule_name": f"resid_post_layer_{cfg.layer}",
              **recorded_config(cfg)}
    final_info = {
        f"training results for layer {cfg.layer}": {"config": config, "final_info": train_info},
        "core evaluation results": evaluations.pop("core evaluation results"),
        "knowledge separation results": separation,
        **evaluations,
        "provenance": {"model": inputs.model_info, "forget_corpus": inputs.forget.provenance(),
                       "retain_corpus": inputs.retain.provenance(), "questions": inputs.questions,
                       "activation_cache": {"entry": str(entry), "key": key}, "code": code_version(),
                       "torch": torch.__version__, "python": sys.version.split()[0], "argv": sys.argv[1:],
                       "wall_time_s": time.time() - started},
    }
    write_json_atomic(out / "final_info.json", final_info)
    append_notes(cfg, final_info, out.resolve().parent / "notes.txt")  # beside the run folders
    # the run is finished; final_info.json and sae/ hold it
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    print(f"done in {time.time() - started:.0f} s: {out / 'final_info.json'}")
    return final_info


EVALUATION_SECTIONS = ("core evaluation results", "absorption evaluation results",
                       "unlearning evaluation results", "SAE-Bench unlearning evaluation results")
# training options added after some runs were made: the value those runs had
RUN_FIELD_FALLBACKS = {"llm_dtype": "float32", "encoder_dtype": "float32"}


def reevaluate(cfg: Config) -> dict:
    """--evaluate_only: evaluate the finished run in out_dir again, on its saved SAE, with this code.

    The model and every training option are the run's (from final_info.json; one given on the command
    line that differs is refused); so are the evaluation settings, except those the command line sets
    (evaluation_settings). The training section and its provenance stay; provenance.evaluation records
    this evaluation's code, settings and time."""
    started = time.time()
    validate(cfg)
    out = Path(cfg.out_dir)
    info = read_finished_run(out)
    training = results.training_section(info)
    cfg = evaluation_settings(run_config(cfg, training["config"]), training["config"])
    lock_out_dir(out)
    set_seed(cfg.seed)
    inputs = load_inputs(cfg, info["provenance"]["model"]["name"], "the run's model")
    saved = load_sae(out / "sae", cfg.device, passthrough=False)
    evaluations = evaluate(cfg, out, saved, inputs, training["final_info"],
                           info["knowledge separation results"])
    kept = {k: v for k, v in info.items() if k not in EVALUATION_SECTIONS and k != "provenance"}
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k in NOT_TRAINING_FIELDS}
    provenance = info["provenance"] | {"evaluation": {
        "code": code_version(), "argv": sys.argv[1:], "settings": settings,
        "at": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "wall_time_s": time.time() - started}}
    final_info = {**kept, **evaluations, "provenance": provenance}
    write_json_atomic(out / "final_info.json", final_info)
    append_notes(cfg, final_info, out.resolve().parent / "notes.txt")
    print(f"re-evaluated in {time.time() - started:.0f} s: {out / 'final_info.json'}")
    return final_info


def read_finished_run(out: Path) -> dict:
    """final_info.json of the finished run in `out`, whose sae/ is there; else a ConfigError naming the
    command that (re-)creates it."""
    info_path = out / "final_info.json"
    if not info_path.exists():
        raise ConfigError(f"--evaluate_only: {out} holds no finished run (final_info.json); train it "
                          f"first: python experiment.py --out_dir={out} ...")
    info = json.loads(info_path.read_text())
    if not (out / "sae" / "cfg.json").exists():
        argv = " ".join(a for a in info["provenance"].get("argv", []) if not a.startswith("--overwrite"))
        raise ConfigError(f"--evaluate_only: {out} has no saved SAE (sae/; SAE weights are not "
                          f"committed); re-create it with: python experiment.py {argv} --overwrite")
    return info


def run_config(cli: Config, stored: dict) -> Config:
    """The run's training options (its stored config; RUN_FIELD_FALLBACKS where it predates an option)
    with the command line's settings. A training option given on the command line (not at its default)
    that differs from the run's is refused."""
    defaults = Config()
    run_values = {}
    for f in dataclasses.fields(Config):
        if not f.metadata["training"]:
            continue
        value = stored.get(f.name, RUN_FIELD_FALLBACKS.get(f.name, getattr(defaults, f.name)))
        given = getattr(cli, f.name)
        if given != getattr(defaults, f.name) and given != value:
            raise ConfigError(f"--{f.name}: the run in {cli.out_dir} was trained with "
                              f"{f.name}={value!r}; --evaluate_only keeps its training options")
        run_values[f.name] = value
    device = pick_device(cli.device)
    return dataclasses.replace(cli, device=device, **run_values)


def evaluation_settings(cli: Config, stored: dict) -> Config:
    """cli with each evaluation setting left at its default replaced by the run's recorded value, so that
    re-evaluating a run measures what its own evaluation measured (an absorption eval it ran is run
    again) unless the command line says otherwise."""
    defaults = Config()
    values = {}
    for f in dataclasses.fields(Config):
        default = getattr(defaults, f.name)
        if f.metadata.get("evaluation") and f.name in stored and getattr(cli, f.name) == default:
            values[f.name] = tuple(stored[f.name]) if isinstance(default, tuple) else stored[f.name]
    return dataclasses.replace(cli, **values)


def configure(cfg: Config) -> tuple[Config, str, str]:
    """(cfg with its device- and model-dependent defaults filled, model name, why that model); raises
    ConfigError before anything heavy is loaded."""
    validate(cfg)
    device = distributed.init(pick_device(cfg.device))
    if cfg.batch_size % distributed.world_size():
        raise ConfigError(f"--batch_size: batch_size={cfg.batch_size} is not divisible by the "
                          f"{distributed.world_size()} processes; each takes an equal slice of every batch")
    model_name, why = models.resolve_auto() if cfg.model == "auto" else (cfg.model, "requested by name")
    try:
        description = models.describe_model(model_name, Path(cfg.cache_dir))
    except ValueError as e:
        raise ConfigError(f"--model: {e}") from None
    return resolve(cfg, device, description), model_name, why


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device: {requested} asked for but CUDA is not available; use --device=cpu")
    return requested


def new_out_dir() -> str:
    """out/run_<UTC date-time>[_n]: a folder no run has used (out/ is not committed, so no study run's)."""
    name = f"out/run_{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    n = 1
    while Path(name if n == 1 else f"{name}_{n}").exists():
        n += 1
    return name if n == 1 else f"{name}_{n}"


_OUT_DIR_LOCKS = {}  # resolved out_dir -> open lock file: a lock lives as long as this process


def prepare_out_dir(cfg: Config) -> Path:
    """Create and lock out_dir (refusing one that is not writable or that another run holds); with --overwrite
    drop a finished run and any checkpoint; otherwise check that a checkpoint there is from this config (so a
    mismatch fails before any heavy work)."""
    out = Path(cfg.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock_out_dir(out)
    except OSError as e:
        raise ConfigError(f"--out_dir: cannot write to {out} ({e.strerror or e}); "
                          f"pick a writable folder") from None
    if cfg.overwrite:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "final_info.json").unlink(missing_ok=True)
    elif (out / "final_info.json").exists():  # finished while this run waited for the lock
        raise ConfigError(f"--out_dir: {out} holds a finished run (final_info.json); "
                          f"pick a new out_dir or pass --overwrite")
    elif (out / "checkpoints" / "last.pt").exists():
        load_checkpoint(out / "checkpoints" / "last.pt", cfg)
    return out


def lock_out_dir(out: Path) -> None:
    """Hold an exclusive flock on out/.lock until this process exits (the OS releases it, even after
    SIGKILL), so that a second run in the same out_dir is refused instead of overwriting the first one's
    files. Taking it again in the same process is a no-op."""
    if out.resolve() in _OUT_DIR_LOCKS:
        return
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"--out_dir: another run is using {out} (it holds {out / '.lock'}); wait for it to "
                          f"finish or pick another out_dir") from None
    _OUT_DIR_LOCKS[out.resolve()] = fd


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Inputs:
    """What a run reads before training: the model, the corpora split once into train / val / eval documents
    ({"forget"|"retain": data.DocumentSplit}), and the questions."""
    model: object
    model_info: dict
    hook_name: str
    forget: data.Corpus
    retain: data.Corpus
    documents: dict
    forget_questions: dict
    retain_questions: dict
    questions: dict


def load_inputs(cfg: Config, model_name: str, why: str) -> Inputs:
    # the corpora first: a missing or empty one fails before the minutes a model takes to load
    forget, retain = (load_corpus_or_explain(name, spec, cfg) for name, spec in
                      (("forget_corpus", cfg.forget_corpus), ("retain_corpus", cfg.retain_corpus)))
    dtype, dtype_why = models.resolve_llm_dtype(cfg.llm_dtype, cfg.device)
    try:
        model, model_info = models.load_model(model_name, cfg.device, Path(cfg.cache_dir), dtype)
    except RuntimeError as e:  # a named model that cannot be had: say so in one line
        raise ConfigError(f"--model: {e}") from None
    model_info |= {"requested": cfg.model, "reason": why, "dtype_reason": dtype_why}
    print(f"model: {model_info['name']} ({model_info['source']}; {why}), {dtype} ({dtype_why})")
    documents = {side: data.split_documents(corpus.documents, cfg.eval_fraction, cfg.data_seed,
                                            cfg.val_fraction)
                 for side, corpus in (("forget", forget), ("retain", retain))}
    questions = data.load_questions("embedded" if model_info["source"] != "hub" else "hub")
    return Inputs(model, model_info, f"blocks.{cfg.layer}.hook_resid_post", forget, retain, documents,
                  *questions)


def load_corpus_or_explain(option: str, spec: str, cfg: Config) -> data.Corpus:
    try:
        return data.load_corpus(spec)
    except (FileNotFoundError, ValueError) as e:  # a missing, empty or malformed corpus file
        raise ConfigError(f"--{option}: {e}") from None


def prepare_activations(cfg: Config, model, model_info: dict, hook_name: str, forget: data.Corpus,
                        retain: data.Corpus, documents: dict):
    """Harvest (or read back) train and validation activations from the training and validation documents of
    `documents` ({"forget"|"retain": data.DocumentSplit}); returns the cache entry and its key fields."""
    key = {"model": {k: model_info.get(k) for k in ("name", "source", "gguf_sha256", "revision",
                                                    "dtype")},
           "layer": cfg.layer, "hook_name": hook_name, "context_length": cfg.context_length,
           "train_tokens": cfg.train_tokens, "val_tokens": cfg.val_tokens, "eval_fraction": cfg.eval_fraction,
           "val_fraction": cfg.val_fraction, "data_seed": cfg.data_seed, "forget": forget.provenance(),
           "retain": retain.provenance()}
    entry = Path(cfg.cache_dir) / "activations" / activations.cache_key(key)
    check_shared_cache(Path(cfg.cache_dir))
    if distributed.on_main(lambda: cached_entry_is_sound(entry)):
        return entry, key
    print(f"activations: harvesting into {entry}")
    bos = models.bos_token_id(model.tokenizer)
    splits = {}
    for split, n_tokens in (("train", cfg.train_tokens), ("val", cfg.val_tokens)):
        contexts, labels = [], []
        for corpus, side, label in ((forget, "forget", activations.FORGET),
                                    (retain, "retain", activations.RETAIN)):
            docs = getattr(documents[side], split)
            try:
                ctx = data.pack_contexts(model.tokenizer, docs, cfg.context_length, n_tokens // 2, bos)
            except ValueError as e:
                # the corpus is too small for the budget: say so before harvesting anything
                raise ConfigError(f"--{split}_tokens: {corpus.name} ({split} documents): {e}") from None
            contexts.append(ctx)
            labels.append(torch.full((len(ctx),), label))
        contexts, labels = torch.cat(contexts), torch.cat(labels)
        order = torch.randperm(len(contexts), generator=torch.Generator().manual_seed(cfg.data_seed))
        splits[split] = (contexts[order], labels[order])
    activations.build_cache(entry, key, model, hook_name, cfg.layer, splits, cfg.harvest_batch_size)
    return entry, key


def check_shared_cache(cache_dir: Path) -> None:
    """Under torchrun, refuse a cache folder that the ranks do not all see: rank 0 writes a token file there
    and every rank must read it back (nodes need a shared filesystem for the cache and the out_dir)."""
    if distributed.world_size() == 1:
        return
    token = distributed.broadcast_object(os.urandom(8).hex())
    probe = cache_dir / f".rank-probe-{token}"
    if distributed.is_main():
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    distributed.barrier()
    seen = probe.exists() and probe.read_text() == token
    missing = int(distributed.reduce_sum(torch.tensor([int(not seen)])))
    distributed.barrier()
    if distributed.is_main():
        probe.unlink()
    if missing:
        raise ConfigError(f"--cache_dir: {missing} of {distributed.world_size()} processes cannot see "
                          f"{cache_dir} as rank 0 writes it; under torchrun the cache (and the "
                          f"out_dir) must be on a filesystem every node shares")


def cached_entry_is_sound(entry: Path) -> bool:
    """True when the entry exists and every file matches its manifest's sha256; a damaged entry (a
    missing or unreadable manifest included) is removed."""
    if not entry.exists():
        return False
    if not (entry / "manifest.json").exists():
        print(f"activations: cache entry {entry} has no manifest.json (an interrupted copy?); rebuilding it")
        shutil.rmtree(entry)
        return False
    try:
        for split in ("train", "val"):
            activations.load_split(entry, split)  # verifies every file against the manifest's sha256
        print(f"activations: reading the cache {entry}")
        return True
    except (RuntimeError, OSError, ValueError, KeyError) as e:  # truncated, corrupted or missing file
        print(f"activations: cache entry {entry} is damaged ({e}); rebuilding it")
        shutil.rmtree(entry)
        return False


def outlier_norm(cfg: Config, train_info: dict) -> "float | None":
    """Training's outlier rule in model units: max_norm_multiple x the median training-token norm (None:
    max_norm_multiple 0 keeps every token)."""
    return cfg.max_norm_multiple * train_info["median_activation_norm"] or None


def evaluate(cfg: Config, out: Path, sae: TopKSAE, inputs: Inputs, train_info: dict,
             separation: dict) -> dict:
    """The evaluation sections of final_info.json, each on the saved SAE and the evaluation documents."""
    import absorption  # SAE-Bench loads with the evaluations, not with load_sae
    import core_eval
    core_cfg = core_eval.CoreEvalConfig(
        context_length=cfg.context_length, batch_size_prompts=cfg.core_eval_batch_prompts,
        n_eval_reconstruction_batches=cfg.core_eval_batches,
        n_eval_sparsity_variance_batches=cfg.core_eval_sparsity_batches)
    sections = {"core evaluation results": core_eval.run_core_eval(
        sae, inputs.model, inputs.documents["retain"].eval, core_cfg, cfg.device,
        max_norm=outlier_norm(cfg, train_info))}
    if cfg.absorption:
        sections["absorption evaluation results"] = absorption.run_absorption(
            sae, inputs.model, cfg.device, absorption.AbsorptionConfig(n_words=cfg.absorption_words or None),
            work_dir=Path(cfg.cache_dir) / "absorption")
    if cfg.unlearning:
        sections["unlearning evaluation results"] = evaluate_unlearning(
            cfg, sae, inputs.model, inputs.hook_name, inputs.documents, inputs.forget_questions,
            inputs.retain_questions, separation)
        sections["SAE-Bench unlearning evaluation results"] = evaluate_unlearning_with_sae_bench(
            cfg, out, sae, inputs.model_info["name"], cfg.device)
    return sections


def evaluate_unlearning(cfg: Config, sae: TopKSAE, model, hook_name: str, splits: dict,
                        forget_questions: dict, retain_questions: dict, separation: dict) -> dict:
    """unlearning.run_unlearning_eval on held-out documents, with the clamp's edit defined by
    `intervention_sae(sae, cfg.unlearning_group_bias_edit)`; for the orthogonal variants also restricted
    to the SAE's own forget group. The question filter depends only on the model, so it is cached across
    runs."""
    import unlearning
    unlearn_cfg = unlearning.UnlearningConfig(
        retain_thresholds=tuple(cfg.unlearning_retain_thresholds),
        n_features=tuple(cfg.unlearning_n_features),
        multipliers=tuple(cfg.unlearning_multipliers), ce_tolerance=cfg.unlearning_ce_tolerance,
        n_ce_contexts=cfg.unlearning_ce_contexts, context_length=cfg.context_length,
        max_questions_per_subject=cfg.unlearning_questions_per_subject,
        forget_group_sweep=cfg.unlearning_forget_group_sweep, cache_dir=str(Path(cfg.cache_dir) / "unlearning"))
    forget_group = (torch.tensor(separation["forget_features"], dtype=torch.long)
                    if VARIANTS[cfg.variant].grouped else None)
    # every SAE's detector: the training's grouping rule applied to the rate split's firing rates
    detector_rule = lambda p_forget, p_retain: specific_latents(
        p_forget, p_retain, cfg.specificity_threshold, cfg.min_freq,
        int(cfg.max_group_fraction * sae.cfg.d_in))[0].tolist()
    result = unlearning.run_unlearning_eval(intervention_sae(sae, cfg.unlearning_group_bias_edit), model,
                                            hook_name, cfg.layer, splits["forget"].eval,
                                            splits["retain"].eval, forget_questions, retain_questions,
                                            unlearn_cfg, cfg.device, forget_group=forget_group,
                                            detector_rule=detector_rule)
    result["eval_config"]["group_bias_edit"] = cfg.unlearning_group_bias_edit
    return result


def evaluate_unlearning_with_sae_bench(cfg: Config, out: Path, sae: TopKSAE, model_name: str,
                                       device: str) -> dict:
    """SAE-Bench's own unlearning eval beside the port, where it applies (gemma-2-2b-it / -9b-it with WMDP's
    bio-forget-corpus.jsonl), with the same edit as the port; otherwise a record of why it did not run."""
    import sae_bench_unlearning
    applies, why = sae_bench_unlearning.applies(model_name, cfg.forget_corpus)
    if not applies:
        return {"ran": False, "reason": why}
    print(f"unlearning: SAE-Bench's own eval ({why})")
    # the SAE's name in SAE-Bench's artifacts: unique per out_dir, so two runs never share firing-rate files
    sae_name = f"{out.name}-{hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:8]}"
    result = sae_bench_unlearning.run_sae_bench_unlearning(
        intervention_sae(sae, cfg.unlearning_group_bias_edit), sae_name, model_name,
        Path(cfg.forget_corpus), device, Path(cfg.cache_dir) / "sae_bench_unlearning")
    return {"ran": True, "reason": why, "group_bias_edit": cfg.unlearning_group_bias_edit, **result}


def code_version() -> dict:
    """The git commit of this code and whether tracked files other than notes.txt, run_*/ and runs/
    (which runs write) had uncommitted changes (None outside git)."""
    here = Path(__file__).resolve().parent
    try:
        git = lambda *args: subprocess.run(["git", *args], cwd=here, capture_output=True, text=True,
                                           check=True).stdout.strip()
        return {"git_commit": git("rev-parse", "HEAD"),
                "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no",
                                                "--", ".", ":(exclude)notes.txt", ":(exclude)run_*",
                                                ":(exclude)runs"))}
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": None, "uncommitted_changes": None}


def append_notes(cfg: Config, final_info: dict, notes_path: Path) -> None:
    """One entry per finished run, appended: what the run was and its headline numbers (results.flatten)."""
    r = results.flatten(final_info)
    g = lambda v: "n/a" if v is None else f"{v:.4g}"
    shown = [f"{name} {getattr(cfg, name)}" for name in VARIANTS[cfg.variant].options
             if name not in variants.GROUP_OPTIONS]
    setting = f" ({', '.join(shown)})" if shown else ""
    ablation = " (no group biases)" if VARIANTS[cfg.variant].grouped and not cfg.group_biases else ""
    entry = (f"\n## {cfg.out_dir}  ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)\n"
             f"variant {cfg.variant}{setting}{ablation} | seed {cfg.seed} | model "
             f"{final_info['provenance']['model']['name']} | layer {cfg.layer} | dict {cfg.dict_size} "
             f"k {cfg.k} | train tokens {cfg.train_tokens:,} x {cfg.epochs} epochs\n"
             f"val explained variance {g(r['val_ev'])} (checkpoint step {r['best_step']}; last step "
             f"{g(r['final_step_val_ev'])}) | core: explained variance (conventional) {g(r['conv_ev'])} "
             f"({g(r['conv_ev_typical'])} without outliers), ce_loss_score {g(r['ce_loss_score'])}, "
             f"kl_div_score {g(r['kl_div_score'])}, L0 {g(r['l0'])}\n"
             f"separation: groups {r['n_forget']} forget / {r['n_retain']} retain | cross-group |cos| mean "
             f"{g(r['cross_cos'])} max {g(r['cross_cos_max'])} | κ forget {g(r['kappa_forget'])} retain "
             f"{g(r['kappa_retain'])} | nearest-neighbour |cos| mean {g(r['nn_cos'])}\n")
    if r["absorption"] is not None or r["absorption_reason"]:
        entry += (f"absorption: mean absorption fraction {g(r['absorption'])}\n"
                  if r["absorption"] is not None
                  else f"absorption: not measured ({r['absorption_reason']})\n")
    if r["has_unlearning"]:
        mcq = (g(r["mcq"]) if r["mcq"] is not None
               else f"n/a ({r['n_forget_questions']} forget questions survive)")
        score = lambda name: "n/a" if r[f"{name}_score"] is None else \
            ("≥ " if r[f"{name}_lower_bound"] else "") + g(r[f"{name}_score"])
        entry += (f"unlearning ({cfg.unlearning_group_bias_edit} group-bias edit): held-out score "
                  f"{score('held_out')} ± {g(r['held_out_score_se'])} nats (forget ΔCE where the report "
                  f"text's retain ΔCE = {r['ce_tolerance']}, curve chosen on selection text) | "
                  f"conditional clamp {score('conditional')} | controls: random features "
                  f"{score('random')}, difference of means {score('dom')}, LEACE {score('leace')} | "
                  f"MCQ unlearning_score {mcq}\n"
                  f"question-answer text (second pair): held-out score {score('qa')} ± "
                  f"{g(r['qa_score_se'])} | difference of means {score('qa_dom')}, LEACE "
                  f"{score('qa_leace')}{' | not scored: ' + r['qa_skipped'] if r['qa_skipped'] else ''}\n")
    with open(notes_path, "a") as f:
        f.write(entry)


# -----------------------------------------------------------------------------
# Training: the loop, its state, checkpoints (resume a killed run where it stopped, bit-identical on CPU)


def checkpoint_rule(cfg: Config) -> str:
    return (f"the lowest validation loss (every {cfg.val_every} steps, at every regroup and at the end) "
            f"on validation documents disjoint from training and from every evaluation; the same rule "
            f"for every variant")


def train(cfg: Config, entry: Path, out: Path) -> tuple[AutoEncoderTopK, float, dict, dict]:
    """Train the SAE on the cached activations; returns (sae, input scale, training info, separation results).

    The returned SAE is chosen by checkpoint_rule(cfg). At every regroup the separation metrics are logged;
    for the cross-group variants a group κ above kappa_max for kappa_patience consecutive regroups stops
    training early.
    Every `checkpoint_every` steps, at the end and on Ctrl-C/SIGTERM the whole training state goes to
    out/checkpoints/last.pt; when it exists, training resumes from it (same batches, same log lines).
    """
    log_path, ckpt_path = out / "train_log.jsonl", out / "checkpoints" / "last.pt"
    training, batches = start_training(cfg, entry, ckpt_path, log_path)
    train_data, start_step, main = training.data, training.step, distributed.is_main()
    steps, wandb_run, started, wall_before = (
        training.steps, open_wandb(cfg) if main else None, time.time(), training.wall_s)
    last = start_step - 1
    with open(log_path if main else os.devnull,
              "ab" if start_step else "wb") as log, StopRequest() as stop_request:
        bar = tqdm(range(start_step, start_step if training.finished else steps), desc="train SAE",
                   unit="step", initial=start_step, total=steps, disable=not main)
        for step in bar:
            # one optimiser step on the next batch (in the SAE's scaled units); a NaN loss stops here
            x, y = next(batches)
            x, y = x.to(cfg.device) / train_data.scale, y.to(cfg.device)
            record = {"step": step, **training.trainer.step(x, y)}
            check_finite(record, step, ckpt_path)
            training.stats, stop = record, False
            # regroup: new groups and partners, the separation metrics, the κ check
            if (step + 1) % cfg.group_every == 0:
                record["separation"], stop = training.regroup(step)
            # validate: the loss that picks the checkpoint
            if step % cfg.val_every == 0 or step == steps - 1 or "separation" in record:
                record |= training.validate(step)
                bar.set_postfix(loss=f"{record['loss']:.4f}", ev=f"{record['explained_variance']:.3f}",
                                dead=record["dead_latents"])
            # log the step
            log.write((json.dumps(json_safe(record)) + "\n").encode())
            if wandb_run is not None:
                wandb_run.log(record, step=step)
            last, training.step, training.wall_s = step, step + 1, wall_before + time.time() - started
            # stop (early stop, or a signal on any rank), or checkpoint
            stop, interrupted = agree(stop, stop_request.signal is not None)
            if stop:
                print(f"early stop: {training.stopper.reason}")
                break
            if interrupted:
                save_training(ckpt_path, training, log)
                raise TrainingInterrupted(f"{stop_request.signal or 'SIGTERM'} at step {step + 1} of "
                                          f"{steps}: checkpoint written to {ckpt_path}; resume with "
                                          f"the same command and --out_dir={out}")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                save_training(ckpt_path, training, log)
        if not training.finished:  # the end state, so that a crash in the evaluations does not redo training
            training.finished = True
            save_training(ckpt_path, training, log)
    if wandb_run is not None:
        wandb_run.finish()
    return training_results(training, start_step, last)


def start_training(cfg: Config, entry: Path, ckpt_path: Path, log_path: Path) -> tuple[Training, object]:
    """(training at its next step, this rank's stream of batch slices from there): resumed from the
    checkpoint when there is one, else fresh with b_dec at the geometric median of batch 0 (training step s
    uses batch s + 1); every rank starts from rank 0's SAE."""
    train_data = TrainingData.load(entry, cfg.max_norm_multiple)
    training = Training(cfg, train_data)
    if ckpt_path.exists():
        resume_training(ckpt_path, training, log_path)
    elif distributed.is_main():
        first, _ = next(activations.shuffled_batches(train_data.acts, train_data.labels, cfg.batch_size,
                                                     cfg.seed, rows=train_data.keep))
        with torch.no_grad():
            training.sae.b_dec.copy_(geometric_median(first.to(cfg.device) / train_data.scale))
    distributed.broadcast_tensors(training.sae.parameters())
    batches = activations.shuffled_batches(train_data.acts, train_data.labels, cfg.batch_size, cfg.seed,
                                           rows=train_data.keep,
                                           skip=training.step + 1, part=distributed.shard(cfg.batch_size))
    return training, batches


def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """argmin_m Σ_i ‖p_i − m‖ by Weiszfeld's iteration, points [N, d] -> [d]."""
    median = points.mean(dim=0)
    for _ in range(max_iter):
        weights = 1 / (points - median).norm(dim=1).clamp_min(1e-8)
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (new - median).norm() < tol * median.norm().clamp_min(1e-8):
            return new
        median = new
    return median


def agree(*flags: bool) -> list[bool]:
    """Each flag, true on every rank when it is true on any (an early stop, a Ctrl-C on one rank), so that all
    ranks leave the loop at the same step."""
    return (distributed.reduce_sum(torch.tensor([int(f) for f in flags])) > 0).tolist()


def check_finite(record: dict, step: int, ckpt_path: Path) -> None:
    if not math.isfinite(record["loss"]):
        terms = ", ".join(f"{k} {record[k]}" for k in ("recon", "auxk", "ortho") if k in record)
        raise FloatingPointError(f"step {step}: loss is {record['loss']} ({terms}); the last good checkpoint "
                                 f"{ckpt_path} is kept, no final_info.json was written")


@dataclass
class TrainingData:
    """The cached activations as training reads them: train rows (those kept:
    norm <= max_norm_multiple × median), their norms, the kept validation rows and their mean, and the
    scale that makes E‖x‖² = 1 over the kept training rows (dictionary_learning's normalisation)."""
    acts: np.ndarray
    labels: np.ndarray
    keep: np.ndarray
    norms: np.ndarray
    val_acts: np.ndarray
    val_mean: np.ndarray
    scale: float

    @classmethod
    def load(cls, entry: Path, max_norm_multiple: float) -> "TrainingData":
        acts, labels = activations.load_split(entry, "train", verify=False)  # verified by prepare_activations
        val_acts, _ = activations.load_split(entry, "val", verify=False)
        keep, norms = activations.typical_rows(acts, max_norm_multiple)
        val_keep, _ = activations.typical_rows(val_acts, max_norm_multiple)
        scale = float(np.sqrt((norms[keep].astype(np.float64) ** 2).mean()))
        val_acts = activations.as_float32(val_acts[val_keep])  # small: held in memory as float32
        return cls(acts, labels, keep, norms, val_acts, val_acts.mean(axis=0), scale)


class Training:
    """One SAE's training: the SAE, trainer, grouper and κ stopper, the regroup history and the best
    checkpoint. state_dict / load_state_dict list what a checkpoint holds, once; regroup and validate are
    the loop's events."""

    def __init__(self, cfg: Config, train_data: TrainingData):
        self.cfg, self.data = cfg, train_data
        d = train_data.acts.shape[1]
        self.sae = AutoEncoderTopK(d, cfg.dict_size, cfg.k, group_biases=uses_group_biases(cfg),
                                   encoder_dtype=models.LLM_DTYPES[cfg.encoder_dtype]).to(cfg.device)
        self.steps = max(1, int(cfg.epochs * len(train_data.keep) / cfg.batch_size))
        self.grouper = FeatureGrouper(cfg.dict_size, cfg.group_every, cfg.specificity_threshold, cfg.min_freq,
                                      max_group_size=int(cfg.max_group_fraction * d))
        self.ortho = make_ortho(cfg)
        self.trainer = TrainerTopK(self.sae, self.steps, cfg.lr, cfg.warmup_steps, cfg.decay_start,
                                   cfg.auxk_alpha, cfg.dead_window_tokens, ortho=self.ortho,
                                   grouper=self.grouper)
        self.stopper = KappaEarlyStopping(cfg.kappa_max, cfg.kappa_patience)
        self.step, self.finished, self.wall_s = 0, False, 0.0  # step: the next step to run
        self.history, self.stats, self.best = [], {}, {"val_recon": float("inf")}

    def state_dict(self) -> dict:
        return {"config": json.dumps(training_fields(self.cfg)), "step": self.step, "finished": self.finished,
                "sae": self.sae.state_dict(), "trainer": self.trainer.state(),
                "grouper": self.grouper.full_state(),
                "stopper": {"strikes": self.stopper.strikes, "reason": self.stopper.reason},
                "history": json.dumps(self.history), "stats": json.dumps(self.stats), "best": self.best,
                "wall_s": self.wall_s, "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.trainer.load_state(state["trainer"])
        self.grouper.load_state(state["grouper"])
        self.stopper.strikes, self.stopper.reason = state["stopper"]["strikes"], state["stopper"]["reason"]
        self.history, self.stats = json.loads(state["history"]), json.loads(state["stats"])
        self.step, self.finished, self.best, self.wall_s = (
            state["step"], state["finished"], state["best"], state["wall_s"])
        torch.set_rng_state(state["torch_rng"])

    def regroup(self, step: int) -> tuple[dict, bool]:
        """The regroup event after `step`: new groups and partners (and the group-bias assignment), the
        separation metrics, and the κ check (ortho variants; topk only watches). Returns
        (metrics, stop)."""
        self.grouper.assign(self.sae.W_dec, self.trainer.steps_done)
        self.sae.set_groups(self.grouper.assignment())
        metrics = separation_metrics(self.sae.W_dec, self.grouper) | {"step": step}
        self.history.append(metrics)
        return metrics, VARIANTS[self.cfg.variant].grouped and self.stopper.check(metrics, step)

    def validate(self, step: int) -> dict:
        """Validation loss and EV; the SAE and its groups are kept when the loss is the lowest so far."""
        result = validation_loss(self.sae, self.data, self.cfg.device)
        if result["val_recon"] < self.best["val_recon"]:
            self.best = {"val_recon": result["val_recon"], "step": step, "grouper": self.grouper.state(),
                         "sae": {k: v.detach().clone() for k, v in self.sae.state_dict().items()}}
        return result


def make_ortho(cfg: Config):
    """The orthogonality term of `cfg.variant` as the variant table says (None without one): the
    all-pairs term for an ungrouped variant, else the cross-group term, with no ramp, α = 0 and the
    partner target where the variant does not read t0, α or the target (fixed_ortho)."""
    variant = VARIANTS[cfg.variant]
    if variant.lambda_field is None:
        return None
    weight = getattr(cfg, variant.lambda_field)
    if not variant.grouped:
        return AllPairsOrthogonalityLoss(weight)
    reads = lambda option: variants.applies(cfg.variant, option)
    return CrossGroupOrthogonalityLoss(weight, t0=cfg.t0 if reads("t0") else 0,
                                       alpha=cfg.alpha if reads("alpha") else 0.0,
                                       target=cfg.ortho_target if reads("ortho_target") else "partner")


def uses_group_biases(cfg: Config) -> bool:
    return VARIANTS[cfg.variant].grouped and cfg.group_biases


def open_wandb(cfg: Config):
    """The wandb run, or None. auto: wandb's own WANDB_MODE where it is set (the tests set disabled),
    else online when an API key is configured, else disabled."""
    mode = cfg.wandb_mode
    if mode == "auto" and os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        mode = os.environ["WANDB_MODE"]
    if mode == "auto":
        netrc = Path.home() / ".netrc"
        configured = (bool(os.environ.get("WANDB_API_KEY"))
                      or (netrc.exists() and "api.wandb.ai" in netrc.read_text()))
        mode = "online" if configured else "disabled"
    if mode == "disabled":
        return None
    import wandb
    return wandb.init(project="orthogonal-sae", dir=cfg.out_dir, mode=mode, config=dataclasses.asdict(cfg))


def save_training(path: Path, training: Training, log) -> None:
    """Checkpoint (rank 0 writes it; every rank holds the same state): the training state and the log's
    length (a resumed run truncates lines written after it)."""
    bad = [name for name, p in training.sae.state_dict().items()
           if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:  # a NaN that the loss did not show (yet) must not become the "last good" checkpoint
        raise FloatingPointError(f"step {training.step}: non-finite SAE parameters ({', '.join(bad)}); the "
                                 f"last good checkpoint {path} is kept, no final_info.json was written")
    if distributed.is_main():
        log.flush()
        save_checkpoint(path, training.state_dict() | {"log_bytes": log.tell()})


def resume_training(path: Path, training: Training, log_path: Path) -> None:
    """Load the checkpoint at `path` into `training` and drop the log lines written after it. The state holds
    global batches only, so any number of processes can resume it."""
    state = load_checkpoint(path, training.cfg)
    training.load_state_dict(state)
    if distributed.is_main():
        with open(log_path, "r+b") as log:
            log.truncate(state["log_bytes"])
    print(f"train: resuming from {path} at step {training.step} of {training.steps}"
          + (" (training had finished)" if training.finished else ""))


# Fields that do not change what training computes; a checkpoint may be resumed with other values of these.
NOT_TRAINING_FIELDS = {f.name for f in dataclasses.fields(Config) if not f.metadata["training"]}


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM during training: a checkpoint was written; the same command resumes."""


def training_fields(cfg: Config) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_TRAINING_FIELDS}


def save_checkpoint(path: Path, state: dict) -> None:
    """File = sha256 of the payload (64 hex digits + newline), then the torch.save payload. Written to a
    temporary file, fsynced and renamed: a reader sees the old checkpoint or the new one, never half of
    one. The checksum catches what torch.load would not: flipped bytes inside tensor data load
    silently."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    write_bytes_atomic(path, hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def load_checkpoint(path: Path, cfg: Config) -> dict:
    """The checkpoint's state (tensors and plain values only: weights_only, nothing is unpickled), after
    checking that it was written by a run with the same training config."""
    raw = path.read_bytes()
    digest, payload = raw[:64].decode("ascii", "replace"), raw[65:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise ConfigError(f"--out_dir: checkpoint {path} is truncated or corrupted (checksum mismatch); "
                          f"delete it or pass --overwrite to start afresh")
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    saved, now = json.loads(state["config"]), training_fields(cfg)
    differing = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if differing:
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differing)
        raise ConfigError(f"--out_dir: the checkpoint in {path.parent} is from a different config "
                          f"({changes}); rerun with the checkpoint's values, pick a new out_dir, "
                          f"or pass --overwrite to start afresh")
    return state


class StopRequest:
    """Turns Ctrl-C / SIGTERM during training into a flag checked between steps, so the checkpoint
    written on the way out holds a consistent state (never one taken in the middle of an optimizer
    step)."""

    def __enter__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def training_results(training: Training, start_step: int,
                     last: int) -> tuple[AutoEncoderTopK, float, dict, dict]:
    """(the chosen SAE, input scale, training info, separation results): the last step's SAE is measured,
    then the checkpoint chosen by checkpoint_rule is loaded and measured (unless it is the last step's,
    measured already)."""
    cfg, train_data, sae, grouper, ortho = (training.cfg, training.data, training.sae, training.grouper,
                                      training.ortho)
    measure = lambda: {"validation": validation_loss(sae, train_data, cfg.device),
                       "separation": separation_metrics(sae.W_dec, grouper),
                       "geometry": feature_geometry(sae.W_dec, grouper.assignment())}
    at_last = measure()
    final_step = {"step": last, **at_last["validation"], "separation": at_last["separation"],
                  "nearest_neighbour_abs_cos": at_last["geometry"]["all"]}
    sae.load_state_dict(training.best["sae"])
    grouper.load_state(training.best["grouper"])
    chosen = at_last if training.best["step"] == last else measure()
    stats, stopper = training.stats, training.stopper
    info = {"training_steps": training.steps, "steps_run": last + 1,
            "best_checkpoint_step": training.best["step"],
            "training_tokens_seen": (last + 1) * cfg.batch_size, "final_loss": stats["loss"],
            "final_recon": stats["recon"], "final_dead_latents": stats["dead_latents"], "layer": cfg.layer,
            "dict_size": cfg.dict_size, "k": cfg.k, "learning_rate": cfg.lr,
            "sparsity_penalty": cfg.auxk_alpha,
            "sparsity_penalty_meaning": "auxk_alpha: weight of the AuxK dead-latent loss "
                                        "(TopK enforces sparsity by k)",
            "input_scale": train_data.scale, "train_tokens_harvested": len(train_data.acts),
            "tokens_dropped_as_outliers": int(len(train_data.acts) - len(train_data.keep)),
            "median_activation_norm": float(np.median(train_data.norms)),
            "train_wall_time_s": training.wall_s,
            "resumed_from_step": start_step if start_step > 0 else None,
            "checkpoint_rule": checkpoint_rule(cfg),
            "world_size": distributed.world_size(),
            **chosen["validation"]}
    reads = lambda option: variants.applies(cfg.variant, option)
    separation = {  # the values that took effect: α 0 and no ramp where the variant has none
        "variant": cfg.variant, "alpha": cfg.alpha if reads("alpha") else 0.0,
        "ortho_target": cfg.ortho_target if reads("ortho_target") else None,
        "lambda2_max": ortho.lambda2_max if ortho else 0.0,
        "lambda2_default": ortho_lambda2_default(cfg.variant),
        "t0": cfg.t0 if reads("t0") else 0, "group_biases": uses_group_biases(cfg),
        "lambda2_final": ortho.lambda2(training.trainer.steps_done) if ortho else 0.0,
        "grouping": {"group_every": cfg.group_every, "specificity_threshold": cfg.specificity_threshold,
                     "min_freq": cfg.min_freq, "max_group_size": grouper.max_group_size,
                     "passive": not VARIANTS[cfg.variant].grouped},
        "final_checkpoint_step": training.best["step"],
        "final": chosen["separation"],  # of the chosen checkpoint, with its own groups
        "final_step": final_step,  # the SAE of the last step, beside the chosen checkpoint
        "geometry": chosen["geometry"],  # max |cos| to the nearest other feature
        # the chosen checkpoint's forget group (unlearning uses it)
        "forget_features": grouper.forget_idx.tolist(),
        "early_stopping": {"kappa_max": cfg.kappa_max, "kappa_patience": cfg.kappa_patience,
                           "applies": VARIANTS[cfg.variant].grouped, "stopped": stopper.reason is not None,
                           "reason": stopper.reason or "ran all steps", "step": last,
                           "kappa_history": [{"step": h["step"], "forget": h["kappa_forget"],
                                              "retain": h["kappa_retain"], "union": h["kappa_union"]}
                                             for h in training.history]},
        "regroup_history": training.history,
    }
    return sae, train_data.scale, info, json_safe(separation)


def ortho_lambda2_default(variant: str) -> float:
    """The Config default of the variant's λ2 field (plot.py names λ2 in a label only where it differs)."""
    name = VARIANTS[variant].lambda_field or "lambda2_max"  # topk: none (0 either way)
    return Config.__dataclass_fields__[name].default


@torch.no_grad()
def validation_loss(sae: AutoEncoderTopK, train_data: TrainingData, device: str,
                    batch_size: int = 4096) -> dict:
    """Mean ‖x − x̂‖² and explained variance (about the mean) on the held-out activations, in scaled
    units; each rank takes its share of the rows and the sums are reduced, so every rank gets the
    same numbers."""
    acts, scale = train_data.val_acts, train_data.scale
    sq_err, sq_dev, n = 0.0, 0.0, len(acts)
    mean = torch.from_numpy(train_data.val_mean).to(device) / scale
    part = distributed.shard(n)
    for start in range(part.start, part.stop, batch_size):
        rows = np.ascontiguousarray(acts[start:min(start + batch_size, part.stop)])
        x = torch.from_numpy(rows).to(device) / scale
        sq_err += (x - sae(x)).pow(2).sum().item()
        sq_dev += (x - mean).pow(2).sum().item()
    sq_err, sq_dev = distributed.reduce_sum(torch.tensor([sq_err, sq_dev], dtype=torch.float64)).tolist()
    return {"val_recon": sq_err / n, "val_explained_variance": 1 - sq_err / sq_dev}


# -----------------------------------------------------------------------------
# The trainer


class TrainerTopK:
    """Adam on L = ‖x − x̂‖² + auxk_alpha · L_auxk [+ λ2(t) · L_ortho]  (sparsity is enforced by k,
    so TopK needs no L1 term).

    L_auxk (Gao et al. 2024): the residual e = x − x̂ is reconstructed from the top k_aux = d/2
    pre-activations of the dead latents only, ê = Σ a_j W_dec[j] (no bias), and
    L_auxk = ‖e − ê‖² / ‖e − mean(e)‖², batch means. A latent is dead when it has not fired for
    `dead_window_tokens` tokens. Learning rate: linear warmup, constant, linear decay to 0 over the last
    (1 − decay_start) of training.
    `ortho` (FixedOrthogonalityLoss / AdaptiveOrthogonalityLoss) adds the orthogonality term; `grouper`
    is fed the TopK indices and domain labels every step and regroups every `grouper.every` steps (for
    every variant, so the separation metrics are comparable; for topk it only watches). After a regroup
    an SAE with group biases takes the new assignment.
    """

    def __init__(self, sae: AutoEncoderTopK, steps: int, lr: float, warmup_steps: int, decay_start: float,
                 auxk_alpha: float, dead_window_tokens: int, ortho=None, grouper: FeatureGrouper = None):
        self.sae, self.steps, self.auxk_alpha, self.dead_window_tokens = (
            sae, steps, auxk_alpha, dead_window_tokens)
        self.ortho, self.grouper, self.steps_done = ortho, grouper, 0
        self.k_aux = sae.d_in // 2
        # fused: one kernel per parameter instead of a dozen elementwise passes (the same update up to float
        # rounding; BENCHMARKS.md)
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), fused=True)
        decay_from = int(decay_start * steps)

        def schedule(step):
            warm = min(1.0, (step + 1) / max(1, warmup_steps))
            decay = 1.0 if step < decay_from else max(0.0, (steps - step) / max(1, steps - decay_from))
            return warm * decay

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.tokens_since_fired = torch.zeros(sae.dict_size, dtype=torch.long)

    def state(self) -> dict:
        """Everything step() depends on besides the SAE's weights and the grouper (for checkpoints)."""
        return {"steps_done": self.steps_done, "tokens_since_fired": self.tokens_since_fired.clone(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state(self, state: dict) -> None:
        self.steps_done = state["steps_done"]
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def auxk_loss(self, residual: torch.Tensor, aux_values: torch.Tensor, aux_indices: torch.Tensor,
                  share: float) -> torch.Tensor:
        """This rank's share of L_auxk; both of its means are over the global batch."""
        if aux_values.shape[1] == 0:  # the dead set is the same on every rank, so all return here together
            return residual.new_zeros(())
        e_hat = SparseDecode.apply(aux_values, aux_indices, self.sae.W_dec)  # no bias
        mean = distributed.reduce_sum(residual.mean(dim=0) * share)
        denom = distributed.reduce_sum((residual - mean).pow(2).sum(dim=-1).mean() * share)
        return ((residual - e_hat).pow(2).sum(dim=-1).mean() * share / denom).nan_to_num(0.0)

    def loss(self, x: torch.Tensor, labels: torch.Tensor = None) -> tuple[torch.Tensor, dict]:
        """This rank's share of the loss, and the global batch's statistics; updates the dead-latent counters
        and (with labels) the grouper. x [n, d] is this rank's slice of the global batch [B, d]; a global mean
        is Σ over ranks of (local mean × share), share = n / B (1 with one process)."""
        share = 1 / distributed.world_size()
        dead = (self.tokens_since_fired >= self.dead_window_tokens).nonzero().flatten().to(x.device)
        values, indices, aux_values, aux_indices = self.sae.encode(x, dead, self.k_aux)  # Codes
        x_hat = self.sae.decode(values, indices)
        residual = x - x_hat
        recon = MeanSquaredNorm.apply(residual) * share
        auxk = self.auxk_loss(residual.detach(), aux_values, aux_indices, share)
        total = recon + self.auxk_alpha * auxk
        extra = {}
        if self.ortho is not None:
            lambda2, ortho = self.ortho(self.sae.W_dec, self.grouper, self.steps_done)
            # every rank computes the same term; the sum counts it once
            total = total + lambda2 * ortho * share
            extra = {"ortho": ortho.item(), "lambda2": lambda2}
        with torch.no_grad():
            fired = torch.zeros(self.sae.dict_size, dtype=torch.int32)
            fired[indices[values > 0].cpu()] = 1  # repeated indices write the same 1: no unique()
            self.tokens_since_fired += len(x) * distributed.world_size()
            self.tokens_since_fired[distributed.reduce_sum(fired) > 0] = 0
            l0 = (values > 0).sum(dim=-1).float().mean()
            # the global batch's means, in one all-reduce: named scalars, then the mean of x [d]
            scalars = {"loss": total, "recon": recon, "auxk": auxk, "x_sq": MeanSquaredNorm.apply(x) * share,
                       "l0": l0 * share}
            summed = distributed.reduce_sum(torch.cat([torch.stack(list(scalars.values())),
                                                       x.mean(dim=0) * share]))
            means, x_mean = dict(zip(scalars, summed[:len(scalars)])), summed[len(scalars):]
            # mean ‖x − x̄‖² = mean ‖x‖² − ‖x̄‖²
            fve = 1 - means["recon"] / (means["x_sq"] - x_mean @ x_mean)
            if self.grouper is not None and labels is not None:
                self.grouper.update(values, indices, labels)
        stats = {name: means[name].item() for name in ("loss", "recon", "auxk")} | {
            "explained_variance": fve.item(), "dead_latents": len(dead), "l0": means["l0"].item(), **extra}
        return total, stats

    def step(self, x: torch.Tensor, labels: torch.Tensor = None) -> dict:
        total, stats = self.loss(x, labels)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.ortho is not None:
            self.ortho.add_gradient(self.sae.W_dec)
        distributed.reduce_gradients(self.sae.parameters())
        self.sae.remove_parallel_decoder_grad()
        self.optimizer.step()
        self.scheduler.step()
        self.sae.normalize_decoder()
        self.steps_done += 1
        return stats | {"lr": self.scheduler.get_last_lr()[0]}


# -----------------------------------------------------------------------------
# Knowledge separation: orthogonality losses, feature grouping, condition numbers


class CrossGroupOrthogonalityLoss:
    """L = L_recon + λ1·L_sparse + λ2(t)·L_ortho, λ2(t) = λ2_max·min(1, t/t0).

    For TopK, sparsity is enforced by k, so L_sparse is the AuxK dead-latent term and λ1 = auxk_alpha.
    L_ortho = cross_group_penalty between the grouper's forget and retain decoder rows (unit norm, since
    W_dec rows are renormalised every step and their radial gradient removed), with the partner or hinge
    target and the grouper's membership weights. adaptive_ortho: the ramp and α; fixed_ortho: t0 = 0
    (λ2 constant) and α = 0.
    """

    def __init__(self, lambda2_max: float, t0: int, alpha: float, target: str):
        self.lambda2_max, self.t0, self.alpha, self.target = lambda2_max, t0, alpha, target

    def lambda2(self, t: int) -> float:
        return self.lambda2_max * min(1.0, t / self.t0) if self.t0 > 0 else self.lambda2_max

    def __call__(self, W_dec: torch.Tensor, grouper: "FeatureGrouper", t: int) -> tuple[float, torch.Tensor]:
        """(λ2(t), L_ortho). L_ortho is taken on a detached copy of the group rows; add_gradient puts its
        gradient into W_dec.grad after backward. (Through autograd, the gather's backward would zero-fill
        a fresh [F, d] gradient and add it to W_dec's every step.)"""
        self.index = torch.cat([grouper.forget_idx, grouper.retain_idx]).to(W_dec.device)
        self.rows = W_dec.detach().index_select(0, self.index).requires_grad_()
        n_forget = len(grouper.forget_idx)
        w_F, w_R = grouper.member_weights(t)
        return self.lambda2(t), cross_group_penalty(self.rows[:n_forget], self.rows[n_forget:],
                                                    grouper.partner_targets(t), self.alpha, self.target,
                                                    w_F, w_R)

    def add_gradient(self, W_dec: nn.Parameter) -> None:
        """W_dec.grad[index] += ∂(λ2·L_ortho)/∂rows, once backward has run (no gradient when a group is
        empty)."""
        if self.rows.grad is not None:
            W_dec.grad.index_add_(0, self.index, self.rows.grad)


def cross_group_penalty(W_F: torch.Tensor, W_R: torch.Tensor, partner: torch.Tensor, alpha: float,
                        target: str, w_F: torch.Tensor = None, w_R: torch.Tensor = None) -> torch.Tensor:
    """Mean squared deviation of the cross-group cosines from their target, W_F [n_F, d], W_R [n_R, d]
    unit rows.

    C = W_F W_Rᵀ [n_F, n_R] (cosines). The first m = len(partner) rows of W_F and of W_R are matched
    partners (forget i <-> retain i), so the partner matrix P is diagonal: P_ii = partner_i (i < m),
    0 elsewhere; partner_i = the pair's sign at matching × its ramp (FeatureGrouper.partner_targets).
      partner: E = C − α·P      each partner pair is pulled to cos = α·sign (the sign it had at
                                matching, so a pair never has to cross 0), every other pair to 0
      hinge:   E = relu(|C| − α)  only |cos| above α is penalised, no partner needed
    L = Σ_ij w_F,i·w_R,j·E_ij² / (n_F·n_R), w ∈ [0, 1] the rows' membership weights (default 1; a row
    that has just joined its group ramps in, see FeatureGrouper.member_weights). Dividing by n_F·n_R (the
    number of pairs) makes L a per-pair mean, so λ2 means the same at any group sizes; an empty group
    gives exactly 0 (no pairs).
    """
    if len(W_F) == 0 or len(W_R) == 0:
        return W_F.new_zeros(())
    C = W_F @ W_R.T
    if target == "hinge":
        E = (C.abs() - alpha).relu()
    else:
        m = torch.arange(len(partner), device=C.device)
        E = C.index_put((m, m), -alpha * partner.to(C), accumulate=True)
    E2 = E.pow(2)
    if w_F is not None:
        E2 = E2 * w_F.to(E2)[:, None] * w_R.to(E2)[None, :]
    return E2.sum() / (len(W_F) * len(W_R))


class AllPairsOrthogonalityLoss:
    """allpairs_ortho (OrtSAE, arXiv 2509.22033): L = (1/F) Σ_i max_{j≠i} cos²(W_i, W_j),
    W = W_dec [F, d].

    Every feature is pushed away from its nearest other feature, which can be met when F > d (unlike
    ‖WWᵀ − I‖², whose minimum is the Welch bound); no groups. The neighbour j(i) is found each step
    without gradient (nearest_neighbours, exact rather than OrtSAE's random chunks), and the gradient
    flows through cos(W_i, W_j(i)). λ2 constant from step 0 (allpairs_lambda2)."""

    def __init__(self, lambda2: float):
        self.lambda2_max = lambda2

    def lambda2(self, t: int) -> float:
        return self.lambda2_max

    def __call__(self, W_dec: torch.Tensor, grouper: "FeatureGrouper", t: int) -> tuple[float, torch.Tensor]:
        every = torch.arange(len(W_dec), device=W_dec.device)
        _, j = nearest_neighbours(W_dec, every, every)
        cos = (W_dec * W_dec[j]).sum(dim=1)  # unit rows
        return self.lambda2_max, cos.pow(2).mean()

    def add_gradient(self, W_dec: nn.Parameter) -> None:
        """Nothing to add: the penalty reads W_dec itself, so backward has already put its gradient in
        W_dec.grad."""


def nearest_neighbours(W: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                       chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row i in `rows` of W [F, d]: (max_{j ∈ cols, j ≠ i} |cos(W_i, W_j)|, that j), [len(rows)]
    each; (nan, −1) where no such j exists. `chunk` rows at a time, so memory is O(chunk · len(cols)) and
    no F×F matrix is formed. No gradient."""
    with torch.no_grad():
        unit = F.normalize(W.detach().float(), dim=1)
        targets = unit[cols].T
        values = torch.full((len(rows),), float("nan"), device=W.device)
        index = torch.full((len(rows),), -1, dtype=torch.long, device=W.device)
        if len(cols) == 0:
            return values, index
        for start in range(0, len(rows), chunk):
            r = rows[start:start + chunk]
            sims = (unit[r] @ targets).abs_()
            sims.masked_fill_(r[:, None] == cols[None, :], -1.0)  # a row is not its own neighbour
            best, at = sims.max(dim=1)
            found = best >= 0
            values[start:start + len(r)] = best.where(found, torch.tensor(float("nan"), device=W.device))
            index[start:start + len(r)] = cols[at].where(found, torch.tensor(-1, device=W.device))
        return values, index


def specific_latents(p_forget, p_retain, threshold: float, min_freq: float,
                     max_group_size: int = 0) -> tuple:
    """(forget, retain) latent indices by the grouping rule on firing rates p_forget, p_retain [F]:
    s = (p_f − p_r)/(p_f + p_r); forget = {s > threshold}, retain = {s < −threshold}, both among latents
    with (p_f + p_r)/2 >= min_freq, each cut to its max_group_size latents of largest |s| (0: no cap),
    in index order."""
    p_f, p_r = torch.as_tensor(p_forget, dtype=torch.float64), torch.as_tensor(p_retain, dtype=torch.float64)
    s = ((p_f - p_r) / (p_f + p_r).clamp_min(1e-12)).float()
    alive = (p_f + p_r) / 2 >= max(min_freq, 1e-12)

    def most_specific(candidates, score):
        idx = candidates.nonzero().flatten()
        if 0 < max_group_size < len(idx):
            idx = idx[score[idx].argsort(descending=True, stable=True)[:max_group_size]].sort().values
        return idx
    return most_specific(alive & (s > threshold), s), most_specific(alive & (s < -threshold), -s)


class FeatureGrouper:
    """Assigns latents to forget / retain / shared from how often they fire on each domain's tokens.

    Every step: p_g ← β·p_g + (1 − β)·(firings on domain-g tokens / number of domain-g tokens), one
    bincount over the batch's TopK indices per domain (O(B·k), no dense [B, F] work), β = 1 − 1/every
    (the EMA horizon is the regroup period), bias-corrected by 1 − β^t as Adam does.
    Every `every` steps (`assign`): s = (p_f − p_r)/(p_f + p_r) ∈ [−1, 1]; forget = {s > threshold},
    retain = {s < −threshold}, both among latents with (p_f + p_r)/2 >= min_freq and each cut to its
    max_group_size most specific latents (largest |s|; 0: no cap); the rest is shared. Partner pairs
    whose two latents are still in their groups are kept (with their sign); the other forget latents are
    paired greedily (on |cos| of decoder rows) with the free retain latents. Both index lists put
    partners first in the same order (the partner matrix is diagonal).
    Defaults measured on the default run's cached activations with a trained topk SAE (100k tokens):
    median firing rate 4.7e-3 (k/F = 6.9e-3), 2% of latents below 1e-3; s quartiles −0.39 / −0.04 / 0.32;
    threshold 0.5 gives ~680 forget and ~800 retain latents of 4608 before the cap.
    """

    def __init__(self, dict_size: int, every: int, threshold: float, min_freq: float,
                 max_group_size: int = 0):
        self.dict_size, self.every, self.threshold, self.min_freq = dict_size, every, threshold, min_freq
        self.max_group_size = max_group_size
        self.beta = 1 - 1 / every
        self.ema = torch.zeros(2, dict_size, dtype=torch.float64)  # row = domain label (RETAIN 0, FORGET 1)
        self.updates = torch.zeros(2)
        self.forget_idx = self.retain_idx = torch.zeros(0, dtype=torch.long)
        self.partner_sign = torch.zeros(0)
        self.paired_at = torch.zeros(0, dtype=torch.long)  # step at which each partner pair was formed
        # step at which a latent joined its current group
        self.joined = torch.zeros(dict_size, dtype=torch.long)
        self.regroups = 0

    @torch.no_grad()
    def update(self, values: torch.Tensor, indices: torch.Tensor, labels: torch.Tensor) -> None:
        """values, indices [n, k] from the TopK encode; labels [n] domain of each token. The counts are summed
        over ranks, so every rank's grouper sees the global batch."""
        fired = (values > 0).cpu()
        indices, labels = indices.cpu(), labels.cpu()
        domains = (activations.RETAIN, activations.FORGET)  # = the ema rows
        counts = torch.stack([torch.cat([torch.bincount(indices[rows][fired[rows]], minlength=self.dict_size),
                                         rows.sum()[None]])
                              for rows in (labels == g for g in domains)])
        counts = distributed.reduce_sum(counts)  # [2, F + 1]: firings per latent, then the domain's tokens
        for g in domains:
            n_tokens = int(counts[g, -1])
            if n_tokens:  # a batch without this domain says nothing about it
                self.ema[g].mul_(self.beta).add_(counts[g, :-1] / n_tokens, alpha=1 - self.beta)
                self.updates[g] += 1

    def frequencies(self) -> torch.Tensor:
        """[2, F] bias-corrected firing rates per domain (row g = label g)."""
        return self.ema / (1 - self.beta ** self.updates).clamp_min(1e-12)[:, None]

    @torch.no_grad()
    def assign(self, W_dec: torch.Tensor, t: int = 0) -> None:
        p = self.frequencies()
        forget, retain = specific_latents(p[activations.FORGET], p[activations.RETAIN], self.threshold,
                                          self.min_freq, self.max_group_size)
        before, m = self.assignment(), len(self.partner_sign)
        old_f, old_r = self.forget_idx[:m].cpu(), self.retain_idx[:m].cpu()
        valid = torch.isin(old_f, forget) & torch.isin(old_r, retain)
        kept_f, kept_r, kept_sign = old_f[valid], old_r[valid], self.partner_sign.cpu()[valid]
        kept_paired_at = self.paired_at.cpu()[valid]
        free_f, free_r = forget[~torch.isin(forget, kept_f)], retain[~torch.isin(retain, kept_r)]
        W = W_dec.detach().float().cpu()
        C = W[free_f] @ W[free_r].T
        rows, cols = match_partners(C)
        rest = lambda idx, taken: idx[~torch.isin(torch.arange(len(idx)), taken)]
        self.forget_idx = torch.cat([kept_f, free_f[rows], rest(free_f, rows)]).to(W_dec.device)
        self.retain_idx = torch.cat([kept_r, free_r[cols], rest(free_r, cols)]).to(W_dec.device)
        new_sign = C[rows, cols].sign()
        new_sign[new_sign == 0] = 1.0  # a pair at cos exactly 0 is pulled to +α
        self.partner_sign = torch.cat([kept_sign, new_sign]).to(W_dec.device)
        # the first grouping takes effect at once; later joiners and later pairs ramp in
        # (member_weights, partner_targets)
        now = t if self.regroups else t - self.every
        self.paired_at = torch.cat([kept_paired_at, torch.full((len(new_sign),), now)])
        self.joined[self.assignment() != before] = now
        self.regroups += 1

    def member_weights(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_F [n_F], w_R [n_R]), w = clamp((t − joined)/every, 0, 1): a latent that joined its group at
        the last regroup enters the penalty over one regroup period, so a regroup does not make the
        penalty jump."""
        w = ((t - self.joined).float() / self.every).clamp(0, 1)
        return (w[self.forget_idx.cpu()].to(self.forget_idx.device),
                w[self.retain_idx.cpu()].to(self.retain_idx.device))

    def partner_targets(self, t: int) -> torch.Tensor:
        """[m] partner_sign · clamp((t − paired_at)/every, 0, 1): a pair matched at the last regroup
        moves its target from 0 (which it had as two unpaired members) to α·sign over one period, so a
        re-match between members already in their groups does not make the penalty jump either."""
        ramp = ((t - self.paired_at).float() / self.every).clamp(0, 1)
        return self.partner_sign * ramp.to(self.partner_sign.device)

    def assignment(self) -> torch.Tensor:
        """[F] long: activations.FORGET / RETAIN for grouped latents, SHARED otherwise."""
        groups = torch.full((self.dict_size,), SHARED, dtype=torch.long)
        groups[self.forget_idx.cpu()], groups[self.retain_idx.cpu()] = activations.FORGET, activations.RETAIN
        return groups

    def state(self) -> dict:
        return {"forget_idx": self.forget_idx.clone(), "retain_idx": self.retain_idx.clone(),
                "partner_sign": self.partner_sign.clone()}

    def load_state(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def full_state(self) -> dict:
        """state() plus the firing-rate EMAs and membership ages (for checkpoints; load_state takes
        either)."""
        return self.state() | {"ema": self.ema.clone(), "updates": self.updates.clone(),
                               "joined": self.joined.clone(), "paired_at": self.paired_at.clone(),
                               "regroups": self.regroups}


def match_partners(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy matching on |C| [n_F, n_R]: repeatedly take the largest |cos| whose row and column are both
    free. Returns (rows, cols) [min(n_F, n_R)], pairs in the order they were taken."""
    m = min(C.shape)
    rows, cols, used_r, used_c = [], [], set(), set()
    n_R = C.shape[1]
    for flat in C.abs().flatten().argsort(descending=True).tolist():
        r, c = divmod(flat, n_R)
        if r not in used_r and c not in used_c:
            used_r.add(r), used_c.add(c), rows.append(r), cols.append(c)
            if len(rows) == m:
                break
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


class KappaEarlyStopping:
    """Stop when the forget or retain group's κ exceeds kappa_max at `patience` consecutive regroup
    checks."""

    def __init__(self, kappa_max: float, patience: int):
        self.kappa_max, self.patience, self.strikes, self.reason = kappa_max, patience, 0, None

    def check(self, metrics: dict, step: int) -> bool:
        # nan (empty) is not bad
        bad = [g for g in ("forget", "retain") if metrics[f"kappa_{g}"] > self.kappa_max]
        self.strikes = self.strikes + 1 if bad else 0
        if self.strikes >= self.patience:
            self.reason = (f"step {step}: κ of the {' and '.join(bad)} group above "
                           f"kappa_max={self.kappa_max} for {self.patience} consecutive checks")
            return True
        return False


def separation_metrics(W_dec: torch.Tensor, grouper: FeatureGrouper) -> dict:
    """Group sizes, κ per group and of the union, principal angles (degrees) between span(W_F) and
    span(W_R), cross-group |cos| mean and max, the partners' mean |cos|. nan (None in JSON) where a group
    is empty."""
    W = W_dec.detach().cpu()
    W_F, W_R = W[grouper.forget_idx.cpu()], W[grouper.retain_idx.cpu()]
    cross = (W_F @ W_R.T).abs() if len(W_F) and len(W_R) else torch.full((1,), float("nan"))
    m = len(grouper.partner_sign)
    partners = (W_F[:m] * W_R[:m]).sum(dim=1).abs().mean().item() if m else float("nan")
    angles = principal_angles(W_F, W_R).rad2deg()
    nan = float("nan")
    return {"n_forget": len(W_F), "n_retain": len(W_R), "n_shared": len(W) - len(W_F) - len(W_R),
            "kappa_forget": condition_number(W_F), "kappa_retain": condition_number(W_R),
            "kappa_union": condition_number(torch.cat([W_F, W_R])),
            "principal_angles_deg": {"n": len(angles), "n_zero": int((angles < 1e-3).sum()),
                                     "min": angles.min().item() if len(angles) else nan,
                                     "median": angles.median().item() if len(angles) else nan,
                                     "max": angles.max().item() if len(angles) else nan},
            "cross_abs_cos_mean": cross.mean().item(), "cross_abs_cos_max": cross.max().item(),
            "partner_abs_cos_mean": partners}


def condition_number(W: torch.Tensor) -> float:
    """κ = σ_max/σ_min over the min(n, d) singular values of W [n, d] (float64); nan for an empty group."""
    if len(W) == 0:
        return float("nan")
    s = torch.linalg.svdvals(W.detach().double().cpu())
    return (s[0] / s[-1]).item()


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, descending, as scipy.linalg.subspace_angles) between the row spans of
    A [n_a, d] and B [n_b, d]: cosines are the singular values of Q_Aᵀ Q_B, Q orthonormal bases
    (rank-revealing SVD, scipy's orth tolerance). When rank A + rank B > d the spans must share
    dimensions, so some angles are exactly 0."""
    def basis(M):
        U, s, _ = torch.linalg.svd(M.detach().double().cpu().T, full_matrices=False)
        return U[:, s > s.max() * max(M.shape) * torch.finfo(torch.float64).eps] if len(s) else U
    if len(A) == 0 or len(B) == 0:
        return torch.zeros(0, dtype=torch.float64)
    cos = torch.linalg.svdvals(basis(A).T @ basis(B)).clamp(-1, 1)
    return cos.flip(0).arccos()


def feature_geometry(W_dec: torch.Tensor, groups: torch.Tensor) -> dict:
    """Each decoder row's max |cos| to any other row, summarised over all rows ("all") and, for each
    group g of `groups` [F] (activations.FORGET / RETAIN, SHARED), over g's rows: to the other rows of g
    ("within") and to the rows outside g ("across"). The groups partition the rows, so a row's overall
    value is the larger of its two: F² products in all."""
    groups = groups.to(W_dec.device)
    nearest = torch.full((len(W_dec),), float("nan"))
    out = {}
    for name, g in (("forget", activations.FORGET), ("retain", activations.RETAIN), ("shared", SHARED)):
        inside, outside = (groups == g).nonzero().flatten(), (groups != g).nonzero().flatten()
        within, across = (nearest_neighbours(W_dec, inside, others)[0].cpu() for others in (inside, outside))
        nearest[inside.cpu()] = torch.fmax(within, across)  # fmax: nan (no candidate) loses
        out[name] = {"within": cos_summary(within), "across": cos_summary(across)}
    return {"all": cos_summary(nearest)} | out


def cos_summary(values: torch.Tensor) -> dict:
    """Mean, median and the shares above 0.5 and 0.7 of nearest-neighbour |cos| values
    (nan ones left out)."""
    v = values[~values.isnan()]
    if len(v) == 0:
        return {"n": 0, "mean": None, "median": None, "share_above_0.5": None, "share_above_0.7": None}
    return {"n": len(v), "mean": v.mean().item(), "median": v.quantile(0.5).item(),
            "share_above_0.5": (v > 0.5).float().mean().item(),
            "share_above_0.7": (v > 0.7).float().mean().item()}


# -----------------------------------------------------------------------------
# The sparse autoencoder


class AutoEncoderTopK(nn.Module):
    """TopK SAE on inputs scaled to unit mean squared norm.

    encode: f = TopK_k(ReLU((x − b_dec) W_enc + b_enc))   x [B, d], W_enc [d, F], f [B, F] with k non-zeros
    decode: x̂ = f W_dec + b_dec [+ Σ_g w_g(f) b_g]          W_dec [F, d], rows unit norm
    The active latents are kept as (values [B, k], indices [B, k]); encoding is TopKEncode, decoding
    SparseDecode, so a training step costs one dense [B, d] x [d, F] product plus O(B·k·d) for everything
    else, and no [B, F] tensor is formed except the (chunked) pre-activations.

    With `group_biases` (adaptive_ortho) each domain group g ∈ {retain, forget} has its own decoder bias
    b_g (`group_bias[g]`, g the activations.RETAIN / FORGET label), weighted by the token's share of
    activation mass in that group, w_g(f) (`group_weights`). `feature_group` [F] holds each latent's
    group (−1 shared); the decoder weights stay shared. Saved, it is a GroupBiasTopKSAE.
    """

    def __init__(self, d_in: int, dict_size: int, k: int, group_biases: bool = False,
                 encoder_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.d_in, self.dict_size, self.k, self.encoder_dtype = d_in, dict_size, k, encoder_dtype
        W_dec = torch.randn(dict_size, d_in)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        # tied initialisation, as dictionary_learning and OpenAI. Stored as W_encᵀ [F, d], one row per
        # latent: the backward forms the encoder gradient in that layout, and fused Adam takes it without
        # a transposing copy
        self.W_enc_T = nn.Parameter(W_dec.clone())
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.group_bias = nn.Parameter(torch.zeros(2, d_in)) if group_biases else None
        if group_biases:
            self.register_buffer("feature_group", torch.full((dict_size,), SHARED, dtype=torch.long))

    @property
    def W_enc(self) -> torch.Tensor:
        """[d, F], a view of W_enc_T."""
        return self.W_enc_T.T

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # SAE-Lens files hold W_enc [d, F]
        if prefix + "W_enc" in state_dict:
            state_dict[prefix + "W_enc_T"] = state_dict.pop(prefix + "W_enc").T
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def encode(self, x: torch.Tensor, aux_latents: torch.Tensor = None, k_aux: int = 0) -> "Codes":
        """Codes: values, indices [B, k] of the k largest ReLU pre-activations; aux_values, aux_indices
        [B, k_aux] of the largest among `aux_latents` (for AuxK; [B, 0] without them)."""
        return Codes(*TopKEncode.apply(x, self.W_enc, self.b_enc, self.b_dec, self.k, aux_latents, k_aux,
                                       self.encoder_dtype))

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Σ_j values[:, j] · W_dec[indices[:, j]] + b_dec (+ group_weights @ group_bias): [B, d]."""
        x_hat = SparseDecode.apply(values, indices, self.W_dec)
        x_hat += self.b_dec  # in place: the decode's output is fresh and its backward does not need it
        if self.group_bias is not None:
            x_hat.addmm_(group_weights(values, self.feature_group[indices]), self.group_bias)
        return x_hat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.encode(x)
        return self.decode(codes.values, codes.indices)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def set_groups(self, assignment: torch.Tensor) -> None:
        """feature_group = assignment [F] (FeatureGrouper.assignment): which group bias each latent
        feeds; nothing without group biases."""
        if self.group_bias is not None:
            self.feature_group.copy_(assignment.to(self.feature_group.device))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out each row's gradient component along the row, so the unit-norm constraint holds to
        first order."""
        if self.W_dec.grad is not None:
            for start in range(0, self.dict_size, 1024):  # in row blocks, so vecdot's product stays in cache
                grad, W = self.W_dec.grad[start:start + 1024], self.W_dec[start:start + 1024]
                grad.addcmul_(torch.linalg.vecdot(grad, W)[:, None], W, value=-1)

    def save(self, path: Path, scale: float, metadata: dict, passthrough_norm: float = None) -> None:
        """Save as a SAE-Lens SAE in the model's own units: SinkSafeTopKSAE, or GroupBiasTopKSAE with group
        biases (sae_lens.SAE.load_from_disk reads either once this module is imported), which leave the
        positions with ‖x‖ > passthrough_norm (model units; None: none) as they are.

        Training saw x / scale. Multiplying b_enc and b_dec by scale gives f' = scale·f and
        x̂' = scale·x̂ on raw x, with the same latents firing and W_dec still unit-norm, so feature values
        are in activation units. Group biases are biases of x̂ too, so they are scaled the same way (the
        weights w_g are ratios of activation mass, unchanged by the scale).
        """
        from sae_lens.saes.sae import SAEMetadata
        groups = self.group_bias is not None
        config_class = GroupBiasTopKSAEConfig if groups else SinkSafeTopKSAEConfig
        sae_class = GroupBiasTopKSAE if groups else SinkSafeTopKSAE
        sae = sae_class(config_class(d_in=self.d_in, d_sae=self.dict_size, k=self.k, dtype="float32",
                                     device="cpu", apply_b_dec_to_input=True,
                                     normalize_activations="none", metadata=SAEMetadata(**metadata),
                                     passthrough_norm=passthrough_norm))
        weights = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_enc": self.b_enc * scale,
                   "b_dec": self.b_dec * scale}
        if groups:
            weights |= {"group_bias": self.group_bias * scale, "feature_group": self.feature_group}
        sae.load_state_dict({name: w.detach().cpu() for name, w in weights.items()})
        sae.save_model(str(path))


class Codes(NamedTuple):
    values: torch.Tensor       # [B, k] the TopK latents' activations
    indices: torch.Tensor      # [B, k] their latent indices
    aux_values: torch.Tensor   # [B, k_aux] AuxK's dead latents
    aux_indices: torch.Tensor


# torch marks its sparse CSR tensors "beta"; the two products used here (sparse.mm, sparse.sampled_addmm)
# are checked against dense references in tests/test_sae.py
def sparse_csr(*args, **kwargs) -> torch.Tensor:
    """torch.sparse_csr_tensor, without its "support is in beta" warning (here, not process-wide)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta",
                                category=UserWarning)
        return torch.sparse_csr_tensor(*args, **kwargs)


def topk_rows(pre: torch.Tensor, k: int,
              blocks: tuple[int, ...] = (8, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [B, k] of the k largest entries in each row of pre [B, F]: the same selection as
    pre.topk(k, sorted=False) (up to the order within a row and the choice among tied values), in stages.

    torch's CPU topk has a per-row cost comparable to the encoder GEMM's at the default shape (BENCHMARKS.md).
    Each stage cuts a row into m = F/block strided blocks {c, c+m, …, c+(block−1)m} and takes every
    block's max: one vectorised pass over [B, block, m]. Each of a row's k largest entries lies in one of
    the k blocks with the largest maxima (an entry in any other block is ≤ its block's max ≤ the k-th
    largest block max, which k entries in other blocks reach). Those k blocks are found the same way, one
    level down (the block maxima [B, m] are a row of their own, cut into blocks[1]), and the answer is
    the topk over their k·block entries.
    At the default shape: [B, 4608] → maxima [B, 576] → [B, 144], then topk over 144, 128 and 256 entries
    instead of 4608.
    A level that saves nothing (F not a multiple of its block, or k·block > F/4) is a plain topk.
    """
    B, F = pre.shape
    if not blocks or F % blocks[0] or 4 * k * blocks[0] > F:
        return pre.topk(k, dim=1, sorted=False)
    block, m = blocks[0], F // blocks[0]
    top_blocks = topk_rows(pre.view(B, block, m).amax(dim=1), k, blocks[1:])[1]                     # [B, k]
    candidates = (top_blocks[:, :, None] + torch.arange(0, F, m, device=pre.device)).view(B, k * block)
    values, j = pre.gather(1, candidates).topk(k, dim=1, sorted=False)
    return values, candidates.gather(1, j)


def scatter_rows(indices: torch.Tensor, weights: torch.Tensor, dense: torch.Tensor,
                 n_rows: int) -> torch.Tensor:
    """Sᵀ · dense: out [n_rows, d], out[f] = Σ_{(b, j): indices[b, j] = f} weights[b, j] · dense[b], for
    S [B, n_rows] the sparse matrix with weights[b, j] at (b, indices[b, j]) (indices, weights [B, n],
    dense [B, d]).

    The weight gradients of a TopK SAE are all of this form. S is laid out latent-major as a CSR matrix:
    a stable argsort of the B·n latent ids (no COO coalescing) and a bincount for the row pointers,
    O(B·n); then one sparse × dense product, O(B·n·d). Nothing of size B × n_rows is formed.
    """
    B, n = indices.shape
    flat = indices.flatten()
    order = flat.to(torch.int32).argsort(stable=True)  # int32 keys sort faster than int64
    crow = torch.zeros(n_rows + 1, dtype=torch.int32, device=indices.device)
    torch.cumsum(torch.bincount(flat, minlength=n_rows), 0, out=crow[1:])
    rows_of_entries = torch.div(order, n, rounding_mode="floor").to(torch.int32)
    S_t = sparse_csr(crow, rows_of_entries, weights.flatten()[order], (n_rows, B),
                                  check_invariants=False)
    return torch.sparse.mm(S_t, dense)


class TopKEncode(torch.autograd.Function):
    """(values, indices) = TopK_k(ReLU((x − b_dec) W_enc + b_enc)), plus the top k_aux pre-activations among
    `aux_latents` (the dead latents AuxK trains), from the same dense pre-activations.

    Forward: the dense product [B, d] x [d, F], O(B·d·F), the only dense step. Rows go in chunks of
    ≤ 2^21 pre-activations (8 MB; 455 rows at F = 4608): the allocator reuses each chunk's block,
    where a whole B×F block (75 MB at B = 4096) would be freshly mapped and page-faulted every step,
    and the selection reads it while it is still in cache (together ~0.85x the time of one unchunked
    product + selection). Selection: topk_rows. ReLU is applied to the k selected values only (ReLU
    and TopK commute; where fewer than k entries are positive, the extra selected values are 0
    either way).
    Backward: the gradient w.r.t. the pre-activations is zero outside the B·(k + k_aux) selected entries,
    so every weight gradient is a sparse product (scatter_rows), O(B·(k+k_aux)·d):
      ∂W_enc[:, f] = Σ_b (x_b − b_dec) g_bf,   ∂b_enc[f] = Σ_b g_bf,   ∂b_dec = −W_enc ∂b_enc.
    The dense [B, F] gradient is never formed.
    With gemm_dtype bfloat16 the product and the selection run on bf16 copies of (x − b_dec), W_enc and
    b_enc (the selected values come back as float32); everything after them is float32.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k: int, aux_latents, k_aux: int,
                gemm_dtype: torch.dtype = torch.float32):
        centered = x - b_dec
        with_aux = aux_latents is not None and len(aux_latents) > 0 and k_aux > 0
        values, indices, aux_values, aux_indices = [], [], [], []
        chunk = max(1, 2**21 // W_enc.shape[1])
        low = [t.to(gemm_dtype) for t in (b_enc, centered, W_enc)]  # no copies at float32
        for start in range(0, len(x), chunk):
            pre = torch.addmm(low[0], low[1][start:start + chunk], low[2])
            v, i = topk_rows(pre, k)
            values.append(v), indices.append(i)
            if with_aux:
                v, j = pre[:, aux_latents].topk(min(k_aux, len(aux_latents)), dim=-1, sorted=False)
                aux_values.append(v), aux_indices.append(aux_latents[j])
        values, indices = torch.cat(values).float().relu_(), torch.cat(indices)
        if with_aux:
            aux_values, aux_indices = torch.cat(aux_values).float().relu_(), torch.cat(aux_indices)
        else:
            aux_values, aux_indices = values.new_zeros(len(x), 0), indices.new_zeros(len(x), 0)
        ctx.save_for_backward(centered, W_enc, torch.cat([values, aux_values], 1),
                              torch.cat([indices, aux_indices], 1))
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _, grad_aux_values, __):
        centered, W_enc, values, indices = ctx.saved_tensors
        # ReLU: no gradient where it clipped
        grad = torch.cat([grad_values, grad_aux_values], 1) * (values > 0)
        grad_W_enc = scatter_rows(indices, grad, centered, W_enc.shape[1]).T
        grad_b_enc = (torch.zeros(W_enc.shape[1], dtype=grad.dtype, device=grad.device)
                      .index_add_(0, indices.flatten(), grad.flatten()))
        return None, grad_W_enc, grad_b_enc, -(W_enc @ grad_b_enc), None, None, None, None


class SparseDecode(torch.autograd.Function):
    """Σ_j values[:, j] · W[indices[:, j]] = S W, for S [B, F] sparse with k entries per row,
    W [F, d]: [B, d].

    Forward: an embedding_bag over W's rows, O(B·k·d). Backward, both O(B·k·d), no [B, F] tensor:
      ∂values[b, j] = g_b · W[indices[b, j]]   a sampled product g Wᵀ at S's entries
                                               (sparse.sampled_addmm);
      ∂W = Sᵀ g                                scatter_rows.
    """

    @staticmethod
    def forward(ctx, values, indices, W):
        ctx.save_for_backward(values, indices, W)
        return F.embedding_bag(indices, W, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        values, indices, W = ctx.saved_tensors
        B, k = indices.shape
        pattern = sparse_csr(torch.arange(0, B * k + 1, k, device=indices.device),
                                          indices.flatten(), values.new_zeros(B * k), (B, len(W)),
                                          check_invariants=False)
        grad_values = torch.sparse.sampled_addmm(pattern, grad, W.T, beta=0.0).values().view(B, k)
        return grad_values, None, scatter_rows(indices, values, grad, len(W))


class MeanSquaredNorm(torch.autograd.Function):
    """mean_b ‖r_b‖² for r [B, d], as one dot product (no r² temporary); backward:
    ∂/∂r = (2/B)·g·r, one pass (autograd's pow/sum/mean chain makes three)."""

    @staticmethod
    def forward(ctx, r):
        ctx.save_for_backward(r)
        flat = r.reshape(-1)
        return torch.dot(flat, flat) / len(r)

    @staticmethod
    def backward(ctx, grad):
        r, = ctx.saved_tensors
        return r * (2 * grad / len(r))


SHARED = -1  # feature_group of a latent in neither domain group


def group_weights(codes: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """w [..., 2]: each token's share of activation mass in the retain (column RETAIN) and
    forget (FORGET) group,

        w_g = Σ_j relu(c_j)·[groups_j = g] / Σ_j relu(c_j)      (0 for a token with no positive code),

    codes [..., n] with groups [..., n] (training's sparse path: TopK values and their latents' groups)
    or [n] (the dense path: n = F, groups = feature_group). Only positive codes carry mass, so
    0 ≤ w_g ≤ 1 and w_RETAIN + w_FORGET ≤ 1 for any codes, negative ones included: an intervention
    that clamps features to −m moves the group-bias term by at most ‖b_RETAIN‖ + ‖b_FORGET‖.
    TopK codes are ≥ 0, where this is the plain share Σ_{j∈g} f_j / Σ_j f_j.
    """
    mass = codes.clamp_min(0)
    per_group = torch.stack([(mass * (groups == g)).sum(dim=-1)
                             for g in (activations.RETAIN, activations.FORGET)], dim=-1)
    return per_group / mass.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)


SINK_SAFE_ARCHITECTURE = "topk_sink_safe"
GROUP_BIAS_ARCHITECTURE = "topk_group_biases"


@dataclass
class SinkSafeTopKSAEConfig(TopKSAEConfig):
    # ‖x‖ (model units) above which a position passes the SAE unchanged: training's outlier threshold,
    # max_norm_multiple x the median training-token norm; None passes nothing through
    passthrough_norm: float | None = None

    @classmethod
    def architecture(cls) -> str:
        return SINK_SAFE_ARCHITECTURE


class SinkSafeTopKSAE(TopKSAE):
    """SAE-Lens's TopK SAE that leaves attention sinks alone: decode(encode(x))_t = x_t wherever
    ‖x_t‖ > cfg.passthrough_norm. Training drops those positions (norms ~100x the median, e.g. BOS), so the
    SAE reconstructs them badly, and every later token attends to the damage when the SAE is spliced in
    at every position (HookedSAETransformer.run_with_saes).

    SAE-Lens's splice calls encode(x), then decode(f) (twice with use_error_term), so encode remembers x
    and its sink positions, and decode passes them through for codes of that shape: as SAE-Lens's own
    layer-norm scaling carries ln_mu/ln_std from encode to decode.
    """
    _sinks = None  # (x [..., d], sink [...]) of the last encode

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        limit = self.cfg.passthrough_norm
        self._sinks = None if limit is None else (x, torch.linalg.vector_norm(x, dim=-1) > limit)
        return super().encode(x)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return self.pass_sinks(super().decode(feature_acts))

    def pass_sinks(self, x_hat: torch.Tensor) -> torch.Tensor:
        """x_hat with the last encode's input at its sink positions."""
        if self._sinks is None or self._sinks[1].shape != x_hat.shape[:-1]:
            return x_hat
        x, sink = self._sinks
        return torch.where(sink[..., None], x.to(x_hat.dtype), x_hat)


register_sae_class(SINK_SAFE_ARCHITECTURE, SinkSafeTopKSAE, SinkSafeTopKSAEConfig)


@dataclass
class GroupBiasTopKSAEConfig(SinkSafeTopKSAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return GROUP_BIAS_ARCHITECTURE


class GroupBiasTopKSAE(SinkSafeTopKSAE):
    """A saved adaptive_ortho SAE for SAE-Lens and SAE-Bench: SAE-Lens's TopK SAE on dense codes
    f [..., F] whose decoder adds the group biases,
    x̂ = f W_dec + b_dec + group_weights(f, feature_group) @ group_bias (AutoEncoderTopK's decode, in
    model units), sinks passed through as SinkSafeTopKSAE. sae_weights.safetensors holds group_bias [2, d]
    and feature_group [F] beside the TopK weights; cfg.json's architecture is "topk_group_biases".
    """

    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.group_bias = nn.Parameter(torch.zeros(2, self.cfg.d_in, dtype=self.dtype, device=self.device))
        self.register_buffer("feature_group", torch.full((self.cfg.d_sae,), SHARED, device=self.device))

    def process_state_dict_for_loading(self, state_dict: dict) -> None:
        # SAE-Lens's disk loader casts every tensor to the config's float dtype; group ids are small integers
        state_dict["feature_group"] = state_dict["feature_group"].round().long()

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        x_hat = feature_acts @ self.W_dec + self.b_dec
        x_hat = x_hat + group_weights(feature_acts, self.feature_group).to(x_hat.dtype) @ self.group_bias
        return self.pass_sinks(self.reshape_fn_out(
            self.run_time_activation_norm_fn_out(self.hook_sae_recons(x_hat)), self.d_head))

    def without_group_biases(self) -> SinkSafeTopKSAE:
        """The same encoder and decoder as a plain SinkSafeTopKSAE (its decode leaves the group-bias term
        out)."""
        cfg = SinkSafeTopKSAEConfig.from_dict(self.cfg.to_dict() | {"architecture": SINK_SAFE_ARCHITECTURE})
        plain = SinkSafeTopKSAE(cfg)
        plain.load_state_dict({name: getattr(self, name) for name in ("W_enc", "W_dec", "b_enc", "b_dec")})
        return plain.to(device=self.device, dtype=self.dtype)


register_sae_class(GROUP_BIAS_ARCHITECTURE, GroupBiasTopKSAE, GroupBiasTopKSAEConfig)


GROUP_BIAS_EDITS = ("held", "relu")


def intervention_sae(sae: TopKSAE, group_bias_edit: str) -> TopKSAE:
    """The SAE whose decode defines an intervention's edit, resid' = resid − decode(f) + decode(f')
    (SAE-Bench's clamp), f' the edited codes. Encoding, and so feature selection, is the same either way.
      held: the group-bias term stays at its value under the codes before the intervention (it is left in
            the error term), so the edit is (f' − f)·W_dec: the same edit for an SAE with or without
            group biases. This is the plain TopK view of a GroupBiasTopKSAE.
      relu: the SAE itself. Group weights come from relu(f'): clamped features carry no mass, so the bias
            moves toward the group(s) of the token's other active features
            (by at most ‖b_RETAIN‖ + ‖b_FORGET‖).
    A TopK SAE without group biases is its own view under both readings."""
    if group_bias_edit not in GROUP_BIAS_EDITS:
        raise ValueError(f"group_bias_edit={group_bias_edit!r}: use one of {', '.join(GROUP_BIAS_EDITS)}")
    return (sae.without_group_biases() if isinstance(sae, GroupBiasTopKSAE) and group_bias_edit == "held"
            else sae)


def load_sae(path: Path, device: str = "cpu", passthrough: bool = True) -> TopKSAE:
    """An SAE saved by AutoEncoderTopK.save, in model units: a SinkSafeTopKSAE, or a GroupBiasTopKSAE with
    group biases (a TopKSAE if saved before sinks were passed through). passthrough=False reconstructs
    the sinks too."""
    sae = SAE.load_from_disk(str(path), device=device)
    if not passthrough and isinstance(sae, SinkSafeTopKSAE):
        sae.cfg.passthrough_norm = None
    return sae


if __name__ == "__main__":
    try:
        run(parse_config())
        distributed.shutdown()
    except ConfigError as e:
        # a config, input file or model that cannot work; raised before heavy work where possible
        sys.exit(f"error: {e}")
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        sys.exit(f"error: {e.strerror}")
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        # outside training: partial cache entries and outputs were cleaned up on the way out
        print("interrupted: no final_info.json was written; run the same command again, with the "
              "--out_dir it printed", file=sys.stderr)
        sys.exit(130)
