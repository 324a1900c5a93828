"""The SAE and trainer math against naive references, planted features, and config validation."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

import experiment
from experiment import AutoEncoderTopK, Config, ConfigError, TrainerTopK, geometric_median


def make_sae(d=16, n=64, k=4, seed=0):
    torch.manual_seed(seed)
    sae = AutoEncoderTopK(d, n, k)
    with torch.no_grad():  # break the tied init and zero biases so the test sees every term
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
        sae.b_enc.copy_(0.05 * torch.randn(n))
        sae.b_dec.copy_(0.1 * torch.randn(d))
    return sae


def dense_reference(sae, x):
    """The textbook TopK SAE: dense [B, F] code with the k largest ReLU pre-activations kept."""
    pre = F.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    keep = pre >= pre.sort(dim=-1, descending=True).values[:, sae.k - 1:sae.k]
    code = pre * keep
    return code, code @ sae.W_dec + sae.b_dec


def test_encode_decode_match_dense_reference():
    sae = make_sae()
    x = torch.randn(32, 16)
    values, indices, *_ = sae.encode(x)
    code = torch.zeros(32, 64).scatter(1, indices, values)
    ref_code, ref_x_hat = dense_reference(sae, x)
    torch.testing.assert_close(code, ref_code)
    torch.testing.assert_close(sae(x), ref_x_hat, rtol=1e-5, atol=1e-5)


def test_decode_gradient_matches_dense_reference():
    sae = make_sae()
    x = torch.randn(8, 16)
    sae(x).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    dense_reference(sae, x)[1].pow(2).sum().backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def naive_auxk(sae, x, dead, k_aux):
    """dictionary_learning's get_auxiliary_loss, written densely."""
    pre = F.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    code, x_hat = dense_reference(sae, x)
    residual = (x - x_hat).detach()
    masked = torch.where(dead[None], pre, torch.tensor(-float("inf")))
    vals, idx = masked.topk(min(k_aux, int(dead.sum())), dim=-1)
    aux_code = torch.zeros_like(pre).scatter(-1, idx, vals)
    e_hat = aux_code @ sae.W_dec
    l2 = (residual - e_hat).pow(2).sum(-1).mean()
    return l2 / (residual - residual.mean(0)).pow(2).sum(-1).mean()


@pytest.mark.parametrize("d, n, k, batch", [(16, 64, 4, 32), (24, 4608, 16, 1000)])
def test_training_loss_and_gradients_match_dense_reference_with_dead_latents(d, n, k, batch):
    """recon + alpha * AuxK and all its parameter gradients (sparse custom backward) vs the dense
    textbook form. At the second shape the encoder runs in several row chunks with the two-stage top-k
    selection, as at the default shape."""
    sae = make_sae(d, n, k)
    trainer = TrainerTopK(sae, steps=10, lr=1e-3, warmup_steps=1, decay_start=0.8, auxk_alpha=0.5,
                          dead_window_tokens=100)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::3] = True
    trainer.tokens_since_fired[dead] = 100  # these latents count as dead for this step
    x = torch.randn(batch, d)
    total, stats = trainer.loss(x)
    total.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    x_hat = dense_reference(sae, x)[1]
    auxk = naive_auxk(sae, x, dead, trainer.k_aux)
    reference = (x - x_hat).pow(2).sum(-1).mean() + 0.5 * auxk
    reference.backward()
    torch.testing.assert_close(total, reference, rtol=1e-5, atol=1e-6)
    assert stats["auxk"] == pytest.approx(auxk.item(), rel=1e-5) and stats["auxk"] > 0
    variance = (x - x.mean(0)).pow(2).sum(-1).mean()
    assert stats["explained_variance"] == pytest.approx(
        1 - (x - x_hat).pow(2).sum(-1).mean().item() / variance.item(), rel=1e-5)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    sae.zero_grad()
    trainer.tokens_since_fired.zero_()  # nobody dead: AuxK is exactly zero
    assert trainer.loss(x)[1]["auxk"] == 0.0


