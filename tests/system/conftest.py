"""Prints what each system check saw, pass or fail, at the end of the run.

The checks call :func:`nspawn.record`; the summary is printed even for passing
tests (pytest hides their output), so a CI log shows every figure.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from nspawn import RECORDS, record

_OUTCOMES: dict[str, str] = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report: pytest.TestReport = yield
    container = getattr(item, "funcargs", {}).get("container")
    if report.when == "call" and report.failed and container is not None:
        # What systemd and the broker said is usually the answer: keep it with the failure.
        tail = container.run("journalctl --no-pager -b -n 25 -o short-monotonic", check=False, timeout=30)
        for line in tail.stdout.splitlines():
            record(item.name, f"journal: {line}")
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    name = report.nodeid.rpartition("::")[2]
    if report.when == "call" or report.outcome != "passed":
        # A failed setup or teardown is worth naming too; a passed one is not.
        previous = _OUTCOMES.get(name)
        if previous is None or previous == "passed":
            _OUTCOMES[name] = report.outcome if report.when == "call" else f"{report.when} {report.outcome}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RECORDS:
        return
    terminalreporter.section("portlease system checks")
    for check, lines in RECORDS.items():
        # "container" is the fixture's own record (timings), not a test.
        terminalreporter.write_line(f"{_OUTCOMES.get(check, 'info').upper():<8} {check}")
        for line in lines:
            terminalreporter.write_line(f"         {line}")
