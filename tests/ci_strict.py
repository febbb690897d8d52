"""Under CI (``CI=true``, which ``.ci/run`` sets) every test must run and every generated case must reproduce.

A skipped test is reported as a failure there, with the skip's reason: a missing browser or a machine
without some feature has to be fixed in ``.ci/run``, not passed over. Hypothesis draws its examples
from a fixed seed there (``derandomize``), so a failure in CI fails the same way on a rerun.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import settings

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")

settings.register_profile("ci", derandomize=True, print_blob=True)
if IN_CI:
    settings.load_profile("ci")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {reason}"
