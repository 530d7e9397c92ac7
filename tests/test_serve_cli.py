"""serve.py / vision-rwkv serve: the config composes into ServeConfig, bad options fail in one line before
any model is loaded, and the command is listed."""

import pytest

from vision_rwkv.cli import COMMANDS
from vision_rwkv.cli import serve as serve_cli
from vision_rwkv.config import ServeConfig


def test_the_config_composes_into_the_schema():
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(serve_cli.compose(["port=9001", "max_batch=8", "cors_origins=[http://a.example]"]))
    assert isinstance(cfg, ServeConfig)
    assert (cfg.host, cfg.port, cfg.max_batch, cfg.cors_origins) == ("127.0.0.1", 9001, 8, ["http://a.example"])
    assert OmegaConf.to_object(serve_cli.compose([])) == ServeConfig()  # the YAML's defaults are the schema's


@pytest.mark.parametrize("argv, words", [
    (["portt=1"], "Could not override 'portt'"),
    (["port=many"], "port"),
    (["max_batch=0"], "max_batch is 0; expected >= 1"),
    (["port=70000"], "port is 70000"),
    (["photo.jpg"], "unexpected argument 'photo.jpg'"),
])
def test_bad_options_are_one_line_and_exit_2(argv, words, capsys):
    assert serve_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_help_and_cfg(capsys):
    assert serve_cli.main(["--help"]) == 0
    assert "POST /v1/caption" in capsys.readouterr().out
    assert serve_cli.main(["--cfg", "port=1234"]) == 0
    assert "port: 1234" in capsys.readouterr().out


def test_the_help_lists_every_option_of_the_config(capsys):
    import dataclasses

    from vision_rwkv.config import ServeConfig

    assert serve_cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    missing = [f.name for f in dataclasses.fields(ServeConfig) if f"  {f.name}=" not in out]
    assert missing == []


def test_the_command_is_listed():
    assert COMMANDS["serve"][0] == "vision_rwkv.cli.serve"
