"""SAE-Bench's core evaluation of a SAE-Lens SAE (experiment.load_sae's TopKSAE or GroupBiasTopKSAE), on
local held-out text, fully offline.

The metrics come from SAE-Bench's own `run_evals` (sae_bench 0.6.0), fed by an sae_lens ActivationsStore
built on a local `datasets.Dataset`, so nothing touches the Hugging Face hub. What it measures, per batch
of batch_size_prompts contexts of context_length tokens:
  reconstruction batches: CE loss and KL of the model with the SAE spliced in at the hook, vs. the clean
    model and vs. the hook zero-ablated (3 full forward passes per batch);
  sparsity/variance batches: L0, L1, norms, MSE, cosine and explained variance of the SAE on the hook's
    activations (1 forward pass up to the hook per batch).
SAE-Bench's `explained_variance` does not measure variance about the mean activation (SAE-Bench issue 76,
SAELens issue 659), so we add the conventional one, computed on exactly the activations of its
sparsity/variance batches, which we record as SAE-Bench computes them (no forward pass of our own).
"""
import dataclasses
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from datasets import Dataset
from sae_bench.evals.core.eval_config import CoreEvalConfig as SAEBenchCoreEvalConfig
from sae_bench.evals.core.main import run_evals
from sae_bench.sae_bench_utils.general_utils import load_and_format_sae
from sae_lens import SAE
from sae_lens.training.activations_store import ActivationsStore
from transformer_lens import HookedTransformer

from files import json_safe
from models import special_token_ids

EV_NOTE = ("explained_variance is SAE-Bench 0.6.0's "
           "1 - E_t||x-x_hat||^2 / (E_t||x||^2 - (E_t||x||^2 / d)^2), "
           "E_t a mean over batches of per-batch token means: its 'total variance' is the second moment "
           "about zero less a term that is not ||E_t x||^2 (SAE-Bench issue 76, SAELens issue 659), so "
           "it is not variance about the mean; explained_variance_legacy is SAE-Bench's token-wise mean "
           "of 1 - ||x-x_hat||^2 / ||x - batch mean||^2; explained_variance_conventional is "
           "1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - x_bar||^2, x_bar the per-dimension mean over "
           "all evaluated tokens t: the same tokens as SAE-Bench's sparsity/variance batches, "
           "BOS/EOS/pad positions excluded; explained_variance_conventional_without_outliers is the "
           "same over the tokens with ||x|| <= outlier_norm_threshold (training's rule: "
           "max_norm_multiple x the median training-token norm), which drops attention-sink tokens; the "
           "results tables use it.")


@dataclass
class CoreEvalConfig:
    context_length: int = 128  # tokens per context (BOS, then documents joined by EOS)
    batch_size_prompts: int = 8  # contexts per batch, in both passes
    n_eval_reconstruction_batches: int = 4  # CE/KL batches: 3 full forward passes each
    n_eval_sparsity_variance_batches: int = 8  # L0/MSE/EV batches: 1 forward pass up to the hook each
    # Splice the SAE in only at non-BOS/EOS/pad positions, as SAE-Bench's published runs do.
    exclude_special_tokens_from_reconstruction: bool = True
    seed: int = 42  # shuffles the documents before packing, as SAE-Bench's multiple_evals does


def make_store(model: HookedTransformer, sae: SAE, texts: list[str], cfg: CoreEvalConfig,
               device: str) -> ActivationsStore:
    """An ActivationsStore streaming packed contexts [context_length] from `texts`, in a seeded shuffled
    order.

    Contexts are BOS, then documents joined by EOS: the packing the SAE was trained on
    (data.pack_contexts), where sae_lens would otherwise join documents with BOS.
    """
    store = ActivationsStore.from_sae(model, sae, dataset=Dataset.from_dict({"text": list(texts)}),
                                      streaming=False, context_size=cfg.context_length,
                                      store_batch_size_prompts=cfg.batch_size_prompts, device=device,
                                      sequence_separator_token="eos")
    store.shuffle_input_dataset(seed=cfg.seed)
    return store


