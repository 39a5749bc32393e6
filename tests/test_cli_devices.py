"""``--device`` and ``--dtype`` on every command that runs a model: accepted, passed to ``hypervocab.load``,
and a device this machine lacks is one clear line with exit status 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hypervocab.cli import demo as cli_demo
from hypervocab.cli import evaluate as cli_evaluate
from hypervocab.cli import main as cli_main
from hypervocab.cli import serve as cli_serve
from hypervocab.cli.evaluate import lm_eval_argv
from hypervocab.cli.main import build_parser, main
from hypervocab.errors import ConfigError
from hypervocab.loading import DTYPES

ROOT = Path(__file__).resolve().parent.parent
FILE = str(ROOT / "README.md")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")

# every command that loads a model, with what it needs besides the model
COMMANDS = {
    "generate": ["generate", "hello", "--model", "no/such/model"],
    "eval compression": ["eval", "compression", FILE, "--model", "no/such/model", "--generate", "1"],
    "eval bpb": ["eval", "bpb", FILE, "--model", "no/such/model"],
    "eval speed": ["eval", "speed", "--edit", FILE, "--model", "no/such/model"],
    "serve": ["serve", "--model", "no/such/model"],
    "demo": ["demo", "--model", "no/such/model"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_device_and_dtype_are_accepted_with_auto_defaults(command):
    parser = build_parser()
    args = parser.parse_args(COMMANDS[command])
    assert (args.device, args.dtype) == ("auto", "auto")
    args = parser.parse_args([*COMMANDS[command], "--device", "cpu", "--dtype", "float32"])
    assert (args.device, args.dtype) == ("cpu", "float32")
    for dtype in DTYPES:
        assert parser.parse_args([*COMMANDS[command], "--dtype", dtype]).dtype == dtype


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_bad_dtype_is_refused_by_the_parser(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*COMMANDS[command], "--dtype", "int8"])
    assert e.value.code == 2
    assert "--dtype: invalid choice: 'int8'" in capsys.readouterr().err


@NO_CUDA
@pytest.mark.parametrize("command", list(COMMANDS))
def test_cuda_on_a_machine_without_it_is_one_line_and_status_2(command, capsys):
    # the device is checked before anything loads, so the model need not exist
    assert main([*COMMANDS[command], "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"hypervocab {command.split()[0]}: error: device 'cuda': this machine has no CUDA device " \
                  "(use 'cpu' or 'auto')"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unknown_device_is_one_line_and_status_2(command, capsys):
    assert main([*COMMANDS[command], "--device", "tpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hypervocab {command.split()[0]}: error: device must be 'auto', 'cpu', 'cuda' or "
                          "'cuda:N', got 'tpu'") and "\n" not in err


@pytest.mark.parametrize("command, module", [
    ("generate", cli_main), ("eval compression", cli_evaluate), ("eval bpb", cli_evaluate),
    ("eval speed", cli_evaluate), ("serve", cli_serve), ("demo", cli_demo)])
def test_the_flags_reach_load(command, module, monkeypatch, capsys):
    seen: dict[str, Any] = {}

    def fake_load(name: Any, **kwargs: Any) -> Any:
        seen.update(kwargs, name=name)
        raise ConfigError("stop here")

    monkeypatch.setattr(module, "load", fake_load)
    assert main([*COMMANDS[command], "--device", "cpu", "--dtype", "bfloat16"]) == 2
    assert (seen["name"], seen["device"], seen["dtype"]) == ("no/such/model", "cpu", "bfloat16")
    assert "error: stop here" in capsys.readouterr().err


def test_lm_eval_gets_device_as_its_own_flag_and_dtype_as_a_model_arg():
    assert lm_eval_argv(["--model_args", "pretrained=x", "--tasks", "arc_easy", "--device", "cpu", "--dtype",
                         "float32"]) == ["--model", "hypervocab", "--model_args", "pretrained=x", "--tasks", "arc_easy",
                                         "--device", "cpu", "--model_args", "dtype=float32"]
    assert lm_eval_argv(["run", "--tasks", "t", "--dtype=bfloat16"]) == [
        "run", "--model", "hypervocab", "--tasks", "t", "--model_args", "dtype=bfloat16"]
    assert lm_eval_argv(["--tasks", "t"]) == ["--model", "hypervocab", "--tasks", "t"]  # defaults: the model's
    assert lm_eval_argv(["--model", "hf", "--dtype", "float16"]) == ["--model", "hf", "--model_args", "dtype=float16"]
    assert lm_eval_argv(["--help", "--dtype", "x"]) == ["--help", "--dtype", "x"]  # help as lm-eval gives it
    for bad in (["--dtype", "int8"], ["--dtype"], ["--dtype="]):
        with pytest.raises(ConfigError, match=r"--dtype must be one of auto, float32, bfloat16, float16, got"):
            lm_eval_argv(["--tasks", "t", *bad])


def test_lm_eval_with_a_bad_dtype_is_one_line_and_status_2(capsys):
    assert main(["eval", "lm-eval", "--tasks", "arc_easy", "--dtype", "int8"]) == 2
    assert capsys.readouterr().err.strip() == ("hypervocab eval lm-eval: error: --dtype must be one of auto, float32, "
                                               "bfloat16, float16, got 'int8'")
