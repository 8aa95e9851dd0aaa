"""Training settings: TOML config files, precedence, checks, --print-config."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from s3cli.cli.main import app
from s3cli.errors import InputError
from s3cli.train.config import DataSpec, TrainConfig, load_config_file, merge_config

runner = CliRunner()


def test_defaults_are_the_paper_recipe():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.weight_decay, cfg.drop_path, cfg.batch_size) == (5e-5, 0.05, 0.15, 16)
    assert (cfg.seq_length, cfg.mem_frames, cfg.num_objects, cfg.crop_size) == (8, 3, 3, 480)
    assert cfg.max_skip == (5, 10, 15, 5) and cfg.max_skip_switch == (0.1, 0.3, 0.8)
    assert cfg.davis_repeat == 5 and cfg.amp


def test_config_file_values_and_paths(tmp_path):
    f = tmp_path / "sub" / "train.toml"
    f.parent.mkdir()
    f.write_text(
        'model = "cutie-small"\nlr = 1e-4\nmax-skip = [3, 6]\nmax_skip_switch = [0.5]\n'
        'output = "runs/x"\ndata = { davis = "DAVIS", ytvos = "/abs/YT" }\n'
    )
    values = load_config_file(f)
    assert values["lr"] == 1e-4 and values["max_skip"] == (3, 6)
    assert values["output"] == str(f.parent.resolve() / "runs/x")
    assert values["data"] == (DataSpec("davis", str(f.parent.resolve() / "DAVIS")),
                              DataSpec("ytvos", "/abs/YT"))
    cfg = merge_config(values, {"lr": 2e-4, "batch_size": None})
    assert cfg.lr == 2e-4 and cfg.batch_size == 16 and cfg.model == "cutie-small"
    cfg.validate()


def test_config_tables_of_data(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('[[data]]\nkind = "mose"\nroot = "/m"\nrepeat = 2\n')
    assert load_config_file(f)["data"] == (DataSpec("mose", "/m", repeat=2),)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("lrr = 1e-4\n", "unknown key 'lrr'"),
        ("lr = \"fast\"\n", "lr must be a number"),
        ("batch_size = 1.5\n", "batch_size must be an integer"),
        ("amp = 1\n", "amp must be true or false"),
        ("data = { imagenet = \"x\" }\n", "unknown dataset kind 'imagenet'"),
        ("lr = \n", "not valid TOML"),
    ],
)
def test_config_file_errors(tmp_path, text, needle):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(InputError) as exc:
        load_config_file(f)
    assert needle in str(exc.value) and str(exc.value).startswith(str(f))


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(model="s4"), "--model s4"),
        (dict(crop_size=100), "multiple of 16"),
        (dict(max_skip_switch=(0.1,)), "one switch point fewer"),
        (dict(seq_length=1), "at least 2 frames"),
        (dict(drop_path=1.0), "[0, 1)"),
        (dict(data=()), "no training data"),
    ],
)
def test_validate(kw, needle):
    values = dict(model="cutie-small", data=(DataSpec("davis", "d"),))
    values.update(kw)
    with pytest.raises(InputError) as exc:
        TrainConfig(**values).validate()
    assert needle in str(exc.value)


def test_print_config_round_trip(tmp_path):
    result = runner.invoke(app, [
        "train", "--print-config", "--data", "davis=/d", "--model", "cutie-small", "--lr",
        "3e-5", "--max-skip", "2,4", "--max-skip-switch", "0.5", "--no-amp",
    ])
    assert result.exit_code == 0, result.output
    f = tmp_path / "c.toml"
    f.write_text(result.stdout)
    cfg = merge_config(load_config_file(f))
    assert cfg.lr == 3e-5 and cfg.max_skip == (2, 4) and not cfg.amp
    assert cfg.data == (DataSpec("davis", "/d"),)


def test_cli_needs_output_and_valid_data_spec():
    result = runner.invoke(app, ["train", "--data", "davis=/d"])
    assert result.exit_code == 1 and "no --output folder" in result.stderr
    result = runner.invoke(app, ["train", "--data", "davis", "--output", "o"])
    assert result.exit_code == 1 and "expected KIND=DIR" in result.stderr
