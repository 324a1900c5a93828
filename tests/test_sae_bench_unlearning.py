"""The wrapping of SAE-Bench's real unlearning eval, offline. The eval itself needs the hub
(gemma-2-2b-it, wikitext, WMDP and MMLU questions), so run_eval is replaced by a fake that does what
SAE-Bench does around the metrics: takes the SAE through load_and_format_sae, casts it to the LLM dtype
and writes an UnlearningEvalOutput."""
import json
import os
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from sae_bench.custom_saes.topk_sae import TopKSAE
from sae_bench.evals.unlearning import main as sae_bench_unlearning_main
from sae_bench.evals.unlearning.eval_output import (UnlearningEvalOutput, UnlearningMetricCategories,
                                                    UnlearningMetrics)
from sae_bench.evals.unlearning.utils import feature_activation
from sae_bench.sae_bench_utils import activation_collection, general_utils

import sae_bench_unlearning

FORGET_TEXTS = ["Influenza hemagglutinin binds sialic acid receptors on the surface of respiratory "
                "epithelial cells.",
                'Plasmids carrying "antibiotic resistance" genes spread between bacteria by conjugation '
                "— often fast.",
                "Reverse genetics systems let researchers rescue an RNA virus from cloned complementary "
                "DNA copies."]
RETAIN_TEXTS = ["The river flows through the old town and past the cathedral before it reaches the harbour.",
                "short line"]  # SAE-Bench keeps only texts longer than 50 characters


def write_corpus(folder: Path, texts=FORGET_TEXTS, name="bio-forget-corpus.jsonl") -> Path:
    path = folder / name
    path.write_text("".join(json.dumps({"text": t, "source": "test"}) + "\n" for t in texts))
    return path


@pytest.mark.parametrize("model_name", ["gemma-2-2b-it", "google/gemma-2-2b-it", "google/gemma-2-9b-it"])
def test_applies_to_supported_gemma_with_wmdp_corpus(model_name, tmp_path):
    ok, why = sae_bench_unlearning.applies(model_name, str(write_corpus(tmp_path)))
    assert ok, why


@pytest.mark.parametrize("model_name", ["smollm2-135m-instruct", "EleutherAI/pythia-70m-deduped",
                                        "gemma-2-2b", "google/gemma-2-27b-it"])
def test_does_not_apply_to_other_models(model_name, tmp_path):
    ok, why = sae_bench_unlearning.applies(model_name, str(write_corpus(tmp_path)))
    assert not ok
    assert why == (f"SAE-Bench's unlearning eval supports only gemma-2-2b-it, gemma-2-9b-it; model is "
                   f"{model_name}")


def test_does_not_apply_without_the_corpus_file(tmp_path):
    ok, why = sae_bench_unlearning.applies("gemma-2-2b-it", "hpo")  # the embedded forget corpus
    assert not ok and "bio-forget-corpus.jsonl" in why and "hpo" in why
    missing = tmp_path / "bio-forget-corpus.jsonl"
    ok, why = sae_bench_unlearning.applies("gemma-2-2b-it", str(missing))
    assert not ok and why == f"forget corpus {missing} does not exist"
    other_name = write_corpus(tmp_path, name="my-bio.jsonl")  # right content, but not WMDP's file
    assert not sae_bench_unlearning.applies("gemma-2-2b-it", str(other_name))[0]
    (tmp_path / "bio-forget-corpus.jsonl").write_text("plain text, not json\n")
    ok, why = sae_bench_unlearning.applies("gemma-2-2b-it", str(tmp_path / "bio-forget-corpus.jsonl"))
    assert not ok and "'text' field" in why


def test_eval_config_from_sae_bench_tables():
    config = sae_bench_unlearning.eval_config("google/gemma-2-2b-it", "cpu")
    assert config.model_name == "gemma-2-2b-it"
    assert config.llm_batch_size == activation_collection.LLM_NAME_TO_BATCH_SIZE["gemma-2-2b-it"] // 8 == 4
    assert config.llm_dtype == activation_collection.LLM_NAME_TO_DTYPE["gemma-2-2b-it"] == "bfloat16"
    # SAE-Bench's sweep
    assert config.retain_thresholds == [0.001, 0.01] and config.multipliers == [25, 50, 100, 200]
    with pytest.raises(ValueError, match="smollm2"):
        sae_bench_unlearning.eval_config("smollm2-135m-instruct", "cpu")


