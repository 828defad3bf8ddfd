"""`saereg train` and `saereg cache` take their options from the config dataclasses: every
option has help and the field's default, and every field has a docstring. A ConfigError names
the library argument from Python and the option that sets it on the command line (exit 2). An
unknown hook is reported before any token-budget check. `prepare` and `prepare_cache` return a
resolved copy and leave the caller's config as it was."""

from __future__ import annotations

import dataclasses
import pickle

import click
import pytest
from click.testing import CliRunner

from saereg.commands.cache import cache
from saereg.commands.main import cli
from saereg.commands.options import FieldOption, field_docs
from saereg.commands.train import train
from saereg.registry.errors import ConfigError
from saereg.registry.sae.architectures import ARCHITECTURES
from saereg.training.cache_config import CacheConfig
from saereg.training.config import SAETrainConfig, TrainConfig
from saereg.training.fields import format_count, parse_count


def test_every_config_field_has_a_docstring():
    for cls in (SAETrainConfig, TrainConfig, CacheConfig):
        assert set(field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}, cls


@pytest.mark.parametrize("command", [train, cache], ids=["train", "cache"])
def test_every_option_has_help_and_the_field_default(command):
    ctx = click.Context(command, info_name=command.name)
    options = [p for p in command.params if isinstance(p, click.Option)]
    for p in options:
        assert p.help, p.opts
    fields = [p for p in options if isinstance(p, FieldOption)]
    assert len(fields) >= 10
    classes = (SAETrainConfig, TrainConfig) if command is train else (CacheConfig,)
    defaults = {f.name: f.default for cls in classes for f in dataclasses.fields(cls)}
    for p in fields:
        help_text = p.get_help_record(ctx)[1]
        default = defaults[p.field]
        if default not in (None, False, dataclasses.MISSING):
            assert "[default: " in help_text, p.opts
    result = CliRunner().invoke(cli, [command.name, "--help"], terminal_width=200)
    assert result.exit_code == 0
    for p in options:
        assert p.opts[0] in result.output


def test_train_defaults_are_the_config_defaults():
    ctx = train.make_context("train", ["some-model"])
    params = ctx.params
    sae, job = SAETrainConfig(hook="h"), TrainConfig(model="m", saes=[SAETrainConfig(hook="h")])
    assert params["archs"] == [sae.architecture] and params["ks"] == [sae.k]
    assert params["expansions"] == [sae.expansion] and params["hooks"] == ()
    for name in ("dead_tokens", "aux_k_alpha", "b_dec_init", "ghost_grads",
                 "jumprelu_init_threshold", "jumprelu_bandwidth", "jumprelu_threshold_lr",
                 "bias_lr", "preact_coefficient"):
        assert params[name] == getattr(sae, name), name
    assert params["lrs"] is None and params["target_l0s"] is None  # unset: one SAE each
    assert params["sparsity_coefficients"] is None
    for name in ("tokens", "batch_tokens", "buffer_tokens", "eval_tokens", "lr_warmup_steps",
                 "grad_clip", "adam_betas", "precision", "compile", "experiment", "seed"):
        assert params[name] == getattr(job, name), name
    counts = train.make_context("train", ["m", "--tokens", "1.5M", "--k", "16,32", "--arch",
                                          "topk, relu"]).params
    assert counts["tokens"] == 1_500_000 and counts["ks"] == [16, 32]
    assert counts["archs"] == ["topk", "relu"]


def test_counts_parse_and_print():
    assert parse_count("200k") == 200_000 and parse_count("1.5M") == 1_500_000
    assert parse_count("2e6") == 2_000_000 and parse_count(4096) == 4096
    with pytest.raises(ValueError):
        parse_count("lots")
    for n in (1_000_000, 8000, 65536, 4096, 0):
        assert parse_count(format_count(n)) == n
    assert format_count(1_000_000) == "1M" and format_count(65536) == "65536"


def test_config_error_names_the_argument_in_python():
    with pytest.raises(ConfigError) as info:
        SAETrainConfig(hook="model.layers.1", architecture="sparse")
    assert info.value.field == "architecture"
    assert str(info.value).startswith(f"architecture must be one of {', '.join(ARCHITECTURES)}")
    assert "--" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        TrainConfig(model="m", saes=[SAETrainConfig(hook="h")], precision="fp8")
    assert info.value.field == "precision" and str(info.value).startswith("precision must be")
    again = pickle.loads(pickle.dumps(info.value))
    assert again.field == "precision" and str(again) == str(info.value)


