"""Preference losses as pure functions in one registry.

Every loss maps the summed response log-probs of each pair (policy, and reference where the
loss has one) plus the response token counts to per-pair losses [N]. Callers use two
entry points:

* :func:`preference_losses` — one named loss, per pair;
* :func:`compute_preference_loss` — a weighted mixture of named losses (TRL's
  ``loss_type: [..]`` / ``loss_weights``) plus ``pref_ftx`` (an SFT term on the chosen
  response, LLaMA-Factory), with the implicit rewards TRL logs.

Online DPO, offline DPO and the parity tests all go through these, so every loss is
computed one way. Notation in the docstrings: ``dc = chosen - ref_chosen``,
``dr = rejected - ref_rejected`` (log-ratios), ``h = dc - dr``, ``ac = chosen / |y_c|``,
``ar = rejected / |y_r|`` (length-normalised log-probs), ``b`` = beta, ``e`` =
label_smoothing, ``sigma`` the logistic function.

Batch-coupled losses (``aot``, ``aot_unpaired``, ``kto_pair``, ``sft``) read the other pairs
of the same call (sorting, batch means); callers pass only real pairs (no padding rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    """Summed response log-probs [N] of each pair; the reference's are absent for reference-free losses."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    """[N] response tokens of the chosen response (> 0)."""
    rejected_tokens: torch.Tensor
    ref_chosen: Optional[torch.Tensor] = None
    ref_rejected: Optional[torch.Tensor] = None
    chosen_wpo: Optional[torch.Tensor] = None
    """[N] WPO's aligned log-prob of the chosen response under the policy (``use_weighting``; detached)."""
    rejected_wpo: Optional[torch.Tensor] = None

    def select(self, index: torch.Tensor) -> "PairLogps":
        """The pairs at ``index``."""
        return PairLogps(**{k: None if v is None else v[index] for k, v in vars(self).items()})

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen is not None and self.ref_rejected is not None

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected

    @property
    def margin(self) -> torch.Tensor:
        """h = (chosen - rejected) - (ref_chosen - ref_rejected)."""
        return self.chosen_logratios - self.rejected_logratios

    @property
    def chosen_mean(self) -> torch.Tensor:
        return self.chosen / self.chosen_tokens

    @property
    def rejected_mean(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens


@dataclass(frozen=True)
class LossOptions:
    """Hyper-parameters the losses read (each loss reads only its own)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    use_weighting: bool = False
    ld_alpha: Optional[float] = None
    """LD-DPO: weight of the response tokens beyond the pair's shared length in every summed log-prob (policy
    and reference; ``None`` = plain sums). Applied where the log-probs are summed (the workers), not here."""


LossFn = Callable[[PairLogps, LossOptions], torch.Tensor]


@dataclass(frozen=True)
class LossInfo:
    """One registered loss and what it needs."""

    fn: LossFn
    needs_reference: bool = True
    uses_label_smoothing: bool = False
    batch_coupled: bool = False
    source: str = "TRL"
    f_divergence: bool = False
    """Reads the log-ratios only through :func:`f_divergence_scores` (so takes any ``f_divergence_type``)."""


#: f-DPO's divergences (Wang et al. 2023, arXiv:2309.16240), TRL's ``f_divergence_type`` values.
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_scores(lp: "PairLogps", o: "LossOptions") -> tuple[torch.Tensor, torch.Tensor]:
    """f'(u) at the chosen and the rejected response, u = pi / pi_ref (f-DPO, arXiv:2309.16240, Theorem 1; as
    TRL 1.16 computes it): the scores whose difference the DPO-style losses compare instead of dc - dr.

    reverse_kl: log u (DPO); forward_kl: 1 - 1/u; js_divergence: log(2u / (1 + u)); alpha_divergence with
    a = ``f_alpha_divergence_coef``: (u^(a-1) - 1) / (a-1), log u at a = 1 (its exponent capped at 80, as TRL).
    """
    dc, dr = lp.chosen_logratios, lp.rejected_logratios
    kind = o.f_divergence_type
    if kind == "reverse_kl":
        return dc, dr
    if kind == "forward_kl":
        return 1 - torch.exp(-dc), 1 - torch.exp(-dr)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(dc), math.log(2) + F.logsigmoid(dr)
    if kind == "alpha_divergence":
        a = o.f_alpha_divergence_coef
        if abs(a - 1.0) < 1e-6:
            return dc, dr
        return tuple(torch.expm1(((a - 1.0) * d).clamp(max=80.0)) / (a - 1.0) for d in (dc, dr))
    raise ValueError(f"unknown algorithm.f_divergence_type {kind!r}; use one of {F_DIVERGENCES}")


def f_divergence_problem(kind: str, loss_names: Sequence[str]) -> str:
    """Why ``algorithm.f_divergence_type`` = ``kind`` cannot go with ``loss_names`` (``""`` when it can)."""
    if kind not in F_DIVERGENCES:
        return f"algorithm.f_divergence_type={kind!r} is unknown; use one of {F_DIVERGENCES}"
    unsupported = [name for name in loss_names if name in LOSSES and not LOSSES[name].f_divergence]
    if kind != "reverse_kl" and loss_names and all(name == "sft" for name in loss_names):
        return (f"algorithm.f_divergence_type={kind!r} has no effect on algorithm.loss_type sft (it reads no "
                "log-ratio); keep reverse_kl")
    if kind != "reverse_kl" and unsupported:
        supported = sorted(n for n, info in LOSSES.items() if info.f_divergence)
        return (f"algorithm.f_divergence_type={kind!r} does not apply to algorithm.loss_type {unsupported} (no "
                f"f-divergence form); use it with {supported}, or keep reverse_kl")
    return ""


def ld_alpha_problem(ld_alpha: Optional[float]) -> str:
    """Why ``algorithm.ld_alpha`` is not a weight (``""`` when it is one, or null)."""
    if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
        return f"algorithm.ld_alpha={ld_alpha} must be in [0, 1] (1 = plain DPO) or null"
    return ""


def _score_margin(lp: "PairLogps", o: "LossOptions") -> torch.Tensor:
    """The chosen-minus-rejected score under ``o.f_divergence_type`` (``lp.margin`` for DPO's reverse KL)."""
    if o.f_divergence_type == "reverse_kl":
        return lp.margin
    chosen, rejected = f_divergence_scores(lp, o)
    return chosen - rejected


def _smoothed_sigmoid(logits: torch.Tensor, e: float) -> torch.Tensor:
    return -(1 - e) * F.logsigmoid(logits) - e * F.logsigmoid(-logits)


def sigmoid(lp: PairLogps, o: LossOptions) -> torch.Tensor:
    """DPO, Rafailov et al. 2023 (arXiv:2305.18290) eq. 7: -log sigma(b h).

    With e > 0, conservative DPO (Mitchell 2023): -(1-e) log sigma(b h) - e log sigma(-b h).
    """
    return _smoothed_sigmoid(o.beta * _score_margin(lp, o), o.label_smoothing)


def hinge(lp: PairLogps, o: LossOptions) -> torch.Tensor:
    """SLiC-HF, Zhao et al. 2023 (arXiv:2305.10425): max(0, 1 - b h)."""
    return torch.relu(1 - o.beta * _score_margin(lp, o))


def ipo(lp: PairLogps, o: LossOptions) -> torch.Tensor:
    """IPO, Azar et al. 2023 (arXiv:2310.12036) eq. 17: (h' - 1/(2b))^2, h' on length-averaged log-ratios."""
    chosen, rejected = f_divergence_scores(lp, o)
    h = chosen / lp.chosen_tokens - rejected / lp.rejected_tokens
    return (h - 1 / (2 * o.beta)) ** 2


def exo_pair(lp: PairLogps, o: LossOptions) -> torch.Tensor:
    """EXO, Ji et al. 2024 (arXiv:2402.00856) eq. 16: KL(softmax(b [dc, dr]) || [1-e, e]); needs e > 0."""
    if o.label_smoothing <= 0:
        raise ValueError("exo_pair needs algorithm.label_smoothing > 0 (the paper suggests 1e-3)")
    logits = o.beta * _score_margin(lp, o)
    e = torch.tensor(o.label_smoothing, dtype=logits.dtype, device=logits.device)
    return (torch.sigmoid(logits) * (F.logsigmoid(logits) - torch.log1p(-e))
            + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - torch.log(e)))


