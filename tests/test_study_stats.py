"""study_stats.pooled_contrasts: a hand-worked table, the OLS cross-check, shared seeds, errors,
and a planted effect."""
import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats

from study_stats import pooled_contrasts

# 3 variants x 4 seeds, worked by hand below.
TABLE = {
    "A": {1: 10, 2: 12, 3: 11, 4: 15},
    "B": {1: 12, 2: 15, 3: 13, 4: 16},
    "C": {1: 9, 2: 11, 3: 12, 4: 12},
}
CONTRASTS = [("B", "A"), ("A", "C"), ("B", "C")]


def test_hand_worked_table():
    # Variant means: A 48/4 = 12, B 56/4 = 14, C 44/4 = 11.
    # Seed means: (10+12+9)/3 = 31/3, (12+15+11)/3 = 38/3, (11+13+12)/3 = 12, (15+16+12)/3 = 43/3.
    # Grand mean: 148/12 = 37/3.
    # Residuals e_vs = y_vs - ybar_v - ybar_s + ybar:
    #   A: 10-12-31/3+37/3 = 0   12-12-38/3+37/3 = -1/3   11-12-12+37/3 = -2/3   15-12-43/3+37/3 = 1
    #   B: 12-14-31/3+37/3 = 0   15-14-38/3+37/3 = 2/3    13-14-12+37/3 = -2/3   16-14-43/3+37/3 = 0
    #   C:  9-11-31/3+37/3 = 0   11-11-38/3+37/3 = -1/3   12-11-12+37/3 = 4/3   12-11-43/3+37/3 = -1
    # (every row and column of e sums to 0.)
    resid = [[0, -1 / 3, -2 / 3, 1], [0, 2 / 3, -2 / 3, 0], [0, -1 / 3, 4 / 3, -1]]
    sum_sq = sum(e * e for row in resid for e in row)          # (14 + 8 + 26) / 9 = 48/9 = 16/3
    assert sum_sq == pytest.approx(16 / 3)
    df = (3 - 1) * (4 - 1)                                      # 6
    s2 = (16 / 3) / df                                          # 8/9
    se = (2 * s2 / 4) ** 0.5                                    # sqrt(4/9) = 2/3
    assert se == pytest.approx(2 / 3)
    # Estimates: B-A = 2, A-C = 1, B-C = 3 -> t = 3, 1.5, 4.5.
    est = [2.0, 1.0, 3.0]
    t = [e / se for e in est]
    assert t == pytest.approx([3.0, 1.5, 4.5])
    p = [2 * stats.t.sf(abs(x), df) for x in t]                 # ~0.0240, ~0.184, ~0.0041
    # Holm by hand: ascending order is B-C (i=0), B-A (i=1), A-C (i=2); multiply by m - i = 3, 2, 1,
    # then a running max and a cap at 1.
    holm_sorted = [3 * p[2], 2 * p[0], 1 * p[1]]
    holm_sorted = [min(1.0, max(holm_sorted[:i + 1])) for i in range(3)]
    p_holm = [holm_sorted[1], holm_sorted[2], holm_sorted[0]]   # back to B-A, A-C, B-C
    assert p_holm == pytest.approx([0.0480, 0.1843, 0.0123], abs=5e-4)
    t_crit = stats.t.ppf(0.975, df)                             # ~2.4469

    out = pooled_contrasts(TABLE, CONTRASTS)
    assert out["n_seeds"] == 4 and out["seeds"] == [1, 2, 3, 4]
    assert out["variants"] == ["A", "B", "C"]
    assert out["df"] == 6
    assert out["residual_variance"] == pytest.approx(8 / 9)
    assert out["se"] == pytest.approx(2 / 3)
    for row, (a, b), e, ti, pi, phi in zip(out["contrasts"], CONTRASTS, est, t, p, p_holm):
        assert (row["a"], row["b"]) == (a, b)
        assert row["estimate"] == pytest.approx(e)
        assert row["se"] == pytest.approx(2 / 3)
        assert row["t"] == pytest.approx(ti)
        assert row["p"] == pytest.approx(pi)
        assert row["p_holm"] == pytest.approx(phi)
        assert row["ci95"] == pytest.approx([e - t_crit * 2 / 3, e + t_crit * 2 / 3])
        assert row["significant"] == (phi < 0.05)
    assert [r["significant"] for r in out["contrasts"]] == [True, False, True]


