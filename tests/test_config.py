"""Option parsing: the reference scripts' spellings, --config YAML, the command line winning, validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from supcon.cli import train_command
from supcon.config import TrainConfig, config_differences, parse_int_list, parse_triplet
from supcon.errors import UserError


@pytest.fixture
def parse(monkeypatch):
    """Run the command line up to the call of ``train`` and return the TrainConfig it would train with."""
    from supcon import train as train_module

    captured = {}

    def fake_train(config, progress=True):
        captured["config"] = config
        captured["progress"] = progress
        return train_module.TrainResult(run_dir=Path("unused"), epochs_done=0)

    monkeypatch.setattr(train_module, "train", fake_train)

    def run(args):
        result = CliRunner().invoke(train_command, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        run.progress = captured["progress"]
        return captured["config"]

    return run


def test_reference_command_line_parses_to_the_intended_config(parse, tmp_path):
    config = parse([
        "--batch_size", "8", "--num_workers", "0", "--learning_rate", "0.016", "--lr_decay_epochs", "10",
        "--temp", "0.07", "--cosine", "--mean", "0.0418, 0.0353, 0.0409", "--std", "0.0956, 0.0911, 0.0769",
        "--dataset", "path", "--data_folder", tmp_path, "--size", "32",
    ])
    config.validate()
    assert config.batch_size == 8
    assert config.num_workers == 0
    assert config.learning_rate == 0.016
    assert config.lr_decay_epochs == [10]
    assert config.temp == 0.07
    assert config.cosine is True
    assert config.mean == [0.0418, 0.0353, 0.0409]
    assert config.std == [0.0956, 0.0911, 0.0769]
    assert config.dataset == "path"
    assert config.data_folder == str(tmp_path)
    assert config.size == 32
    # untouched options keep their defaults
    assert config.model == "resnet50"
    assert config.epochs == 1000
    assert config.warm is None  # decided from the global batch at run time


def test_options_once_only_in_yaml_are_on_the_command_line(parse, tmp_path):
    config = parse(["--data-folder", tmp_path, "--base-temp", "0.1", "--warm-epochs", "3", "--warmup-from", "0.001",
                    "--knn-temperature", "0.2"])
    assert (config.base_temp, config.warm_epochs, config.warmup_from, config.knn_temperature) == (0.1, 3, 0.001, 0.2)


@pytest.mark.parametrize("field, value, fragment", [("warm_epochs", 0, "--warm-epochs must be at least 1"),
                                                    ("warmup_from", -0.1, "--warmup-from must be >= 0"),
                                                    ("base_temp", 0.0, "--base-temp must be positive")])
def test_warm_up_and_base_temperature_bounds(tmp_path, field, value, fragment):
    with pytest.raises(UserError, match=fragment):
        TrainConfig(data_folder=str(tmp_path), **{field: value}).validate()


def test_other_underscore_aliases(parse, tmp_path):
    config = parse(["--data_folder", tmp_path, "--lr_decay_rate", "0.5", "--save_freq", "7", "--weight_decay",
                    "0.001", "--feat_dim", "64", "--run_dir", tmp_path / "run", "--no-cosine"])
    assert (config.lr_decay_rate, config.save_freq, config.weight_decay, config.feat_dim) == (0.5, 7, 0.001, 64)
    assert config.run_dir == str(tmp_path / "run")
    assert config.cosine is False


def test_defaults_of_the_issue(parse, tmp_path):
    config = parse(["--data-folder", tmp_path])
    assert (config.model, config.feat_dim, config.temp, config.base_temp) == ("resnet50", 128, 0.07, 0.07)
    assert (config.batch_size, config.epochs, config.save_freq, config.size) == (32, 1000, 50, 224)
    assert (config.momentum, config.weight_decay, config.lr_decay_rate) == (0.9, 1e-4, 0.1)
    assert config.cosine is True and config.learning_rate is None and config.method == "supcon"
    assert config.small_input is False and config.pretrained is False and config.resume is False


def test_config_file_supplies_values_and_the_command_line_wins(parse, tmp_path):
    config_file = tmp_path / "recipe.yaml"
    config_file.write_text(yaml.safe_dump({
        "batch_size": 4, "epochs": 7, "temp": 0.2, "model": "resnet18", "mean": [0.1, 0.2, 0.3],
        "lr-decay-epochs": [5, 6],
    }))
    config = parse(["--config", config_file, "--data-folder", tmp_path, "--batch-size", "8", "--model",
                    "test_resnet"])
    assert config.batch_size == 8  # command line
    assert config.model == "test_resnet"  # command line
    assert config.epochs == 7 and config.temp == 0.2  # file
    config.validate()
    assert config.mean == [0.1, 0.2, 0.3]
    assert config.lr_decay_epochs == [5, 6]


def test_config_file_with_a_train_section_and_a_runs_config_yaml(parse, tmp_path):
    config_file = tmp_path / "recipe.yaml"
    config_file.write_text(yaml.safe_dump({"train": {"epochs": 3, "size": 16}, "probe": {"anything": 1}}))
    config = parse(["--config", config_file, "--data-folder", tmp_path])
    assert (config.epochs, config.size) == (3, 16)

    # A run's config.yaml (options + run_info) seeds a new run.
    run_config = tmp_path / "config.yaml"
    run_config.write_text(yaml.safe_dump({"epochs": 5, "batch_size": 16, "run_info": {"num_processes": 1}}))
    config = parse(["--config", run_config, "--data-folder", tmp_path])
    assert (config.epochs, config.batch_size) == (5, 16)


def test_quiet_turns_the_progress_bars_off(parse, tmp_path, monkeypatch):
    import io

    from supcon import cli, cli_utils

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    # CliRunner's stderr is no terminal (so no bars); here the command runs as if at one
    monkeypatch.setattr(cli, "show_progress", lambda quiet: cli_utils.show_progress(quiet, stream=Terminal()))
    parse(["--data-folder", tmp_path])
    assert parse.progress is True
    parse(["--data-folder", tmp_path, "--quiet"])
    assert parse.progress is False


def test_no_progress_bars_when_stderr_is_not_a_terminal(parse, tmp_path):
    parse(["--data-folder", tmp_path])  # CliRunner's stderr, like a log file, is no terminal
    assert parse.progress is False


@pytest.mark.parametrize("text,expected", [
    ("0.5,0.25,0.125", [0.5, 0.25, 0.125]),
    (" 0.0418, 0.0353 , 0.0409 ", [0.0418, 0.0353, 0.0409]),
    ("[0.1, 0.2, 0.3]", [0.1, 0.2, 0.3]),
    ([1, 2, 3], [1.0, 2.0, 3.0]),
    (None, None),
])
def test_parse_triplet(text, expected):
    assert parse_triplet(text, "mean") == expected


@pytest.mark.parametrize("text,name,message", [
    ("0.5,0.5", "mean", "exactly 3 values"),
    ("0.5,0.5,0.5,0.5", "std", "exactly 3 values"),
    ("a,b,c", "mean", "three comma-separated numbers"),
    ("", "mean", "three comma-separated numbers"),
    ("0.2,0,0.2", "std", "must be positive"),
    ("0.2,-1,0.2", "std", "must be positive"),
    ("nan,0,0", "mean", "finite"),
])
def test_parse_triplet_refuses(text, name, message):
    with pytest.raises(UserError, match=message):
        parse_triplet(text, name)


def test_parse_int_list():
    assert parse_int_list("700,800,900", "x") == [700, 800, 900]
    assert parse_int_list("10", "x") == [10]
    assert parse_int_list(10, "x") == [10]
    assert parse_int_list([5, "6"], "x") == [5, 6]
    assert parse_int_list("", "x") == []
    with pytest.raises(UserError, match="comma-separated integers"):
        parse_int_list("10,x", "lr-decay-epochs")


@pytest.mark.parametrize("overrides,message", [
    ({"data_folder": None}, "--data-folder is required"),
    ({"dataset": "cifar10"}, "only 'path'"),
    ({"method": "byol"}, "--method"),
    ({"batch_size": 1}, "--batch-size must be at least 2"),
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"save_freq": 0}, "--save-freq must be at least 1"),
    ({"temp": 0.0}, "--temp must be positive"),
    ({"learning_rate": -0.1}, "--learning-rate must be positive"),
    ({"lr_decay_rate": 1.5}, "--lr-decay-rate"),
    ({"precision": "fp8"}, "--precision"),
    ({"num_workers": -1}, "--num-workers"),
    ({"chunk_size": 0}, "--chunk-size must be at least 1"),
    ({"batch_size": 8, "chunk_size": 16}, "--chunk-size 16 is larger than --batch-size 8"),
    ({"memory_size": -1}, "--memory-size and --memory-warmup must be >= 0"),
    ({"memory_warmup": -2}, "--memory-size and --memory-warmup must be >= 0"),
])
def test_validate_names_the_option(overrides, message):
    config = TrainConfig(**{"data_folder": "somewhere", **overrides})
    with pytest.raises(UserError, match=message):
        config.validate()


def test_config_differences_ignore_runtime_options_and_auto_values():
    old = {"temp": 0.07, "num_workers": 8, "learning_rate": 0.015625, "epochs": 10, "resume": False}
    assert config_differences(old, {"temp": 0.07, "num_workers": 2, "learning_rate": None, "epochs": 10,
                                    "resume": True}) == []
    assert config_differences(old, {"temp": 0.1, "num_workers": 8, "learning_rate": 0.1, "epochs": 10}) == [
        "learning_rate", "temp"]


# --- resolving: a new object, every automatic option decided, nothing re-inferred on resume ----------------------


def test_resolving_decides_the_automatic_options_in_a_new_object(tmp_path):
    from supcon.config import LR_RULE_GIVEN, LR_RULE_LINEAR, resolve_train_config

    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    user = TrainConfig(data_folder=str(tmp_path / "train"), batch_size=64)
    before = dataclasses.asdict(user)
    resolved, facts = resolve_train_config(user, precision="fp32", on_gpu=False, world_size=8)
    assert dataclasses.asdict(user) == before  # the user's config is not touched
    assert (resolved.precision, resolved.channels_last, resolved.gpu_augment) == ("fp32", False, False)
    assert resolved.val_folder == str((tmp_path / "val").resolve())
    assert resolved.learning_rate == pytest.approx(0.5 * 512 / 1024)
    assert facts == {"learning_rate_rule": LR_RULE_LINEAR, "global_batch": 512, "auto_warm": True}
    assert resolved.warm is True

    # a learning rate given on the command line is "given", even when it equals the linear rule's value
    _, facts = resolve_train_config(dataclasses.replace(user, learning_rate=0.25), precision="fp32", on_gpu=True,
                                    world_size=8)
    assert facts["learning_rate_rule"] == LR_RULE_GIVEN


def test_resolving_a_resumed_run_keeps_what_it_recorded(tmp_path):
    from supcon.config import resolve_train_config

    user = TrainConfig(data_folder=str(tmp_path / "train"), batch_size=32)
    recorded = {"gpu_augment": True, "learning_rate": 0.3, "warm": False, "mean": [0.1, 0.2, 0.3],
                "std": [0.4, 0.5, 0.6], "val_folder": None}
    resolved, facts = resolve_train_config(user, precision="fp32", on_gpu=False, world_size=1, recorded=recorded,
                                           recorded_info={"learning_rate_rule": "given"})
    assert (resolved.gpu_augment, resolved.learning_rate, resolved.warm) == (True, 0.3, False)
    assert (resolved.mean, resolved.std, resolved.val_folder) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6], None)
    assert facts["learning_rate_rule"] == "given" and not facts["auto_warm"]
