"""Every command is a console script (pyproject.toml's ``[project.scripts]``) whose target is a
``main(argv=None)`` that returns the exit code. Checked from pyproject.toml itself, in this
process: the shared environment's installed scripts may come from another checkout."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import re

import pytest

from .helpers import ROOT

COMMANDS = {"ddp-demo-train", "ddp-demo-explain", "ddp-demo-check", "ddp-demo-compare", "ddp-demo-doctor",
            "ddp-demo-verify", "ddp-demo-bench", "ddp-demo-rendezvous", "ddp-demo-checkpoint"}


def scripts(pyproject: str) -> dict[str, str]:
    """``[project.scripts]``'s ``name = "module:function"`` lines (tomllib is Python 3.11+; this runs on 3.10)."""
    section = pyproject.split("\n[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, flags=re.M))


SCRIPTS = scripts((ROOT / "pyproject.toml").read_text())


def resolve(target: str):
    """What the installed script calls: ``module:function``, as importlib.metadata's EntryPoint.load does."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def test_every_command_is_a_console_script():
    assert set(SCRIPTS) == COMMANDS


@pytest.mark.parametrize("script", sorted(COMMANDS))
def test_each_script_is_a_main_that_returns_an_exit_code(script):
    main = resolve(SCRIPTS[script])
    assert main.__name__ == "main" and inspect.signature(main).return_annotation in (int, "int")
    assert list(inspect.signature(main).parameters)[0] == "argv"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0 and out.getvalue().startswith("usage: "), out.getvalue()


def test_negative_control_a_target_that_does_not_exist_is_refused():
    with pytest.raises(AttributeError):
        resolve("ddp_demo.train:mian")
    with pytest.raises(ModuleNotFoundError):
        resolve("ddp_demo.trian:main")
