"""The multimodal regvi model, assembled from one :class:`RegVIModule` per modality
(docs/model.md#multimodal-model).

Every modality keeps the single-modal building blocks — encoder, library encoder, decoder,
ambient, feature scaling, dispersion prior and GammaPoisson likelihood — so there is one
implementation of each. What this module adds is the wiring:

* modalities are sorted alphabetically. With ``latent_mode="concat"`` (default) modality m's
  encoder gives the latent block z_m with its own N(0, I) prior, and the joint
  z = [z_m1 ; z_m2 ; ...] feeds EVERY decoder; a cell with no counts in modality m (missing
  modality) has that modality's local terms masked (reconstruction, KL(q(z_m) || p(z_m)),
  KL(q(l_m) || p(l_m))) and its block z_m drawn from the prior p(z_m) = N(0, I) (its posterior
  given no data) — the prior mean at inference;
* with ``latent_mode="poe"`` every encoder is an expert on ONE shared z: the posterior is the
  product of the prior N(0, I) and the Gaussian experts of the cell's observed modalities
  (precision-weighted means), with one KL(q(z) || p(z)) per cell;
* modality dropout (training only, ``modality_dropout`` > 0): a cell with two or more
  observed modalities has, with that probability, one of them (uniformly chosen) hidden from
  the encoders — its block is a prior draw (``"concat"``) or its expert leaves the product
  (``"poe"``) — while every observed modality is still reconstructed, so the latent of the
  other modalities must predict it;
* loss = sum over modalities of local terms meaned over cells + sum of global terms / N_train,
  with the KL weight on each block's KL(q(z_m) || p(z_m)) times its ``kl_multipliers`` entry
  (default 1; ``"concat"`` only);
* per-modality switches turn purpose-based covariates off (one group / no input for that
  modality), and per-modality learning-rate multipliers become optimiser parameter groups.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from regvi.data.modalities import GROUP_PURPOSES
from regvi.data.registry import MODEL_PURPOSES
from regvi.module import ModuleConfig, RegVIModule, check_n_obs
from regvi.nn.distributions import normal_kl
from regvi.nn.joint_embedding import barlow_twins_loss

#: Covariate purposes a modality can switch off: those of the model, and the continuous inputs.
SWITCHABLE_PURPOSES = (*MODEL_PURPOSES, "continuous")
#: Purposes whose codes index parameter groups (switched off = everything in group 0).
_GROUP_PURPOSES = GROUP_PURPOSES
#: How the encoders form the joint latent: blocks side by side, or a product of experts.
LATENT_MODES = ("concat", "poe")


def check_poe_sizes(latent_mode: str, n_latent: dict[str, Any]) -> None:
    """Raise unless every modality has the same ``n_latent`` when ``latent_mode="poe"``."""
    if latent_mode == "poe" and len(set(n_latent.values())) > 1:
        raise ValueError(
            f"n_latent={n_latent}: latent_mode='poe' shares one latent between the modalities, "
            "so give one n_latent for all of them"
        )


def check_kl_multipliers(latent_mode: str, value: Any, modalities: Sequence[str]) -> None:
    """``kl_multipliers``: a dict known modality → positive factor, and blocks to weigh
    (``latent_mode="concat"``: with ``"poe"`` there is one KL of the shared z)."""
    if not isinstance(value, Mapping):
        raise TypeError(f"kl_multipliers={value!r}; expected a dict modality → factor")
    for m, v in value.items():
        if m not in modalities:
            raise ValueError(
                f"kl_multipliers names unknown modality {m!r}; modalities {list(modalities)}"
            )
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"kl_multipliers[{m!r}]={v!r}; expected a positive number")
    if value and latent_mode == "poe":
        raise ValueError(
            f"kl_multipliers={dict(value)} needs latent_mode='concat': with 'poe' there are no "
            "per-modality blocks, only one KL of the shared z"
        )


def check_modality_dropout(value: Any) -> None:
    """Raise unless ``value`` is a probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"modality_dropout={value!r}; expected a probability in [0, 1)")


