"""SAE configuration and torch modules for every architecture.

Architectures: ``relu`` (standard SAE, L1 penalty), ``topk``, ``batchtopk``, ``jumprelu``,
``gated`` and ``matryoshka`` (BatchTopK with nested dictionaries). Every module shares the
same parameter names as the SAELens 6 layout (``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in],
``b_enc``, ``b_dec``, plus ``threshold`` for JumpReLU and ``b_gate``/``b_mag``/``r_mag`` for
gated), so saving is a plain write of the state dict (see :mod:`saereg.registry.sae.folder`).

Input normalisation: training multiplies inputs by a fixed ``norm_scale`` (chosen so that
E||x||^2 = d_in) and divides outputs by it. :meth:`SAE.fold_normalization` folds the scale into
the weights so that a saved SAE takes raw activations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from saereg.registry.errors import ConfigError
from saereg.registry.sae.architectures import ARCHITECTURES, K_ARCHITECTURES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
"""Every dtype this project names (SAE weights, language models, activations), by name."""


def torch_dtype(name: str | torch.dtype, choices: tuple[str, ...] | None = None, *,
                field: str = "dtype") -> torch.dtype:
    """The torch dtype called ``name`` (a dtype passes through), one of ``choices`` (default:
    every name in :data:`DTYPES`); otherwise ConfigError naming ``field`` and the choices."""
    allowed = choices or tuple(DTYPES)
    if isinstance(name, torch.dtype):
        name = dtype_name(name) or str(name)
    if name not in allowed:
        raise ConfigError(f"{field} must be one of {', '.join(allowed)}; got {name!r}",
                          field=field)
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str | None:
    """The name :data:`DTYPES` gives ``dtype`` (None for a dtype it does not name)."""
    return next((name for name, d in DTYPES.items() if d == dtype), None)


@dataclass
class SAEConfig:
    """Shape and inference behaviour of one SAE (what cfg.json records)."""

    d_in: int
    """Width of the activations the SAE reads (the hook point's last dimension)."""
    d_sae: int
    """Number of latents (dictionary size)."""
    architecture: str = "topk"
    """One of relu, topk, batchtopk, jumprelu, gated, matryoshka."""
    k: int | None = None
    """Active latents per token for topk, batchtopk (average) and matryoshka."""
    dtype: str = "float32"
    """Parameter dtype, as a string (float32, bfloat16, ...)."""
    device: str = "cpu"
    """Device the weights were saved from (informative; loading chooses its own)."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding."""
    jumprelu_init_threshold: float = 0.001
    """Initial threshold for JumpReLU latents."""
    jumprelu_bandwidth: float = 0.001
    """Width of the rectangle kernel of the straight-through estimator."""
    matryoshka_widths: list[int] | None = None
    """Nested dictionary sizes for matryoshka, increasing, the last one equal to d_sae."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """model_name, hook_name, context_size, dataset_path, ... (free-form, JSON-serialisable)."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture must be one of {', '.join(ARCHITECTURES)}; "
                              f"got {self.architecture!r}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ConfigError(f"d_in and d_sae must be positive; got d_in={self.d_in}, "
                              f"d_sae={self.d_sae}")
        torch_dtype(self.dtype)
        if self.architecture in K_ARCHITECTURES:
            if self.k is None:
                raise ConfigError(f"architecture {self.architecture} needs k")
            if not 0 < self.k < self.d_sae:
                raise ConfigError(f"k must be in 1..d_sae-1 (d_sae={self.d_sae}); got k={self.k}")
        if self.architecture == "matryoshka":
            widths = self.matryoshka_widths or default_matryoshka_widths(self.d_sae)
            if any(b <= a for a, b in zip(widths, widths[1:])) or widths[0] <= 0:
                raise ConfigError(f"matryoshka_widths must be increasing and positive; got {widths}")
            if widths[-1] != self.d_sae:
                raise ConfigError(f"the last matryoshka width must equal d_sae={self.d_sae}; "
                                  f"got {widths[-1]}")
            self.matryoshka_widths = list(widths)
        if self.jumprelu_init_threshold <= 0 or self.jumprelu_bandwidth <= 0:
            raise ConfigError("jumprelu_init_threshold and jumprelu_bandwidth must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def default_matryoshka_widths(d_sae: int, groups: int = 4) -> list[int]:
    """Doubling prefix sizes ending at d_sae: d_sae/8, d_sae/4, d_sae/2, d_sae for 4 groups."""
    widths = [max(1, d_sae >> (groups - 1 - i)) for i in range(groups)]
    return sorted(set(widths))


class SAE(nn.Module):
    """Base module: linear encoder, an activation chosen by the subclass, linear decoder."""

    architecture = "relu"
    picks_by_rank = False
    """TopK family: a latent fires by its rank among the pre-activations."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        dtype = DTYPES[cfg.dtype]
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        self.register_buffer("norm_scale", torch.ones((), dtype=torch.float32))
        self.reset_parameters()

    # -- initialisation ---------------------------------------------------------------------
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows, encoder tied to the decoder transpose."""
        with torch.no_grad():
            w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator,
                            dtype=torch.float32)
            w /= w.norm(dim=1, keepdim=True)
            self.W_dec.copy_(w)
            self.W_enc.copy_(w.T)
            for name in ("b_enc", "b_dec"):
                if hasattr(self, name):
                    getattr(self, name).zero_()

    # -- forward ----------------------------------------------------------------------------
    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.norm_scale.to(x.dtype)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations for raw input x (the normalisation is applied here)."""
        x = self.normalize_input(x.to(self.W_enc.dtype))
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x))

    def decode_normalized(self, acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the normalised space (what the training loss compares)."""
        return acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return self.decode_normalized(acts) / self.norm_scale.to(self.W_dec.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # -- normalisation folding --------------------------------------------------------------
    @torch.no_grad()
    def fold_normalization(self) -> None:
        """Fold ``norm_scale`` into the weights; afterwards norm_scale is 1 and outputs agree.

        With x_n = s*x: (x_n - b_dec) W_enc = (x - b_dec/s)(s W_enc), and the output
        (f W_dec + b_dec)/s = f (W_dec/s) + b_dec/s. Pre-activations are unchanged, so
        thresholds and gates are too.
        """
        s = float(self.norm_scale)
        if s == 1.0:
            return
        self._scale_input_weights(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)
        self.norm_scale.fill_(1.0)

    def _scale_input_weights(self, s: float) -> None:
        self.W_enc.mul_(s)

    # -- export -----------------------------------------------------------------------------
    def export_architecture(self) -> str:
        """Architecture name written to cfg.json (SAELens inference class)."""
        return "standard" if self.architecture == "relu" else self.architecture

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors for sae_weights.safetensors (normalisation must already be folded)."""
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        sd.pop("norm_scale", None)
        return sd

    @torch.no_grad()
    def set_decoder_norm_to_unit(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """Unit-norm decoder rows with every output unchanged: latent i's activation is
        multiplied by n_i = ||W_dec,i|| (the encoder side scales) and its row divided by it.
        The latents fire where they did; only how strongly changes (f_i d_i is the same)."""
        if self.picks_by_rank:
            raise TypeError(f"a {self.architecture} SAE picks its latents by rank: scaling them "
                            f"one by one would change which fire")
        n = self.W_dec.norm(dim=1).clamp_min(1e-8)
        self._scale_activations(n)
        self.W_dec.div_(n.unsqueeze(1))

    def _scale_activations(self, n: torch.Tensor) -> None:
        """Multiply every latent's activation by n [d_sae] (n > 0) through its encoder."""
        self.W_enc.mul_(n)
        self.b_enc.mul_(n)

    @torch.no_grad()
    def remove_decoder_radial_grad(self) -> None:
        """Project out the gradient component parallel to each decoder row, in place:
        g_i -= (<g_i, w_i> / ||w_i||^2) w_i, with no temporary the size of W_dec."""
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec
        dots = torch.bmm(g.unsqueeze(1), w.unsqueeze(2)).view(-1)
        coef = dots.div_(w.norm(dim=1).square_().clamp_min_(1e-16))
        g.addcmul_(w, coef.unsqueeze(1), value=-1)


class ReLUSAE(SAE):
    architecture = "relu"


def topk_acts(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest pre-activations per row (ReLU applied), zero elsewhere."""
    values, idx = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, idx, values.relu())


class TopKSAE(SAE):
    architecture = "topk"
    picks_by_rank = True

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.k = int(cfg.k)  # may be annealed during training (k schedule)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return topk_acts(pre, self.k)


class JumpReLUSAE(SAE):
    """z * H(z - threshold); trained with a straight-through estimator (saereg.training.losses)."""

    architecture = "jumprelu"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.threshold = nn.Parameter(
            torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold, dtype=DTYPES[cfg.dtype]))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) * (pre > self.threshold)

    def _scale_activations(self, n: torch.Tensor) -> None:
        super()._scale_activations(n)
        self.threshold.mul_(n)


class BatchTopKSAE(SAE):
    """Training: keep the k*batch largest activations of the whole batch. Inference: a single
    threshold learned as an EMA of the smallest kept activation; exported as jumprelu."""

    architecture = "batchtopk"
    picks_by_rank = True

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.k = int(cfg.k)
        # Negative until the first training batch sets it: then per-token topk is used.
        self.register_buffer("threshold", torch.full((), -1.0, dtype=torch.float32))

    def batch_topk(self, pre: torch.Tensor) -> torch.Tensor:
        flat = torch.relu(pre).flatten()
        n = min(self.k * pre.shape[0], flat.numel())
        values, idx = flat.topk(n, sorted=False)
        return torch.zeros_like(flat).scatter_(0, idx, values).view_as(pre)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.batch_topk(pre)
        if float(self.threshold) < 0:
            return topk_acts(pre, self.k)
        return torch.relu(pre) * (pre > self.threshold.to(pre.dtype))

    @torch.no_grad()
    def update_threshold(self, acts: torch.Tensor, momentum: float = 0.01) -> None:
        positive = acts[acts > 0]
        if positive.numel() == 0:
            return
        smallest = positive.min().float()
        if float(self.threshold) < 0:
            self.threshold.copy_(smallest)
        else:
            self.threshold.mul_(1 - momentum).add_(momentum * smallest)

    def export_architecture(self) -> str:
        return "jumprelu"

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        sd = super().export_state_dict()
        t = max(float(self.threshold), 0.0)
        sd["threshold"] = torch.full((self.cfg.d_sae,), t, dtype=self.W_enc.dtype)
        return sd


class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK with nested dictionaries: every prefix of the latents (cfg.matryoshka_widths)
    must reconstruct on its own (the nested loss lives in saereg.training.losses)."""

    architecture = "matryoshka"


class GatedSAE(SAE):
    """Gate path decides which latents fire, magnitude path (W_enc * exp(r_mag)) how much."""

    architecture = "gated"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        del self.b_enc
        dtype = DTYPES[cfg.dtype]
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        for name in ("b_gate", "b_mag", "r_mag"):
            if hasattr(self, name):
                getattr(self, name).data.zero_()

    def _centered(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize_input(x.to(self.W_enc.dtype))
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Gate pre-activations."""
        return self._centered(x) @ self.W_enc + self.b_gate

    def gate_and_magnitude(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xc = self._centered(x)
        proj = xc @ self.W_enc
        return proj + self.b_gate, proj * self.r_mag.exp() + self.b_mag

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        gate_pre, mag_pre = self.gate_and_magnitude(x)
        return (gate_pre > 0).to(mag_pre.dtype) * torch.relu(mag_pre)

    def _scale_activations(self, n: torch.Tensor) -> None:
        """The magnitude path only: the gate, which decides where a latent fires, keeps W_enc."""
        self.r_mag.add_(n.log())
        self.b_mag.mul_(n)


SAE_CLASSES: dict[str, type[SAE]] = {
    "relu": ReLUSAE, "standard": ReLUSAE, "topk": TopKSAE, "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE, "gated": GatedSAE, "matryoshka": MatryoshkaSAE,
}


def build_sae(cfg: SAEConfig, seed: int | None = None) -> SAE:
    """A freshly initialised SAE for ``cfg`` (deterministic when ``seed`` is given)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    sae = SAE_CLASSES[cfg.architecture](cfg)
    if generator is not None:
        sae.reset_parameters(generator)
    return sae


def expected_norm_scale(x: torch.Tensor) -> float:
    """Scale s with E||s x||^2 = d_in, from a sample of activations [N, d_in]."""
    mean_sq = x.float().pow(2).sum(-1).mean().item()
    if not math.isfinite(mean_sq) or mean_sq <= 0:
        raise ValueError("cannot estimate a normalisation scale from zero or non-finite activations")
    return math.sqrt(x.shape[-1] / mean_sq)
