"""The language model's dtype (--llm_dtype) and the encoder product's (--encoder_dtype): float32 is the
unchanged path, bit for bit; bfloat16 stays within stated tolerances of it."""
import numpy as np
import pytest
import torch

import activations
import experiment
import models
import unlearning
from experiment import AutoEncoderTopK, TopKEncode, topk_rows
from tests.test_models import llama_folder  # noqa: F401 (a fixture)
from tests.test_robust import make_entry, tiny_config


def old_topk_encode(ctx, x, W_enc, b_enc, b_dec, k, aux_latents, k_aux, gemm_dtype=None):
    """TopKEncode.forward as it was before the dtype was a choice (the reference for float32)."""
    centered = x - b_dec
    with_aux = aux_latents is not None and len(aux_latents) > 0 and k_aux > 0
    values, indices, aux_values, aux_indices = [], [], [], []
    chunk = max(1, 2**21 // W_enc.shape[1])
    for start in range(0, len(x), chunk):
        pre = torch.addmm(b_enc, centered[start:start + chunk], W_enc)
        v, i = topk_rows(pre, k)
        values.append(v), indices.append(i)
        if with_aux:
            v, j = pre[:, aux_latents].topk(min(k_aux, len(aux_latents)), dim=-1, sorted=False)
            aux_values.append(v), aux_indices.append(aux_latents[j])
    values, indices = torch.cat(values).relu_(), torch.cat(indices)
    if with_aux:
        aux_values, aux_indices = torch.cat(aux_values).relu_(), torch.cat(aux_indices)
    else:
        aux_values, aux_indices = values.new_zeros(len(x), 0), indices.new_zeros(len(x), 0)
    ctx.save_for_backward(centered, W_enc, torch.cat([values, aux_values], 1),
                          torch.cat([indices, aux_indices], 1))
    ctx.mark_non_differentiable(indices, aux_indices)
    return values, indices, aux_values, aux_indices


def trained_state(tmp_path, name, **changes):
    out = tmp_path / name
    out.mkdir()
    experiment.set_seed(0)  # run() seeds before train()
    sae, scale, info, _ = experiment.train(tiny_config(out, **changes), make_entry(out), out)
    return {k: v.clone() for k, v in sae.state_dict().items()}, info


def test_float32_training_is_bit_identical_to_the_old_encoder(tmp_path, monkeypatch):
    """A whole training run at encoder_dtype float32 gives the same bytes as one through the old
    encoder (every step, regroup and checkpoint included)."""
    new, _ = trained_state(tmp_path, "new", encoder_dtype="float32")
    monkeypatch.setattr(TopKEncode, "forward", staticmethod(old_topk_encode))
    old, _ = trained_state(tmp_path, "old")
    assert new.keys() == old.keys()
    for name in new:
        assert torch.equal(new[name], old[name]), name


def test_bfloat16_encoder_trains_to_within_tolerance(tmp_path):
    """bf16 rounds the pre-activations to 8 bits of mantissa: the selection and the values move a little,
    the validation explained variance by less than 0.01 on the planted data."""
    _, fp32 = trained_state(tmp_path, "fp32", encoder_dtype="float32")
    _, bf16 = trained_state(tmp_path, "bf16", encoder_dtype="bfloat16")
    assert fp32["val_explained_variance"] > 0.5
    assert abs(bf16["val_explained_variance"] - fp32["val_explained_variance"]) < 0.01


def test_bfloat16_encoder_selects_nearly_the_same_latents():
    torch.manual_seed(0)
    sae = AutoEncoderTopK(64, 512, 16)
    x = torch.randn(300, 64)
    fp32 = sae.encode(x)
    sae.encoder_dtype = torch.bfloat16
    bf16 = sae.encode(x)
    assert bf16.values.dtype == torch.float32 and not torch.equal(bf16.values, fp32.values)
    same = (bf16.indices.sort(1).values == fp32.indices.sort(1).values).float().mean()
    assert same > 0.9
    kept = torch.stack([torch.isin(b, f) for b, f in zip(bf16.indices, fp32.indices)])
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    # a latent bf16 keeps that fp32 drops is a near tie: within bf16's rounding of the k-th value
    kth = fp32.values.min(dim=1, keepdim=True).values
    swapped = pre.gather(1, bf16.indices)[~kept]
    assert (swapped >= (kth.expand_as(bf16.indices)[~kept]) * (1 - 2**-6)).all()


def test_float32_model_forwards_are_unchanged(llama_folder, tmp_path):  # noqa: F811
    model, info = models.load_model(str(llama_folder), "cpu", tmp_path, "float32")
    assert info["dtype"] == "float32" and model.cfg.dtype == torch.float32
    tokens = torch.randint(4, len(model.tokenizer), (3, 9))
    expected = model(tokens, stop_at_layer=2, padding_side="right")
    assert torch.equal(unlearning.to_hook(model, tokens, 1), expected)
    assert torch.equal(unlearning.tail(model, expected, 1), unlearning.tail(model, expected.clone(), 1))
    stored = np.zeros((4, 3), dtype=np.float32)
    assert activations.as_float32(stored) is stored


def test_bfloat16_model_is_within_tolerance_and_stored_exactly(llama_folder, tmp_path):  # noqa: F811
    fp32, _ = models.load_model(str(llama_folder), "cpu", tmp_path, "float32")
    bf16, info = models.load_model(str(llama_folder), "cpu", tmp_path, "bfloat16")
    assert info["dtype"] == "bfloat16" and bf16.W_E.dtype == torch.bfloat16
    tokens = torch.randint(4, len(fp32.tokenizer), (4, 12))
    tokens[:, 0] = fp32.tokenizer.bos_token_id
    ref, low = unlearning.to_hook(fp32, tokens, 1), unlearning.to_hook(bf16, tokens, 1)
    assert low.dtype == torch.float32  # every edit at the hook runs in float32
    rel = (low - ref).norm(dim=-1) / ref.norm(dim=-1)
    # bf16's unit roundoff is 2^-9 ≈ 0.2% per operation; two blocks of this random model's large weights
    # (std 0.3) amplify it to ~2% (the embedded SmolLM2's layer-15 residual: 1.2%, BENCHMARKS.md)
    assert 0 < rel.median() < 0.04 and rel.max() < 0.1
    logits = unlearning.tail(bf16, low, 1).float()
    ref_logits = unlearning.tail(fp32, ref, 1)
    logit_rel = (logits - ref_logits).norm(dim=-1) / ref_logits.norm(dim=-1)
    assert 0 < logit_rel.median() < 0.05

    path = tmp_path / "x_acts.npy"
    activations.harvest_split(bf16, "blocks.1.hook_resid_post", 1, tokens, torch.tensor([1, 0, 1, 0]), 2,
                              path, "t")
    stored = np.load(path)
    assert stored.dtype == np.uint16  # bf16 bits: half the bytes of float32
    _, cache = bf16.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post", stop_at_layer=2)
    exact = cache["blocks.1.hook_resid_post"][:, 1:].reshape(-1, bf16.cfg.d_model).float().numpy()
    assert np.array_equal(activations.as_float32(stored), exact)
    norms = activations.typical_rows(stored, 0)[1]
    np.testing.assert_allclose(norms, np.linalg.norm(exact, axis=1), rtol=1e-6)


def test_auto_names_the_hardware_it_read(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert models.resolve_llm_dtype("auto", "cpu") == (
        "bfloat16", "auto: the CPU has AVX512-BF16 (torch.cpu reports it)")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert models.resolve_llm_dtype("auto", "cpu")[0] == "float32"
    assert models.resolve_llm_dtype("float32", "cpu") == ("float32", "requested by name")


@pytest.mark.parametrize("field, value", [("llm_dtype", "float16"), ("encoder_dtype", "auto")])
def test_unknown_dtype_is_refused(field, value, tmp_path):
    with pytest.raises(experiment.ConfigError, match=f"--{field}"):
        experiment.validate(experiment.Config(out_dir=str(tmp_path), **{field: value}))
