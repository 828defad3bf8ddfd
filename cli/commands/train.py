"""``saereg models``, ``saereg train`` and ``saereg quickstart``.

The options of ``train`` come from :class:`saereg.training.config.SAETrainConfig` and
:class:`saereg.training.config.TrainConfig` (see :data:`TRAIN_OPTIONS`). Only click and light
saereg modules are imported at module level; torch, transformers, Lightning and MLflow load when
a command runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import click

from saereg.commands.options import Count, Opt, config_options, fields_of
from saereg.training.config import SAETrainConfig, TrainConfig

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

TRAIN_OPTIONS = {
    "model": None,  # the MODEL argument
    "saes": None,  # built from the sweep options below
    "hook": Opt(dest="hooks", multiple=True, default=()),
    "architecture": Opt(flag="--arch", dest="archs", sweep=True),
    "k": Opt(dest="ks", sweep=True),
    "expansion": Opt(dest="expansions", sweep=True),
    "sparsity_coefficient": Opt(dest="sparsity_coefficients", sweep=True),
    "target_l0": Opt(dest="target_l0s", sweep=True),
    "lr": Opt(dest="lrs", sweep=True),
    "tokens": Opt(count=True),
    "batch_tokens": Opt(count=True),
    "buffer_tokens": Opt(count=True),
    "eval_tokens": Opt(count=True),
    "dead_tokens": Opt(count=True),
    "revive_every": Opt(count=True),
    "sparsity_warmup_tokens": Opt(count=True),
    "k_anneal_tokens": Opt(count=True),
    "from_cache": Opt(type=click.Path(file_okay=False)),
}
"""How ``train``'s options differ from the config fields they set."""


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


@click.command()
@click.argument("model", required=False)
@config_options(SAETrainConfig, TrainConfig, table=TRAIN_OPTIONS)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--register", "register", default=None, metavar="NAME",
              help="Register the trained SAE as the next version of NAME in the catalog "
                   "(several SAEs: NAME-<sae id> each).")
@click.option("--resume", "resume", default=None,
              help="Continue a stopped job (its folder or job id) from its last checkpoint.")
def train(model: str | None, no_progress: bool, register: str | None, resume: str | None,
          **options) -> None:
    """Train SAEs on MODEL's activations at one or more hook points, from one model pass.

    Every combination of --hook, --arch, --k, --expansion, --sparsity-coefficient,
    --target-l0 and --lr trains its own SAE with its own MLflow run and folder (k applies to
    topk, batchtopk and matryoshka; the coefficient and the target L0 to relu, jumprelu and
    gated), all from one model pass. Examples:

        saereg train smollm2-135m --hook model.layers.6 --hook model.layers.12 --k 32 --tokens 2M

        saereg train smollm2-135m --hook 6 --arch relu,jumprelu --target-l0 16,32,64
    """
    from saereg.training.job import run_training
    from saereg.training.sweep import sweep

    if resume:
        from saereg.training.job import finished_message

        job_dir = _job_dir(resume)
        done = finished_message(job_dir)
        if done:  # nothing to do, and nothing wrong: exit 0
            click.echo(done)
            return
        _finish(run_training(resume=job_dir, progress=not no_progress), register)
        return
    hooks = options.pop("hooks")
    if options["from_cache"]:
        from saereg.training.cache import read_manifest

        manifest = read_manifest(options["from_cache"])
        if model and model != manifest["model"]:
            raise click.UsageError(f"the cache holds activations of {manifest['model']}, "
                                   f"not {model}")
        model = manifest["model"]
        hooks = hooks or tuple(manifest["hooks"])
    if not model:
        raise click.UsageError("MODEL is required (or --resume JOB, or --from-cache PATH)")
    if not hooks:
        raise click.UsageError("at least one --hook is required; list them with: "
                               "saereg models hooks MODEL")
    saes = sweep(list(hooks), options.pop("archs"), options.pop("ks"), options.pop("expansions"),
                 sparsity_coefficients=options.pop("sparsity_coefficients"),
                 target_l0s=options.pop("target_l0s"), lrs=options.pop("lrs"),
                 **fields_of(SAETrainConfig, options))
    cfg = TrainConfig(model=model, saes=saes, **fields_of(TrainConfig, options))
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
@click.option("--register", default=None, metavar="NAME",
              help="Register the SAE as NAME (default: smollm2-l<layer>-topk).")
@click.option("--stats-tokens", type=Count(), default="32K", show_default=True,
              help="Tokens of the stats pass over the registered SAE.")
def quickstart(tokens: int, hook: str, no_progress: bool, register: str | None,
               stats_tokens: int) -> None:
    """Train a TopK SAE (k=32, 8x) on a middle layer of the packaged SmolLM2-135M-Instruct,
    on the offline default corpus; register it, study its features (a stats pass and the
    offline heuristic labels), then print where to look: `saereg serve` and the page of its
    first live feature.

    Small batches (1024 tokens) and lr 1e-3 make the most of a short CPU budget."""
    from rich.console import Console
    from rich.table import Table

    from saereg.analysis.labels import label_heuristic
    from saereg.analysis.stats import AnalyzeConfig, analyze
    from saereg.registry.api import get_version
    from saereg.training.config import SAETrainConfig, TrainConfig
    from saereg.training.job import run_training

    q = QUICKSTART
    cfg = TrainConfig(model=q["model"], tokens=tokens, batch_tokens=q["batch_tokens"],
                      run_name="quickstart", saes=[
        SAETrainConfig(hook=hook, architecture="topk", k=q["k"], expansion=q["expansion"],
                       lr=q["lr"], dead_tokens=q["dead_tokens"])])
    stats = AnalyzeConfig(tokens=stats_tokens)
    result = run_training(cfg, progress=not no_progress)
    if result is None:  # a data-parallel process of rank > 0
        return
    _report(result)
    layer = re.fullmatch(r"(?:(?:model\.)?layers\.)?(\d+)", hook)
    name = register or ("smollm2-" + (f"l{layer.group(1)}" if layer else
                                      re.sub(r"[^A-Za-z0-9]+", "-", hook).strip("-")) + "-topk")
    register_results(result, name)
    ref = get_version(name).ref  # the version just registered: the newest, and ready
    run_id = analyze(ref, stats, progress=not no_progress)
    made = label_heuristic(ref, progress=not no_progress)
    first = min((lab.feature_index for lab in made), default=0)
    url = f"http://127.0.0.1:8000/sae/{ref}/feature/{first}"
    table = Table(title="Browse what quickstart made", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("SAE", ref)
    table.add_row("stats", f"run {run_id}: {stats.tokens:,} tokens")
    table.add_row("labels", f"{len(made)} heuristic labels (every live feature)")
    table.add_row("serve", "saereg serve")
    table.add_row("open", url)
    Console(highlight=False).print(table)


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