@pytest.mark.parametrize("args, flag_message", [
    (["--arch", "topk,sparse"], "--arch must be one of relu, topk"),
    (["--ghost-grads"], "--ghost-grads apply to relu SAEs only"),
    (["--lr-decay-fraction", "2"], "--lr-decay-fraction must be within [0, 1]"),
    (["--k-start", "0"], "--k-start must be at least 1"),
    (["--arch", "relu", "--sparsity-coefficient", "nan"],
     "--sparsity-coefficient must be a finite number, not negative; got nan"),
    (["--arch", "relu", "--lr", "inf"], "--lr must be a positive finite number; got inf"),
    (["--arch", "relu", "--decoder-refit", "1"], "--decoder-refit is a share of the run"),
    (["--decoder-refit", "0.1"], "--decoder-refit applies to relu, jumprelu, gated SAEs"),
    (["--revive-until", "1.5"], "--revive-until is a share, at most 1 (got 1.5)"),
    (["--revive-share", "0"], "--revive-share must be a positive finite number"),
    (["--revive-until", "nan"], "--revive-until must be a finite number"),
])
def test_config_error_on_the_command_line_names_the_flag(args, flag_message):
    result = CliRunner().invoke(cli, ["train", "some-model", "--hook", "1", *args])
    assert result.exit_code == 2, result.output
    assert flag_message in result.output
    assert "train [OPTIONS] [MODEL]" in result.output  # the usage of the command that failed


def test_cache_config_error_names_the_flag(tmp_path):
    result = CliRunner().invoke(cli, ["cache", "some-model", "--hook", "1", "--tokens", "1k",
                                      "--out", str(tmp_path / "c"), "--context-size", "1"])
    assert result.exit_code == 2, result.output
    assert "--context-size must be at least 2" in result.output
    assert not (tmp_path / "c").exists()


def test_unknown_hook_is_reported_before_the_batch_size(tiny_model_dir):
    result = CliRunner().invoke(cli, ["train", str(tiny_model_dir), "--hook", "model.nope",
                                      "--tokens", "1k", "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "unknown hook point 'model.nope'" in result.output
    assert "saereg models hooks MODEL" in result.output
    assert "batch" not in result.output


def test_budget_errors_name_their_flag_once_hooks_are_known(tiny_model_dir):
    result = CliRunner().invoke(cli, ["train", str(tiny_model_dir), "--hook", "1",
                                      "--tokens", "4k", "--batch-tokens", "2048",
                                      "--buffer-tokens", "1024", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "--buffer-tokens (1024) must hold at least one batch" in result.output


def test_prepare_returns_a_resolved_copy(tiny_model_dir):
    from saereg.training.job import prepare

    cfg = TrainConfig(model=str(tiny_model_dir), context_size=32, tokens=2048, batch_tokens=512,
                      buffer_tokens=1024,
                      saes=[SAETrainConfig(hook="1", k=4, expansion=2),
                            SAETrainConfig(hook="model.layers.2", k=4, expansion=2)])
    before = cfg.to_dict()
    resolved, lm, d_ins = prepare(cfg, "cpu")
    assert cfg.to_dict() == before and cfg.saes[0].hook == "1"
    assert resolved is not cfg and resolved.saes[0] is not cfg.saes[0]
    assert resolved.hooks == ["model.layers.1", "model.layers.2"]
    assert d_ins == {"model.layers.1": 64, "model.layers.2": 64}
    assert {**resolved.to_dict(), "saes": None} == {**before, "saes": None}


def test_prepare_cache_returns_a_resolved_copy(tiny_lm, tmp_path):
    from saereg.training.cache import write_cache
    from saereg.training.job import prepare

    write_cache(tiny_lm, ["model.layers.1"], tmp_path / "acts", 600, context_size=32,
                lm_batch_size=4, shard_tokens=300, heldout_tokens=0, progress=False)
    cfg = TrainConfig(model="anything", from_cache=str(tmp_path / "acts"), tokens=1024,
                      batch_tokens=512, buffer_tokens=1024,
                      saes=[SAETrainConfig(hook="1", k=4, expansion=2)])
    before = cfg.to_dict()
    resolved, source, d_ins = prepare(cfg, "cpu")
    assert cfg.to_dict() == before
    assert resolved.model == tiny_lm.name and resolved.context_size == 32
    assert resolved.hooks == ["model.layers.1"] and d_ins == {"model.layers.1": 64}


def test_a_plain_option_named_like_the_field_is_named_too():
    result = CliRunner().invoke(cli, ["quickstart", "--tokens", "0"])
    assert result.exit_code == 2, result.output
    assert "--tokens must be at least 1; got 0" in result.output
    assert "quickstart [OPTIONS]" in result.output
