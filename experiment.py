"""Train a TopK sparse autoencoder on one layer of a language model and evaluate it.

    python experiment.py --out_dir=run_1            # embedded default: CPU, no hub
    python experiment.py --help                     # every option, its meaning and default

The run: load the model (Pythia-70M-deduped from the hub when reachable, else the embedded SmolLM2-135M-Instruct)
-> harvest residual-stream activations of forget-domain (biology) and retain-domain (general) text, cached on
disk -> train the SAE -> SAE-Bench core evaluation on held-out retain text -> out_dir/final_info.json.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import activations
import core_eval
import data
import models

# -----------------------------------------------------------------------------
# Config: the dataclass is the CLI (--name=value for every field)


def _opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # run
    out_dir: str = _opt("run_0", "folder for final_info.json, the SAE, the training log")
    overwrite: bool = _opt(False, "replace a finished run in out_dir (final_info.json present)")
    seed: int = _opt(0, "seed of the SAE initialisation and the batch order")
    device: str = _opt("auto", "'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:N'")
    cache_dir: str = _opt(str(models.default_cache_dir()), "converted model and activation cache (env ORTHO_SAE_CACHE)")
    wandb_mode: str = _opt("auto", "'auto' (online if a wandb API key is configured, else disabled), 'online', 'offline', 'disabled'")
    # model and data
    model: str = _opt("auto", "'auto', 'pythia-70m-deduped', 'smollm2-135m-instruct', a hub id or a local HF model folder")
    layer: int = _opt(-1, "residual stream after this block is the SAE's input; -1: the model's default (Pythia-70M 3, SmolLM2 15)")
    forget_corpus: str = _opt(data.HPO, "'hpo' (embedded biology text) or a local .jsonl/.txt file such as WMDP bio-forget-corpus.jsonl")
    retain_corpus: str = _opt(data.BIGBENCH_WIKIPEDIA, "'bigbench-wikipedia' (embedded), 'wikitext' (hub) or a local .jsonl/.txt file")
    context_length: int = _opt(128, "tokens per context, BOS included (BOS activations are not trained on)")
    train_tokens: int = _opt(0, "activations harvested for training, half forget half retain; 0: 400k on CPU, 4M on CUDA")
    val_tokens: int = _opt(16_384, "held-out activations (from evaluation documents) for the validation loss")
    eval_fraction: float = _opt(0.1, "share of each corpus's documents held out from training, for evaluation")
    data_seed: int = _opt(0, "seed of the document split and context order (part of the activation-cache key)")
    harvest_batch_size: int = _opt(16, "contexts per model forward while harvesting")
    # SAE and trainer
    dict_size: int = _opt(0, "number of SAE latents F; 0: 8 x d_model on CPU, 32 x d_model on CUDA")
    k: int = _opt(32, "active latents per token (TopK)")
    batch_size: int = _opt(2048, "activations per training step")
    epochs: float = _opt(4.0, "passes over the harvested training activations")
    lr: float = _opt(0.0, "Adam learning rate; 0: 2e-4 / sqrt(F / 16384) (dictionary_learning's TopK rule)")
    warmup_steps: int = _opt(50, "linear learning-rate warmup")
    decay_start: float = _opt(0.8, "fraction of training after which the learning rate decays linearly to 0")
    auxk_alpha: float = _opt(1 / 32, "weight of the AuxK loss on dead latents (OpenAI TopK paper)")
    dead_window_tokens: int = _opt(0, "a latent that has not fired for this many tokens is dead (AuxK); 0: 1/20 of the training tokens")
    max_norm_multiple: float = _opt(10.0, "drop activations whose norm exceeds this multiple of the median norm (attention-sink outliers); 0: keep all")
    # evaluation
    core_eval_batches: int = _opt(4, "SAE-Bench core: reconstruction batches (each: model with/without SAE, with ablation)")
    core_eval_sparsity_batches: int = _opt(8, "SAE-Bench core: sparsity/variance batches")
    core_eval_batch_prompts: int = _opt(8, "SAE-Bench core: contexts per batch")


def parse_config(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.type is bool or f.type == "bool":
            parser.add_argument(f"--{f.name}", nargs="?", const=True, default=f.default, help=f.metadata["help"],
                                type=lambda s: s.lower() in ("1", "true", "yes"))
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"])
    return Config(**vars(parser.parse_args(argv)))


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


def validate(cfg: Config) -> None:
    """Checks that need no model: raise ConfigError naming the field and the fix."""
    checks = [
        (cfg.k >= 1, "k", f"k={cfg.k} must be >= 1"),
        (cfg.dict_size >= 0, "dict_size", f"dict_size={cfg.dict_size} must be >= 0 (0 picks the device default)"),
        (cfg.dict_size == 0 or cfg.k <= cfg.dict_size, "k", f"k={cfg.k} exceeds dict_size={cfg.dict_size}: lower --k or raise --dict_size"),
        (cfg.lr >= 0, "lr", f"lr={cfg.lr} must be > 0 (or 0 for the automatic rule)"),
        (cfg.train_tokens >= 0, "train_tokens", f"train_tokens={cfg.train_tokens} must be >= 0 (0 picks the device default)"),
        (cfg.val_tokens > 0, "val_tokens", f"val_tokens={cfg.val_tokens} must be > 0"),
        (cfg.batch_size >= 1, "batch_size", f"batch_size={cfg.batch_size} must be >= 1"),
        (cfg.epochs > 0, "epochs", f"epochs={cfg.epochs} must be > 0"),
        (cfg.context_length >= 2, "context_length", f"context_length={cfg.context_length} must be >= 2 (BOS + one token)"),
        (0 < cfg.eval_fraction < 1, "eval_fraction", f"eval_fraction={cfg.eval_fraction} must be in (0, 1)"),
        (0 <= cfg.decay_start <= 1, "decay_start", f"decay_start={cfg.decay_start} must be in [0, 1]"),
        (cfg.auxk_alpha >= 0, "auxk_alpha", f"auxk_alpha={cfg.auxk_alpha} must be >= 0"),
        (cfg.layer >= -1, "layer", f"layer={cfg.layer} must be >= 0 (or -1 for the model's default)"),
        (cfg.wandb_mode in ("auto", "online", "offline", "disabled"), "wandb_mode", f"wandb_mode={cfg.wandb_mode!r}: use auto, online, offline or disabled"),
        (cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"), "device", f"device={cfg.device!r}: use auto, cpu or cuda[:N]"),
    ]
    for ok, name, message in checks:
        if not ok:
            raise ConfigError(f"--{name}: {message}")
    if (Path(cfg.out_dir) / "final_info.json").exists() and not cfg.overwrite:
        raise ConfigError(f"--out_dir: {cfg.out_dir} holds a finished run (final_info.json); pick a new out_dir or pass --overwrite")


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
        raise ConfigError(f"--layer: layer={cfg.layer} is outside {model_desc['hf_name']} (layers 0..{model_desc['n_layers'] - 1})")
    if cfg.k > cfg.dict_size:
        raise ConfigError(f"--k: k={cfg.k} exceeds dict_size={cfg.dict_size}: lower --k or raise --dict_size")
    return cfg


# -----------------------------------------------------------------------------
# The sparse autoencoder


class TopKEncode(torch.autograd.Function):
    """(values, indices) = TopK_k(ReLU((x − b_dec) W_enc + b_enc)), plus the top k_aux pre-activations among
    `aux_latents` (the dead latents AuxK trains), from the same dense pre-activations.

    Forward: one dense [B, d] x [d, F] product, O(B·d·F). Backward: the gradient w.r.t. the pre-activations is
    zero outside the B·(k + k_aux) selected entries, so every weight gradient is a sparse product, O(B·(k+k_aux)·d):
      ∂W_enc[:, f] = Σ_b (x_b − b_dec) g_bf,   ∂b_enc[f] = Σ_b g_bf,   ∂b_dec = −W_enc ∂b_enc.
    The dense [B, F] gradient is never formed.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k: int, aux_latents, k_aux: int):
        centered = x - b_dec
        pre = torch.addmm(b_enc, centered, W_enc).relu_()
        values, indices = pre.topk(k, dim=-1, sorted=False)
        if aux_latents is None or len(aux_latents) == 0 or k_aux == 0:
            aux_values, aux_indices = pre.new_zeros(len(x), 0), indices.new_zeros(len(x), 0)
        else:
            aux_values, j = pre[:, aux_latents].topk(min(k_aux, len(aux_latents)), dim=-1, sorted=False)
            aux_indices = aux_latents[j]
        ctx.save_for_backward(centered, W_enc, torch.cat([values, aux_values], 1), torch.cat([indices, aux_indices], 1))
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _, grad_aux_values, __):
        centered, W_enc, values, indices = ctx.saved_tensors
        grad = torch.cat([grad_values, grad_aux_values], 1) * (values > 0)  # ReLU: no gradient where it clipped
        B, n_sel = indices.shape
        rows = torch.arange(B, device=indices.device).repeat_interleave(n_sel)
        sparse_grad = torch.sparse_coo_tensor(torch.stack([indices.flatten(), rows]), grad.flatten(), (W_enc.shape[1], B))
        grad_W_enc = torch.sparse.mm(sparse_grad, centered).T
        grad_b_enc = torch.zeros(W_enc.shape[1], dtype=grad.dtype, device=grad.device).index_add_(0, indices.flatten(), grad.flatten())
        return None, grad_W_enc, grad_b_enc, -(W_enc @ grad_b_enc), None, None, None


