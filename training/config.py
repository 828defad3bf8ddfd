"""Training configuration: one dataclass per SAE, one per job, one per activation cache.

A job makes one pass over the language model and trains every SAE in ``saes`` from it: several
hook points, and several configurations per hook point. Each field's own checks run in
``__post_init__``; the token-budget checks that tie fields together (``tokens`` against
``batch_tokens``, the buffer, the number of processes) run in :meth:`TrainConfig.check_budget`,
which :func:`saereg.training.job.prepare` calls once the hook points are known, so that an
unknown hook is reported first. Every check raises :class:`saereg.registry.errors.ConfigError`
naming the field to fix (its ``field``; the command line shows the option instead).

The command line builds its ``train`` and ``cache`` options from these classes: the docstring
under a field is its option's help, the field's default the option's default.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from saereg.registry.errors import ConfigError
from saereg.registry.sae.architectures import ARCHITECTURES, K_ARCHITECTURES
from saereg.training.fields import id_number, not_negative, one_of, positive

STRATEGIES = ("auto", "ddp")
PRECISIONS = ("32", "bf16-mixed")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
SPARSITY_ARCHITECTURES = ("relu", "jumprelu", "gated")
"""The architectures whose sparsity a coefficient (or target_l0) sets; the others take k."""
DEFAULT_SPARSITY = {"relu": 5.0, "gated": 5.0, "jumprelu": 1.0}
"""Sparsity coefficients when none is given, in the units of the normalised inputs."""
DEFAULT_PREACT = {"jumprelu": 1e-3}
"""Pre-activation loss weights when none is given (see SAETrainConfig.preact_coefficient)."""
DEFAULT_REFIT = {"relu": 0.1}
"""Decoder refit shares when none is given (see SAETrainConfig.decoder_refit)."""
DEFAULT_DEAD_TOKENS = 1_000_000
DEFAULT_REVIVE_UNTIL = {"topk": 0.8}
"""The share of the run split revival runs in when none is given (see revive_until)."""
REVIVAL_SAMPLE_TOKENS = 32768
"""Tokens (the inputs of the steps before a split revival round) a round clusters targets on;
rounds are at least this many tokens apart, so each sees only steps trained since the last."""
LM_DTYPES = ("float32", "bfloat16", "float16")
"""The dtypes a language model is loaded in (names of saereg.registry.sae.modules.DTYPES)."""


@dataclass
class SAETrainConfig:
    """One SAE to train."""

    hook: str
    """Hook point: a module path of the model (its output is the SAE's input), or a decoder
    layer number."""
    architecture: str = "topk"
    """Architecture: relu, topk, batchtopk, jumprelu, gated or matryoshka."""
    expansion: int = 8
    """d_sae = expansion x d_in, unless d_sae is given."""
    d_sae: int | None = None
    """Number of latents; overrides expansion."""
    k: int = 32
    """Active latents per token (topk, batchtopk, matryoshka)."""
    k_start: int | None = None
    """Anneal k from this value down to k over k_anneal_tokens (unset: k stays fixed)."""
    k_anneal_tokens: int = 0
    """Tokens over which k anneals from k_start to k."""
    sparsity_coefficient: float | None = None
    """L1 (relu, gated) or L0 (jumprelu) coefficient, in the units of the normalised inputs
    (E||x||^2 = d_in; unset: relu and gated 5, as in Anthropic's April 2024 recipe, jumprelu
    1). With target_l0 it is the controller's starting value (unset: a hundredth of the
    default)."""
    target_l0: float | None = None
    """Target L0 (relu, jumprelu, gated), an alternative to a fixed coefficient: after every
    step the sparsity coefficient is multiplied by exp(0.03 * log(L0 / target_l0)), the
    step's measured L0 over all processes (clipped to a factor of 1.03 either way), so it
    rises while the SAE is denser than the target and falls while it is sparser. The
    coefficient is saved in checkpoints and logged as sparsity_coefficient."""
    sparsity_warmup_tokens: int | None = None
    """Tokens over which a fixed sparsity coefficient rises linearly from zero (unset: the
    first 5% of the run; not used with target_l0, whose controller sets the coefficient)."""
    lr: float | None = None
    """Adam learning rate (unset: 2e-4 / sqrt(d_sae / 16384))."""
    aux_k_alpha: float = 1 / 32
    """Weight of the AuxK loss that revives dead latents (topk, batchtopk, matryoshka)."""
    aux_k: int | None = None
    """Dead latents the AuxK loss uses per token (unset: d_in // 2)."""
    dead_tokens: int | None = None
    """Tokens without firing after which a latent counts as dead, for AuxK and ghost grads
    (unset: 1M, or a tenth of the run's tokens when that is less, so that short runs revive
    dead latents too)."""
    ghost_grads: bool = False
    """Ghost grads for dead latents (relu only)."""
    revive_until: float | None = None
    """Share of the run, from its start, in which split revival runs (see
    saereg.training.revival): every revive_every tokens a round clusters each latent's targets
    on the last 32k tokens and moves the latents that carry least onto the second direction of
    latents that stand between two features (unset: 0.8 for topk, where it was measured to
    help, 0 for the others; 0 turns it off; never in a decoder refit)."""
    revive_every: int | None = None
    """Tokens between split revival rounds (unset: a twentieth of the run's tokens; at least
    32768, the tokens a round looks at)."""
    revive_share: float = 0.1
    """The most latents one split revival round moves, as a share of d_sae."""
    preact_coefficient: float | None = None
    """Weight of the pre-activation loss of relu, jumprelu and gated SAEs: c * sum_i
    relu(t_i - h_i) ||W_dec,i|| over the latents, averaged over tokens, where h_i is latent
    i's pre-activation (the gate's, for gated) and t_i its threshold (0 for relu and gated).
    It lifts the pre-activations of latents that do not fire toward their threshold, so a
    latent that stopped firing is pulled back (Anthropic, January 2025); Adam's scaling
    makes a small weight enough for a latent with no other gradient (unset: 1e-3 for
    jumprelu, 0 for relu and gated; 0 turns it off)."""
    bias_lr: float | None = None
    """Adam learning rate of the encoder biases of relu, jumprelu and gated SAEs (b_enc;
    b_gate and b_mag), which set where latents fire (unset: the SAE's lr x sqrt(d_in), like
    the JumpReLU thresholds: a bias is in the pre-activations' units, which a step of the
    encoder weights moves about sqrt(d_in) times as far as a step of one weight)."""
    decoder_refit: float | None = None
    """Share of the run, at its end, in which only the decoder learns (relu, jumprelu, gated):
    the encoder, its biases and the thresholds are frozen, so each token keeps the latents and
    L0 that training chose, and W_dec is fitted to the reconstruction error with no sparsity
    term. An L1 penalty shrinks every activation it keeps ("feature suppression", Wright and
    Sharkey 2024); refitting the decoder on the fixed code pays that back, as the relaxed
    lasso refits its chosen support (Meinshausen 2007). After each refit step every decoder
    row's norm moves into the encoder, so rows stay unit-norm and outputs are unchanged
    (unset: 0.1 for relu, 0 for jumprelu and gated, whose magnitudes no L1 penalty shrinks;
    0 turns it off)."""
    decoder_refit_lr: float | None = None
    """Adam learning rate of the decoder in the refit, decaying linearly to 0 at the last step
    (unset: 3 x the SAE's lr)."""
    jumprelu_init_threshold: float = 0.5
    """Initial threshold of every JumpReLU latent, in units of the RMS of the pre-activations
    on the first buffer (measured when training starts; cfg.json records the value used)."""
    jumprelu_bandwidth: float = 0.05
    """Width of the rectangle kernel of JumpReLU's straight-through estimator, in the
    normalised space (E||x||^2 = d_in: the JumpReLU paper's 0.001 at E||x||^2 = 1, d_in
    2304)."""
    jumprelu_threshold_lr: float | None = None
    """Adam learning rate of the JumpReLU thresholds (unset: the SAE's lr x sqrt(d_in), so a
    threshold moves at the same relative rate as the encoder weights)."""
    matryoshka_widths: list[int] | None = None
    """Nested prefix sizes of a matryoshka SAE, increasing, the last one d_sae (unset: d_sae/8,
    d_sae/4, d_sae/2, d_sae)."""
    b_dec_init: str = "geometric_median"
    """How b_dec starts, from the first buffer: geometric_median, mean or zeros."""
    seed: int = 0
    """Seed of the SAE's initial weights."""

    def __post_init__(self) -> None:
        one_of(self, "architecture", ARCHITECTURES)
        positive(self, "expansion", "k", "d_sae", "k_start", "lr", "dead_tokens", "aux_k",
                  "revive_every", "revive_share",
                  "jumprelu_init_threshold", "jumprelu_bandwidth", "jumprelu_threshold_lr",
                  "bias_lr", "target_l0", "decoder_refit_lr")
        not_negative(self, "k_anneal_tokens", "sparsity_coefficient", "sparsity_warmup_tokens",
                      "aux_k_alpha", "preact_coefficient", "decoder_refit", "revive_until")
        for name in ("revive_until", "revive_share"):
            value = getattr(self, name)
            if value is not None and value > 1:
                raise ConfigError(f"{name} is a share, at most 1 (got {value})", field=name)
        if self.decoder_refit is not None and self.decoder_refit >= 1:
            raise ConfigError(f"decoder_refit is a share of the run, less than 1 "
                              f"(got {self.decoder_refit})", field="decoder_refit")
        if self.decoder_refit and self.architecture not in SPARSITY_ARCHITECTURES:
            raise ConfigError(f"decoder_refit applies to {', '.join(SPARSITY_ARCHITECTURES)} "
                              f"SAEs; a {self.architecture} SAE picks its latents by rank, which "
                              f"a rescaled encoder would change", field="decoder_refit")
        if self.ghost_grads and self.architecture != "relu":
            raise ConfigError(f"ghost_grads apply to relu SAEs only; this one is "
                              f"{self.architecture}", field="ghost_grads")
        one_of(self, "b_dec_init", B_DEC_INITS)
        if self.target_l0 is not None and self.architecture not in SPARSITY_ARCHITECTURES:
            raise ConfigError(f"target_l0 applies to {', '.join(SPARSITY_ARCHITECTURES)} SAEs; "
                              f"a {self.architecture} SAE takes k", field="target_l0")

    def resolve(self, d_in: int) -> None:
        """Checks that need the hook's width: k < d_sae."""
        d_sae = self.width(d_in)
        if self.architecture in K_ARCHITECTURES:
            for name, k in (("k", self.k), ("k_start", self.k_start)):
                if k is not None and k >= d_sae:
                    raise ConfigError(f"{name} ({k}) must be smaller than d_sae ({d_sae}) for "
                                      f"hook {self.hook}", field=name)

    def width(self, d_in: int) -> int:
        return self.d_sae if self.d_sae is not None else self.expansion * d_in

    def default_lr(self, d_in: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.width(d_in) / 16384)

    def default_sparsity(self) -> float:
        if self.sparsity_coefficient is not None:
            return self.sparsity_coefficient
        return DEFAULT_SPARSITY.get(self.architecture, 0.0)

    def preact_of(self) -> float:
        """The pre-activation loss weight of this SAE (see preact_coefficient)."""
        return self._sparsity_setting(self.preact_coefficient, DEFAULT_PREACT)

    def refit_of(self) -> float:
        """The share of the run spent refitting the decoder (see decoder_refit)."""
        return self._sparsity_setting(self.decoder_refit, DEFAULT_REFIT)

    def _sparsity_setting(self, value: float | None, defaults: dict[str, float]) -> float:
        """A setting of relu, jumprelu and gated SAEs: 0 for the others, else ``value`` or
        (unset) the architecture's entry of ``defaults``."""
        if self.architecture not in SPARSITY_ARCHITECTURES:
            return 0.0
        return value if value is not None else defaults.get(self.architecture, 0.0)

    def refit_steps(self, total_steps: int) -> int:
        """Steps at the end of a run of ``total_steps`` that refit the decoder (at least one
        where the share is set, and never every step)."""
        share = self.refit_of()
        if not share or total_steps < 2:
            return 0
        return min(total_steps - 1, max(1, round(share * total_steps)))

    def revival_steps(self, total_steps: int, batch_tokens: int, run_tokens: int) -> list[int]:
        """The steps after whose update a split revival round runs (see revive_until): every
        revive_every tokens (at least REVIVAL_SAMPLE_TOKENS) within the first revive_until of
        the run, none in the refit; a run shorter than two samples has none."""
        until = (DEFAULT_REVIVE_UNTIL.get(self.architecture, 0.0) if self.revive_until is None
                 else self.revive_until)
        every_tokens = self.revive_every or max(1, run_tokens // 20)
        every = max(round(every_tokens / batch_tokens), -(-REVIVAL_SAMPLE_TOKENS // batch_tokens),
                    1)
        end = min(int(until * total_steps), total_steps - self.refit_steps(total_steps))
        return list(range(every, end, every))

    def refit_lr_of(self, d_in: int) -> float:
        """The decoder's learning rate in the refit (see decoder_refit_lr)."""
        if self.decoder_refit_lr is not None:
            return self.decoder_refit_lr
        return 3 * self.default_lr(d_in)

    def bias_lr_of(self, d_in: int) -> float:
        """The encoder biases' learning rate (see bias_lr)."""
        return self.bias_lr if self.bias_lr is not None else self._pre_activation_lr(d_in)

    def threshold_lr(self, d_in: int) -> float:
        """The JumpReLU thresholds' learning rate (see jumprelu_threshold_lr)."""
        if self.jumprelu_threshold_lr is not None:
            return self.jumprelu_threshold_lr
        return self._pre_activation_lr(d_in)

    def _pre_activation_lr(self, d_in: int) -> float:
        """lr x sqrt(d_in): the rate of a parameter in the pre-activations' units."""
        return self.default_lr(d_in) * math.sqrt(d_in)

    def dead_window(self, run_tokens: int) -> int:
        """Tokens without firing after which a latent is dead: dead_tokens, or (unset) 1M or
        a tenth of ``run_tokens``, whichever is less."""
        if self.dead_tokens is not None:
            return self.dead_tokens
        return max(1, min(DEFAULT_DEAD_TOKENS, run_tokens // 10))

    def warmup_tokens(self, run_tokens: int) -> int:
        """Tokens of the fixed coefficient's linear warm-up (see sparsity_warmup_tokens)."""
        if self.sparsity_warmup_tokens is not None:
            return self.sparsity_warmup_tokens
        return run_tokens // 20

    def sae_id(self) -> str:
        """A short unique name: hook, architecture, width, then every value a sweep can set
        (k, sparsity coefficient, target L0, learning rate) that applies and is set."""
        hook = re.sub(r"[^A-Za-z0-9]+", "_", self.hook).strip("_")
        width = f"d{self.d_sae}" if self.d_sae else f"x{self.expansion}"
        parts = [hook, self.architecture, width]
        if self.architecture in K_ARCHITECTURES:
            parts.append(f"k{self.k}")
        if self.architecture in SPARSITY_ARCHITECTURES:
            if self.target_l0 is not None:
                parts.append(f"l0_{id_number(self.target_l0)}")
            if self.sparsity_coefficient is not None:
                parts.append(f"c{id_number(self.sparsity_coefficient)}")
        if self.lr is not None:
            parts.append(f"lr{id_number(self.lr)}")
        return "-".join(parts)


@dataclass
class TrainConfig:
    """One training job: one language-model pass feeding every SAE in ``saes``."""

    model: str
    """Model reference: a packaged alias, a local folder, a .gguf file or a hub id."""
    saes: list[SAETrainConfig]
    """The SAEs to train (SAETrainConfig objects or their dicts), at least one."""
    dataset: str | None = None
    """Hub dataset name or local text/jsonl/parquet path (unset: the offline default corpus)."""
    text_column: str | None = None
    """Column holding the text (unset: text, or the first string column)."""
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
    """Adam's beta1 and beta2."""
    grad_clip: float = 1.0
    """Gradient norm clip, per SAE (0 disables)."""
    log_every: int = 10
    """Steps between metric logs."""
    checkpoint_every: int = 100
    """Steps between checkpoints (one more is written at the final step)."""
    eval_tokens: int = 8192
    """Held-out tokens for the final evaluation (CE-loss score, KL, explained variance)."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    devices: int = 1
    """Processes (one device each) per node; more than one trains data-parallel."""
    strategy: str = "auto"
    """Lightning strategy: auto (ddp when devices x num_nodes > 1) or ddp (one process per
    device, gradients averaged; gloo on CPU, nccl on CUDA); batch_tokens and tokens are totals
    over all processes."""
    num_nodes: int = 1
    """Machines taking part; each runs the same command (Lightning's launcher environment:
    MASTER_ADDR, MASTER_PORT, NODE_RANK, WORLD_SIZE, or torchrun)."""
    dtype: str = "float32"
    """Language-model dtype: float32, bfloat16 or float16."""
    compile: bool = False
    """torch.compile the loss of relu, jumprelu and gated SAEs (a few seconds to compile)."""
    precision: str = "32"
    """SAE training precision: 32, or bf16-mixed (autocast: the encoder's matrix product and
    the top-k selection in bfloat16, weights, gradients and Adam in float32)."""
    experiment: str = "sae-registry"
    """MLflow experiment name."""
    seed: int = 0
    """Seed of the data order and of every SAE's initial weights."""
    run_name: str | None = None
    """Name of the job's MLflow parent run (unset: job <job id>)."""
    from_cache: str | None = None
    """Train from this activation cache folder (see saereg.training.cache) instead of running
    the model."""

    def __post_init__(self) -> None:
        self.saes = [s if isinstance(s, SAETrainConfig) else SAETrainConfig(**s) for s in self.saes]
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]
        if not self.saes:
            raise ConfigError("saes is empty: at least one SAE (one hook point) is needed",
                              field="saes")
        positive(self, "context_size", "tokens", "batch_tokens", "lm_batch_size",
                  "buffer_tokens", "log_every", "checkpoint_every")
        not_negative(self, "eval_tokens", "lr_warmup_steps", "grad_clip")
        if self.context_size < 2:
            raise ConfigError(f"context_size must be at least 2 (BOS plus one token); got "
                              f"{self.context_size}", field="context_size")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise ConfigError(f"lr_decay_fraction must be within [0, 1]; got "
                              f"{self.lr_decay_fraction}", field="lr_decay_fraction")
        one_of(self, "dtype", LM_DTYPES)
        self._check_parallel()
        ids = [s.sae_id() for s in self.saes]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ConfigError(f"saes holds the same SAE twice: {', '.join(dupes)}", field="saes")

    def _check_parallel(self) -> None:
        for name in ("devices", "num_nodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be at least 1; got {value!r}", field=name)
        hint = ("; ddp_spawn would have to pickle the model, the streams and the MLflow client "
                "into new processes, use ddp") if self.strategy == "ddp_spawn" else ""
        one_of(self, "strategy", STRATEGIES, hint)
        one_of(self, "precision", PRECISIONS)
        if self.devices > 1 and (":" in self.device or self.device == "mps"):
            raise ConfigError(f"device {self.device} names a single device; with devices="
                              f"{self.devices} use cuda, cpu or auto", field="device")

    def check_budget(self) -> None:
        """The checks that tie the token budget together: at least one batch of tokens, a
        buffer that holds a batch, a batch that splits evenly over the processes."""
        if self.tokens < self.batch_tokens:
            raise ConfigError(f"tokens ({self.tokens}) is smaller than one batch "
                              f"(batch_tokens {self.batch_tokens})", field="tokens")
        if self.buffer_tokens < self.batch_tokens:
            raise ConfigError(f"buffer_tokens ({self.buffer_tokens}) must hold at least one "
                              f"batch (batch_tokens {self.batch_tokens})", field="buffer_tokens")
        if self.batch_tokens % self.world_size:
            raise ConfigError(f"batch_tokens ({self.batch_tokens}) must be divisible by the "
                              f"number of processes (devices x num_nodes = {self.world_size})",
                              field="batch_tokens")

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
