"""Edits of the residual stream at the SAE's hook, for the unlearning evaluation (unlearning.py).

Every edit maps resid [B, L, d] to resid' and leaves the first position (BOS) alone.
- Clamp (SAE-Bench's `anthropic_clamp_resid_SAE_features`): f = sae.encode(resid) with f[:, 0] = 0,
  f' = f with each selected feature set to −multiplier where it is > 0, and
  resid' = (resid − sae.decode(f)) + sae.decode(f'): the SAE's error term is kept.
  A gated Clamp edits only positions t whose causal detector d_t (causal_detector) is >= the gate's
  threshold: the conditional clamp. Threshold 0 opens every position (d_t >= 0), the static clamp.
- ControlEdit: the same hook without an SAE (Controls), to say whether the SAE is needed at all.
  difference_of_means clamps the coordinate c = (resid − m)·û of the forget − retain mean direction û
  like a feature; leace moves resid toward its LEACE erasure (EleutherAI's concept-erasure).
"""
from typing import NamedTuple

import torch
from concept_erasure import LeaceEraser


class Clamp(NamedTuple):
    """Set `features` to −multiplier where they fire, at the positions the gate opens: gate None =
    every position (static); (detector name, threshold) = where that detector is >= threshold."""
    features: tuple
    multiplier: float
    gate: tuple = None


class ControlEdit(NamedTuple):
    """Controls' erasure `control` ("difference_of_means" | "leace") at `strength`."""
    control: str
    strength: float


CONTROLS = ("difference_of_means", "leace")


@torch.no_grad()
def encode_for_clamp(sae, resid: torch.Tensor):
    """(f with the first position zeroed, error term resid − decode(f)) for resid [B, L, d]."""
    f = sae.encode(resid)
    f[:, 0, :] = 0.0  # SAE-Bench: "We zero out the BOS token for all SAEs."
    return f, resid - sae.decode(f)


@torch.no_grad()
def clamp_from_codes(sae, f: torch.Tensor, error: torch.Tensor, features, multiplier: float,
                     gate: torch.Tensor = None):
    """(resid' = error + decode(f'), active [B, L]): f' = f with each selected feature set to
    −multiplier wherever it is > 0 and gate [B, L] (None: everywhere) is open; `active` marks the
    positions edited."""
    idx = torch.as_tensor(list(features), dtype=torch.long, device=f.device)
    sel = f[..., idx]
    on = sel > 0
    if gate is not None:
        on &= gate[..., None]
    f2 = f.clone()
    f2[..., idx] = torch.where(on, torch.full_like(sel, -float(multiplier)), sel)
    return error + sae.decode(f2), on.any(dim=-1)


@torch.no_grad()
def clamp_residual(sae, resid: torch.Tensor, features, multiplier: float):
    """The static clamp on resid [B, L, d]: (resid', active [B, L]). With no feature selected, resid is
    returned unchanged (SAE-Bench's hook returns None then)."""
    if len(features) == 0:
        return resid, torch.zeros(resid.shape[:2], dtype=torch.bool, device=resid.device)
    f, error = encode_for_clamp(sae, resid)
    return clamp_from_codes(sae, f, error, features, multiplier)


def clamp_hook(sae, features, multiplier: float):
    """A TransformerLens forward hook applying clamp_residual (for full-model runs: tests, benchmarks)."""
    def hook(resid, hook):
        return clamp_residual(sae, resid, features, multiplier)[0]
    return hook


def causal_detector(f: torch.Tensor, features) -> torch.Tensor:
    """d [B, L] from codes f [B, L, F] >= 0 (first position zeroed): s_j = Σ_{i∈D} f_ij / Σ_i f_ij, the
    share of position j's activation mass on the detector features D (0 where none fires), and
    d_t = (s_1 + … + s_t) / t, d_0 = 0: the mean over the context's prefix up to and including t, so
    no position's value depends on a later one."""
    idx = torch.as_tensor(list(features), dtype=torch.long, device=f.device)
    share = f[..., idx].sum(dim=-1) / f.sum(dim=-1).clamp_min(1e-12)
    share[:, 0] = 0.0
    count = torch.arange(f.shape[1], device=f.device).clamp_min(1)
    return share.cumsum(dim=1) / count