def _ols(table):
    rows = [{"variant": v, "seed": s, "score": y} for v, d in table.items() for s, y in d.items()]
    return smf.ols("score ~ C(variant) + C(seed)", data=pd.DataFrame(rows)).fit()


def test_matches_statsmodels_ols():
    rng = np.random.default_rng(0)
    table = {v: {s: float(rng.normal(loc=i, scale=1.0)) + 0.5 * s for s in range(5)}
             for i, v in enumerate(["topk", "adaptive_alpha0.1", "adaptive_alpha0.3", "ortho"])}
    contrasts = [("adaptive_alpha0.1", "topk"), ("adaptive_alpha0.3", "ortho")]
    out = pooled_contrasts(table, contrasts)
    res = _ols(table)
    assert out["residual_variance"] == pytest.approx(res.scale)
    assert out["df"] == res.df_resid == 12
    names = list(res.params.index)
    for row in out["contrasts"]:
        # Treatment coding: the reference level (alphabetically first) has coefficient 0.
        c = np.zeros(len(names))
        for v, sign in ((row["a"], 1.0), (row["b"], -1.0)):
            name = f"C(variant)[T.{v}]"
            if name in names:
                c[names.index(name)] = sign
        tt = res.t_test(c)
        assert row["estimate"] == pytest.approx(float(np.squeeze(tt.effect)))
        assert row["se"] == pytest.approx(float(np.squeeze(tt.sd)))
        assert row["t"] == pytest.approx(float(np.squeeze(tt.tvalue)))
        assert row["p"] == pytest.approx(float(np.squeeze(tt.pvalue)))
        assert row["ci95"] == pytest.approx(list(np.squeeze(tt.conf_int(alpha=0.05))))


def test_only_shared_seeds():
    table = {v: dict(d) for v, d in TABLE.items()}
    table["D"] = {1: 10.0, 2: 13.0, 3: 12.5}                     # no seed 4
    out = pooled_contrasts(table, CONTRASTS)
    assert out["n_seeds"] == 3 and out["seeds"] == [1, 2, 3]
    assert out["df"] == (4 - 1) * (3 - 1)
    restricted = {v: {s: d[s] for s in (1, 2, 3)} for v, d in table.items()}
    assert out == pooled_contrasts(restricted, CONTRASTS)
    # A's seed-4 score must not matter once D lacks seed 4.
    table["A"][4] = 1000.0
    assert pooled_contrasts(table, CONTRASTS) == out

    table["E"] = {1: 3.0, 7: 4.0}                                # shares only seed 1
    with pytest.raises(ValueError, match="E"):
        pooled_contrasts(table, CONTRASTS)
    with pytest.raises(ValueError):
        pooled_contrasts({"A": TABLE["A"]}, [])                  # one variant


def test_unknown_variant_raises():
    with pytest.raises(ValueError, match="Z"):
        pooled_contrasts(TABLE, [("B", "A"), ("Z", "A")])


def test_planted_effect():
    rng = np.random.default_rng(1)
    seeds = range(6)
    seed_effect = {s: float(rng.normal(scale=10.0)) for s in seeds}
    variant_effect = {"A": 0.0, "B": 1.0, "C": 0.0}
    table = {v: {s: 5.0 + seed_effect[s] + eff + float(rng.normal(scale=0.1)) for s in seeds}
             for v, eff in variant_effect.items()}
    out = pooled_contrasts(table, [("B", "A"), ("A", "C")])
    planted, null = out["contrasts"]
    assert planted["significant"] and planted["p_holm"] < 1e-6
    assert planted["ci95"][0] < 1.0 < planted["ci95"][1]
    assert not null["significant"] and null["p_holm"] >= 0.05
    assert null["ci95"][0] < 0.0 < null["ci95"][1]