@pytest.mark.parametrize("rows, n, k", [(64, 4608, 32), (40, 16384, 32), (300, 96, 3), (50, 100, 7),
                                        (20, 64, 16)])
def test_topk_rows_selects_the_k_largest(rows, n, k):
    """The staged selection (three levels for the first two shapes, two for the third) and its plain-topk
    fallback (last two) against torch.topk, with ties and with rows that have fewer than k positive
    entries."""
    torch.manual_seed(0)
    pre = torch.randn(rows, n)
    pre[:rows // 4] = pre[:rows // 4].round()  # many ties
    pre[rows // 4:rows // 2] = -pre[rows // 4:rows // 2].abs()  # nothing positive
    values, indices = experiment.topk_rows(pre, k)
    torch.testing.assert_close(values.sort(dim=1, descending=True).values, pre.topk(k, dim=1).values,
                               rtol=0, atol=0)
    torch.testing.assert_close(pre.gather(1, indices), values, rtol=0, atol=0)
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all()  # k distinct latents per row


def test_scatter_rows_is_the_transposed_sparse_product():
    """Sᵀ·dense for S [B, F] given as (indices, weights), with repeated latents in a row (AuxK can
    pick a latent the main TopK also picked), against the dense product."""
    torch.manual_seed(0)
    B, n, k, d = 40, 30, 6, 7
    indices, weights, dense = torch.randint(0, n, (B, k)), torch.randn(B, k), torch.randn(B, d)
    S = torch.zeros(B, n).index_put_((torch.arange(B)[:, None].expand(B, k), indices), weights,
                                     accumulate=True)
    torch.testing.assert_close(experiment.scatter_rows(indices, weights, dense, n), S.T @ dense)


def test_sparse_decode_gradients_with_repeated_latents():
    torch.manual_seed(0)
    B, n, k, d = 40, 30, 6, 7
    indices = torch.randint(0, n, (B, k))
    values, W = torch.randn(B, k, requires_grad=True), torch.randn(n, d, requires_grad=True)
    g = torch.randn(B, d)
    out = experiment.SparseDecode.apply(values, indices, W)
    grads = torch.autograd.grad(out, (values, W), g)
    S = torch.zeros(B, n).index_put((torch.arange(B)[:, None].expand(B, k), indices), values, accumulate=True)
    ref = S @ W
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, torch.autograd.grad(ref, (values, W), g)):
        torch.testing.assert_close(got, want)


def test_dead_latent_counter_scales_with_run_and_fires():
    """With a window of 3 batches, latents that never win TopK count as dead from the 4th step on (deadness is
    judged on the tokens seen before the step); AuxK is then non-zero."""
    sae = make_sae(n=64, k=2)
    trainer = TrainerTopK(sae, steps=10, lr=1e-3, warmup_steps=1, decay_start=0.8, auxk_alpha=1 / 32,
                          dead_window_tokens=3 * 16)
    x = torch.randn(16, 16)
    for _ in range(3):
        assert trainer.loss(x)[1]["dead_latents"] == 0
    _, stats = trainer.loss(x)
    fired = set(sae.encode(x)[1].flatten().tolist())
    assert stats["dead_latents"] == 64 - len(fired) > 0
    assert stats["auxk"] > 0


def test_parallel_gradient_removed_and_rows_stay_unit_norm():
    sae = make_sae()
    sae(torch.randn(8, 16)).pow(2).sum().backward()
    g = sae.W_dec.grad.clone()
    sae.remove_parallel_decoder_grad()
    for row, grad_before, grad_after in zip(sae.W_dec, g, sae.W_dec.grad):
        expected = grad_before - (grad_before @ row) * row  # naive per-row projection
        torch.testing.assert_close(grad_after, expected, rtol=1e-5, atol=1e-6)
        assert abs(float(grad_after @ row)) < 1e-5
    trainer = TrainerTopK(sae, steps=5, lr=1e-2, warmup_steps=1, decay_start=0.8, auxk_alpha=0.0,
                          dead_window_tokens=10**9)
    trainer.step(torch.randn(8, 16))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_geometric_median_minimises_sum_of_distances():
    torch.manual_seed(0)
    points = torch.cat([torch.randn(50, 3), 40 + torch.randn(5, 3)])  # outliers pull the mean, not the median
    objective = lambda m: np.linalg.norm(points.numpy() - m, axis=1).sum()
    reference = minimize(objective, points.mean(0).numpy(), method="Nelder-Mead",
                         options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 20000}).x
    median = geometric_median(points)
    np.testing.assert_allclose(median.numpy(), reference, atol=1e-3)
    assert objective(median.numpy()) < objective(points.mean(0).numpy()) - 1