@dataclass
class MultiModuleConfig:
    """Configuration of :class:`RegMultiVIModule` (saved as JSON with the weights).

    Attributes
    ----------
    modalities
        Modality names, sorted alphabetically (the latent order).
    configs
        Modality → its :class:`ModuleConfig` (``n_latent_decoder`` = joint latent size).
    disabled_covariates
        Modality → purposes switched off for it.
    lr_multipliers
        Modality → multiplier of the learning rate of its parameters.
    kl_multipliers
        Modality → multiplier of the KL weight on its block's KL(q(z_m) || p(z_m)) in the
        training loss (``latent_mode="concat"`` only; docs/model.md#per-modality-kl-weight).
        The ELBO reported is unweighted.
    latent_mode
        ``"concat"``: z = [z_m1 ; z_m2 ; ...], one block per modality; ``"poe"``: one shared z,
        the product of the prior and every observed modality's Gaussian expert (all modalities
        then have the same ``n_latent``).
    modality_dropout
        Training only: the probability that a cell with 2+ observed modalities has one of them
        (uniformly chosen) hidden from the encoders while still being reconstructed
        (docs/model.md#modality-dropout). 0 (default) turns it off.
    """

    modalities: list[str]
    configs: dict[str, ModuleConfig]
    disabled_covariates: dict[str, list[str]] = field(default_factory=dict)
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    kl_multipliers: dict[str, float] = field(default_factory=dict)
    latent_mode: str = "concat"
    modality_dropout: float = 0.0

    def __post_init__(self) -> None:
        if list(self.modalities) != sorted(self.modalities):
            raise ValueError(f"modalities must be sorted alphabetically; got {self.modalities}")
        if len(self.modalities) < 2:
            raise ValueError(f"the multimodal model needs 2+ modalities; got {self.modalities}")
        if set(self.configs) != set(self.modalities):
            raise ValueError(
                f"configs for {sorted(self.configs)} do not match modalities {self.modalities}"
            )
        if self.latent_mode not in LATENT_MODES:
            raise ValueError(
                f"latent_mode={self.latent_mode!r}; expected one of {list(LATENT_MODES)}"
            )
        check_modality_dropout(self.modality_dropout)
        check_kl_multipliers(self.latent_mode, self.kl_multipliers, self.modalities)
        check_poe_sizes(self.latent_mode, {m: c.n_latent for m, c in self.configs.items()})
        total = self.n_latent
        for m, c in self.configs.items():
            if c.n_latent_decoder != total:
                raise ValueError(
                    f"modality {m!r}: n_latent_decoder={c.n_latent_decoder}; expected the joint "
                    f"latent size {total}"
                )
        for m, purposes in self.disabled_covariates.items():
            bad = sorted(set(purposes) - set(SWITCHABLE_PURPOSES))
            if m not in self.configs or bad:
                raise ValueError(
                    f"disabled_covariates[{m!r}]={purposes}: unknown modality or purposes {bad}; "
                    f"modalities {self.modalities}, purposes {list(SWITCHABLE_PURPOSES)}"
                )
        for m, mult in self.lr_multipliers.items():
            if m not in self.configs or not float(mult) > 0:
                raise ValueError(
                    f"lr_multipliers[{m!r}]={mult!r}: expected a known modality and a positive "
                    f"number (modalities {self.modalities})"
                )

    @property
    def n_latent(self) -> int:
        """Size of the joint latent z."""
        if self.latent_mode == "poe":
            return self.configs[self.modalities[0]].n_latent
        return sum(self.configs[m].n_latent for m in self.modalities)

    def latent_slices(self) -> dict[str, slice]:
        """Modality → its block of the joint latent (empty with ``latent_mode="poe"``: there
        are no blocks)."""
        if self.latent_mode == "poe":
            return {}
        out, start = {}, 0
        for m in self.modalities:
            n = self.configs[m].n_latent
            out[m] = slice(start, start + n)
            start += n
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable representation."""
        return {
            "modalities": list(self.modalities),
            "configs": {m: c.to_dict() for m, c in self.configs.items()},
            "disabled_covariates": {m: list(v) for m, v in self.disabled_covariates.items()},
            "lr_multipliers": {m: float(v) for m, v in self.lr_multipliers.items()},
            "kl_multipliers": {m: float(v) for m, v in self.kl_multipliers.items()},
            "latent_mode": self.latent_mode,
            "modality_dropout": float(self.modality_dropout),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MultiModuleConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(
            modalities=list(d["modalities"]),
            configs={m: ModuleConfig(**c) for m, c in d["configs"].items()},
            disabled_covariates={m: list(v) for m, v in d.get("disabled_covariates", {}).items()},
            lr_multipliers=dict(d.get("lr_multipliers", {})),
            kl_multipliers=dict(d.get("kl_multipliers", {})),  # saved before it existed: none
            latent_mode=d.get("latent_mode", "concat"),  # saved before it existed: concat
            modality_dropout=float(d.get("modality_dropout", 0.0)),  # saved before: off
        )


class RegMultiVIModule(nn.Module):
    """Joint generative model over several count modalities (docs/model.md#multimodal-model).

    A minibatch holds the shared covariate codes (``index``, ``ambient``, ``dispersion``, ...)
    and ``batch["modalities"][m]`` with ``x``, ``log_x_factorial`` and ``observed`` (bool,
    ``(B,)``) for every modality m.
    """

    def __init__(self, config: MultiModuleConfig):
        super().__init__()
        self.config = config
        self.modalities = list(config.modalities)
        self.slices = config.latent_slices()
        self.mods = nn.ModuleDict({m: RegVIModule(config.configs[m]) for m in self.modalities})
        self.kl_multiplier = {m: float(config.kl_multipliers.get(m, 1.0)) for m in self.modalities}

    # ------------------------------------------------------------------ data views
    def modality_batch(self, batch: dict[str, Any], m: str) -> dict[str, Any]:
        """The single-modal view of ``batch`` for modality ``m`` (covariate switches applied)."""
        view = {k: v for k, v in batch.items() if k != "modalities"}
        view.update(batch["modalities"][m])
        for purpose in self.config.disabled_covariates.get(m, ()):
            if purpose in _GROUP_PURPOSES and purpose in view:
                view[purpose] = torch.zeros_like(view[purpose][:, :1])
            elif purpose == "continuous":
                view["continuous"] = view["continuous"][:, :0]
            else:
                view.pop(purpose, None)
        return view

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups, one per modality, with the modality's lr multiplier."""
        return [
            {
                "params": list(self.mods[m].parameters()),
                "lr": lr * float(self.config.lr_multipliers.get(m, 1.0)),
                "name": m,
            }
            for m in self.modalities
        ]

    # ------------------------------------------------------------------ three steps
    def encoder_visible(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Modality → ``(B, 1)`` bool: the encoders see the cell's modality m.

        That is ``observed``, except in training with ``modality_dropout`` p > 0: a cell with
        2+ observed modalities then, with probability p, has one of them (uniformly chosen)
        hidden (docs/model.md#modality-dropout). Draws use torch's global generator (seeded)."""
        p = float(self.config.modality_dropout)
        if not (self.training and p > 0):
            return {m: batch["modalities"][m]["observed"][:, None] for m in self.modalities}
        observed = torch.stack(
            [batch["modalities"][m]["observed"] for m in self.modalities], dim=1
        )  # (B, M)
        n_observed = observed.sum(1)
        drop = (torch.rand(observed.shape[0], device=observed.device) < p) & (n_observed > 1)
        scores = torch.rand(observed.shape, device=observed.device).masked_fill(~observed, -1)
        hidden = nn.functional.one_hot(scores.argmax(1), len(self.modalities)).bool()
        observed = observed & ~(hidden & drop[:, None])
        return {m: observed[:, i : i + 1] for i, m in enumerate(self.modalities)}

    def inference(self, batch: dict[str, Any], sample: bool = True) -> dict[str, Any]:
        """Encode every modality and form the joint posterior q(z) and a draw z.

        ``latent_mode="concat"``: z concatenates the blocks in modality order; a block of a cell
        whose modality the encoders do not see (:meth:`encoder_visible`: missing, or hidden by
        modality dropout) is replaced by a prior draw (``sample``) or the prior mean 0, and its
        posterior moments by the prior's (mean 0, variance 1). ``latent_mode="poe"``: the
        product of experts (:meth:`product_of_experts`) over the modalities the encoders see.
        ``"visible"`` holds :meth:`encoder_visible`.
        """
        visible = self.encoder_visible(batch)
        if self.config.latent_mode == "poe":
            return self._inference_poe(batch, sample, visible)
        per: dict[str, dict[str, Any]] = {}
        zs, means, variances = [], [], []
        for m in self.modalities:
            view = self.modality_batch(batch, m)
            inf = self.mods[m].inference(view, sample=sample)
            seen = visible[m]
            prior_z = torch.randn_like(inf["z"]) if sample else torch.zeros_like(inf["z"])
            zs.append(torch.where(seen, inf["z"], prior_z))
            means.append(torch.where(seen, inf["qz_mean"], torch.zeros_like(inf["qz_mean"])))
            variances.append(torch.where(seen, inf["qz_var"], torch.ones_like(inf["qz_var"])))
            per[m] = inf
        return {
            "z": torch.cat(zs, dim=-1),
            "qz_mean": torch.cat(means, dim=-1),
            "qz_var": torch.cat(variances, dim=-1),
            "modalities": per,
            "visible": visible,
        }

    @staticmethod
    def product_of_experts(
        experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of N(0, I) · prod_m N(mu_m, var_m)^{o_m}
        (docs/model.md#product-of-experts).

        ``experts`` holds ``(mu_m, var_m, o_m)`` with ``o_m`` ``(B, 1)`` bool (cell has m).
        Precision 1 + sum_m o_m / var_m; mean = var · sum_m o_m · mu_m / var_m. A cell with
        no observed modality gets the prior (mean 0, variance 1).
        """
        mu0 = experts[0][0]
        precision = torch.ones_like(mu0)
        weighted = torch.zeros_like(mu0)
        for mu, var, observed in experts:
            p = torch.where(observed, 1.0 / var, torch.zeros_like(var))
            precision = precision + p
            weighted = weighted + p * mu
        var = 1.0 / precision
        return weighted * var, var

    def _inference_poe(
        self, batch: dict[str, Any], sample: bool, visible: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        """``latent_mode="poe"``: every modality's encoder is a Gaussian expert on one z; the
        experts of the modalities in ``visible`` enter the product."""
        per: dict[str, dict[str, Any]] = {}
        experts = []
        for m in self.modalities:
            view = self.modality_batch(batch, m)
            inf = self.mods[m].inference(view, sample=sample)  # a library draw when sampling
            experts.append((inf["qz_mean"], inf["qz_var"], visible[m]))
            per[m] = inf
        mean, var = self.product_of_experts(experts)
        z = mean + var.sqrt() * torch.randn_like(mean) if sample else mean
        return {"z": z, "qz_mean": mean, "qz_var": var, "modalities": per, "visible": visible}

    def modality_posterior(self, inf_m: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior of z from ONE modality's data: with ``latent_mode="poe"`` the product of the
        prior and that modality's expert, with ``"concat"`` its block's posterior.
        ``inf_m`` is ``inference(...)["modalities"][m]``."""
        if self.config.latent_mode != "poe":
            return inf_m["qz_mean"], inf_m["qz_var"]
        observed = torch.ones_like(inf_m["qz_mean"][:, :1], dtype=torch.bool)
        return self.product_of_experts([(inf_m["qz_mean"], inf_m["qz_var"], observed)])

    def generative(
        self, z: torch.Tensor, inf: dict[str, Any], batch: dict[str, Any], sample_theta: bool = True
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Decode the joint z with every modality's decoder and observation model."""
        return {
            m: self.mods[m].generative(
                z, inf["modalities"][m]["library"], self.modality_batch(batch, m), sample_theta
            )
            for m in self.modalities
        }

    def decoder_rates(self, z: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Decoder output rate rho_m(z) of every modality (no library, ambient or scaling)."""
        out = {}
        for m in self.modalities:
            mod, view = self.mods[m], self.modality_batch(batch, m)
            cont = view["continuous"]
            dec_in = torch.cat([z, cont], dim=-1) if cont.shape[-1] else z
            out[m] = mod.decoder(dec_in, mod.decoder_cats(view.get("nn_conditioning"), z.dtype))
        return out

    def decoder_means(
        self, z: torch.Tensor, batch: dict[str, Any], library: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """NB mean mu_m(z) = exp(l_m) · (rho_m(z) + s_m) · y_m of every modality
        (docs/model.md#expected-count, docs/model.md#jacobian-modality-attribution).

        The same mu as the likelihood uses (:meth:`RegVIModule.generative` with theta at its
        posterior mean): library ``library[m]`` ``(B, 1)`` (usually the posterior mean of m's
        library encoder), ambient s_m and feature scaling y_m of the cell's categories, the
        covariate switches of ``disabled_covariates`` applied. Since s_m and y_m do not depend
        on z, ∂mu_m / ∂z = exp(l_m) · y_m · ∂rho_m / ∂z.
        """
        return {
            m: self.mods[m].generative(
                z, library[m], self.modality_batch(batch, m), sample_theta=False
            )["mu"]
            for m in self.modalities
        }

    def posterior_library(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Posterior-mean log library l_m ``(B, 1)`` of every modality (no gradient)."""
        with torch.no_grad():
            inf = self.inference(batch, sample=False)
        return {m: inf["modalities"][m]["library"].detach() for m in self.modalities}

    # ------------------------------------------------------------------ loss
    def joint_embedding_loss(
        self, batch: dict[str, Any], inf: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Modality → Barlow Twins loss between modality m's block of E_q[z] and that block
        with m's counts binomially thinned, over the cells that have m (modalities with
        ``joint_embedding_weight`` > 0). Unweighted; training only."""
        out = {}
        for m in self.modalities:
            if self.mods[m].config.joint_embedding_weight <= 0:
                continue
            view = self.modality_batch(batch, m)
            thinned = self.mods[m].thinned_posterior_mean(view)
            out[m] = barlow_twins_loss(
                inf["modalities"][m]["qz_mean"],
                thinned,
                self.mods[m].config.joint_embedding_off_diagonal,
                weights=view["observed"],
            )
        return out

    def loss(
        self,
        batch: dict[str, Any],
        n_obs: int,
        kl_weight: float = 1.0,
        sample: bool = True,
        skip_n_obs_check: bool = False,
        sample_theta: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Negative ELBO: per-modality local terms meaned over cells + global terms / N_train.

        ``sample`` and ``sample_theta`` as in :meth:`regvi.module.RegVIModule.loss`.

        Returns the same totals as :meth:`RegVIModule.loss` plus ``reconstruction_<m>``,
        ``kl_z_<m>`` (``latent_mode="concat"`` only: with ``"poe"`` there is one KL of the shared
        z, ``kl_z``), ``kl_library_<m>``, ``global_<m>`` and ``theta_mean_<m>`` per modality, and
        in training ``joint_embedding_<m>`` for modalities with a joint-embedding weight (added
        to ``loss`` × the weight, not to the ELBO).
        """
        n_batch = batch["index"].shape[0]
        check_n_obs(n_obs, n_batch, skip_n_obs_check)
        inf = self.inference(batch, sample=sample)
        gen = self.generative(
            inf["z"], inf, batch, sample_theta=sample if sample_theta is None else sample_theta
        )
        out: dict[str, torch.Tensor] = {}
        zero = inf["z"].new_zeros(())
        totals = {"reconstruction": zero, "kl_z": zero, "kl_library": zero}
        penalties_total: dict[str, torch.Tensor] = {}
        kl_dims, theta_sum, n_theta = [], zero, 0
        kl_z_weighted = zero  # Σ_m kl_multiplier_m · KL_z_m (concat); the shared KL_z (poe)
        poe = self.config.latent_mode == "poe"
        if poe:  # one KL of the shared z: no local KL_z per modality
            kl_joint = normal_kl(
                inf["qz_mean"],
                inf["qz_var"],
                torch.zeros_like(inf["qz_mean"]),
                torch.ones_like(inf["qz_var"]),
            )
            totals["kl_z"] = kl_joint.sum(-1).mean()
            kl_z_weighted = totals["kl_z"]
            kl_dims.append(kl_joint.mean(0))
        for m in self.modalities:
            mod, view = self.mods[m], self.modality_batch(batch, m)
            local = mod.local_terms(view, inf["modalities"][m], gen[m])
            mask = view["observed"].to(inf["z"].dtype)
            # masked cells contribute 0; the mean is over all B cells (the plate rule)
            recon = (local["reconstruction"] * mask).mean()
            kl_l = (local["kl_library"] * mask).mean()
            penalties = mod.global_penalties(gen[m]["log_theta"], inf["modalities"][m])
            for k, v in penalties.items():
                penalties_total[k] = penalties_total.get(k, zero) + v
            theta = torch.exp(gen[m]["log_theta"])
            theta_sum, n_theta = theta_sum + theta.sum(), n_theta + theta.numel()
            if not poe:  # a block the encoders did not see is the prior: no KL
                seen = inf["visible"][m].to(inf["z"].dtype)
                kl_z_dims = local["kl_z_per_dim"] * seen
                kl_z = kl_z_dims.sum(-1).mean()
                out[f"kl_z_{m}"] = kl_z
                totals["kl_z"] = totals["kl_z"] + kl_z
                kl_z_weighted = kl_z_weighted + self.kl_multiplier[m] * kl_z
                kl_dims.append(kl_z_dims.mean(0))
            out.update(
                {
                    f"reconstruction_{m}": recon,
                    f"kl_library_{m}": kl_l,
                    f"global_{m}": sum(penalties.values()) / n_obs,
                    f"theta_mean_{m}": theta.mean(),
                }
            )
            totals["reconstruction"] = totals["reconstruction"] + recon
            totals["kl_library"] = totals["kl_library"] + kl_l
        global_total = sum(penalties_total.values())
        elbo = totals["reconstruction"] + totals["kl_z"] + totals["kl_library"]
        joint = self.joint_embedding_loss(batch, inf) if self.training else {}
        if n_batch < 2:  # one cell has no correlations; keep the keys (epoch accumulator)
            joint = {m: zero for m in joint}
        out.update({f"joint_embedding_{m}": v for m, v in joint.items()})
        out.update(
            loss=totals["reconstruction"]
            + kl_weight * kl_z_weighted
            + totals["kl_library"]
            + global_total / n_obs
            + sum((self.mods[m].config.joint_embedding_weight * v for m, v in joint.items()), zero),
            elbo=elbo,
            **totals,
            **{"global": global_total / n_obs},
            **{k: v / n_obs for k, v in penalties_total.items()},
            kl_z_per_dim=torch.cat(kl_dims),
            theta_mean=theta_sum / n_theta,
        )
        return out