class Controls(NamedTuple):
    """Non-SAE erasures at the hook, fitted on labelled tokens (forget 1, retain 0).
    difference_of_means: û = (μ_f − μ_r)/‖μ_f − μ_r‖, m = (μ_f + μ_r)/2, c = (x − m)·û "fires" where
    c > 0 (x lies on the forget side of the midpoint), and the edit sets c to −strength there:
    x' = x − (c + strength)·û, the clamp of a feature whose decoder row is û.
    leace: x' = x − strength·(x − E(x)), E the LEACE eraser (strength 1 erases the concept)."""
    direction: torch.Tensor  # û [d]
    midpoint: torch.Tensor  # m [d]
    eraser: LeaceEraser

    def mask(self, control: str, resid: torch.Tensor) -> torch.Tensor:
        """[B, L] positions the control edits (never the first)."""
        if control == "difference_of_means":
            on = (resid - self.midpoint) @ self.direction > 0
        else:
            on = torch.ones(resid.shape[:2], dtype=torch.bool, device=resid.device)
        on[:, 0] = False
        return on

    def edit(self, control: str, strength: float, resid: torch.Tensor) -> torch.Tensor:
        """resid' [B, L, d], edited where mask(control, resid)."""
        on = self.mask(control, resid)[..., None]
        if control == "difference_of_means":
            c = ((resid - self.midpoint) @ self.direction)[..., None]
            delta = -(c + strength) * self.direction
        else:
            delta = -strength * (resid - self.eraser(resid.double()).to(resid.dtype))
        return resid + torch.where(on, delta, torch.zeros_like(delta))


def fit_controls(forget: torch.Tensor, retain: torch.Tensor) -> Controls:
    """Controls from forget [n_f, d] and retain [n_r, d] token residuals (float64 statistics)."""
    forget, retain = forget.double(), retain.double()
    mu_f, mu_r = forget.mean(dim=0), retain.mean(dim=0)
    direction = (mu_f - mu_r) / (mu_f - mu_r).norm()
    x = torch.cat([forget, retain])
    z = torch.cat([torch.ones(len(forget)), torch.zeros(len(retain))]).double()
    eraser = LeaceEraser.fit(x, z)
    dtype = torch.float32
    return Controls(direction.to(dtype), ((mu_f + mu_r) / 2).to(dtype), eraser)


class BatchEdits:
    """One batch's residual [B, L, d] under any edit; its SAE codes and detector values are computed
    once, at their first use. `valid` [B, L] marks the positions that count (not right padding)."""

    def __init__(self, sae, resid: torch.Tensor, valid: torch.Tensor, detectors: dict = None,
                 controls: Controls = None):
        self.sae, self.resid, self.valid = sae, resid, valid
        self.detectors, self.controls = detectors or {}, controls
        self._codes, self._detector = None, {}

    def codes(self):
        if self._codes is None:
            self._codes = encode_for_clamp(self.sae, self.resid)
        return self._codes

    def gate(self, gate) -> "torch.Tensor | None":
        """[B, L] positions a gate opens (None: all)."""
        if gate is None:
            return None
        name, threshold = gate
        if name not in self._detector:
            self._detector[name] = causal_detector(self.codes()[0], self.detectors[name])
        return self._detector[name] >= threshold

    def mask(self, edit) -> torch.Tensor:
        """[B, L] the valid positions `edit` changes."""
        if isinstance(edit, ControlEdit):
            return self.controls.mask(edit.control, self.resid) & self.valid
        f = self.codes()[0]
        on = (f[..., torch.as_tensor(edit.features, dtype=torch.long, device=f.device)] > 0).any(dim=-1)
        gate = self.gate(edit.gate)
        return on & self.valid if gate is None else on & gate & self.valid

    def apply(self, edit, rows: torch.Tensor) -> torch.Tensor:
        """resid' [n, L, d] of rows [n] under `edit`."""
        if isinstance(edit, ControlEdit):
            return self.controls.edit(edit.control, edit.strength, self.resid[rows])
        f, error = self.codes()
        gate = self.gate(edit.gate)
        return clamp_from_codes(self.sae, f[rows], error[rows], edit.features, edit.multiplier,
                                None if gate is None else gate[rows])[0]
