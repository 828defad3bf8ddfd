"""``saereg models``, ``saereg train`` and ``saereg quickstart``.

Only click is imported at module level; torch, transformers, Lightning and MLflow load when a
command runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import click

QUICKSTART = {
    "model": "smollm2-135m",
    "hook": "model.layers.15",
    "k": 32,
    "expansion": 8,
    "tokens": 300_000,
    "batch_tokens": 1024,
    "lr": 1e-3,
    "dead_tokens": 100_000,
}


def parse_count(value: str | int) -> int:
    """'200k', '1.5M', '2e6', '4096' -> int."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(-?[0-9.]+(?:e[0-9]+)?)\s*([kKmMbB]?)\s*", str(value))
    if not m:
        raise ValueError(value)
    mult = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


class Count(click.ParamType):
    name = "count"

    def __init__(self, minimum: int = 1):
        self.minimum = minimum

    def convert(self, value, param, ctx):
        try:
            n = parse_count(value)
        except ValueError:
            self.fail(f"{value!r} is not a count (examples: 4096, 200k, 1.5M)", param, ctx)
        if n < self.minimum:
            self.fail(f"{value} must be at least {self.minimum}", param, ctx)
        return n


def int_list(minimum: int = 1):
    def convert(ctx, param, value):
        if value is None:
            return None
        try:
            items = [parse_count(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of integers")
        bad = [i for i in items if i < minimum]
        if not items or bad:
            raise click.BadParameter(f"every value must be at least {minimum}; got {value}")
        return items
    return convert


@click.group()
def models() -> None:
    """Language models: list hook points and their shapes."""


@models.command("hooks")
@click.argument("model")
@click.option("--filter", "pattern", default=None, help="Only hook points containing this text.")
@click.option("--all", "show_all", is_flag=True, help="Include every sub-module, not only layers.")
def models_hooks(model: str, pattern: str | None, show_all: bool) -> None:
    """List MODEL's hook points (module paths) with their output shapes."""
    from rich.console import Console
    from rich.table import Table

    from saereg.training.lm import list_hook_points, load_lm

    lm = load_lm(model)
    points = list_hook_points(lm)
    if not show_all and not pattern:
        points = [p for p in points if re.search(r"layers\.\d+(\.(mlp|self_attn))?$", p.name)] or points
    if pattern:
        points = [p for p in points if pattern in p.name]
    table = Table(title=f"{lm.name}: {len(points)} hook points (output shape for a 1 x T input)")
    for col in ("hook point", "module", "shape"):
        table.add_column(col)
    for p in points:
        table.add_row(p.name, p.module_type, " x ".join(str(s) for s in p.shape))
    Console().print(table)


def train_options(f):
    opts = [
        click.option("--hook", "hooks", multiple=True, help="Hook point (module path); repeat for several."),
        click.option("--arch", "archs", default="topk", show_default=True,
                     help="Architectures, comma-separated: relu, topk, batchtopk, jumprelu, gated, matryoshka."),
        click.option("--k", "ks", default="32", show_default=True, callback=int_list(),
                     help="Active latents; comma-separated values train one SAE each."),
        click.option("--expansion", "expansions", default="8", show_default=True, callback=int_list(),
                     help="d_sae / d_in; comma-separated values train one SAE each."),
        click.option("--d-sae", type=click.IntRange(min=1), default=None, help="Latents (overrides --expansion)."),
        click.option("--tokens", type=Count(), default="1M", show_default=True, help="Training tokens."),
        click.option("--dataset", default=None, help="Hub dataset or local txt/jsonl/parquet path (default: offline corpus)."),
        click.option("--text-column", default=None, help="Column holding the text."),
        click.option("--context-size", type=click.IntRange(min=2), default=128, show_default=True),
        click.option("--batch-tokens", type=Count(), default="4096", show_default=True, help="Activations per step."),
        click.option("--lm-batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Context windows per model forward."),
        click.option("--buffer-tokens", type=Count(), default="64k", show_default=True, help="Shuffling buffer size."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Learning rate (default 2e-4 / sqrt(d_sae / 16384))."),
        click.option("--sparsity-coefficient", type=click.FloatRange(min=0), default=None,
                     help="L1 (relu, gated) or L0 (jumprelu) coefficient."),
        click.option("--sparsity-warmup-tokens", type=Count(minimum=0), default="0"),
        click.option("--k-start", type=click.IntRange(min=1), default=None, help="Anneal k from this value."),
        click.option("--k-anneal-tokens", type=Count(minimum=0), default="0"),
        click.option("--dead-tokens", type=Count(), default="1M", show_default=True,
                     help="Tokens without firing after which a latent counts as dead."),
        click.option("--aux-k-alpha", type=click.FloatRange(min=0), default=1 / 32, show_default=True),
        click.option("--ghost-grads", is_flag=True, help="Ghost grads for dead latents (relu)."),
        click.option("--eval-tokens", type=Count(minimum=0), default="8192", show_default=True),
        click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True),
        click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, show_default=True),
        click.option("--device", default="auto", show_default=True),
        click.option("--devices", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Processes per node, one device each; more than one trains data-parallel."),
        click.option("--strategy", default="auto", show_default=True,
                     help="auto or ddp (one process per device; --batch-tokens and --tokens are "
                          "totals over all processes)."),
        click.option("--num-nodes", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Machines running the same command (Lightning's launcher: MASTER_ADDR, "
                          "NODE_RANK, ... or torchrun)."),
        click.option("--dtype", default="float32", show_default=True, help="Model dtype."),
        click.option("--compile", "compile_", is_flag=True,
                     help="torch.compile the loss of relu, jumprelu and gated SAEs."),
        click.option("--precision", default="32", show_default=True,
                     help="SAE training precision: 32 or bf16-mixed (encoder product and top-k "
                          "in bfloat16, float32 weights and optimizer)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--experiment", default="sae-registry", show_default=True, help="MLflow experiment."),
        click.option("--run-name", default=None),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
        click.option("--register", "register", default=None, metavar="NAME",
                     help="Register the trained SAE as the next version of NAME in the catalog "
                          "(several SAEs: NAME-<sae id> each)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@click.command()
@click.argument("model", required=False)
@train_options
@click.option("--resume", "resume", default=None,
              help="Continue a stopped job (its folder or job id) from its last checkpoint.")
@click.option("--from-cache", "from_cache", default=None, type=click.Path(file_okay=False),
              help="Train from an activation cache (saereg cache) instead of running MODEL.")
def train(model, hooks, archs, ks, expansions, d_sae, tokens, dataset, text_column, context_size,
          batch_tokens, lm_batch_size, buffer_tokens, lr, sparsity_coefficient,
          sparsity_warmup_tokens, k_start, k_anneal_tokens, dead_tokens, aux_k_alpha,
          ghost_grads, eval_tokens, log_every, checkpoint_every, device, devices, strategy,
          num_nodes, dtype, compile_, precision, seed, experiment, run_name, no_progress,
          register, resume, from_cache) -> None:
    """Train SAEs on MODEL's activations at one or more hook points, from one model pass.

    Every combination of --hook, --arch, --k and --expansion trains its own SAE with its own
    MLflow run. Example:

        saereg train smollm2-135m --hook model.layers.6 --hook model.layers.12 --k 32 --tokens 2M
    """
    from saereg.training.job import run_training

    if resume:
        _finish(run_training(resume=_job_dir(resume), progress=not no_progress), register)
        return
    if from_cache:
        from saereg.training.cache import read_manifest

        manifest = read_manifest(from_cache)
        if model and model != manifest["model"]:
            raise click.UsageError(f"the cache holds activations of {manifest['model']}, "
                                   f"not {model}")
        model = manifest["model"]
        hooks = hooks or tuple(manifest["hooks"])
    if not model:
        raise click.UsageError("MODEL is required (or --resume JOB, or --from-cache PATH)")
    if not hooks:
        raise click.UsageError("at least one --hook is required; list them with: saereg models hooks MODEL")
    from saereg.training.config import TrainConfig, sweep

    arch_list = [a.strip() for a in archs.split(",") if a.strip()]
    saes = sweep(list(hooks), arch_list, ks, expansions, d_sae=d_sae, lr=lr,
                 sparsity_coefficient=sparsity_coefficient,
                 sparsity_warmup_tokens=sparsity_warmup_tokens, k_start=k_start,
                 k_anneal_tokens=k_anneal_tokens, dead_tokens=dead_tokens,
                 aux_k_alpha=aux_k_alpha, ghost_grads=ghost_grads, seed=seed)
    cfg = TrainConfig(model=model, saes=saes, dataset=dataset, text_column=text_column,
                      context_size=context_size, tokens=tokens, batch_tokens=batch_tokens,
                      lm_batch_size=lm_batch_size, buffer_tokens=buffer_tokens,
                      eval_tokens=eval_tokens, log_every=log_every,
                      checkpoint_every=checkpoint_every, device=device, devices=devices,
                      strategy=strategy, num_nodes=num_nodes, dtype=dtype,
                      compile=compile_, precision=precision, seed=seed,
                      experiment=experiment, run_name=run_name, from_cache=from_cache)
    _finish(run_training(cfg, progress=not no_progress), register)


def _finish(result, register: str | None) -> None:
    if result is None:  # a data-parallel process of rank > 0: rank 0 reports
        return
    _report(result)
    if register:
        register_results(result, register)


def register_results(result, name: str) -> None:
    """Register every SAE of a finished job; one SAE takes NAME, several NAME-<sae id>."""
    from saereg.registry.api import register_from_run
    from saereg.registry.errors import SaeRegError

    for r in result.saes:
        target = name if len(result.saes) == 1 else f"{name}-{r.sae_id}"
        try:
            info = register_from_run(r.run_id, target)
        except SaeRegError as e:
            raise SaeRegError(f"training finished, but registering {target!r} failed: {e}; "
                              f"retry with: saereg sae register --run {r.run_id} --name {target}"
                              ) from e
        click.echo(f"registered {target}@{info.number}")


def _job_dir(ref: str) -> Path:
    from saereg.registry.paths import runs_dir

    p = Path(ref).expanduser()
    if p.is_dir():
        return p
    if (runs_dir() / ref).is_dir():
        return runs_dir() / ref
    from saereg.registry.errors import NotFoundError

    known = sorted(d.name for d in runs_dir().glob("*")) if runs_dir().is_dir() else []
    raise NotFoundError("training job", ref, known)


@click.command()
@click.option("--tokens", type=Count(), default=str(QUICKSTART["tokens"]), show_default=True)
@click.option("--hook", default=QUICKSTART["hook"], show_default=True)
@click.option("--no-progress", is_flag=True)
@click.option("--register", default=None, metavar="NAME", help="Register the SAE as NAME.")
def quickstart(tokens: int, hook: str, no_progress: bool, register: str | None) -> None:
    """Train a TopK SAE (k=32, 8x) on a middle layer of the packaged SmolLM2-135M-Instruct,
    on the offline default corpus, then print where to look.

    Small batches (1024 tokens) and lr 1e-3 make the most of a short CPU budget."""
    from saereg.training.config import SAETrainConfig, TrainConfig
    from saereg.training.job import run_training

    q = QUICKSTART
    cfg = TrainConfig(model=q["model"], tokens=tokens, batch_tokens=q["batch_tokens"],
                      run_name="quickstart", saes=[
        SAETrainConfig(hook=hook, architecture="topk", k=q["k"], expansion=q["expansion"],
                       lr=q["lr"], dead_tokens=q["dead_tokens"])])
    _finish(run_training(cfg, progress=not no_progress), register)


def _report(result) -> None:
    """What the job made: per SAE its evaluation, MLflow run and folder; then where to look."""
    from rich.console import Console

    console = Console(highlight=False)

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    console.print(f"[bold]job {result.job_dir.name}[/] finished: {len(result.saes)} SAE(s)")
    for r in result.saes:
        m = r.metrics
        console.print(f"\n[bold]{r.sae_id}[/]  hook {r.hook}, {r.architecture}, d_sae {r.d_sae}"
                      + (f", k {r.k}" if r.k else ""))
        console.print(f"  held-out: explained variance {f(m.get('explained_variance'), '.3f')} "
                      f"(per token {f(m.get('explained_variance_per_token'), '.3f')})  "
                      f"L0 {f(m.get('l0'), '.1f')}  CE-loss score {f(m.get('ce_loss_score'), '.3f')}  "
                      f"KL {f(m.get('kl_div'), '.4f')}  dead {f(m.get('dead_fraction'), '.3f')}")
        console.print(f"  MLflow run {r.run_id}")
        console.print(f"  folder     {r.folder}", soft_wrap=True)
    console.print(f"\nMLflow parent run: {result.parent_run_id}")
    uri = result.tracking_uri
    hint = uri if uri.startswith("http") else f"mlflow ui --backend-store-uri {uri}"
    console.print(f"Browse the runs:  {hint}", soft_wrap=True)
