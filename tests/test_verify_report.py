"""``python -m ddp_demo.verify``'s verdict reads on its own (issue 26): a summary by default that
names the tolerance, counts the matches and says the controls are expected to differ, ending in
PASS or FAIL; every row with ``--table``. Built from rows as ``proof/cases.py`` judges them, so no
process is started here (tests/test_equivalence.py runs the cases themselves), except for the
sharded strategies (issue 21): one set of 2 processes runs fsdp's cases for one model."""

from __future__ import annotations

import dataclasses
import functools

from ddp_demo.core.flags import parse_into
from ddp_demo.core.tolerances import CONTROL_MARGIN
from ddp_demo.proof.verdicts import CONTROL as EXPECTED_TO_DIFFER
from ddp_demo.proof.verdicts import Row, summary, table
from ddp_demo.verify import VerifyOptions, build_parser, collect

MATCH = Row(2, "grads", "mlp", "float64", "-", True, 2e-17, 0.02, True)
CONTROL = Row(2, "grads", "mlp", "float64", "-", False, 0.117, 1.17e11, True)
ACCUM = Row(2, "accum", "mlp", "float32", "K=2", True, 1.5e-8, 0.0, True)


def test_the_summary_names_the_tolerance_the_controls_and_the_verdict():
    lines = summary([MATCH, CONTROL, ACCUM], (2,), ("mlp",))
    text = "\n".join(lines)
    assert len(lines) <= 8 and lines[-1].startswith("PASS: ")
    assert "float64 <= 1e-12" in text and "float32 <= 1e-06 + 1e-05 x max |one|" in text
    assert "matches:  2 of 2" in text and "controls: 1 of 1" in text and "expected to differ" in text


def test_negative_control_a_control_that_does_not_differ_fails_and_is_shown():
    weak = Row(2, "grads", "cnn", "float64", "-", False, 1e-11, 10.0, False)
    lines = summary([MATCH, weak], (2,), ("mlp", "cnn"))
    assert lines[-1].startswith("FAIL: 1 of 2")
    assert any("cnn" in line and "FAIL: differs by only 10 tolerances" in line for line in lines)


def test_the_table_marks_every_control_as_expected_to_differ():
    lines = table([MATCH, CONTROL, ACCUM])
    rows = [line for line in lines if line.startswith(" 2 ")]
    assert len(rows) == 3 and rows[0].endswith("match") and rows[2].endswith("match")
    assert "expected to differ" in rows[1] and "differs by 1.17e+11 tolerances" in rows[1]
    assert "negative controls" in lines[1] and lines[-1].startswith("PASS: ")


def test_table_on_request():
    assert parse_into(VerifyOptions, build_parser(), ["--table"]).table
    assert parse_into(VerifyOptions, build_parser(), ["-v"]).table
    assert not parse_into(VerifyOptions, build_parser(), []).table


@functools.cache
def sharded_report() -> tuple[list[Row], list[str], list[str]]:
    """``verify --world-sizes 2 --models multiply --strategies fsdp``: one set of 2 processes, seconds."""
    rows = collect((2,), ("multiply",), ("fsdp",))
    return rows, summary(rows, (2,), ("multiply",)), table(rows)


def test_verify_runs_the_sharded_proof_and_reports_it_like_ddp():
    rows, lines, _ = sharded_report()
    assert {r.strategy for r in rows} == {"fsdp"} and {r.check for r in rows} == {"grads", "steps", "accum", "bn"}
    assert all(r.good for r in rows), table([r for r in rows if not r.good])
    assert any(line.startswith("  fsdp: matches:  ") for line in lines)
    assert any(line.startswith("  fsdp: controls: ") for line in lines) and lines[-1].startswith("PASS: fsdp ")


def test_negative_control_sharded_controls_are_reported_as_expected_to_differ():
    """Reduction off, and plain BatchNorm under fsdp (its statistics stay per rank): each must miss
    by CONTROL_MARGIN tolerances, shown as expected to differ; one that came close would FAIL."""
    rows, _, lines = sharded_report()
    controls = [r for r in rows if r.control]
    assert {r.check for r in controls} == {"grads", "steps", "bn"} and all(r.good for r in controls)
    shown = [line for line in lines if line.startswith(" 2  fsdp ") and " off " in line]
    assert len(shown) == len(controls) and all(EXPECTED_TO_DIFFER in line for line in shown)
    weak = dataclasses.replace(controls[0], tolerances_off=CONTROL_MARGIN / 2, good=False)
    assert summary([weak], (2,), ("multiply",))[-1].startswith("FAIL: 1 of 1")


def test_strategies_are_spaced_or_comma_separated_default_ddp():
    def parsed(*argv):
        return parse_into(VerifyOptions, build_parser(), list(argv)).strategies

    assert parsed() == ("ddp",) and parsed("--strategies", "zero", "fsdp") == ("zero", "fsdp")
    assert parsed("--strategies", "ddp,zero", "fsdp") == ("ddp", "zero", "fsdp")
