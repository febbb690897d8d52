"""Under CI (``CI=true``, which ``.ci/run`` sets) every test must run and pass, and every generated case must reproduce.

A skipped test is reported as a failure there, with the skip's reason: a missing browser or a machine
without some feature has to be fixed in ``.ci/run``, not passed over. That holds for every kind of skip:
one inside a test or a fixture, a ``skip``/``skipif`` mark, and a module that skips itself while it is
collected (``pytest.importorskip``, ``pytest.skip(allow_module_level=True)``), which stands as one failed
test in the module's place. A test expected to fail (an ``xfail`` mark or ``pytest.xfail()``) fails there
too, and so does one marked so that passes (XPASS): a known failure is fixed or its test removed, not carried.
Hypothesis draws its examples from a fixed seed there (``derandomize``), so a failure in CI fails the same
way on a rerun.

tests/conftest.py imports the hooks below, and a pytest run elsewhere loads them with ``-p tests.ci_strict``.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import settings

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")

settings.register_profile("ci", derandomize=True, print_blob=True)
if IN_CI:
    settings.load_profile("ci")

MUST_RUN = "under CI=true, where every test must run"
MUST_PASS = "under CI=true, where every test must pass"


def _skip_reason(longrepr) -> str:
    """The reason of a skip report (pytest keeps it as (path, line, "Skipped: reason"))."""
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


class SkippedAtCollection(pytest.Item):
    """Stands for a module (or folder) that skipped itself while collected: under CI it is one failed test."""

    def __init__(self, *, reason: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reason = reason

    def runtest(self) -> None:
        pytest.fail(f"skipped while collected {MUST_RUN}: {self.reason}", pytrace=False)

    def reportinfo(self):
        return self.path, None, self.name


# tryfirst: the outermost wrapper, so the report it sees is the final one (after pytest's own skipping plugin
# has turned an xfail's outcome into "skipped" or "passed").
@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped:
        stand_in = SkippedAtCollection.from_parent(collector, name="skipped-while-collected", reason=_skip_reason(report.longrepr))
        report.outcome, report.longrepr, report.result = "passed", None, [stand_in]


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not IN_CI:
        return
    if hasattr(report, "wasxfail"):
        reason = report.wasxfail
        del report.wasxfail  # a plain failure now, not an xfail that failed
        if report.passed:
            report.longrepr = f"marked xfail but passed (XPASS) {MUST_PASS}: remove the mark ({reason})"
        else:
            report.longrepr = f"expected to fail (xfail) {MUST_PASS}: {reason}"
        report.outcome = "failed"
    elif report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped {MUST_RUN}: {_skip_reason(report.longrepr)}"