def nca_pair(lp: PairLogps, o: LossOptions) -> torch.Tensor:
    """NCA, Chen et al. 2024 (arXiv:2402.05369): -log sigma(b dc) - 1/2 log sigma(-b dc) - 1/2 log sigma(-b dr)."""
    rc, rr = o.beta * lp.chosen_logratios, o.beta * lp.rejected_logratios
    return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)


def robust(lp: PairLogps, o: LossOptions) -> torch.Tensor:
    """Robust DPO, Chowdhury et al. 2024 (arXiv:2403.00409) eq. 9, e = label flip rate in [0, 0.5):

    ((1-e)(-log sigma(b h)) - e(-log sigma(-b h))) / (1 - 2e).
    """
    logits, e = o.beta * _score_margin(lp, o), o.label_smoothing
    return (-(1 - e) * F.logsigmoid(logits) + e * F.logsigmoid(-logits)) / (1 - 2 * e)


def bco_pair(lp: PairLogps, o: LossOptions) -> torch.Tensor:
    """BCO, Jung et al. 2024 (arXiv:2404.04656), paired form: -log sigma(b dc) - log sigma(-b dr)."""
    return -F.logsigmoid(o.beta * lp.chosen_logratios) - F.logsigmoid(-o.beta * lp.rejected_logratios)


