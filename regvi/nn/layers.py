"""Fully-connected blocks, encoders and the decoder.

Equations: docs/model.md#encoders and docs/model.md#decoder.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from typing import TypedDict

import torch
from torch import nn
from torch.nn import functional as F

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover
    from typing_extensions import Unpack

_ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "leaky_relu": nn.LeakyReLU}
#: names accepted by ``activation=``
ACTIVATIONS = tuple(_ACTIVATIONS)


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"activation={name!r}; expected one of {sorted(_ACTIVATIONS)}") from None


class CategoricalInjector(nn.Module):
    """One-hot encodes categorical covariates for concatenation to a layer input.

    Parameters
    ----------
    n_cats_per_key
        Number of categories of each key; keys with one level are ignored
        (docs/model.md#covariate-purposes).
    """

    def __init__(self, n_cats_per_key: Sequence[int]):
        super().__init__()
        self.n_cats = [int(n) for n in n_cats_per_key]
        self.keep = [i for i, n in enumerate(self.n_cats) if n > 1]
        self.n_out = sum(self.n_cats[i] for i in self.keep)

    def forward(self, cat_codes: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """Return ``(n_cells, sum n_cats)`` one-hot features or ``None`` when there are none."""
        if self.n_out == 0 or cat_codes is None:
            return None
        # a comparison, not F.one_hot: no data-dependent check, so jacrev / make_fx / compile
        # trace through it (the registry guarantees codes in [0, n_cats))
        parts = [
            (
                cat_codes[:, i, None]
                == torch.arange(self.n_cats[i], device=cat_codes.device, dtype=cat_codes.dtype)
            ).to(dtype)
            for i in self.keep
        ]
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def _full_precision(t: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 (autocast matmul outputs) → float32; other dtypes unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class BodyOptions(TypedDict, total=False):
    """Keyword options of the :class:`FCBlock` body of a :class:`Decoder` (defaults there)."""

    n_cat_features: int
    use_layer_norm: bool
    activation: str


class EncoderBodyOptions(BodyOptions, total=False):
    """Keyword options of the :class:`FCBlock` body of an :class:`Encoder` (defaults there)."""

    dropout_rate: float


class FCBlock(nn.Module):
    """Linear → LayerNorm (no affine) → activation → Dropout, per layer.

    Categorical one-hot features are concatenated to the input of every layer
    ("injection at every layer").
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        n_layers: int,
        n_cat_features: int = 0,
        dropout_rate: float = 0.1,
        use_layer_norm: bool = True,
        activation: str = "relu",
    ):
        super().__init__()
        self.linears = nn.ModuleList()
        self.post = nn.ModuleList()
        dims = [n_in] + [n_hidden] * n_layers
        for d_in, d_out in itertools.pairwise(dims):
            self.linears.append(nn.Linear(d_in + n_cat_features, d_out))
            layers: list[nn.Module] = []
            if use_layer_norm:
                layers.append(nn.LayerNorm(d_out, elementwise_affine=False))
            layers.append(_activation(activation))
            if dropout_rate > 0:
                layers.append(nn.Dropout(dropout_rate))
            self.post.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor, cat_features: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the block; ``cat_features`` is concatenated before every Linear."""
        for linear, post in zip(self.linears, self.post, strict=True):
            if cat_features is not None:
                x = torch.cat([x, cat_features], dim=-1)
            x = post(linear(x))
        return x


class _HeadedBlock(nn.Module):
    """An :class:`FCBlock` body ``n_in → n_hidden`` (``n_layers``) under output heads of width
    ``n_out``, which a subclass builds in :meth:`_heads` (after the body: the weights are drawn
    in that order)."""

    def __init__(
        self, n_in: int, n_out: int, n_hidden: int, n_layers: int, **body: Unpack[BodyOptions]
    ):
        super().__init__()
        self.body = FCBlock(n_in, n_hidden, n_layers, **body)
        self._heads(n_hidden, n_out)

    def _heads(self, n_hidden: int, n_out: int) -> None:
        raise NotImplementedError


class Encoder(_HeadedBlock):
    """Gaussian encoder q(z | x): FC block then mean and variance heads.

    ``var = exp(raw) + var_eps`` (default) or ``softplus(raw) + var_eps``.
    """

    def __init__(
        self,
        *dims: int,
        var_activation: str = "exp",
        var_eps: float = 1e-4,
        **body: Unpack[EncoderBodyOptions],
    ):
        """``dims``: ``n_in, n_out, n_hidden, n_layers``."""
        if var_activation not in ("exp", "softplus"):
            raise ValueError(f"var_activation={var_activation!r}; expected 'exp' or 'softplus'")
        super().__init__(*dims, **body)
        self.var_activation = var_activation
        self.var_eps = var_eps

    def _heads(self, n_hidden: int, n_out: int) -> None:
        self.mean = nn.Linear(n_hidden, n_out)
        self.var = nn.Linear(n_hidden, n_out)

    def forward(
        self, x: torch.Tensor, cat_features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return posterior mean and variance."""
        h = self.body(x, cat_features)
        # float32 heads: under mixed precision the matmuls run in bf16 / fp16, the KL in fp32
        raw = _full_precision(self.var(h))
        var = (torch.exp(raw) if self.var_activation == "exp" else F.softplus(raw)) + self.var_eps
        return _full_precision(self.mean(h)), var


class LibraryEncoder(Encoder):
    """q(l | x): a one-layer encoder with 16 hidden units and a scalar output
    (docs/model.md#encoders)."""

    def __init__(self, n_in: int, n_cat_features: int = 0, n_hidden: int = 16, **kwargs):
        super().__init__(n_in, 1, n_hidden, 1, n_cat_features=n_cat_features, **kwargs)


class Decoder(_HeadedBlock):
    """Decoder rho = softplus(Linear(FC(z ⊕ continuous, onehot(c)))) (docs/model.md#decoder);
    ``c`` are the decoder-conditioning keys (none: batch-free).

    The output is non-negative and not on the simplex. The decoder has no dropout.
    """

    def __init__(
        self, n_in: int, n_out: int, n_hidden: int, n_layers: int, **body: Unpack[BodyOptions]
    ):
        super().__init__(n_in, n_out, n_hidden, n_layers, dropout_rate=0.0, **body)

    def _heads(self, n_hidden: int, n_out: int) -> None:
        self.out = nn.Linear(n_hidden, n_out)

    def forward(self, z: torch.Tensor, cat_features: torch.Tensor | None = None) -> torch.Tensor:
        """Return the non-negative rate ``rho`` of shape ``(n_cells, n_out)``."""
        # float32 output (mixed precision): the likelihood is computed in fp32
        return F.softplus(_full_precision(self.out(self.body(z, cat_features))))

    def weights(self) -> list[torch.Tensor]:
        """Weight matrices (not biases), the target of the decoder L2 penalty."""
        return [lin.weight for lin in self.body.linears] + [self.out.weight]
