"""CPU seconds per test: the suite is CPU-bound on CI's two cores, so wall time alone (pytest's
`--durations`) hides a test whose subprocesses or threads keep both cores busy.

Each phase of a test (setup, call, teardown) is measured in the process that runs it (an xdist
worker): user + system time of that process and of the children it waited for meanwhile (the
subprocesses a test starts; `resource.getrusage`). The reports carry the figures to the
controller, which prints the `--cpu_durations` tests (default 25) that took the most, and the
sum over all tests. Loaded by tests/conftest.py.
"""

import collections
import resource

import pytest

_START = pytest.StashKey[float]()


def _cpu() -> float:
  own, children = (resource.getrusage(resource.RUSAGE_SELF),
                   resource.getrusage(resource.RUSAGE_CHILDREN))
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def pytest_addoption(parser):
  parser.addoption("--cpu_durations", type=int, default=25, metavar="N",
                   help="show the N tests that took the most CPU seconds (0: none)")


def pytest_configure(config):
  config.pluginmanager.register(_CpuTime(config.getoption("cpu_durations")), "unires_cpu_time")


class _CpuTime:
  """Measures in the workers, adds up in the controller (see the module doc)."""

  def __init__(self, count: int):
    self.count = count
    self.per_test: dict[str, float] = collections.defaultdict(float)

  @pytest.hookimpl(tryfirst=True)
  def pytest_runtest_setup(self, item):
    item.stash[_START] = _cpu()

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_makereport(self, item, call):
    outcome = yield
    now = _cpu()
    # One key per phase: the report's list may be the item's own, shared by its phases.
    outcome.get_result().user_properties.append(
        (f"cpu_s_{call.when}", now - item.stash.get(_START, now)))
    item.stash[_START] = now

  def pytest_runtest_logreport(self, report):
    for key, value in report.user_properties:
      if key == f"cpu_s_{report.when}":
        self.per_test[report.nodeid] += value

  def pytest_terminal_summary(self, terminalreporter):
    if not self.count or not self.per_test:
      return
    tr = terminalreporter
    tr.write_sep("=", f"most CPU: {min(self.count, len(self.per_test))} of "
                      f"{len(self.per_test)} tests")
    for nodeid, seconds in sorted(self.per_test.items(), key=lambda kv: -kv[1])[:self.count]:
      tr.write_line(f"{seconds:8.1f} CPU-s  {nodeid}")
    tr.write_line(f"{sum(self.per_test.values()):8.1f} CPU-s  all tests (setup + call + "
                  "teardown, with the subprocesses they waited for)")
