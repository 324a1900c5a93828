"""The study's pre-registered test: pooled-variance contrasts between SAE variants, Holm-corrected.

Each variant v is trained at the same seeds s, so a score y_vs sits in a V x S table (seeds pair
runs). The model is two-way additive with fixed effects and no interaction,

    y_vs = mu + alpha_v + beta_s + e_vs,    e_vs ~ N(0, sigma^2) independent,

fitted by ordinary least squares on the complete table formed by the seeds that every variant has.
For a complete table the fit is closed form:

    fitted_vs = ybar_v. + ybar_.s - ybar_..         (variant mean + seed mean - grand mean)
    e_vs      = y_vs - fitted_vs
    s^2       = sum_vs e_vs^2 / df,   df = (V - 1)(S - 1)

A contrast a - b is estimated by the difference of the two variant means (the seed effects cancel,
as both means are over the same seeds), with

    SE  = sqrt(2 s^2 / S),   t = estimate / SE,   p = 2 P(T_df > |t|),
    CI95 = estimate +- t_{0.975, df} SE,

and the family of contrasts is corrected with Holm's step-down method (statsmodels multipletests).
This equals the OLS fit of score ~ C(variant) + C(seed) and its t-test of the difference of the two
variant coefficients; tests/test_study_stats.py checks that.

A non-SAE control (difference of means, LEACE) does not depend on the SAE or the seed: one number c.
A variant minus c cannot be paired by seed, and the seed effects do not cancel, so it is tested
against the variant's own spread over seeds (one-sample t):

    SE = sd_s(y_vs) / sqrt(S),   t = (ybar_v. - c) / SE,   df = S - 1.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests

ALPHA = 0.05


def _shared_seeds(table: dict[str, dict[int, float]]) -> list[int]:
    """The seeds every variant in the table has, sorted."""
    seed_sets = [set(scores) for scores in table.values()]
    return sorted(set.intersection(*seed_sets)) if seed_sets else []


def pooled_contrasts(table: dict[str, dict[int, float]],
                     contrasts: list[tuple[str, str]]) -> dict:
    """Fit score ~ variant + seed on the complete variant x shared-seed table; test each contrast.

    table maps variant -> {seed: score}; only the seeds shared by all variants are used. contrasts
    is a list of (a, b) pairs, each meaning mean(a) - mean(b). Returns

        {"n_seeds", "seeds", "variants", "df", "residual_variance", "se",
         "contrasts": [{"a", "b", "estimate", "se", "t", "p", "p_holm", "ci95": [lo, hi],
                        "significant": p_holm < 0.05}, ...]}

    where se = sqrt(2 s^2 / S) is common to all contrasts, p is two-sided on df = (V-1)(S-1)
    degrees of freedom and p_holm is Holm's step-down adjustment over the given contrasts.
    Raises ValueError for fewer than 2 variants or 2 shared seeds, a contrast naming a variant not
    in the table, or a zero residual variance (an exactly additive table leaves nothing to test).
    """
    variants = list(table)
    seeds = _shared_seeds(table)
    if len(variants) < 2 or len(seeds) < 2:
        raise ValueError(
            f"need >= 2 variants sharing >= 2 seeds; variants {variants} share seeds {seeds} "
            f"(seeds per variant: { {v: sorted(table[v]) for v in variants} })")
    for a, b in contrasts:
        unknown = [v for v in (a, b) if v not in table]
        if unknown:
            raise ValueError(f"contrast {a} - {b} names {unknown}, not in variants {variants}")

    y = np.array([[float(table[v][s]) for s in seeds] for v in variants])  # V x S
    V, S = y.shape
    variant_mean = y.mean(axis=1)
    seed_mean = y.mean(axis=0)
    grand_mean = y.mean()
    resid = y - variant_mean[:, None] - seed_mean[None, :] + grand_mean
    df = (V - 1) * (S - 1)
    s2 = float((resid ** 2).sum() / df)
    if not s2 > 0:
        raise ValueError(f"residual variance is {s2}: the table is exactly additive, no test")
    se = math.sqrt(2 * s2 / S)
    t_crit = float(stats.t.ppf(0.975, df))

    index = {v: i for i, v in enumerate(variants)}
    rows = []
    for a, b in contrasts:
        est = float(variant_mean[index[a]] - variant_mean[index[b]])
        t = est / se
        rows.append({"a": a, "b": b, "estimate": est, "se": se, "t": t, "df": df,
                     "p": float(2 * stats.t.sf(abs(t), df)),
                     "ci95": [est - t_crit * se, est + t_crit * se]})
    holm(rows)
    return {"n_seeds": S, "seeds": seeds, "variants": variants, "df": df,
            "residual_variance": s2, "se": se, "contrasts": rows}


def ci95(values: list):
    """(mean, half-width of its 95% CI, n) of per-seed values: t_{0.975, n-1} s / sqrt(n), s the sample
    std; half None for one value; None for none."""
    if not values:
        return None
    half = (float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))
            if len(values) > 1 else None)
    return float(np.mean(values)), half, len(values)


def holm(rows: list[dict]) -> list[dict]:
    """Adds p_holm (Holm's step-down adjustment of the rows' p over the whole list) and significant
    (p_holm < 0.05) to each row, in place."""
    if rows:
        p_holm = multipletests([r["p"] for r in rows], method="holm")[1]
        for r, ph in zip(rows, p_holm):
            r["p_holm"] = float(ph)
            r["significant"] = bool(ph < ALPHA)
    return rows


def constant_contrast(a: str, scores: dict[int, float], b: str, constant: float) -> dict:
    """mean(scores) - constant, a one-sample t-test over the seeds (see the module docstring); the
    row has pooled_contrasts' fields, df included."""
    y = np.array(list(scores.values()), dtype=float)
    if len(y) < 2:
        raise ValueError(f"{a} - {b}: need >= 2 seeds, got {len(y)}")
    df = len(y) - 1
    est, se = float(y.mean() - constant), float(y.std(ddof=1) / math.sqrt(len(y)))
    t = est / se
    half = float(stats.t.ppf(0.975, df)) * se
    return {"a": a, "b": b, "estimate": est, "se": se, "t": t, "df": df,
            "p": float(2 * stats.t.sf(abs(t), df)), "ci95": [est - half, est + half]}
