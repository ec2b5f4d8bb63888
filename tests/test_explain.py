"""The explain walkthrough under real torchrun, and its negative control."""

from __future__ import annotations

from .helpers import torchrun


def test_explain_two_ranks(tmp_path):
    proc = torchrun(2, "ddp_demo.explain", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    rank_lines = [line for line in lines if line.startswith("[rank ")]
    assert rank_lines == [
        "[rank 0] device cpu: shard [1.0, 2.0]; gradient before all-reduce 1.5, after 2.5",
        "[rank 1] device cpu: shard [3.0, 4.0]; gradient before all-reduce 3.5, after 2.5",
    ]
    assert "single process on the whole x: gradient 2.5 = mean(x)" in lines
    assert any(line.startswith("every rank's gradient equals the single-process gradient: yes") for line in lines)


def test_negative_control_without_allreduce_explain_says_no(tmp_path):
    proc = torchrun(2, "ddp_demo.explain", "--skip-allreduce", cwd=tmp_path)
    assert proc.returncode != 0
    assert "gradient before all-reduce 1.5, after (no all-reduce) 1.5" in proc.stdout
    assert "every rank's gradient equals the single-process gradient: NO" in proc.stdout