def test_sae_bench_reads_the_corpus_in_place(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path)
    monkeypatch.setattr(feature_activation, "load_dataset",  # wikitext from the hub, in SAE-Bench
                        lambda *args, **kwargs: Dataset.from_dict({"text": RETAIN_TEXTS}))
    before = os.getcwd()
    work_dir = tmp_path / "work"
    with sae_bench_unlearning.forget_corpus_in_place(corpus, work_dir) as link:
        assert Path(os.getcwd()) == work_dir.resolve() and link.resolve() == corpus.resolve()
        forget, retain = feature_activation.get_forget_retain_data()
    assert forget == FORGET_TEXTS and retain == RETAIN_TEXTS[:1]
    assert os.getcwd() == before
    # A second run with another file re-points the link; the cwd is restored on an exception too.
    other = write_corpus(tmp_path / "work", texts=FORGET_TEXTS[:1], name="other.jsonl")
    with pytest.raises(RuntimeError, match="inside"):
        with sae_bench_unlearning.forget_corpus_in_place(other, work_dir):
            assert feature_activation.get_forget_retain_data()[0] == FORGET_TEXTS[:1]
            raise RuntimeError("inside")
    assert os.getcwd() == before


def small_sae() -> TopKSAE:
    """A SAE-Bench custom TopK SAE with unit-norm decoder rows, as load_and_format_sae requires."""
    sae = TopKSAE(d_in=16, d_sae=32, k=4, model_name="gemma-2-2b-it", hook_layer=12,
                  device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(32, 16), dim=1))
        sae.W_enc.copy_(sae.W_dec.T)
    return sae


def test_run_sae_bench_unlearning_wraps_run_eval(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path)
    work_dir = tmp_path / "sae_bench"
    artifacts_dir = work_dir / "artifacts" / "unlearning" / "gemma-2-2b-it" / "run_1_custom_sae"
    stale_file = artifacts_dir / "results" / "sparsities" / "feature_sparsity_forget.txt"  # an earlier SAE's
    stale_file.parent.mkdir(parents=True)
    stale_file.write_text("0.5\n")
    question_ids = work_dir / "artifacts" / "unlearning" / "gemma-2-2b-it" / "data" / "question_ids"
    question_ids.mkdir(parents=True)  # depends on the model only: kept
    sae = small_sae()
    calls = []

    def fake_run_eval(config, selected_saes, device, output_path, force_rerun=False, clean_up_artifacts=False,
                      artifacts_path="artifacts"):
        (sae_release, sae_object), = selected_saes
        calls.append(dict(config=config, sae_release=sae_release, sae=sae_object, device=device,
                          cwd=os.getcwd(), output_path=output_path, artifacts_path=artifacts_path,
                          stale=stale_file.exists(),
                          forget=feature_activation.get_forget_retain_data()[0]))
        os.makedirs(output_path, exist_ok=True)  # what run_eval does, in its order
        sae_id, formatted, _ = general_utils.load_and_format_sae(sae_release, sae_object, device)
        formatted.to(device=device, dtype=general_utils.str_to_dtype(config.llm_dtype))
        (Path(artifacts_path) / "unlearning" / config.model_name / f"{sae_release}_{sae_id}"
         / "results").mkdir(parents=True, exist_ok=True)
        output = UnlearningEvalOutput(
            eval_config=config, eval_id="test", datetime_epoch_millis=0,
            eval_result_metrics=UnlearningMetricCategories(
                unlearning=UnlearningMetrics(unlearning_score=0.25)),
            eval_result_details=[], sae_bench_commit_hash="test", sae_lens_id=sae_id,
            sae_lens_release_id=sae_release, sae_lens_version="test",
            sae_cfg_dict=formatted.cfg.to_dict())
        output.to_json_file(general_utils.get_results_filepath(output_path, sae_release, sae_id))
        return {f"{sae_release}_{sae_id}": output}

    monkeypatch.setattr(sae_bench_unlearning_main, "run_eval", fake_run_eval)
    monkeypatch.setattr(feature_activation, "load_dataset",
                        lambda *a, **k: Dataset.from_dict({"text": RETAIN_TEXTS}))
    before = os.getcwd()
    result = sae_bench_unlearning.run_sae_bench_unlearning(sae, "run_1", "google/gemma-2-2b-it", corpus,
                                                           "cpu", work_dir)
    (call,) = calls
    assert call["config"].model_name == "gemma-2-2b-it" and call["config"].llm_batch_size == 4
    assert (call["config"].llm_dtype == "bfloat16" and call["device"] == "cpu"
            and call["sae_release"] == "run_1")
    # SAE-Bench got a copy of the SAE with the same weights, and its cast to bfloat16 left the caller's
    # SAE alone.
    assert call["sae"] is not sae and torch.equal(call["sae"].W_dec, sae.W_dec.bfloat16())
    assert call["sae"].W_dec.dtype == torch.bfloat16 and sae.W_dec.dtype == torch.float32
    # During the call: the corpus was where SAE-Bench reads it, from work_dir; stale artifacts were gone.
    assert call["forget"] == FORGET_TEXTS and Path(call["cwd"]) == work_dir.resolve() and not call["stale"]
    assert os.getcwd() == before and question_ids.is_dir()
    assert Path(call["output_path"]).is_absolute() and Path(call["artifacts_path"]).is_absolute()
    # The result: SAE-Bench's output as written, JSON-safe, plus where things are.
    assert result["eval_type_id"] == "unlearning" and result["sae_lens_id"] == "custom_sae"
    assert result["eval_result_metrics"] == {"unlearning": {"unlearning_score": 0.25}}
    assert result["eval_config"]["model_name"] == "gemma-2-2b-it" and result["sae_cfg_dict"]["d_sae"] == 32
    assert Path(result["artifacts_dir"]) == artifacts_dir.resolve() and artifacts_dir.is_dir()
    assert (Path(result["results_file"])
            == work_dir.resolve() / "eval_results" / "run_1_custom_sae_eval_results.json")
    assert json.loads(json.dumps(result)) == result


