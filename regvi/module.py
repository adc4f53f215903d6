"""The single-modal regvi generative model: ``inference`` → ``generative`` → ``loss`` (pure torch).

Read top to bottom, this file is the model of docs/model.md (generative model, encoders, loss):

* latent          z_n ~ Normal(0, I)
* library         l_n ~ Normal(m_p, sqrt(w · v_p)), m_p centred across groups (+ log s)
* decoder         rho_n = softplus(Linear(FC(z_n ⊕ continuous, onehot(c_n))))
                  (c_n: decoder-conditioning keys, the library key by default; none = batch-free)
* ambient         s_{e,g} = exp(beta_{e,g}), summed over the cell's ambient categories
* scaling         y_{t,g} = softplus(gamma_{t,g}) / 0.7 ~ Gamma(200, 200), multiplied over keys
* expected count  mu_ng = exp(l_n) · (rho_ng + s_{e_n,g}) · y_{t_n,g}
* likelihood      x_ng ~ GammaPoisson(theta_{g,d}, theta_{g,d} / mu_ng)
* dispersion      q(log theta_{g,d}) = Normal(mu_theta, sigma_theta);
                  1/sqrt(theta) ~ Exponential(lambda_d), lambda_d ~ Gamma(alpha, alpha · m)

and the plate rule: local terms are meaned over the minibatch, global priors divided by
``n_obs`` = N_train.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from regvi.checks import check_bool, check_choice, check_float, check_int
from regvi.nn import (
    ACTIVATIONS,
    CategoricalInjector,
    Decoder,
    Encoder,
    LibraryEncoder,
    gamma_log_prob,
    gamma_poisson_log_prob_rows,
    gamma_poisson_log_prob_unnormalised,
    normal_kl,
)
from regvi.nn.distributions import exponential_log_prob, normal_entropy
from regvi.nn.joint_embedding import barlow_twins_loss, thin_counts

FEATURE_SCALING_DIVISOR = 0.7  # y = softplus(gamma) / 0.7  (docs/model.md#feature-scaling)


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """softplus⁻¹(x) = log(exp(x) − 1), stable for large x."""
    return x + torch.log(-torch.expm1(-x))


#: ModuleConfig fields derived from the data / covariate registry (not user options).
DERIVED_FIELDS = frozenset(
    {
        "n_genes",
        "n_continuous",
        "n_cats_decoder",
        "n_cats_encoder",
        "n_ambient_per_key",
        "n_dispersion_groups",
        "n_library_groups",
        "n_scaling_per_key",
        "n_latent_decoder",
    }
)


@dataclass
class ModuleConfig:
    """Everything needed to rebuild a :class:`RegVIModule` (saved as JSON with the weights).

    Group counts (``n_*``) come from the covariate registry; the rest are model settings with the
    defaults listed in docs/model.md#options-and-defaults.
    """

    n_genes: int
    n_latent: int = 20
    n_hidden: int = 128
    n_layers: int = 1
    dropout_rate: float = 0.1
    use_layer_norm: bool = True
    activation: str = "relu"
    var_activation: str = "exp"
    n_continuous: int = 0
    n_cats_decoder: list[int] = field(default_factory=list)
    n_cats_encoder: list[int] = field(default_factory=list)
    n_ambient_per_key: list[int] = field(default_factory=lambda: [1])
    n_dispersion_groups: int = 1
    n_library_groups: int = 1
    n_scaling_per_key: list[int] = field(default_factory=list)
    #: width of the z fed to the decoder (``None``: ``n_latent``); the multimodal model feeds
    #: the joint z of all modalities to every decoder
    n_latent_decoder: int | None = None
    # ambient RNA
    use_ambient: bool = True
    regularise_background: bool = False
    ambient_prior_alpha: float = 1.0
    ambient_prior_beta: float = 100.0
    # multiplicative feature scaling
    use_feature_scaling: bool = True
    feature_scaling_prior_alpha: float = 200.0
    # dispersion
    dispersion: str = "gene-batch"
    dispersion_prior_mean: float = 1.0 / 3.0
    dispersion_prior_alpha: float = 9.0
    # library size
    library_variance_weight: float = 0.5
    library_centring_sensitivity: float = 1.0
    library_residual: bool = False
    # decoder regularisation
    decoder_l2: float = 0.1
    #: initial posterior std of z (``None``: PyTorch's default init of the variance head, which
    #: gives std ≈ 1): the variance head's bias is set so that std ≈ this value and its weights
    #: are scaled by 0.1, so the cells' posterior means are not drowned in sampling noise at
    #: the start of training (see :meth:`RegVIModule.init_posterior_scale`)
    encoder_var_init: float | None = None
    #: what the z encoder reads (docs/model.md#encoder-input): ``"normalised"`` (default),
    #: log(1 + x · L̄ / L) with L the cell's total and L̄ the training cells' typical total, so
    #: z does not see sequencing depth; or ``"log1p"``, log(1 + x) (scVI's input). The library
    #: encoder always reads log(1 + x)
    encoder_input: str = "normalised"
    # joint-embedding loss for low-count cells (regvi/nn/joint_embedding.py; 0 = off)
    #: weight of the Barlow Twins loss between z of x and of a binomially thinned copy x*
    joint_embedding_weight: float = 0.0
    #: per-cell thinning fraction f ~ Uniform(min, max): share of the counts x* keeps
    joint_embedding_min_fraction: float = 0.1
    joint_embedding_max_fraction: float = 0.5
    #: lambda: weight of the off-diagonal (redundancy-reduction) part of the loss
    joint_embedding_off_diagonal: float = 0.005

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable representation."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModuleConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)

    @classmethod
    def user_options(cls) -> set[str]:
        """Fields a user may set (everything not derived from the data)."""
        return set(cls.__dataclass_fields__) - DERIVED_FIELDS

    def __post_init__(self) -> None:
        check_module_options(self.to_dict(), all_fields=True)
        for name in _FLOAT_OPTIONS:  # 1 and 1.0 are the same setting; keep JSON stable
            setattr(self, name, float(getattr(self, name)))


#: float options of ModuleConfig: (minimum, maximum, positive, maximum exclusive)
_FLOAT_OPTIONS: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "dropout_rate": (0.0, 1.0, False, True),
    "ambient_prior_alpha": (None, None, True, False),
    "ambient_prior_beta": (None, None, True, False),
    "feature_scaling_prior_alpha": (None, None, True, False),
    "dispersion_prior_mean": (None, None, True, False),
    "dispersion_prior_alpha": (None, None, True, False),
    "library_variance_weight": (None, None, True, False),
    "library_centring_sensitivity": (None, None, True, False),
    "decoder_l2": (0.0, None, False, False),
    "joint_embedding_weight": (0.0, None, False, False),
    "joint_embedding_min_fraction": (0.0, 1.0, True, False),
    "joint_embedding_max_fraction": (0.0, 1.0, True, False),
    "joint_embedding_off_diagonal": (0.0, None, False, False),
}
_BOOL_OPTIONS = (
    "use_layer_norm",
    "use_ambient",
    "regularise_background",
    "use_feature_scaling",
    "library_residual",
)
#: integer options and their minimum
_INT_OPTIONS = {
    "n_genes": 1,
    "n_latent": 1,
    "n_hidden": 1,
    "n_layers": 1,
    "n_continuous": 0,
    "n_dispersion_groups": 1,
    "n_library_groups": 1,
}
#: what the z encoder reads (ModuleConfig.encoder_input)
ENCODER_INPUTS = ("log1p", "normalised")
_CHOICE_OPTIONS = {
    "dispersion": ("gene-batch", "gene"),
    "var_activation": ("exp", "softplus"),
    "activation": ACTIVATIONS,
    "encoder_input": ENCODER_INPUTS,
}


def check_module_options(options: dict[str, Any], all_fields: bool = False) -> None:
    """Type- and range-check :class:`ModuleConfig` options, naming the option on error.

    ``options`` may hold a subset of the fields (a user's keyword arguments, checked before any
    data is read); ``all_fields`` also checks the data-derived group counts.
    """
    for name, value in options.items():
        if name in _BOOL_OPTIONS:
            check_bool(name, value)
        elif name in _FLOAT_OPTIONS:
            lo, hi, positive, exclusive = _FLOAT_OPTIONS[name]
            check_float(name, value, lo, hi, positive, exclusive)
        elif name in _INT_OPTIONS:
            check_int(name, value, _INT_OPTIONS[name])
        elif name in _CHOICE_OPTIONS:
            check_choice(name, value, _CHOICE_OPTIONS[name])
        elif name == "n_latent_decoder":
            check_int(name, value, 1, allow_none=True)
        elif name == "encoder_var_init":
            if value is not None:
                check_float(name, value, positive=True)
        elif all_fields and name.startswith("n_"):
            if not isinstance(value, list | tuple):
                raise TypeError(f"{name}={value!r}; expected a list of integers")
            for i, v in enumerate(value):
                check_int(f"{name}[{i}]", v, 1)
    lo = options.get("joint_embedding_min_fraction")
    hi = options.get("joint_embedding_max_fraction")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(
            f"joint_embedding_min_fraction={lo} is above joint_embedding_max_fraction={hi}; "
            "expected min <= max (the range of the per-cell thinning fraction)"
        )


class RegVIModule(nn.Module):
    """Generative model and variational posterior of single-modal regvi (docs/model.md)."""

    def __init__(self, config: ModuleConfig):
        super().__init__()
        self.config = c = config
        G = c.n_genes
        self.decoder_cats = CategoricalInjector(c.n_cats_decoder)
        self.encoder_cats = CategoricalInjector(c.n_cats_encoder)
        n_enc_in = G + c.n_continuous
        self.z_encoder = Encoder(
            n_enc_in,
            c.n_latent,
            c.n_hidden,
            c.n_layers,
            n_cat_features=self.encoder_cats.n_out,
            dropout_rate=c.dropout_rate,
            use_layer_norm=c.use_layer_norm,
            activation=c.activation,
            var_activation=c.var_activation,
        )
        if c.encoder_var_init is not None:
            self.init_posterior_scale(c.encoder_var_init)
        self.l_encoder = LibraryEncoder(
            n_enc_in,
            self.encoder_cats.n_out,
            dropout_rate=c.dropout_rate,
            use_layer_norm=c.use_layer_norm,
            activation=c.activation,
            var_activation=c.var_activation,
        )
        self.decoder = Decoder(
            (c.n_latent_decoder or c.n_latent) + c.n_continuous,
            G,
            c.n_hidden,
            c.n_layers,
            n_cat_features=self.decoder_cats.n_out,
            use_layer_norm=c.use_layer_norm,
            activation=c.activation,
        )
        # Ambient RNA: beta_{e,g}, one table per ambient key; init at the prior mean log 0.01.
        self.ambient_log = nn.ParameterList(
            [nn.Parameter(torch.full((n, G), math.log(0.01))) for n in c.n_ambient_per_key]
            if c.use_ambient
            else []
        )
        # Feature scaling: gamma_{t,g} with softplus(gamma)/0.7 = 1 at init (prior mean).
        scaling_rows = c.n_scaling_per_key or [1]
        gamma0 = float(inverse_softplus(torch.tensor(FEATURE_SCALING_DIVISOR)))
        self.feature_scaling_raw = nn.ParameterList(
            [nn.Parameter(torch.full((n, G), gamma0)) for n in scaling_rows]
            if c.use_feature_scaling
            else []
        )
        # Dispersion: q(log theta) = Normal(mu_theta, sigma_theta), mu at log 9, sigma at 0.1.
        n_disp = c.n_dispersion_groups if c.dispersion == "gene-batch" else 1
        self.log_theta_mean = nn.Parameter(torch.full((n_disp, G), math.log(9.0)))
        self.log_theta_scale_raw = nn.Parameter(
            torch.full((n_disp, G), float(inverse_softplus(torch.tensor(0.1))))
        )
        # lambda_d of the containment prior, softplus-parameterised, init at its prior mean 1/m.
        lam0 = float(inverse_softplus(torch.tensor(1.0 / c.dispersion_prior_mean)))
        self.dispersion_rate_raw = nn.Parameter(torch.full((n_disp,), lam0))
        # E[lambda_d] of the hyper-prior Gamma(alpha, alpha / E[lambda_d]): 1/m, or moved to the
        # data with dispersion_init="data" (see data_init)
        self.register_buffer(
            "dispersion_rate_prior_mean", torch.full((n_disp,), 1.0 / c.dispersion_prior_mean)
        )
        # Library prior statistics m_p (centred) and v_p, set from training data.
        self.register_buffer("library_prior_mean", torch.zeros(c.n_library_groups))
        self.register_buffer("library_prior_var", torch.ones(c.n_library_groups))
        self.register_buffer("library_log_offset", torch.zeros(()))
        if c.library_residual:
            # w_obs ~ LogNormal(q_mean, q_scale) posterior, Exponential(1) prior.
            self.library_w_mean = nn.Parameter(torch.zeros(()))
            self.library_w_scale_raw = nn.Parameter(inverse_softplus(torch.tensor(0.1)))

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_posterior_scale(self, std: float) -> None:
        """Start q(z) with std ≈ ``std`` for every cell: variance-head bias at the inverse
        variance activation of std² (exp: log std²; softplus: log(expm1(std²))) and its weights
        × 0.1, so the variance depends only a little on the cell at the start."""
        head = self.z_encoder.var
        target = torch.tensor(float(std) ** 2 - self.z_encoder.var_eps).clamp_min(1e-8)
        bias = (
            torch.log(target) if self.config.var_activation == "exp" else inverse_softplus(target)
        )
        head.bias.fill_(float(bias))
        head.weight.mul_(0.1)

    @torch.no_grad()
    def set_library_prior(
        self,
        group_mean: torch.Tensor,
        group_var: torch.Tensor,
        group_cells: torch.Tensor | None = None,
    ) -> None:
        """Set m_p (centred: m_p − mean_p m_p + log s) and v_p from per-group log-library stats.

        The library encoder's output bias starts where the prior is: at the cell-weighted mean
        of the centred m_p (``group_cells`` cells per group; default equal weights), i.e.
        ≈ log s, so q(l) starts at p(l) also for s ≠ 1 (ATAC: log 0.2 ≈ −1.6). In the residual
        form (:meth:`library_posterior_mean`) the encoder is a residual around
        log s + w · (log L − mean_p m_p), and its bias starts at 0.
        """
        s = self.config.library_centring_sensitivity
        offset = group_mean.mean() - math.log(s)
        self.library_log_offset.copy_(offset)
        self.library_prior_mean.copy_(group_mean - offset)
        self.library_prior_var.copy_(group_var.clamp_min(1e-4))
        if self.config.library_residual:
            self.l_encoder.mean.bias.zero_()
            return
        weights = torch.ones_like(group_mean) if group_cells is None else group_cells.float()
        weights = weights / weights.sum().clamp_min(1.0)
        self.l_encoder.mean.bias.fill_(float((weights * self.library_prior_mean).sum()))

    @torch.no_grad()
    def data_init(
        self,
        mean_expression: torch.Tensor | None,
        ambient_group_means: list[torch.Tensor] | None = None,
        dispersion_init: torch.Tensor | None = None,
    ) -> None:
        """Data-dependent initialisation (docs/model.md#data-dependent-initialisation).

        Parameters
        ----------
        mean_expression
            Mean depth-normalised expression per gene, ``(G,)`` (``None``: keep the bias): decoder
            output bias =
            softplus⁻¹(max(mean, 0.01)).
        ambient_group_means
            Per ambient key, ``(n_categories, G)`` group means: ambient = 0.2 × mean.
        dispersion_init
            Optional ``(n_disp, G)`` method-of-moments theta (``dispersion_init="data"``).
        """
        if mean_expression is not None:
            self.decoder.out.bias.copy_(inverse_softplus(mean_expression.clamp_min(0.01)))
        if ambient_group_means is not None and self.config.use_ambient:
            n_keys = len(self.ambient_log)
            for param, means in zip(self.ambient_log, ambient_group_means, strict=True):
                # several ambient keys add up: split the 0.2 × mean evenly between them
                param.copy_(torch.log((0.2 * means / n_keys).clamp_min(1e-6)))
        if dispersion_init is not None:
            theta = dispersion_init.clamp(0.01, 20.0).expand_as(self.log_theta_mean)
            self.log_theta_mean.copy_(torch.log(theta))
            # Move the containment prior with the data: lambda_d and the hyper-prior mean
            # E[lambda_d] to 1 / mean_g(1/sqrt(theta_gd)) (E[1/sqrt(theta) | lambda] = 1/lambda),
            # so the prior does not pull the data-initialised theta back to 1/m² (= 9).
            lam = 1.0 / theta.rsqrt().mean(-1)
            self.dispersion_rate_prior_mean.copy_(lam)
            self.dispersion_rate_raw.copy_(inverse_softplus(lam))

    # ------------------------------------------------------------------ parameters
    def dispersion_rate(self) -> torch.Tensor:
        """lambda_d, the rate of the Exponential prior on 1/sqrt(theta), ``(n_disp,)``."""
        return F.softplus(self.dispersion_rate_raw)

    def log_theta_scale(self) -> torch.Tensor:
        """sigma_theta of q(log theta)."""
        return F.softplus(self.log_theta_scale_raw)

    def ambient_rate(self, ambient_codes: torch.Tensor) -> torch.Tensor | None:
        """s_n = sum over the cell's ambient categories of exp(beta_{e,g}), ``(B, G)``."""
        if not self.config.use_ambient or len(self.ambient_log) == 0:
            return None
        total = None
        for k, param in enumerate(self.ambient_log):
            s = torch.exp(param).index_select(0, ambient_codes[:, k])
            total = s if total is None else total + s
        return total

    def feature_scaling(self, scaling_codes: torch.Tensor) -> torch.Tensor | None:
        """y_n = product over scaling keys of softplus(gamma_{t,g}) / 0.7, ``(B, G)`` or ``(1, G)``."""
        if not self.config.use_feature_scaling:
            return None
        if not self.config.n_scaling_per_key:
            return F.softplus(self.feature_scaling_raw[0]) / FEATURE_SCALING_DIVISOR
        total = None
        for k, param in enumerate(self.feature_scaling_raw):
            y = (F.softplus(param) / FEATURE_SCALING_DIVISOR).index_select(0, scaling_codes[:, k])
            # regvi: keys MULTIPLY (docs/model.md#feature-scaling)
            total = y if total is None else total * y
        return total

    # ------------------------------------------------------------------ three steps
    def _encoder_input(
        self, x: torch.Tensor, continuous: torch.Tensor, normalise: bool = False
    ) -> torch.Tensor:
        """log(1 + x) (or, with ``normalise``, log(1 + x · L̄ / L)) and the continuous covariates.

        L̄ = exp(mean_p m_p) is the typical training library (``library_log_offset`` + log s).
        """
        if normalise:
            log_typical = self.library_log_offset + math.log(
                self.config.library_centring_sensitivity
            )
            log_total = torch.log(x.sum(-1, keepdim=True).clamp_min(1.0))
            x = x * torch.exp(log_typical - log_total)
        h = torch.log1p(x)
        return torch.cat([h, continuous], dim=-1) if continuous.shape[-1] else h

    def _z_encoder_input(self, x: torch.Tensor, continuous: torch.Tensor) -> torch.Tensor:
        return self._encoder_input(x, continuous, self.config.encoder_input == "normalised")

    def inference(self, batch: dict[str, torch.Tensor], sample: bool = True) -> dict[str, Any]:
        """x → q(z), q(l); returns posterior parameters and (sampled or mean) z, l."""
        x, continuous = batch["x"], batch["continuous"]
        h = self._encoder_input(x, continuous)
        h_z = self._z_encoder_input(x, continuous) if self.config.encoder_input != "log1p" else h
        enc_cats = self.encoder_cats(batch.get("encoder"), h.dtype)
        qz_mean, qz_var = self.z_encoder(h_z, enc_cats)
        ql_mean, ql_var = self.l_encoder(h, enc_cats)
        out: dict[str, Any] = {}
        if self.config.library_residual:
            w_scale = F.softplus(self.library_w_scale_raw)
            log_w = self.library_w_mean + (w_scale * torch.randn_like(w_scale) if sample else 0.0)
            ql_mean = self.library_posterior_mean(ql_mean, x, torch.exp(log_w))
            out["library_log_w"] = log_w
        z = qz_mean + qz_var.sqrt() * torch.randn_like(qz_mean) if sample else qz_mean
        library = ql_mean + ql_var.sqrt() * torch.randn_like(ql_mean) if sample else ql_mean
        out.update(
            qz_mean=qz_mean, qz_var=qz_var, ql_mean=ql_mean, ql_var=ql_var, z=z, library=library
        )
        return out

    def thinned_posterior_mean(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """E_q[z | x*] of a binomially thinned copy x* of the batch's counts (joint embedding)."""
        c = self.config
        x_thin, _ = thin_counts(
            batch["x"], c.joint_embedding_min_fraction, c.joint_embedding_max_fraction
        )
        h = self._z_encoder_input(x_thin, batch["continuous"])
        qz_mean, _ = self.z_encoder(h, self.encoder_cats(batch.get("encoder"), h.dtype))
        return qz_mean

    def joint_embedding_loss(
        self, batch: dict[str, torch.Tensor], qz_mean: torch.Tensor
    ) -> torch.Tensor:
        """Barlow Twins loss between E_q[z | x] (``qz_mean``) and E_q[z | x*] (unweighted)."""
        z_thin = self.thinned_posterior_mean(batch)
        return barlow_twins_loss(qz_mean, z_thin, self.config.joint_embedding_off_diagonal)

    def library_posterior_mean(
        self, residual: torch.Tensor, x: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        """Residual library form: E_q[l_n] = r_n + log s + w · (log L_n − mean_p m_p).

        ``r_n`` is the library encoder's output, L_n the observed total count, m_p the
        uncentred per-group mean log library and s the centring sensitivity: at r = 0 and
        w = 1 the posterior mean is the prior's centring (log s + centred log library) for any
        s and w, without a (w − 1) · log s shift.
        """
        log_s = math.log(self.config.library_centring_sensitivity)
        # library_log_offset = mean_p m_p − log s
        centred = torch.log(x.sum(-1, keepdim=True).clamp_min(1.0)) - (
            self.library_log_offset + log_s
        )
        return residual + log_s + w * centred

    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        batch: dict[str, torch.Tensor],
        sample_theta: bool = True,
    ) -> dict[str, torch.Tensor]:
        """z, l → rho, mu and theta of the GammaPoisson likelihood."""
        continuous = batch["continuous"]
        dec_in = torch.cat([z, continuous], dim=-1) if continuous.shape[-1] else z
        rho = self.decoder(dec_in, self.decoder_cats(batch.get("nn_conditioning"), z.dtype))
        ambient = self.ambient_rate(batch.get("ambient"))
        scaling = self.feature_scaling(batch.get("feature_scaling"))
        rate = rho if ambient is None else rho + ambient
        if scaling is not None:
            rate = rate * scaling
        mu = torch.exp(library) * rate  # mu_ng = exp(l_n) · (rho_ng + s_{e_n,g}) · y_{t_n,g}
        log_theta_mean = self.log_theta_mean
        if sample_theta:
            eps = torch.randn_like(log_theta_mean)
            log_theta = log_theta_mean + self.log_theta_scale() * eps
        else:
            log_theta = log_theta_mean
        codes = batch["dispersion"][:, 0] if log_theta.shape[0] > 1 else None
        return {
            "rho": rho,
            "mu": mu,
            "log_theta": log_theta,  # (n_disp, G); cells use row ``dispersion_codes``
            "dispersion_codes": codes,  # (B,) or None (one group)
        }

    # ------------------------------------------------------------------ global priors
    def dispersion_kl(self, log_theta: torch.Tensor) -> torch.Tensor:
        """−entropy(q) − log p(1/sqrt(theta) | lambda) − log p(lambda), summed over genes × groups.

        The Exponential prior is on u = 1/sqrt(theta); q is over log theta, so the density is
        transformed with |du / dlog theta| = u / 2. That Jacobian puts the prior's mode at
        theta = lambda² (≈ 9 at the default prior mean m = 1/3 of 1/sqrt(theta)).
        Convention: lambda_d ~ Gamma(alpha, rate = alpha / E[lambda_d]) with E[lambda_d] = 1/m
        (rate alpha · m) unless ``dispersion_init="data"`` moved it, and
        E[1/sqrt(theta) | lambda] = 1/lambda.
        """
        c = self.config
        lam = self.dispersion_rate()
        u = torch.exp(-0.5 * log_theta)
        neg_entropy = -normal_entropy(self.log_theta_scale()).sum()
        log_p_u = (exponential_log_prob(u, lam[:, None]) + torch.log(0.5 * u)).sum()
        log_p_lam = gamma_log_prob(
            lam,
            c.dispersion_prior_alpha,
            c.dispersion_prior_alpha / self.dispersion_rate_prior_mean,
        ).sum()
        return neg_entropy - log_p_u - log_p_lam

    def global_penalties(
        self, log_theta: torch.Tensor, inference: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Global (gene/group plate) negative log-priors, before division by ``n_obs``."""
        c = self.config
        zero = log_theta.new_zeros(())
        terms = {"dispersion_kl": self.dispersion_kl(log_theta)}
        if c.use_ambient and c.regularise_background and len(self.ambient_log):
            # exp(beta) ~ Gamma(alpha, beta) (default Gamma(1, 100), mean 0.01)
            terms["ambient_prior"] = -sum(
                gamma_log_prob(torch.exp(p), c.ambient_prior_alpha, c.ambient_prior_beta).sum()
                for p in self.ambient_log
            )
        else:
            terms["ambient_prior"] = zero
        if c.use_feature_scaling:
            a = c.feature_scaling_prior_alpha
            terms["feature_scaling_prior"] = -sum(
                gamma_log_prob(F.softplus(p) / FEATURE_SCALING_DIVISOR, a, a).sum()
                for p in self.feature_scaling_raw
            )
        else:
            terms["feature_scaling_prior"] = zero
        terms["decoder_l2"] = c.decoder_l2 * sum((w**2).sum() for w in self.decoder.weights())
        if c.library_residual:
            # KL(q(w) || Exponential(1)) by one-sample Monte Carlo on log w
            log_w = inference["library_log_w"]
            w_scale = F.softplus(self.library_w_scale_raw)
            log_q = -normal_entropy(w_scale)  # E_q[log q(log w)]
            log_p = exponential_log_prob(torch.exp(log_w), torch.ones(())) + log_w
            terms["library_w_kl"] = log_q - log_p
        else:
            terms["library_w_kl"] = zero
        return terms

    # ------------------------------------------------------------------ loss
    def loss(
        self,
        batch: dict[str, torch.Tensor],
        n_obs: int,
        kl_weight: float = 1.0,
        sample: bool = True,
        skip_n_obs_check: bool = False,
        return_per_gene: bool = False,
        sample_theta: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Negative ELBO with the plate rule (docs/model.md#loss-and-the-plate-rule).

        Parameters
        ----------
        batch
            Minibatch from :class:`regvi.data.CountBatches`.
        n_obs
            Number of TRAINING cells (N_train), used to scale global priors — for training and
            validation alike. Refused when smaller than the batch unless ``skip_n_obs_check``.
        kl_weight
            KL warmup weight applied to KL(q(z) || p(z)).
        sample
            Sample z, l and theta (training); ``False`` uses posterior means.
        return_per_gene
            Also return the per-gene reconstruction loss (summed over the batch / B).
        sample_theta
            Sample theta from q(log theta) (``None``: as ``sample``). Validation and
            :meth:`regvi.RegVI.get_elbo` pass ``False``: z and l sampled, theta at its posterior
            mean exp(mu_theta), so the early-stopping ELBO carries no dispersion noise.

        Returns
        -------
        dict
            ``loss``, ``elbo``, ``reconstruction``, ``kl_z``, ``kl_library``, each global term,
            ``global``, ``kl_z_per_dim`` and ``theta_mean`` (detached-safe tensors); in training
            with ``joint_embedding_weight`` > 0 also ``joint_embedding`` (the unweighted Barlow
            Twins loss, added to ``loss`` × the weight but not to ``elbo``).
        """
        x = batch["x"]
        check_n_obs(n_obs, x.shape[0], skip_n_obs_check)
        inf = self.inference(batch, sample=sample)
        if sample_theta is None:
            sample_theta = sample
        gen = self.generative(inf["z"], inf["library"], batch, sample_theta=sample_theta)
        local = self.local_terms(batch, inf, gen, per_gene=return_per_gene)
        # local (cell plate) terms: summed over non-batch dims, MEANED over the minibatch
        reconstruction = local["reconstruction"].mean()
        kl_z_per_dim = local["kl_z_per_dim"]
        kl_z = kl_z_per_dim.sum(-1).mean()
        kl_library = local["kl_library"].mean()
        # global (gene / group plate) terms: divided by n_obs = N_train, never the batch size
        penalties = self.global_penalties(gen["log_theta"], inf)
        global_total = sum(penalties.values())
        elbo = reconstruction + kl_z + kl_library
        loss = reconstruction + kl_weight * kl_z + kl_library + global_total / n_obs
        extra: dict[str, torch.Tensor] = {}
        weight = self.config.joint_embedding_weight
        if weight > 0 and self.training:  # training only, not in the ELBO
            # one cell has no correlations: 0, but the key stays (the epoch accumulator)
            je = (
                self.joint_embedding_loss(batch, inf["qz_mean"])
                if x.shape[0] > 1
                else loss.new_zeros(())
            )
            extra["joint_embedding"] = je
            loss = loss + weight * je
        out = {
            "loss": loss,
            "elbo": elbo,
            "reconstruction": reconstruction,
            "kl_z": kl_z,
            "kl_library": kl_library,
            "global": global_total / n_obs,
            **{k: v / n_obs for k, v in penalties.items()},
            "kl_z_per_dim": kl_z_per_dim.mean(0),
            "theta_mean": torch.exp(gen["log_theta"]).mean(),
            **extra,
        }
        if return_per_gene:
            out["reconstruction_per_gene"] = (torch.lgamma(x + 1.0) - local["log_lik"]).mean(0)
        return out

    def local_terms(
        self,
        batch: dict[str, torch.Tensor],
        inf: dict[str, Any],
        gen: dict[str, torch.Tensor],
        per_gene: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Per-cell (cell-plate) terms, before averaging over the minibatch.

        Returns
        -------
        dict
            ``reconstruction`` ``(B,)`` = −log p(x | z, l) summed over features,
            ``kl_z_per_dim`` ``(B, D)``, ``kl_library`` ``(B,)`` and ``log_lik`` ``(B, G)``
            (without the lgamma(x + 1) constant; only with ``per_gene``).
        """
        x = batch["x"]
        # x ~ GammaPoisson(theta, theta / mu); lgamma(x + 1) is precomputed per cell (non-zeros)
        log_theta, codes = gen["log_theta"], gen["dispersion_codes"]
        if per_gene:
            log_theta_cell = log_theta if codes is None else log_theta.index_select(0, codes)
            theta_cell = torch.exp(log_theta_cell)
            log_lik = gamma_poisson_log_prob_unnormalised(
                x, gen["mu"], theta_cell, log_theta_cell, torch.lgamma(theta_cell)
            )
            log_lik_rows = log_lik.sum(-1)
        else:
            # per-cell sums from per-group theta: lgamma only at non-zero counts (same value,
            # see its docstring)
            log_lik = None
            nonzero = (batch["x_nonzero"], batch["x_values"]) if "x_nonzero" in batch else None
            log_lik_rows = gamma_poisson_log_prob_rows(x, gen["mu"], log_theta, codes, nonzero)
        kl_z_per_dim = normal_kl(
            inf["qz_mean"],
            inf["qz_var"],
            torch.zeros_like(inf["qz_mean"]),
            torch.ones_like(inf["qz_var"]),
        )
        lib_group = batch["library_size"][:, 0]
        kl_library = normal_kl(
            inf["ql_mean"][:, 0],
            inf["ql_var"][:, 0],
            self.library_prior_mean[lib_group],
            self.config.library_variance_weight * self.library_prior_var[lib_group],
        )
        return {
            "reconstruction": batch["log_x_factorial"] - log_lik_rows,
            "kl_z_per_dim": kl_z_per_dim,
            "kl_library": kl_library,
            "log_lik": log_lik,
        }


def check_n_obs(n_obs: int | None, n_batch: int, skip: bool = False) -> None:
    """Refuse a missing ``n_obs`` or one smaller than the minibatch (the plate rule,
    docs/model.md#loss-and-the-plate-rule)."""
    if n_obs is None:
        raise ValueError("loss() needs n_obs = number of training cells (got None)")
    if not skip and n_obs < n_batch:
        raise ValueError(
            f"n_obs={n_obs} is smaller than the minibatch ({n_batch} cells): n_obs must be the "
            "number of TRAINING cells (N_train), not the batch size. Pass "
            "skip_n_obs_check=True if this is intended."
        )