def sparsity_variance_batches(model, sae, texts, cfg: CoreEvalConfig, device: str) -> list[torch.Tensor]:
    """The token batches [batch_size_prompts, context_length] that run_evals' sparsity/variance pass will see.

    run_evals draws its reconstruction batches and then its sparsity/variance batches from one token
    stream (its `reset_input_dataset` does not rewind that stream), so a fresh, identically built store
    replays them. We also refuse to run if the texts run out: the store would silently start over and
    count the same tokens twice.
    """
    store, n_recon = make_store(model, sae, texts, cfg, device), cfg.n_eval_reconstruction_batches
    batches = []
    try:
        for _ in range(n_recon + cfg.n_eval_sparsity_variance_batches):
            batches.append(store.get_batch_tokens(cfg.batch_size_prompts, raise_at_epoch_end=True))
    except StopIteration:
        raise ValueError(f"{len(texts)} texts fill only {len(batches)} of the "
                         f"{n_recon + cfg.n_eval_sparsity_variance_batches} batches of "
                         f"{cfg.batch_size_prompts}x{cfg.context_length} tokens asked for: give more "
                         f"text or ask for fewer batches") from None
    return batches[n_recon:]


def kept_positions(tokens: torch.Tensor, activations: torch.Tensor, ignore: list[int]) -> torch.Tensor:
    """activations [batch, pos, d] -> [n_kept, d], at every position whose token is not in `ignore`."""
    keep = ~torch.isin(tokens, torch.tensor(sorted(ignore), dtype=tokens.dtype, device=tokens.device))
    return activations[keep]


@torch.no_grad()
def hook_activations(model: HookedTransformer, tokens: torch.Tensor, hook_name: str, layer: int,
                     ignore: list[int]) -> torch.Tensor:
    """Activations [n_kept, d] at `hook_name` for every position whose token is not in `ignore`."""
    _, cache = model.run_with_cache(tokens, names_filter=hook_name, stop_at_layer=layer + 1)
    return kept_positions(tokens, cache[hook_name], ignore)


@contextmanager
def recording_hook_activations(model: HookedTransformer, hook_name: str, ignore: list[int]):
    """Within the block, every `model.run_with_cache` call also appends (tokens, activations [n_kept, d]
    at `hook_name`, on the CPU) to the list it yields.

    In run_evals only the sparsity/variance pass calls run_with_cache (the reconstruction pass calls the
    model and run_with_hooks), so this hands us the activations SAE-Bench computed there, sparing a
    forward pass.
    """
    records, run_with_cache = [], model.run_with_cache
    shadowed = "run_with_cache" in vars(model)  # already an instance attribute (e.g. a test's wrapper)

    def recording(tokens, *args, **kwargs):
        out, cache = run_with_cache(tokens, *args, **kwargs)
        records.append((tokens, kept_positions(tokens, cache[hook_name], ignore).cpu()))
        return out, cache

    model.run_with_cache = recording  # an instance attribute: shadows the method until removed
    try:
        yield records
    finally:
        if shadowed:
            model.run_with_cache = run_with_cache
        else:
            del model.run_with_cache


