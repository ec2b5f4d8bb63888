"""``DDP_DEMO_NO_SKIPS=1`` (set by .ci/run): a skipped test fails instead.

A few tests skip where the machine cannot host what they need (network namespaces, SLURM's daemons,
``scontrol``), so the suite still runs on a laptop and says why. In CI every one of them is a
required check: there a skip would count as a pass and hide the check, so it is reported as a
failure with its reason. Loaded by tests/conftest.py; torch-free, so a test can load it alone.
"""

from __future__ import annotations

import os

import pytest

ENV = "DDP_DEMO_NO_SKIPS"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get(ENV) == "1" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but {ENV}=1 requires every test to run: {reason}"