class AutoEncoderTopK(nn.Module):
    """TopK SAE on inputs scaled to unit mean squared norm.

    encode: f = TopK_k(ReLU((x − b_dec) W_enc + b_enc))      x [B, d], W_enc [d, F], f [B, F] with k non-zeros
    decode: x̂ = f W_dec + b_dec                               W_dec [F, d], rows unit norm
    The active latents are kept as (values [B, k], indices [B, k]); decoding is an embedding_bag over W_dec's
    rows, O(B·k·d), never a dense [B, F] product.
    """

    def __init__(self, d_in: int, dict_size: int, k: int):
        super().__init__()
        self.d_in, self.dict_size, self.k = d_in, dict_size, k
        W_dec = torch.randn(dict_size, d_in)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone())  # tied initialisation, as dictionary_learning and OpenAI
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def encode(self, x: torch.Tensor, aux_latents: torch.Tensor = None, k_aux: int = 0):
        """(values [B, k], indices [B, k]) of the k largest ReLU pre-activations; with `aux_latents`, also the
        (values, indices) [B, k_aux] of the largest among those latents (for AuxK)."""
        values, indices, aux_values, aux_indices = TopKEncode.apply(x, self.W_enc, self.b_enc, self.b_dec, self.k, aux_latents, k_aux)
        return (values, indices) if aux_latents is None else (values, indices, aux_values, aux_indices)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Σ_j values[:, j] · W_dec[indices[:, j]] + b_dec: [B, d]."""
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out each row's gradient component along the row, so the unit-norm constraint holds to first order."""
        if self.W_dec.grad is not None:
            self.W_dec.grad -= (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True) * self.W_dec

    def save(self, path: Path, scale: float, metadata: dict) -> None:
        """Save as a SAE-Lens TopK SAE in the model's own units (sae_lens.SAE.load_from_disk reads it).

        Training saw x / scale. Multiplying b_enc and b_dec by scale gives f' = scale·f and x̂' = scale·x̂ on raw x,
        with the same latents firing and W_dec still unit-norm, so feature values are in activation units.
        """
        from sae_lens.saes.sae import SAEMetadata
        from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
        sae = TopKSAE(TopKSAEConfig(d_in=self.d_in, d_sae=self.dict_size, k=self.k, dtype="float32", device="cpu",
                                    apply_b_dec_to_input=True, normalize_activations="none",
                                    metadata=SAEMetadata(**metadata)))
        sae.load_state_dict({"W_enc": self.W_enc.detach().cpu(), "W_dec": self.W_dec.detach().cpu(),
                             "b_enc": self.b_enc.detach().cpu() * scale, "b_dec": self.b_dec.detach().cpu() * scale})
        sae.save_model(str(path))


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


