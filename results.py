"""A run's final_info.json, flat: the one reading of its headline numbers that notes.txt and plot.py share,
and the one reading of a curve at a retain tolerance that the scores (unlearning.py) and the figures share."""
import variants

BELOW = "below_tolerance_at_every_multiplier"   # a lower bound: the curve never costs the tolerance
ABOVE = "above_tolerance_at_smallest_multiplier"


def tolerance_point(retain: list, tolerance: float) -> tuple:
    """Where a curve's retain ΔCE (ascending knobs) first reaches `tolerance`: (i, t, flag), the point
    (1 − t)·point_i + t·point_{i+1}, linear between the two bracketing knobs (no extrapolation).
    A curve that stays below gives its last point, flag BELOW; one already above at the smallest knob
    gives (None, None, ABOVE)."""
    if retain[0] > tolerance:
        return None, None, ABOVE
    for i in range(len(retain) - 1):
        if retain[i + 1] > tolerance:
            return i, (tolerance - retain[i]) / (retain[i + 1] - retain[i]), None
    return len(retain) - 1, 0.0, BELOW


def training_section(info: dict) -> dict:
    """The "training results for layer L" section (its name carries the layer)."""
    return next(v for k, v in info.items() if k.startswith("training results for layer"))


def absorption_fraction(info: dict):
    """SAE-Bench's mean absorption fraction, where the run measured one (None if off or refused)."""
    result = info.get("absorption evaluation results") or {}
    return result["eval_result_metrics"]["mean"]["mean_absorption_fraction_score"] \
        if "eval_result_metrics" in result else None


def held_out_lower_bound(scores: dict):
    """Whether the held-out score is only a lower bound (the curve's retain ΔCE stays below the tolerance
    on the report split at every multiplier up to the cap): the run's own flag, or for a run written
    before it, held_out.report.flag == BELOW (None without either)."""
    if "held_out_lower_bound" in scores:
        return scores["held_out_lower_bound"]
    report = (scores.get("held_out") or {}).get("report")
    return None if report is None else report.get("flag") == BELOW


def point(scores: dict, *path: str) -> dict:
    """scores[path[0]][path[1]]...: one score point {score, score_se, lower_bound, ...}; {} where a level is
    absent (a run written before it, a variant without it)."""
    for key in path:
        scores = (scores or {}).get(key)
    return scores or {}


def config_key(point: dict) -> str:
    """A sweep config's name, "<retain threshold>/<n features>"."""
    return f"{point['retain_threshold']:g}/{point['n_features']}"


