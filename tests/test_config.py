import pytest
import yaml

from conftest import ROOT
from resnet.config import EvalConfig, TrainConfig, parse_config, save_config


def test_defaults_and_dashed_flags():
    cfg = parse_config(TrainConfig, ["--activation", "gelu", "--opt", "adam", "--batch-size", "64",
                                     "--no-channels-last", "--model-kwargs", '{"blocks": [2, 2, 2, 2]}',
                                     "--wandb-tags", "a,b"])
    assert (cfg.activation, cfg.opt, cfg.batch_size, cfg.channels_last) == ("gelu", "adam", 64, False)
    assert cfg.model_kwargs == {"blocks": [2, 2, 2, 2]} and cfg.wandb_tags == ["a", "b"]
    assert cfg.epochs == TrainConfig().epochs


def test_recipe_sets_defaults_and_flags_win(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 7\nlr: 1\nopt: adamw\ncutout: 8\nwandb-tags: [x]\n")
    cfg = parse_config(TrainConfig, ["--config", str(recipe), "--epochs", "3"])
    assert cfg.epochs == 3 and cfg.lr == 1.0 and cfg.opt == "adamw" and cfg.cutout == 8 and cfg.wandb_tags == ["x"]


@pytest.mark.parametrize("text, match", [
    ("epoch: 3\n", "unknown field 'epoch'"),
    ("epochs: three\n", "field 'epochs' expects a number, got 'three'"),
    ("epochs: [3]\n", "field 'epochs' expects float"),
    ("opt: rmsprop\n", "field 'opt' must be one of"),
    ("- 1\n", "mapping"),
])
def test_bad_recipes_name_the_file_and_field(tmp_path, capsys, text, match):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--config", str(recipe)])
    err = capsys.readouterr().err
    assert match in err and str(recipe) in err


def test_bad_flag_values_are_rejected(capsys):
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--opt", "rmsprop"])
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--model-kwargs", "[1, 2]"])
    assert "mapping" in capsys.readouterr().err


def test_saved_config_round_trips(tmp_path):
    cfg = parse_config(TrainConfig, ["--lr", "0.05", "--wandb-tags", "t1"])
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["lr"] == 0.05
    again = parse_config(TrainConfig, ["--config", str(tmp_path / "config.yaml")])
    assert again == cfg


def test_resume_reads_the_runs_own_config(tmp_path):
    save_config(parse_config(TrainConfig, ["--epochs", "9", "--opt", "adam"]), tmp_path / "config.yaml")
    cfg = parse_config(TrainConfig, ["--resume", str(tmp_path), "--epochs", "12"])
    assert cfg.opt == "adam" and cfg.epochs == 12 and cfg.resume == str(tmp_path)


def test_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit):
        parse_config(EvalConfig, ["--help"])
    out = capsys.readouterr().out
    assert "--checkpoint" in out and "--tta" in out and "(default: 500)" in out


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_parse_and_pass_the_checks(recipe):
    from resnet.training import check_config

    cfg = parse_config(TrainConfig, ["--config", str(recipe)])
    check_config(cfg)


def test_numeric_strings_in_a_recipe_are_numbers(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-3\nweight_decay: 5e-4\nepochs: '12'\n")  # PyYAML reads 1e-3 as a string
    cfg = parse_config(TrainConfig, ["--config", str(recipe)])
    assert (cfg.lr, cfg.weight_decay, cfg.epochs) == (0.001, 0.0005, 12)
    recipe.write_text("lr: fast\n")
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--config", str(recipe)])
    assert f"error: {recipe}: field 'lr' expects a number, got 'fast'" in capsys.readouterr().err


def test_malformed_yaml_is_one_line_naming_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 3\nlr: [0.1\n")
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--config", str(recipe)])
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {recipe}: not valid YAML (line 3")


def test_help_is_grouped_by_topic_and_says_each_default_once(capsys):
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--help"])
    out = capsys.readouterr().out
    titles = ["model:", "optimisation:", "augmentation:", "data:", "run:", "tracking:"]
    positions = [out.index(f"\n{t}\n") for t in titles]
    assert positions == sorted(positions)
    where = {flag: out.index(f"\n  {flag} ") for flag in ("--activation", "--weight-decay", "--cutout", "--val-split")}
    assert positions[0] < where["--activation"] < positions[1] < where["--weight-decay"] < positions[2]
    assert positions[2] < where["--cutout"] < positions[3] < where["--val-split"] < positions[4]
    flat = " ".join(out.split("\n\n", 1)[1].split())  # past the usage block
    for flag in ("--lr LR", "--weight-decay WEIGHT_DECAY", "--run-dir RUN_DIR"):
        text = flat.split(flag + " ", 1)[1].split(" --", 1)[0]
        assert text.count("default") == 1, (flag, text)


def test_unknown_flag_suggests_the_near_one(capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(TrainConfig, ["--epocs", "3"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.count("\n") == 0
    assert "unrecognized arguments: --epocs 3" in err and "did you mean --epochs?" in err