def test_runner_records_why_sae_bench_did_not_run_and_runs_it_where_it_applies(tmp_path, monkeypatch):
    import experiment
    cfg = experiment.Config(cache_dir=str(tmp_path / "cache"), forget_corpus="hpo")
    out = tmp_path / "run_1"
    sae = object()  # a TopK SAE without group biases is handed over as it is
    assert experiment.evaluate_unlearning_with_sae_bench(cfg, out, sae, "smollm2-135m-instruct", "cpu") == {
        "ran": False,
        "reason": "SAE-Bench's unlearning eval supports only gemma-2-2b-it, gemma-2-9b-it; model is "
                  "smollm2-135m-instruct"}
    corpus = write_corpus(tmp_path)
    calls = []
    monkeypatch.setattr(sae_bench_unlearning, "run_sae_bench_unlearning",
                        lambda *args: calls.append(args)
                        or {"eval_result_metrics": {"unlearning": {"unlearning_score": 0.25}}})
    gemma = experiment.dataclasses.replace(cfg, forget_corpus=str(corpus))
    result = experiment.evaluate_unlearning_with_sae_bench(gemma, out, sae, "google/gemma-2-2b-it", "cpu")
    assert result["ran"] and result["eval_result_metrics"]["unlearning"]["unlearning_score"] == 0.25
    assert result["group_bias_edit"] == "held"
    (handed, name, model, corpus_arg, device, work_dir), = calls
    assert handed is sae and name.startswith("run_1-") and model == "google/gemma-2-2b-it"
    assert corpus_arg == corpus and work_dir == tmp_path / "cache" / "sae_bench_unlearning"


def test_runner_hands_sae_bench_the_same_edit_as_the_port(tmp_path, monkeypatch):
    """held: SAE-Bench's clamp runs on the plain TopK view (group-bias term left in its error term);
    relu: on the group-bias SAE itself."""
    import experiment
    sae = experiment.AutoEncoderTopK(8, 16, 2, group_biases=True)
    with torch.no_grad():
        sae.group_bias.normal_()
    sae.save(tmp_path / "sae", 1.0, {"model_name": "m", "hook_name": "blocks.0.hook_resid_post",
                                     "hook_layer": 0, "context_size": 16, "prepend_bos": True})
    saved = experiment.load_sae(tmp_path / "sae")
    calls = []
    monkeypatch.setattr(sae_bench_unlearning, "run_sae_bench_unlearning",
                        lambda *args: calls.append(args) or {})
    corpus = write_corpus(tmp_path)
    for edit in experiment.GROUP_BIAS_EDITS:
        cfg = experiment.Config(cache_dir=str(tmp_path / "cache"), forget_corpus=str(corpus),
                                unlearning_group_bias_edit=edit)
        experiment.evaluate_unlearning_with_sae_bench(cfg, tmp_path / "run_1", saved, "gemma-2-2b-it", "cpu")
    (held, *_), (relu, *_) = calls
    assert (type(held) is experiment.SinkSafeTopKSAE and torch.equal(held.W_dec, saved.W_dec)
            and torch.equal(held.b_dec, saved.b_dec))
    assert relu is saved