def flatten(info: dict) -> dict:
    """{metric: value} for one run; None where the run has no such number (an eval that was off or refused, a
    field an older run did not write)."""
    training = training_section(info)
    cfg, train_info = training["config"], training["final_info"]
    core = info["core evaluation results"]["metrics"]
    rq = core["reconstruction_quality"]
    sep = info["knowledge separation results"]
    unlearning = info.get("unlearning evaluation results")
    scores = unlearning["eval_result_metrics"]["unlearning"] if unlearning else {}
    absorbed = info.get("absorption evaluation results")
    qa = unlearning["eval_result_metrics"].get("unlearning_question_answer_text") or {} if unlearning else {}
    report = point(scores, "held_out", "report")  # the static clamp's point on the report split
    conditional, trained = (point(scores, "conditional", g) for g in ("rate_groups", "trained_groups"))
    rates = unlearning["eval_result_details"]["firing_rates"] if unlearning else {"forget": {}, "retain": {}}
    rand, dom, leace = (point(scores, "controls", c)
                        for c in ("random_features", "difference_of_means", "leace"))
    return {
        "variant": sep["variant"],
        "alpha": sep["alpha"] if variants.applies(sep["variant"], "alpha") else None,
        "seed": cfg["seed"], "batch_size": cfg["batch_size"],
        "val_ev": train_info["val_explained_variance"], "conv_ev": rq["explained_variance_conventional"],
        "conv_ev_typical": rq.get("explained_variance_conventional_without_outliers"),
        "ce_loss_score": core["model_performance_preservation"]["ce_loss_score"],
        "kl_div_score": core["model_behavior_preservation"]["kl_div_score"], "l0": core["sparsity"]["l0"],
        "n_forget": sep["final"]["n_forget"], "n_retain": sep["final"]["n_retain"],
        "cross_cos": sep["final"]["cross_abs_cos_mean"], "cross_cos_max": sep["final"]["cross_abs_cos_max"],
        "kappa_forget": sep["final"]["kappa_forget"], "kappa_retain": sep["final"]["kappa_retain"],
        "nn_cos": sep["geometry"]["all"]["mean"] if "geometry" in sep else None,
        "absorption": absorption_fraction(info),
        "absorption_reason": absorbed.get("reason") if absorbed else None,
        "wall_min": info["provenance"]["wall_time_s"] / 60,
        "early_stop_step": sep["early_stopping"]["step"] if sep["early_stopping"]["stopped"] else None,
        "best_step": train_info["best_checkpoint_step"],
        "final_step_val_ev": sep.get("final_step", {}).get("val_explained_variance"),
        "has_unlearning": unlearning is not None,
        "held_out_score": scores.get("held_out_score"), "held_out_score_se": scores.get("held_out_score_se"),
        "held_out_lower_bound": held_out_lower_bound(scores),
        "conditional_score": conditional.get("score"), "conditional_score_se": conditional.get("score_se"),
        "conditional_lower_bound": conditional.get("lower_bound"),
        "conditional_auroc": conditional.get("detector_auroc_report"),
        "conditional_trained_score": trained.get("score"),
        "conditional_trained_lower_bound": trained.get("lower_bound"),
        # the report split's curves the scores are read on, [{knob, forget_delta_ce, retain_delta_ce}]:
        # None for a run written before they were recorded
        "held_out_curve": report.get("curve"),
        "conditional_curve": conditional.get("curve"),
        "retain_threshold": report.get("retain_threshold"),
        # the clamp multiplier each score is read at (where the report split's retain ΔCE meets the
        # tolerance; the largest run where the score is a lower bound)
        "held_out_knob": report.get("knob"),
        "conditional_knob": conditional.get("knob"),
        # every sweep config's point at the tolerance on the selection split, where no choice is made
        # between configs: {"<retain threshold>/<n features>": (score, lower bound)}
        "config_scores": {config_key(c): (c.get("score"), c.get("lower_bound"))
                          for c in scores.get("curves_at_tolerance") or ()},
        "random_score": rand.get("score"), "random_score_std": rand.get("score_std"),
        # how far ranking by forget rate beats random features drawn from the same eligible pool (the
        # retain threshold's); None where either is missing or a lower bound (their difference is no bound)
        "over_random_score": (scores["held_out_score"] - rand["score"]
                              if scores.get("held_out_score") is not None and rand.get("score") is not None
                              and not held_out_lower_bound(scores) and not rand.get("n_lower_bounds")
                              else None),
        "random_lower_bound": rand["n_lower_bounds"] > 0 if "n_lower_bounds" in rand else None,
        # latents by firing rate on the rate split's text: none on a side, retain rate < 0.001
        "silent_forget": rates["forget"].get("n_zero"), "silent_retain": rates["retain"].get("n_zero"),
        "retain_below_0.001": rates["retain"].get("n_below_0.001"),
        "dead_latents": train_info.get("final_dead_latents"),
        "dom_score": dom.get("score"), "dom_lower_bound": dom.get("lower_bound"),
        "leace_score": leace.get("score"), "leace_lower_bound": leace.get("lower_bound"),
        "ce_tolerance": scores.get("ce_tolerance"), "mcq": scores.get("unlearning_score"),
        "n_forget_questions": scores.get("n_forget_questions"),
        # the second text pair (question + answer text): None for a run written before it or skipped
        "qa_score": qa.get("held_out_score"), "qa_score_se": qa.get("held_out_score_se"),
        "qa_lower_bound": qa.get("held_out_lower_bound"), "qa_skipped": qa.get("skipped"),
        "qa_dom_score": point(qa, "controls", "difference_of_means").get("score"),
        "qa_dom_lower_bound": point(qa, "controls", "difference_of_means").get("lower_bound"),
        "qa_leace_score": point(qa, "controls", "leace").get("score"),
        "qa_leace_lower_bound": point(qa, "controls", "leace").get("lower_bound"),
    }