def test_learning_rate_schedule():
    sae = make_sae()
    trainer = TrainerTopK(sae, steps=100, lr=1.0, warmup_steps=10, decay_start=0.8, auxk_alpha=0,
                          dead_window_tokens=10**9)
    lrs = []
    for _ in range(100):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.scheduler.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[50] == pytest.approx(1.0)
    assert lrs[90] == pytest.approx(0.5) and lrs[99] == pytest.approx(0.05)


def test_saved_sae_loads_in_sae_lens_in_model_units(tmp_path):
    from sae_lens import SAE
    sae = make_sae(d=16, n=64, k=4)
    scale = 7.5
    sae.save(tmp_path / "sae", scale, {"model_name": "m", "hook_name": "blocks.0.hook_resid_post",
                                       "hook_layer": 0})
    loaded = SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    x = scale * torch.randn(32, 16)  # raw model-unit activations
    values, indices, *_ = sae.encode(x / scale)
    code = torch.zeros(32, 64).scatter(1, indices, values)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), scale * code, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loaded(x), scale * sae(x / scale), rtol=1e-4, atol=1e-4)
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["architecture"] == "topk_sink_safe"


def test_state_with_W_enc_in_the_sae_lens_layout_loads():
    """SAE-Lens files hold W_enc [d, F]; AutoEncoderTopK stores its transpose W_enc_T [F, d]."""
    sae = make_sae()
    lens_layout = {("W_enc" if name == "W_enc_T" else name):
                   (v.T.contiguous() if name == "W_enc_T" else v.clone())
                   for name, v in sae.state_dict().items()}
    assert lens_layout["W_enc"].shape == (16, 64)
    loaded = AutoEncoderTopK(16, 64, 4)
    loaded.load_state_dict(lens_layout)
    x = torch.randn(32, 16)
    assert torch.equal(loaded(x), sae(x))


def test_planted_features_are_recovered():
    """Tokens are sums of 3 of 48 known unit directions in d=24 with positive weights. A TopK SAE (F=96, k=3)
    must find them: best |cos| with a decoder row > 0.9 for at least 90% of the directions. Random unit
    vectors in 24 dimensions reach a max |cos| of ~0.6 against 96 rows, so 0.9 is far from chance."""
    torch.manual_seed(0)
    d, n_true, n_active = 24, 48, 3
    true = F.normalize(torch.randn(n_true, d), dim=1)

    def sample(b):
        idx = torch.rand(b, n_true).topk(n_active, dim=1).indices
        weights = torch.zeros(b, n_true).scatter(1, idx, 0.5 + torch.rand(b, n_active))
        return weights @ true

    sae = AutoEncoderTopK(d, 96, n_active)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample(2048)))
    steps = 1500
    trainer = TrainerTopK(sae, steps, lr=3e-3, warmup_steps=50, decay_start=0.8, auxk_alpha=1 / 32,
                          dead_window_tokens=256 * 20)
    for _ in range(steps):
        stats = trainer.step(sample(256))
    best = (true @ F.normalize(sae.W_dec.detach(), dim=1).T).abs().max(dim=1).values
    assert (best > 0.9).float().mean() >= 0.9, best
    assert stats["explained_variance"] > 0.9