@torch.no_grad()
def conventional_explained_variance(sae: SAE, activations: list[torch.Tensor],
                                    max_norm: float = None) -> dict:
    """1 − Σ_t ‖x_t − x̂_t‖² / Σ_t ‖x_t − x̄‖², x̄ = per-dimension mean over the tokens t
    summed over: all tokens of all batches of `activations` ([n_kept, d] each; "all"), and those with
    ‖x_t‖ <= max_norm ("typical": training's outlier rule, which drops attention-sink tokens whose norms
    are ~100× the median), with the number of tokens dropped.

    Accumulated in float64 over the concatenated tokens: with a large mean activation,
    Σ‖x‖² − N‖x̄‖² in float32 would cancel catastrophically.
    """
    xs, residuals = [], []
    for x in activations:
        x = x.to(sae.device)
        xs.append(x.double().cpu())
        residuals.append((x - sae.decode(sae.encode(x))).double().cpu())
    x, r = torch.cat(xs), torch.cat(residuals)
    ev = lambda x, r: (1 - r.pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    typical = x.norm(dim=1) <= max_norm if max_norm else torch.ones(len(x), dtype=torch.bool)
    return {"all": ev(x, r), "typical": ev(x[typical], r[typical]), "n_tokens": len(x),
            "n_dropped": int((~typical).sum())}


def run_core_eval(sae: SAE, model: HookedTransformer, texts: list[str], cfg: CoreEvalConfig, device: str,
                  max_norm: float = None) -> dict:
    """SAE-Bench core metrics of `sae` on `texts`, in the layout SAE-Bench writes under "core evaluation
    results", plus the conventional explained variance over all tokens and without those of
    norm > max_norm (model units; None: none dropped), and the wall time."""
    started = time.time()
    meta = sae.cfg.metadata
    sae_set = f"{meta['model_name']}_layer_{meta['hook_layer']}_sae"
    # Copies hook_name/hook_layer/model_name from cfg.metadata onto cfg, where run_evals reads them
    # (SAE-Lens 6).
    sae_id, sae, _ = load_and_format_sae(sae_set, sae, device)
    ignore = special_token_ids(model.tokenizer)
    eval_cfg = SAEBenchCoreEvalConfig(
        model_name=meta["model_name"], llm_dtype=str(model.cfg.dtype).removeprefix("torch."),
        batch_size_prompts=cfg.batch_size_prompts,
        n_eval_reconstruction_batches=cfg.n_eval_reconstruction_batches,
        n_eval_sparsity_variance_batches=cfg.n_eval_sparsity_variance_batches,
        dataset=f"local: {len(texts)} held-out documents", context_size=cfg.context_length,
        compute_kl=True, compute_ce_loss=True, compute_l2_norms=True, compute_sparsity_metrics=True,
        compute_variance_metrics=True, compute_featurewise_weight_based_metrics=True,
        exclude_special_tokens_from_reconstruction=cfg.exclude_special_tokens_from_reconstruction,
        verbose=True)

    # Replay (and check there is enough text for) the sparsity/variance tokens before the expensive part.
    sv_batches = sparsity_variance_batches(model, sae, texts, cfg, device)
    with recording_hook_activations(model, sae.cfg.hook_name, ignore) as recorded:
        metrics, feature_metrics = run_evals(sae, make_store(model, sae, texts, cfg, device), model,
                                             eval_cfg, ignore_tokens=ignore, verbose=True)
    metrics = json_safe(metrics)  # nan -> None (SAE-Bench writes -1, which reads like a value)
    seen = [tokens for tokens, _ in recorded]  # the batches SAE-Bench's sparsity/variance pass ran on
    if len(seen) == len(sv_batches) and all(map(torch.equal, seen, sv_batches)):
        activations = [a for _, a in recorded]
    else:  # a SAE-Bench whose sparsity/variance pass we did not see: run the model ourselves
        warnings.warn("SAE-Bench's sparsity/variance activations were not recorded; recomputing them")
        activations = (hook_activations(model, tokens, sae.cfg.hook_name, sae.cfg.hook_layer, ignore)
                       for tokens in sv_batches)
    ev = json_safe(conventional_explained_variance(sae, activations, max_norm))  # no tokens: None
    metrics["reconstruction_quality"] |= {
        "explained_variance_conventional": ev["all"],
        "explained_variance_conventional_without_outliers": ev["typical"],
        "outlier_norm_threshold": max_norm, "outlier_tokens_dropped": ev["n_dropped"],
        "ev_tokens": ev["n_tokens"], "explained_variance_note": EV_NOTE}
    weight_based = {name: distribution(feature_metrics[name]) for name in WEIGHT_BASED_METRICS}
    return {"unique_id": f"{sae_set}_{sae_id}", "sae_set": sae_set, "sae_id": sae_id,
            "eval_cfg": dataclasses.asdict(eval_cfg), "metrics": metrics,
            "featurewise_weight_based_metrics": weight_based | {"note": WEIGHT_BASED_NOTE},
            "wall_time_s": time.time() - started}


# SAE-Bench's per-feature weight-based metrics (get_featurewise_weight_based_metrics), summarised over
# features
WEIGHT_BASED_METRICS = ("max_decoder_cosine_sim", "max_encoder_cosine_sim", "encoder_decoder_cosine_sim",
                        "encoder_norm")
WEIGHT_BASED_NOTE = ("SAE-Bench's featurewise weight-based metrics, summarised over the F features: "
                     "max_*_cosine_sim is each feature's largest signed cosine to another feature's "
                     "decoder (encoder) vector; encoder_decoder_cosine_sim the cosine between a "
                     "feature's encoder and decoder vectors.")


def distribution(values: list) -> dict:
    """Mean, median, min and max of a per-feature list."""
    v = torch.tensor(values, dtype=torch.float64)
    return {"mean": v.mean().item(), "median": v.quantile(0.5).item(), "min": v.min().item(),
            "max": v.max().item()}