def sppo_hard(lp: PairLogps, o: LossOptions) -> torch.Tensor:
    """SPPO, Wu et al. 2024 (arXiv:2405.00675) eq. 4.7 with hard win probability 1/0:
    (dc - 1/(2b))^2 + (dr + 1/(2b))^2."""
    return (lp.chosen_logratios - 0.5 / o.beta) ** 2 + (lp.rejected_logratios + 0.5 / o.beta) ** 2


def aot(lp: PairLogps, o: LossOptions) -> torch.Tensor:
    """AOT paired, Melnyk et al. 2024 (arXiv:2406.05882): smoothed sigmoid of b (sort(c - r) - sort(rc - rr))
    over the batch (stochastic dominance of the policy's margins over the reference's)."""
    delta = torch.sort(lp.chosen - lp.rejected, dim=0).values - torch.sort(lp.ref_chosen - lp.ref_rejected, dim=0).values
    return _smoothed_sigmoid(o.beta * delta, o.label_smoothing)


def aot_unpaired(lp: PairLogps, o: LossOptions) -> torch.Tensor:
    """AOT unpaired, Melnyk et al. 2024 (arXiv:2406.05882): smoothed sigmoid of b (sort(dc) - sort(dr))."""
    delta = torch.sort(lp.chosen_logratios, dim=0).values - torch.sort(lp.rejected_logratios, dim=0).values
    return _smoothed_sigmoid(o.beta * delta, o.label_smoothing)


def apo_zero(lp: PairLogps, o: LossOptions) -> torch.Tensor:
    """APO-zero, D'Oosterlinck et al. 2024 (arXiv:2408.06266) eq. 7: 1 - sigma(b dc) + sigma(b dr)."""
    return 1 - torch.sigmoid(o.beta * lp.chosen_logratios) + torch.sigmoid(o.beta * lp.rejected_logratios)


def apo_down(lp: PairLogps, o: LossOptions) -> torch.Tensor:
    """APO-down, D'Oosterlinck et al. 2024 (arXiv:2408.06266) eq. 8: sigma(b dc) + 1 - sigma(b h)."""
    return torch.sigmoid(o.beta * lp.chosen_logratios) + 1 - torch.sigmoid(o.beta * lp.margin)


def discopop(lp: PairLogps, o: LossOptions) -> torch.Tensor:
    """DiscoPOP, Chris Lu et al. 2024 (arXiv:2406.08414) eq. 5, x = b h, m = sigma(x / tau):
    -log sigma(x) (1 - m) + exp(-x) m.

    ``exp(-x) m`` is evaluated as ``exp(-x + log sigma(x / tau))`` so a very negative x gives a
    large finite value instead of inf x 0.
    """
    x = o.beta * _score_margin(lp, o)
    modulation = torch.sigmoid(x / o.discopop_tau)
    return -F.logsigmoid(x) * (1 - modulation) + torch.exp(-x + F.logsigmoid(x / o.discopop_tau))


def sft(lp: PairLogps, o: LossOptions) -> torch.Tensor:  # noqa: ARG001
    """Negative log-likelihood of the chosen responses, token-averaged over the batch (as TRL's ``sft``):
    every pair carries -sum(chosen) / sum(|y_c|), so the batch mean is that value."""
    value = -lp.chosen.sum() / lp.chosen_tokens.sum()
    return value.expand(lp.chosen.shape[0])


def sigmoid_norm(lp: PairLogps, o: LossOptions) -> torch.Tensor:
    """Length-normalised DPO (as TRL's ``sigmoid_norm``): -log sigma(b (dc/|y_c| - dr/|y_r|))."""
    chosen, rejected = f_divergence_scores(lp, o)
    h = chosen / lp.chosen_tokens - rejected / lp.rejected_tokens
    return -F.logsigmoid(o.beta * h)