# every check of validate(): a value it refuses, and the field its one-line message names
INVALID = [
    ({"k": 0}, "k"), ({"k": 100, "dict_size": 64}, "k"), ({"dict_size": -1}, "dict_size"), ({"lr": -1.0}, "lr"),
    ({"train_tokens": -5}, "train_tokens"), ({"val_tokens": 0}, "val_tokens"), ({"batch_size": 0}, "batch_size"),
    ({"checkpoint_every": 0}, "checkpoint_every"), ({"val_every": 0}, "val_every"), ({"epochs": 0}, "epochs"),
    ({"context_length": 1}, "context_length"), ({"eval_fraction": 1.5}, "eval_fraction"),
    ({"val_fraction": -0.1}, "val_fraction"), ({"variant": "allpairs_ortho", "allpairs_lambda2": -1.0},
                                                 "allpairs_lambda2"),
    ({"max_group_fraction": 1.5}, "max_group_fraction"), ({"decay_start": 2.0}, "decay_start"),
    ({"auxk_alpha": -1.0}, "auxk_alpha"), ({"layer": -2}, "layer"), ({"wandb_mode": "on"}, "wandb_mode"),
    ({"llm_dtype": "float16"}, "llm_dtype"), ({"encoder_dtype": "auto"}, "encoder_dtype"),
    ({"variant": "sparse"}, "variant"), ({"unlearning_group_bias_edit": "drop"}, "unlearning_group_bias_edit"),
    ({"unlearning_retain_thresholds": (0.0,)}, "unlearning_retain_thresholds"),
    ({"unlearning_n_features": ()}, "unlearning_n_features"), ({"unlearning_multipliers": (-1.0,)},
                                                               "unlearning_multipliers"),
    ({"absorption_words": -1}, "absorption_words"), ({"unlearning_ce_contexts": 1}, "unlearning_ce_contexts"),
    ({"ortho_target": "cone"}, "ortho_target"), ({"alpha": 1.0}, "alpha"), ({"lambda2_max": -1.0}, "lambda2_max"),
    ({"t0": -1}, "t0"), ({"group_every": 0}, "group_every"), ({"specificity_threshold": 1.0}, "specificity_threshold"),
    ({"min_freq": -1.0}, "min_freq"), ({"kappa_max": 1.0}, "kappa_max"), ({"kappa_patience": 0}, "kappa_patience"),
    ({"device": "tpu"}, "device"), ({"evaluate_only": True, "overwrite": True}, "evaluate_only"),
    # an option the variant does not read
    ({"variant": "fixed_ortho", "alpha": 0.3}, "alpha"), ({"variant": "topk", "lambda2_max": 5.0}, "lambda2_max"),
    ({"variant": "topk", "group_biases": False}, "group_biases"),
    ({"variant": "adaptive_ortho", "allpairs_lambda2": 1.0}, "allpairs_lambda2"),
    ({"variant": "allpairs_ortho", "t0": 10}, "t0"), ({"variant": "fixed_ortho", "ortho_target": "hinge"},
                                                      "ortho_target"),
]


@pytest.mark.parametrize("override, field", INVALID)
def test_invalid_config_names_the_field(override, field, tmp_path):
    with pytest.raises(ConfigError, match=f"^--{field}:") as e:
        experiment.validate(Config(out_dir=str(tmp_path / "run"), **override))
    assert "\n" not in str(e.value)


def test_every_check_of_validate_is_exercised(tmp_path):
    """INVALID names every field validate() checks, and the defaults pass every check."""
    checks = experiment.config_checks(Config())
    assert all(ok for ok, _, _ in checks)
    assert {field for _, field, _ in checks} <= {field for _, field in INVALID}
    experiment.validate(Config(out_dir=str(tmp_path / "run")))


