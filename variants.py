"""The variants, in one table: what each one's loss is, whether it groups features, and which of the
variant-specific options it reads. experiment.py (make_ortho, validate, the recorded config, the notes),
plot.py, results.py and bench/ read this table; nothing else decides what a variant means. A module of
its own, without torch, so that plot.py and results.py can read it without loading a model stack.

Loss of every variant: L = L_recon + auxk_alpha·L_auxk + λ·L_ortho, with L_ortho:
- topk: none (λ = 0);
- fixed_ortho: mean over cross-group pairs (f ∈ F, r ∈ R) of (w_f·w_r)², λ = lambda2_max from step 0;
- allpairs_ortho: mean over features i of max_j≠i (w_i·w_j)², λ = allpairs_lambda2, no groups;
- adaptive_ortho: mean over cross-group pairs of (w_f·w_r − α·P_fr)² (partner target; P the matched
  partners' signs) or relu(|w_f·w_r| − α)² (hinge), λ(t) = lambda2_max·min(1, t/t0).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    loss: str                     # the orthogonality term, in words
    grouped: bool                 # its loss acts on the forget/retain groups: group decoder biases
                                  # (unless --group_biases=false) and κ early stopping
    lambda_field: "str | None"    # the Config field that holds the weight of its term
    options: tuple = ()           # the variant-specific Config fields it reads


GROUP_OPTIONS = ("group_biases", "kappa_max", "kappa_patience")
VARIANTS = {
    "topk": Variant("none: the plain TopK SAE", False, None),
    "fixed_ortho": Variant("cross-group (w_f·w_r)², α = 0, λ2 = lambda2_max from step 0", True,
                           "lambda2_max", ("lambda2_max", *GROUP_OPTIONS)),
    "allpairs_ortho": Variant("every feature's largest cos² to another feature (OrtSAE), no groups",
                              False, "allpairs_lambda2", ("allpairs_lambda2",)),
    "adaptive_ortho": Variant("cross-group (w_f·w_r − α·P)² (or the hinge), λ2 ramped over t0", True,
                              "lambda2_max", ("alpha", "ortho_target", "lambda2_max", "t0", *GROUP_OPTIONS)),
}
# the fields some variant ignores: a run records them only where its variant reads them
OPTIONS = tuple(dict.fromkeys(o for v in VARIANTS.values() for o in v.options))


def ignored(variant: str) -> tuple:
    """The variant-specific fields `variant` does not read."""
    return tuple(o for o in OPTIONS if o not in VARIANTS[variant].options)


def applies(variant: str, option: str) -> bool:
    """Whether `variant` reads `option`: every option but the variant-specific ones others own."""
    return option not in OPTIONS or option in VARIANTS[variant].options