# -----------------------------------------------------------------------------
# The trainer


class TrainerTopK:
    """Adam on L = ‖x − x̂‖² + auxk_alpha · L_auxk  (sparsity is enforced by k, so TopK needs no L1 term).

    L_auxk (Gao et al. 2024): the residual e = x − x̂ is reconstructed from the top k_aux = d/2 pre-activations of
    the dead latents only, ê = Σ a_j W_dec[j] (no bias), and L_auxk = ‖e − ê‖² / ‖e − mean(e)‖², batch means.
    A latent is dead when it has not fired for `dead_window_tokens` tokens. Learning rate: linear warmup, constant,
    linear decay to 0 over the last (1 − decay_start) of training.
    """

    def __init__(self, sae: AutoEncoderTopK, steps: int, lr: float, warmup_steps: int, decay_start: float,
                 auxk_alpha: float, dead_window_tokens: int):
        self.sae, self.steps, self.auxk_alpha, self.dead_window_tokens = sae, steps, auxk_alpha, dead_window_tokens
        self.k_aux = sae.d_in // 2
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
        decay_from = int(decay_start * steps)

        def schedule(step):
            warm = min(1.0, (step + 1) / max(1, warmup_steps))
            decay = 1.0 if step < decay_from else max(0.0, (steps - step) / max(1, steps - decay_from))
            return warm * decay

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.tokens_since_fired = torch.zeros(sae.dict_size, dtype=torch.long)

    def auxk_loss(self, residual: torch.Tensor, aux_values: torch.Tensor, aux_indices: torch.Tensor) -> torch.Tensor:
        if aux_values.shape[1] == 0:
            return residual.new_zeros(())
        e_hat = F.embedding_bag(aux_indices, self.sae.W_dec, per_sample_weights=aux_values, mode="sum")  # no bias
        denom = (residual - residual.mean(dim=0)).pow(2).sum(dim=-1).mean()
        return ((residual - e_hat).pow(2).sum(dim=-1).mean() / denom).nan_to_num(0.0)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Loss and the statistics logged for it; updates the dead-latent counters."""
        dead = (self.tokens_since_fired >= self.dead_window_tokens).nonzero().flatten().to(x.device)
        values, indices, aux_values, aux_indices = self.sae.encode(x, dead, self.k_aux)
        x_hat = self.sae.decode(values, indices)
        residual = x - x_hat
        recon = residual.pow(2).sum(dim=-1).mean()
        auxk = self.auxk_loss(residual.detach(), aux_values, aux_indices)
        total = recon + self.auxk_alpha * auxk
        with torch.no_grad():
            self.tokens_since_fired += len(x)
            self.tokens_since_fired[indices[values > 0].unique().cpu()] = 0
            fve = 1 - recon / (x - x.mean(dim=0)).pow(2).sum(dim=-1).mean()
        stats = {"loss": total.item(), "recon": recon.item(), "auxk": auxk.item(), "explained_variance": fve.item(),
                 "dead_latents": len(dead), "l0": (values > 0).sum(dim=-1).float().mean().item()}
        return total, stats

    def step(self, x: torch.Tensor) -> dict:
        total, stats = self.loss(x)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.sae.remove_parallel_decoder_grad()
        self.optimizer.step()
        self.scheduler.step()
        self.sae.normalize_decoder()
        return stats | {"lr": self.scheduler.get_last_lr()[0]}


@torch.no_grad()
def validation_loss(sae: AutoEncoderTopK, acts: np.ndarray, scale: float, device: str, batch_size: int = 4096) -> dict:
    """Mean ‖x − x̂‖² and explained variance (about the mean) on held-out activations, in scaled units."""
    sq_err, sq_dev, n = 0.0, 0.0, len(acts)
    mean = torch.from_numpy(np.asarray(acts).mean(axis=0)).to(device) / scale
    for start in range(0, n, batch_size):
        x = torch.from_numpy(np.ascontiguousarray(acts[start:start + batch_size])).to(device) / scale
        sq_err += (x - sae(x)).pow(2).sum().item()
        sq_dev += (x - mean).pow(2).sum().item()
    return {"val_recon": sq_err / n, "val_explained_variance": 1 - sq_err / sq_dev}


# -----------------------------------------------------------------------------
# The run


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device: {requested} asked for but CUDA is not available; use --device=cpu")
    return requested


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_activations(cfg: Config, model, model_info: dict, hook_name: str, forget: data.Corpus, retain: data.Corpus):
    """Harvest (or read back) train and validation activations; returns the cache entry and its key fields."""
    key = {"model": {k: model_info.get(k) for k in ("name", "source", "gguf_sha256", "revision")},
           "layer": cfg.layer, "hook_name": hook_name, "context_length": cfg.context_length,
           "train_tokens": cfg.train_tokens, "val_tokens": cfg.val_tokens, "eval_fraction": cfg.eval_fraction,
           "data_seed": cfg.data_seed, "forget": forget.provenance(), "retain": retain.provenance()}
    entry = Path(cfg.cache_dir) / "activations" / activations.cache_key(key)
    if (entry / "manifest.json").exists():
        print(f"activations: reading the cache {entry}")
        return entry, key
    print(f"activations: harvesting into {entry}")
    bos = model.tokenizer.bos_token_id if model.tokenizer.bos_token_id is not None else model.tokenizer.eos_token_id
    splits = {}
    for split, n_tokens in (("train", cfg.train_tokens), ("val", cfg.val_tokens)):
        contexts, labels = [], []
        for corpus, label in ((forget, activations.FORGET), (retain, activations.RETAIN)):
            train_docs, eval_docs = data.split_documents(corpus.documents, cfg.eval_fraction, cfg.data_seed)
            docs = train_docs if split == "train" else eval_docs
            ctx = data.pack_contexts(model.tokenizer, docs, cfg.context_length, n_tokens // 2, bos)
            contexts.append(ctx)
            labels.append(torch.full((len(ctx),), label))
        contexts, labels = torch.cat(contexts), torch.cat(labels)
        order = torch.randperm(len(contexts), generator=torch.Generator().manual_seed(cfg.data_seed))
        splits[split] = (contexts[order], labels[order])
    activations.build_cache(entry, key, model, hook_name, cfg.layer, splits, cfg.harvest_batch_size)
    return entry, key


def open_wandb(cfg: Config):
    mode = cfg.wandb_mode
    if mode == "auto":
        netrc = Path.home() / ".netrc"
        configured = bool(os.environ.get("WANDB_API_KEY")) or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
        mode = "online" if configured else "disabled"
    if mode == "disabled":
        return None
    import wandb
    return wandb.init(project="orthogonal-sae", dir=cfg.out_dir, mode=mode, config=dataclasses.asdict(cfg))


def train(cfg: Config, entry: Path, log_path: Path) -> tuple[AutoEncoderTopK, float, dict]:
    """Train the SAE on the cached activations; returns (sae, input scale, final training info)."""
    acts, labels = activations.load_split(entry, "train")
    val_acts, _ = activations.load_split(entry, "val")
    keep, norms = activations.typical_rows(acts, cfg.max_norm_multiple)
    val_keep, _ = activations.typical_rows(val_acts, cfg.max_norm_multiple)
    val_acts = val_acts[val_keep]
    # scale so that E‖x‖² = 1 over the kept tokens (dictionary_learning's normalisation)
    scale = float(np.sqrt((norms[keep].astype(np.float64) ** 2).mean()))
    sae = AutoEncoderTopK(acts.shape[1], cfg.dict_size, cfg.k).to(cfg.device)
    batches = activations.shuffled_batches(acts, labels, cfg.batch_size, cfg.seed, rows=keep)
    first, _ = next(batches)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(first.to(cfg.device) / scale))
    steps = max(1, int(cfg.epochs * len(keep) / cfg.batch_size))
    trainer = TrainerTopK(sae, steps, cfg.lr, cfg.warmup_steps, cfg.decay_start, cfg.auxk_alpha, cfg.dead_window_tokens)
    run = open_wandb(cfg)
    start = time.time()
    with open(log_path, "w") as log:
        for step in (bar := tqdm(range(steps), desc="train SAE", unit="step")):
            x, _ = next(batches)
            stats = trainer.step(x.to(cfg.device) / scale)
            if not math.isfinite(stats["loss"]):
                raise FloatingPointError(f"step {step}: loss is {stats['loss']} (recon {stats['recon']}, auxk {stats['auxk']})")
            record = {"step": step, **stats}
            if step % 50 == 0 or step == steps - 1:
                record |= validation_loss(sae, val_acts, scale, cfg.device)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", ev=f"{stats['explained_variance']:.3f}", dead=stats["dead_latents"])
            log.write(json.dumps(record) + "\n")
            if run is not None:
                run.log(record, step=step)
    if run is not None:
        run.finish()
    info = {"training_steps": steps, "training_tokens_seen": steps * cfg.batch_size, "final_loss": stats["loss"],
            "final_recon": stats["recon"], "final_dead_latents": stats["dead_latents"], "layer": cfg.layer,
            "dict_size": cfg.dict_size, "k": cfg.k, "learning_rate": cfg.lr, "sparsity_penalty": cfg.auxk_alpha,
            "sparsity_penalty_meaning": "auxk_alpha: weight of the AuxK dead-latent loss (TopK enforces sparsity by k)",
            "input_scale": scale, "train_tokens_harvested": len(acts), "tokens_dropped_as_outliers": int(len(acts) - len(keep)),
            "median_activation_norm": float(np.median(norms)), "train_wall_time_s": time.time() - start, **validation_loss(sae, val_acts, scale, cfg.device)}
    return sae, scale, info


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def append_notes(cfg: Config, final_info: dict, notes_path: Path) -> None:
    """One entry per finished run, appended: what the run was and its headline numbers."""
    training = final_info[f"training results for layer {cfg.layer}"]["final_info"]
    core = final_info["core evaluation results"]["metrics"]
    entry = (f"\n## {cfg.out_dir}  ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)\n"
             f"variant topk | seed {cfg.seed} | model {final_info['provenance']['model']['name']} | layer {cfg.layer} | "
             f"dict {cfg.dict_size} k {cfg.k} | train tokens {cfg.train_tokens:,} x {cfg.epochs} epochs\n"
             f"val explained variance {training['val_explained_variance']:.4f} | "
             f"core: explained variance (conventional) {core['reconstruction_quality']['explained_variance_conventional']:.4f}, "
             f"ce_loss_score {core['model_performance_preservation']['ce_loss_score']:.4f}, "
             f"kl_div_score {core['model_behavior_preservation']['kl_div_score']:.4f}, L0 {core['sparsity']['l0']:.1f}\n")
    with open(notes_path, "a") as f:
        f.write(entry)


def run(cfg: Config) -> dict:
    started = time.time()
    validate(cfg)
    device = pick_device(cfg.device)
    model_name, why = models.resolve_auto() if cfg.model == "auto" else (cfg.model, "requested by name")
    try:
        description = models.describe_model(model_name, Path(cfg.cache_dir))
    except ValueError as e:
        raise ConfigError(f"--model: {e}") from None
    cfg = resolve(cfg, device, description)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "final_info.json").unlink(missing_ok=True)
    set_seed(cfg.seed)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))

    model, model_info = models.load_model(model_name, device, Path(cfg.cache_dir))
    model_info |= {"requested": cfg.model, "reason": why}
    print(f"model: {model_info['name']} ({model_info['source']}; {why})")
    hook_name = f"blocks.{cfg.layer}.hook_resid_post"
    forget = data.load_corpus(cfg.forget_corpus, Path(cfg.cache_dir))
    retain = data.load_corpus(cfg.retain_corpus, Path(cfg.cache_dir))
    _, _, questions = data.load_questions("embedded" if model_info["source"] != "hub" else "hub")
    entry, key = prepare_activations(cfg, model, model_info, hook_name, forget, retain)

    sae, scale, train_info = train(cfg, entry, out / "train_log.jsonl")
    metadata = {"model_name": model_info["name"], "hook_name": hook_name, "hook_layer": cfg.layer,
                "context_size": cfg.context_length, "prepend_bos": True}
    sae.save(out / "sae", scale, metadata)

    _, retain_eval_docs = data.split_documents(retain.documents, cfg.eval_fraction, cfg.data_seed)
    core_cfg = core_eval.CoreEvalConfig(context_length=cfg.context_length, batch_size_prompts=cfg.core_eval_batch_prompts,
                                        n_eval_reconstruction_batches=cfg.core_eval_batches,
                                        n_eval_sparsity_variance_batches=cfg.core_eval_sparsity_batches)
    core = core_eval.run_core_eval(out / "sae", model, retain_eval_docs, core_cfg, device)

    final_info = {
        f"training results for layer {cfg.layer}": {
            "config": {"trainer_class": "TrainerTopK", "dict_class": "AutoEncoderTopK", "activation_dim": sae.d_in,
                       "lm_name": model_info["name"], "submodule_name": f"resid_post_layer_{cfg.layer}",
                       **dataclasses.asdict(cfg)},
            "final_info": train_info,
        },
        "core evaluation results": core,
        "provenance": {"model": model_info, "forget_corpus": forget.provenance(), "retain_corpus": retain.provenance(),
                       "questions": questions, "activation_cache": {"entry": str(entry), "key": key},
                       "torch": torch.__version__, "python": sys.version.split()[0], "argv": sys.argv[1:],
                       "wall_time_s": time.time() - started},
    }
    write_json_atomic(out / "final_info.json", final_info)
    append_notes(cfg, final_info, out.resolve().parent / "notes.txt")  # beside the run folders
    print(f"done in {time.time() - started:.0f} s: {out / 'final_info.json'}")
    return final_info


if __name__ == "__main__":
    try:
        run(parse_config())
    except ConfigError as e:  # raised before any model is loaded
        sys.exit(f"error: {e}")