def test_an_option_the_variant_ignores_is_refused_naming_the_variant():
    """And final_info.json's config records only the options that took effect."""
    with pytest.raises(ConfigError, match="variant fixed_ortho does not use it .only adaptive_ortho do.; "
                                          "drop --alpha=0.3"):
        experiment.validate(Config(variant="fixed_ortho", alpha=0.3))
    for variant in experiment.VARIANTS:  # the defaults are fine for every variant
        experiment.validate(Config(out_dir="unused", variant=variant))
    recorded = experiment.recorded_config(Config(variant="topk"))
    assert not {"alpha", "lambda2_max", "t0", "group_biases", "allpairs_lambda2"} & set(recorded)
    assert recorded["k"] == 32 and experiment.recorded_config(Config())["alpha"] == 0.1


def test_layer_outside_model_and_k_over_auto_dict_size():
    desc = {"n_layers": 6, "d_model": 8, "default_layer": 3, "hf_name": "tiny"}
    with pytest.raises(ConfigError, match="--layer.*0..5"):
        experiment.resolve(Config(layer=6), "cpu", desc)
    with pytest.raises(ConfigError, match="--k"):
        experiment.resolve(Config(k=65), "cpu", desc)  # auto dict_size = 8 * 8 = 64
    cfg = experiment.resolve(Config(), "cpu", desc)
    assert (cfg.layer, cfg.dict_size, cfg.train_tokens) == (3, 64, 400_000)


def test_finished_run_is_not_overwritten(tmp_path):
    (tmp_path / "final_info.json").write_text("{}")
    with pytest.raises(ConfigError, match="--out_dir.*--overwrite"):
        experiment.validate(Config(out_dir=str(tmp_path)))
    experiment.validate(Config(out_dir=str(tmp_path), overwrite=True))


def test_cli_parses_every_field_and_errors_in_one_line(tmp_path):
    import subprocess, sys
    cfg = experiment.parse_config(["--out_dir=x", "--k=8", "--lr=0.01", "--overwrite", "--epochs=1.5"])
    assert (cfg.out_dir, cfg.k, cfg.lr, cfg.overwrite, cfg.epochs) == ("x", 8, 0.01, True, 1.5)
    help_text = subprocess.run([sys.executable, "experiment.py", "--help"], capture_output=True,
                               text=True).stdout
    for f in experiment.dataclasses.fields(Config):
        assert f"--{f.name}" in help_text
    bad = subprocess.run([sys.executable, "experiment.py", "--k=0", f"--out_dir={tmp_path}/r"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "--k" in bad.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv, message", [
    (["--k=abc"], "argument --k: invalid int value: 'abc'"),
    (["--unlearning_multipliers=25;50"], "'25;50' is not a comma-separated list of floats"),
    (["--unlearning_n_features=10,2.5"], "'10,2.5' is not a comma-separated list of ints"),
    (["--no_such_option=1"], "unrecognized arguments: --no_such_option=1"),
])
def test_a_bad_command_line_is_one_line_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        experiment.parse_config(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


def test_sweep_lists_are_typed_tuples_from_the_command_line():
    cfg = experiment.parse_config(["--unlearning_multipliers=100", "--unlearning_n_features=5,7"])
    assert cfg.unlearning_multipliers == (100.0,) and cfg.unlearning_n_features == (5, 7)
    assert cfg.unlearning_retain_thresholds == (0.001, 0.01)  # the default, already a tuple


def test_loading_an_sae_imports_no_evaluation_module_and_sets_no_warning_filter():
    """import experiment (load_sae, the SAE classes) leaves SAE-Bench and the evaluation modules
    unloaded and the process's warning filters as they were."""
    code = ("import sys, warnings, torch, sae_lens, transformer_lens\n"
            "before = list(warnings.filters)\n"
            "import experiment\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('sae_bench', 'unlearning', 'core_eval', "
            "'absorption', 'sae_bench_unlearning', 'interventions')]\n"
            "print(heavy, [f for f in warnings.filters if f not in before])")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(experiment.__file__).parent,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[] []"
