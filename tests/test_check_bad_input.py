"""``python -m ddp_demo.check`` on bad input: one line naming the problem, exit 2, nothing written.

Bad input is checked before any process starts, so these cases call ``main`` in this process;
one goes through the real command.
"""

from __future__ import annotations

import pytest

from ddp_demo.check.__main__ import main

from .helpers import PYTHON, ROOT, run_cmd

EX = "examples/check"


def _source(returns: str, seed: bool = True) -> str:
    return "import torch\ndef build():\n" + ("    torch.manual_seed(0)\n" if seed else "") + f"    return {returns}\n"


X, Y = "torch.zeros(6, 2)", "torch.zeros(6, 1)"
TARGETS = {
    "syntax.py": "def build(:\n",
    "raises.py": "def build():\n    raise RuntimeError('no data here')\n",
    "two.py": _source(f"torch.nn.Linear(2, 1), ({X}, {Y})"),
    "notmodule.py": _source(f"3, ({X}, {Y}), print"),
    "listbatch.py": _source(f"torch.nn.Linear(2, 1), ({X}, [0, 1, 2, 3, 4, 5]), print"),
    "sizes.py": _source(f"torch.nn.Linear(2, 1), ({X}, torch.zeros(5, 1)), print"),
    "odd.py": _source("torch.nn.Linear(2, 1), (torch.zeros(5, 2), torch.zeros(5, 1)), print"),
    "unseeded.py": _source(f"torch.nn.Linear(2, 1), ({X}, {Y}), torch.nn.functional.mse_loss", seed=False),
    "linear.py": _source(f"torch.nn.Linear(2, 1), ({X}, {Y}), torch.nn.functional.mse_loss"),
    "vector.py": _source(f"torch.nn.Linear(2, 1), (torch.ones(6, 2), {Y}), lambda o, y: o - y"),
    # issue 24: a Recipe's own settings
    "recipe.py": "from ddp_demo.check import Recipe\n" + "\n".join(
        _source(f"Recipe(torch.nn.Linear(2, 1), ({X}, {Y}){extra})").replace("def build", f"def {name}")
        for name, extra in (("k0", ", torch.nn.functional.mse_loss, accumulate=0"), ("noloss", ""),
                            ("fp16", ", torch.nn.functional.mse_loss, autocast=torch.float16"),
                            ("k4", ", torch.nn.functional.mse_loss, accumulate=4"))),
}
BAD = {  # argv (with {d} the folder of TARGETS), what the one line must say
    "no colon": (["examples/check/transformer.py"], "FILE.py:FUNCTION"),
    "missing file": (["{d}/missing.py:build"], "no such file"),
    "syntax error": (["{d}/syntax.py:build"], "SyntaxError"),
    "no such function": (["{d}/two.py:make"], "no function 'make'; it defines 'build'"),
    "misspelled function": (["{d}/two.py:biuld"], "no function 'biuld'; did you mean 'build'?"),
    "no such module": (["nosuchpackage.models:build"], "ModuleNotFoundError"),
    "function raises": (["{d}/raises.py:build"], "no data here"),
    "two things returned": (["{d}/two.py:build"], "must return (model, batch, loss_fn)"),
    "model not a Module": (["{d}/notmodule.py:build"], "not a torch.nn.Module"),
    "non-tensor batch entry": (["{d}/listbatch.py:build"], "batch entry 1 is a list of 6, not a tensor"),
    "first dimensions differ": (["{d}/sizes.py:build"], "first dimensions differ"),
    "batch not divisible by N": (["{d}/odd.py:build", "--world-sizes", "2"], "does not divide by world size 2"),
    "different weights each call": (["{d}/unseeded.py:build"], "torch.manual_seed"),
    "loss not a scalar": (["{d}/vector.py:build"], "scalar tensor"),
    "recipe accumulate 0": (["{d}/recipe.py:k0"], "Recipe.accumulate must be a positive integer"),
    "recipe without loss or step": (["{d}/recipe.py:noloss"], "needs loss_fn, or its own step"),
    "recipe fp16 autocast": (["{d}/recipe.py:fp16"], "use torch.bfloat16"),
    "batch not divisible by N x K": (["{d}/recipe.py:k4", "--world-sizes", "2"], "times 4 micro-batches"),
    "bad world sizes": (["{d}/two.py:build", "--world-sizes", "2,x"], "--world-sizes"),
    "zero world size": (["{d}/two.py:build", "--world-sizes", "0"], "--world-sizes"),
    "target after the sizes": (["--world-sizes", "2", "{d}/two.py:build"], "put the positional argument before"),
    "bad dtype": (["{d}/two.py:build", "--dtype", "float16"], "--dtype"),
    "json folder missing": ([f"{EX}/lstm.py:build", "--json", "{d}/no/such/v.json"], "--json"),
    "plot not a picture": ([f"{EX}/lstm.py:build", "--plot", "{d}/v.txt"], "--plot {d}/v.txt: use a .png"),
    "reduce dtype without fsdp": ([f"{EX}/lstm.py:build", "--reduce-dtype", "float32"], "add --strategy fsdp"),
    "reduce dtype unknown": ([f"{EX}/lstm.py:build", "--strategy", "fsdp", "--reduce-dtype", "float16"],
                             "--reduce-dtype 'float16' is not known"),
    "reduce dtype not lower": (["{d}/linear.py:build", "--strategy", "fsdp", "--dtype", "keep", "--reduce-dtype",
                                "float32"], "not lower than"),
}


@pytest.fixture
def bad_targets(tmp_path):
    for name, source in TARGETS.items():
        (tmp_path / name).write_text(source)
    return tmp_path


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_exit_2(case, bad_targets, capsys):
    argv, must_say = BAD[case]
    argv = [a.replace("{d}", str(bad_targets)) for a in argv]
    assert main([*argv, "--json", str(bad_targets / "v.json")] if "--json" not in argv else argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("ddp_demo.check: error: "), err
    assert must_say.replace("{d}", str(bad_targets)) in err
    assert not (bad_targets / "v.json").exists()


def test_bad_input_through_the_real_command(bad_targets):
    proc = run_cmd([PYTHON, "-m", "ddp_demo.check", f"{bad_targets}/odd.py:build"], ROOT, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "e.g. 6" in proc.stderr


@pytest.mark.parametrize("words", [["2", "3"], ["2,3"], ["2,", "3"], ["2", "3", "2"]])
def test_world_sizes_spaced_or_comma_separated_read_the_same_in_check_and_verify(words):
    """Issue 26: verify took ``2 3`` and check ``2,3``; both now take either, as one tuple."""
    from ddp_demo.check.options import parse
    from ddp_demo.core.flags import parse_into
    from ddp_demo.verify import VerifyOptions, build_parser

    assert parse(["t.py:build", "--world-sizes", *words], "")[1].world_sizes == (2, 3)
    assert parse_into(VerifyOptions, build_parser(), ["--world-sizes", *words]).world_sizes == (2, 3)
