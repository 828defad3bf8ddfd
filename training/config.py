"""Training configuration: one dataclass per SAE, one per job.

A job makes one pass over the language model and trains every SAE in ``saes`` from it: several
hook points, and several configurations per hook point. Cross-field checks run in
``__post_init__`` and raise :class:`saereg.registry.errors.ConfigError` naming the field to fix.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from saereg.registry.errors import ConfigError
from saereg.registry.sae.modules import ARCHITECTURES, K_ARCHITECTURES

STRATEGIES = ("auto", "ddp")
PRECISIONS = ("32", "bf16-mixed")


@dataclass
class SAETrainConfig:
    """One SAE to train."""

    hook: str
    """Module path of the hook point (its output is the SAE's input)."""
    architecture: str = "topk"
    """relu, topk, batchtopk, jumprelu, gated or matryoshka."""
    expansion: int = 8
    """d_sae = expansion * d_in, unless d_sae is given."""
    d_sae: int | None = None
    """Number of latents; overrides expansion."""
    k: int = 32
    """Active latents per token (topk, batchtopk, matryoshka)."""
    k_start: int | None = None
    """k schedule: anneal k from this value to k over k_anneal_tokens (None: fixed k)."""
    k_anneal_tokens: int = 0
    """Tokens over which k anneals from k_start to k."""
    sparsity_coefficient: float | None = None
    """L1 (relu, gated) or L0 (jumprelu) coefficient; None picks the architecture default."""
    sparsity_warmup_tokens: int = 0
    """Tokens over which the sparsity coefficient rises linearly from zero."""
    lr: float | None = None
    """Adam learning rate; None: 2e-4 / sqrt(d_sae / 16384)."""
    aux_k_alpha: float = 1 / 32
    """Weight of the AuxK loss (topk, batchtopk, matryoshka)."""
    aux_k: int | None = None
    """Dead latents used by AuxK per token; None: d_in // 2."""
    dead_tokens: int = 1_000_000
    """A latent that has not fired for this many tokens counts as dead."""
    ghost_grads: bool = False
    """Ghost grads for dead latents (relu only)."""
    jumprelu_init_threshold: float = 0.001
    jumprelu_bandwidth: float = 0.001
    matryoshka_widths: list[int] | None = None
    """Nested prefix sizes (matryoshka); None: d_sae/8, d_sae/4, d_sae/2, d_sae."""
    b_dec_init: str = "geometric_median"
    """How b_dec starts: geometric_median, mean or zeros (from the first buffer)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"--arch must be one of {', '.join(ARCHITECTURES)}; "
                              f"got {self.architecture!r}")
        for name in ("expansion", "k"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive; got {getattr(self, name)}")
        if self.d_sae is not None and self.d_sae <= 0:
            raise ConfigError(f"--d-sae must be positive; got {self.d_sae}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be positive; got {self.lr}")
        if self.sparsity_coefficient is not None and self.sparsity_coefficient < 0:
            raise ConfigError("--sparsity-coefficient must not be negative")
        if self.dead_tokens <= 0:
            raise ConfigError(f"--dead-tokens must be positive; got {self.dead_tokens}")
        if self.ghost_grads and self.architecture != "relu":
            raise ConfigError("ghost grads apply to relu SAEs only")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ConfigError("b_dec_init must be geometric_median, mean or zeros")
        if self.k_start is not None and self.k_start <= 0:
            raise ConfigError("--k-start must be positive")

    def resolve(self, d_in: int) -> None:
        """Checks that need the hook's width: k < d_sae, matryoshka widths."""
        d_sae = self.width(d_in)
        if self.architecture in K_ARCHITECTURES:
            for name, k in (("k", self.k), ("k_start", self.k_start)):
                if k is not None and k >= d_sae:
                    raise ConfigError(f"--{name.replace('_', '-')} ({k}) must be smaller than "
                                      f"d_sae ({d_sae}) for hook {self.hook}")

    def width(self, d_in: int) -> int:
        return self.d_sae if self.d_sae is not None else self.expansion * d_in

    def default_lr(self, d_in: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.width(d_in) / 16384)

    def default_sparsity(self) -> float:
        if self.sparsity_coefficient is not None:
            return self.sparsity_coefficient
        return {"relu": 5.0, "gated": 5.0, "jumprelu": 0.05}.get(self.architecture, 0.0)

    def sae_id(self) -> str:
        """A short unique-ish name: hook, architecture, width and k."""
        hook = re.sub(r"[^A-Za-z0-9]+", "_", self.hook).strip("_")
        width = f"d{self.d_sae}" if self.d_sae else f"x{self.expansion}"
        k = f"-k{self.k}" if self.architecture in K_ARCHITECTURES else ""
        return f"{hook}-{self.architecture}-{width}{k}"


@dataclass
class TrainConfig:
    """One training job: one language-model pass feeding every SAE in ``saes``."""

    model: str
    """Model reference: a packaged alias, a local folder, a .gguf file or a hub id."""
    saes: list[SAETrainConfig]
    dataset: str | None = None
    """Hub dataset name or local text/jsonl/parquet path; None: the offline default corpus."""
    text_column: str | None = None
    context_size: int = 128
    """Tokens per context window (BOS first)."""
    tokens: int = 1_000_000
    """Training tokens per SAE (special-token positions are not counted), over all processes."""
    batch_tokens: int = 4096
    """Activations per optimiser step, over all processes: each of the ``world_size``
    processes of a data-parallel job draws ``batch_tokens // world_size`` of them."""
    lm_batch_size: int = 8
    """Context windows per language-model forward pass."""
    buffer_tokens: int = 65536
    """Shuffling buffer size (activations held per hook, in each process)."""
    lr_warmup_steps: int = 50
    """Linear learning-rate warm-up (at most a tenth of the steps)."""
    lr_decay_fraction: float = 0.2
    """Fraction of the steps, at the end, over which the learning rate decays linearly to 0."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    """Gradient norm clip, per SAE (0 disables)."""
    log_every: int = 10
    """Steps between metric logs."""
    checkpoint_every: int = 100
    """Steps between checkpoints."""
    eval_tokens: int = 8192
    """Held-out tokens for the final evaluation (CE-loss score, KL, explained variance)."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    devices: int = 1
    """Processes (one device each) per node; more than one trains data-parallel."""
    strategy: str = "auto"
    """Lightning strategy: auto (ddp when devices x num_nodes > 1) or ddp (one process per
    device, gradients averaged; gloo on CPU, nccl on CUDA)."""
    num_nodes: int = 1
    """Machines taking part; each runs the same command (Lightning's launcher environment:
    MASTER_ADDR, MASTER_PORT, NODE_RANK, WORLD_SIZE, or torchrun)."""
    dtype: str = "float32"
    """Language-model dtype."""
    compile: bool = False
    """torch.compile the loss of relu, jumprelu and gated SAEs (a few seconds to compile)."""
    precision: str = "32"
    """SAE training precision: 32, or bf16-mixed (autocast: the encoder's matrix product and
    the top-k selection in bfloat16, weights, gradients and Adam in float32)."""
    experiment: str = "sae-registry"
    """MLflow experiment name."""
    seed: int = 0
    run_name: str | None = None
    from_cache: str | None = None
    """Train from this activation cache folder instead of running the model (see saereg.training.cache)."""

    def __post_init__(self) -> None:
        self.saes = [s if isinstance(s, SAETrainConfig) else SAETrainConfig(**s) for s in self.saes]
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]
        if not self.saes:
            raise ConfigError("at least one --hook is needed")
        positive = ("context_size", "tokens", "batch_tokens", "lm_batch_size", "buffer_tokens",
                    "log_every", "checkpoint_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive; "
                                  f"got {getattr(self, name)}")
        if self.context_size < 2:
            raise ConfigError("--context-size must be at least 2 (BOS plus one token)")
        if self.tokens < self.batch_tokens:
            raise ConfigError(f"--tokens ({self.tokens}) is smaller than one batch "
                              f"(--batch-tokens {self.batch_tokens})")
        if self.buffer_tokens < self.batch_tokens:
            raise ConfigError(f"--buffer-tokens ({self.buffer_tokens}) must hold at least one "
                              f"batch ({self.batch_tokens})")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise ConfigError("lr_decay_fraction must be within [0, 1]")
        if self.eval_tokens < 0:
            raise ConfigError("--eval-tokens must not be negative")
        self._check_parallel()
        ids = [s.sae_id() for s in self.saes]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ConfigError(f"the same SAE is configured twice: {', '.join(dupes)}")

    def _check_parallel(self) -> None:
        for name in ("devices", "num_nodes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1; "
                                  f"got {getattr(self, name)!r}")
        if self.strategy not in STRATEGIES:
            hint = ("; ddp_spawn would have to pickle the model, the streams and the MLflow "
                    "client into new processes, use ddp") if self.strategy == "ddp_spawn" else ""
            raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}; "
                              f"got {self.strategy!r}{hint}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}; "
                              f"got {self.precision!r}")
        if self.devices > 1 and (":" in self.device or self.device == "mps"):
            raise ConfigError(f"--device {self.device} names a single device; with --devices "
                              f"{self.devices} use --device cuda, cpu or auto")
        if self.batch_tokens % self.world_size:
            raise ConfigError(f"--batch-tokens ({self.batch_tokens}) must be divisible by the "
                              f"number of processes (--devices x --num-nodes = {self.world_size})")

    @property
    def world_size(self) -> int:
        """Processes in the job: devices x num_nodes."""
        return self.devices * self.num_nodes

    @property
    def total_steps(self) -> int:
        return self.tokens // self.batch_tokens

    @property
    def hooks(self) -> list[str]:
        return list(dict.fromkeys(s.hook for s in self.saes))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def flat_params(cfg: TrainConfig, sae: SAETrainConfig) -> dict[str, str]:
    """Every setting that shaped one SAE, flattened for MLflow params."""
    job = {k: v for k, v in cfg.to_dict().items() if k != "saes"}
    out = {f"job.{k}": v for k, v in job.items()}
    out.update({f"sae.{k}": v for k, v in asdict(sae).items()})
    return {k: "" if v is None else str(v)[:500] for k, v in out.items()}


def sweep(hooks: list[str], architectures: list[str], ks: list[int], expansions: list[int],
          **common: Any) -> list[SAETrainConfig]:
    """The cartesian product of hooks x architectures x k x expansion (k only where it applies)."""
    out: list[SAETrainConfig] = []
    for hook in hooks:
        for arch in architectures:
            for k in (ks if arch in K_ARCHITECTURES else ks[:1]):
                for expansion in expansions:
                    out.append(SAETrainConfig(hook=hook, architecture=arch, k=k,
                                              expansion=expansion, **common))
    return out