def kto_pair(lp: PairLogps, o: LossOptions) -> torch.Tensor:
    """KTO on pairs, Ethayarajh et al. 2024 (arXiv:2402.01306) / HALOs eq. 7, as LLaMA-Factory runs it
    (TRL <= 0.8's ``kto_pair``). With batch KL estimates z_c = max(0, mean dc), z_r = max(0, mean dr):
    ((1 - sigma(b (dc - z_r))) + (1 - sigma(b (z_c - dr)))) / 2 — the mean of TRL's 2N-row loss."""
    dc, dr = lp.chosen_logratios, lp.rejected_logratios
    chosen_kl, rejected_kl = dc.mean().clamp(min=0), dr.mean().clamp(min=0)
    return 0.5 * ((1 - torch.sigmoid(o.beta * (dc - rejected_kl))) + (1 - torch.sigmoid(o.beta * (chosen_kl - dr))))


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x (Maechler 2012)."""
    x = x.clamp(max=-1e-12)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo(lp: PairLogps, o: LossOptions) -> torch.Tensor:
    """ORPO, Hong et al. 2024 (arXiv:2403.07691) eq. 6-7, reference-free, as LLaMA-Factory runs it:
    -ac + b (-log sigma(log odds(y_c) - log odds(y_r))), odds(y) = p / (1 - p) with log p = a."""
    ac, ar = lp.chosen_mean, lp.rejected_mean
    log_odds = (ac - ar) - (_log1m_exp(ac) - _log1m_exp(ar))
    return -ac - o.beta * F.logsigmoid(log_odds)


def simpo(lp: PairLogps, o: LossOptions) -> torch.Tensor:
    """SimPO, Meng et al. 2024 (arXiv:2405.14734) eq. 6, reference-free: -log sigma(b (ac - ar) - gamma)."""
    return -F.logsigmoid(o.beta * (lp.chosen_mean - lp.rejected_mean) - o.simpo_gamma)


LOSSES: dict[str, LossInfo] = {
    "sigmoid": LossInfo(sigmoid, uses_label_smoothing=True, f_divergence=True),
    "hinge": LossInfo(hinge, f_divergence=True),
    "ipo": LossInfo(ipo, f_divergence=True),
    "exo_pair": LossInfo(exo_pair, uses_label_smoothing=True, f_divergence=True),
    "nca_pair": LossInfo(nca_pair),
    "robust": LossInfo(robust, uses_label_smoothing=True, f_divergence=True),
    "bco_pair": LossInfo(bco_pair),
    "sppo_hard": LossInfo(sppo_hard),
    "aot": LossInfo(aot, uses_label_smoothing=True, batch_coupled=True),
    "aot_unpaired": LossInfo(aot_unpaired, uses_label_smoothing=True, batch_coupled=True),
    "apo_zero": LossInfo(apo_zero),
    "apo_down": LossInfo(apo_down),
    "discopop": LossInfo(discopop, f_divergence=True),
    "sft": LossInfo(sft, needs_reference=False, batch_coupled=True, f_divergence=True),
    "sigmoid_norm": LossInfo(sigmoid_norm, f_divergence=True),
    "kto_pair": LossInfo(kto_pair, batch_coupled=True, source="LLaMA-Factory"),
    "orpo": LossInfo(orpo, needs_reference=False, source="LLaMA-Factory"),
    "simpo": LossInfo(simpo, needs_reference=False, source="LLaMA-Factory"),
}


def loss_info(name: str) -> LossInfo:
    if name not in LOSSES:
        raise ValueError(f"unknown algorithm.loss_type {name!r}; known: {sorted(LOSSES)}")
    return LOSSES[name]


def _check_inputs(lp: PairLogps, needs_reference: bool, what: str) -> None:
    if bool((lp.chosen_tokens <= 0).any() | (lp.rejected_tokens <= 0).any()):
        raise ValueError("every chosen and rejected response needs at least one token (found a zero-length one)")
    if needs_reference and not lp.has_reference:
        raise ValueError(f"{what} needs reference log-probs and none were given; use a reference model or a "
                         "reference-free loss (orpo, simpo, sft)")


def preference_losses(name: str, lp: PairLogps, options: LossOptions) -> torch.Tensor:
    """Per-pair losses [N] of the loss ``name``."""
    info = loss_info(name)
    _check_inputs(lp, info.needs_reference, f"algorithm.loss_type {name!r}")
    return info.fn(lp, options)


@dataclass(frozen=True)
class LossSpec:
    """What to optimise: a weighted sum of registered losses plus ``pref_ftx`` x SFT on chosen."""

    terms: tuple[tuple[str, float], ...] = (("sigmoid", 1.0),)
    pref_ftx: float = 0.0
    options: LossOptions = field(default_factory=LossOptions)

    @classmethod
    def create(cls, loss_type: str | Sequence[str], loss_weights: Optional[Sequence[float]] = None,
               pref_ftx: float = 0.0, **options: float) -> "LossSpec":
        names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        if not names:
            raise ValueError("algorithm.loss_type is empty; name at least one loss")
        weights = [1.0] * len(names) if loss_weights is None else list(loss_weights)
        if len(weights) != len(names):
            raise ValueError(f"algorithm.loss_weights has {len(weights)} entries for {len(names)} loss types")
        for name in names:
            loss_info(name)
        problem = f_divergence_problem(options.get("f_divergence_type", "reverse_kl"), names)
        if problem:
            raise ValueError(problem)
        problem = weighting_problem(bool(options.get("use_weighting")), names)
        if problem:
            raise ValueError(problem)
        problem = ld_alpha_problem(options.get("ld_alpha"))
        if problem:
            raise ValueError(problem)
        return cls(tuple(zip(names, map(float, weights))), float(pref_ftx), LossOptions(**options))

    @property
    def needs_reference(self) -> bool:
        return any(LOSSES[name].needs_reference for name, _ in self.terms)

    @property
    def batch_coupled(self) -> bool:
        return any(LOSSES[name].batch_coupled for name, _ in self.terms)


def weighting_problem(use_weighting: bool, loss_names: Sequence[str]) -> str:
    """Why WPO cannot weigh ``loss_names`` (``""`` when it can): losses that couple a batch's pairs (aot,
    aot_unpaired, kto_pair; TRL refuses aot's too) have no per-pair loss to weigh. sft's batch mean can be."""
    coupled = [n for n in loss_names if n in LOSSES and LOSSES[n].batch_coupled and n != "sft"]
    if use_weighting and coupled:
        return (f"algorithm.use_weighting (WPO) weighs each pair's loss, but algorithm.loss_type {coupled} couples "
                "the pairs of a batch; use another loss or set algorithm.use_weighting: false")
    return ""


def wpo_weights(lp: PairLogps) -> torch.Tensor:
    """[N] WPO's pair weight (Zhou et al. 2024, arXiv:2406.11827, eq. 2, as TRL 1.16): exp of the chosen and the
    rejected response's aligned log-probs (the policy's per-token log-prob minus log sum_v p_v^2, averaged over
    the response), so pairs the policy itself would likely sample weigh more; detached."""
    if lp.chosen_wpo is None or lp.rejected_wpo is None:
        raise ValueError("algorithm.use_weighting needs the pairs' WPO log-probs (chosen_wpo, rejected_wpo)")
    return torch.exp(lp.chosen_wpo + lp.rejected_wpo).detach()


@dataclass
class PreferenceLossOutput:
    losses: torch.Tensor
    """[N] per-pair loss (weighted sum of the terms plus pref_ftx x SFT; times the WPO weight with use_weighting)."""
    chosen_rewards: torch.Tensor
    """[N] implicit reward of the chosen response (detached): b (chosen - ref_chosen), or b ac without a reference."""
    rejected_rewards: torch.Tensor
    """[N] same for the rejected response."""


def compute_preference_loss(lp: PairLogps, spec: LossSpec) -> PreferenceLossOutput:
    """Per-pair losses of ``spec`` and the implicit rewards."""
    _check_inputs(lp, spec.needs_reference, "this loss")
    losses = torch.zeros_like(lp.chosen)
    for name, weight in spec.terms:
        losses = losses + weight * LOSSES[name].fn(lp, spec.options)
    if spec.pref_ftx:
        losses = losses + spec.pref_ftx * (-lp.chosen_mean)
    if spec.options.use_weighting:
        losses = losses * wpo_weights(lp)
    beta = spec.options.beta
    if lp.has_reference:
        chosen_rewards, rejected_rewards = beta * lp.chosen_logratios, beta * lp.rejected_logratios
    else:
        chosen_rewards, rejected_rewards = beta * lp.chosen_mean, beta * lp.rejected_mean
    return PreferenceLossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())
