"""pytest plugin: ``BNN_TEST_LOG=PATH`` appends one JSON line per test outcome to PATH as soon as it is known.

A run stopped at a time limit never writes its JUnit XML or its summary; this log still holds every result it
reached and the message of every failure (benchmarks/gpu_suite.sh sets it for the GPU tests).  Under pytest-xdist
only the controller writes (the workers forward their reports to it).  tests/conftest.py imports the hook; other
test trees load it with ``-p result_log`` (this folder on the path).
"""
import json
import os

TEST_LOG_ENV = "BNN_TEST_LOG"
_MESSAGE_CHARS = 4000
_writes = {"enabled": False}


def pytest_configure(config):
    """Only the process that reports writes: not an xdist worker (it forwards its reports to the controller)."""
    _writes["enabled"] = bool(os.environ.get(TEST_LOG_ENV)) and not hasattr(config, "workerinput")


def pytest_runtest_logreport(report):
    """One line per test: its call's outcome, or a setup/teardown that did not pass (errors and skips)."""
    if not _writes["enabled"]:
        return
    path = os.environ[TEST_LOG_ENV]
    if report.when != "call" and report.passed:
        return
    record = {"test": report.nodeid, "when": report.when, "outcome": report.outcome,
              "seconds": round(report.duration, 3)}
    if not report.passed:
        record["message"] = report.longreprtext[-_MESSAGE_CHARS:]
    with open(path, "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")
