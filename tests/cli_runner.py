"""`run_cli`: a command-line program run in the test's process, as its console script runs it."""

import importlib
import sys

import pytest
from absl import flags


@pytest.fixture
def run_cli(monkeypatch, capsys):
  """`run_cli(program, *args)` -> (exit status, stdout, stderr) of `unires-<program> ARGS`, its
  flags parsed from `sys.argv` as the console script parses them, absl's registry reset before
  and after. A program that raises (a bug) raises here."""

  def run(program: str, *args: str) -> tuple[int, str, str]:
    module = importlib.import_module(f"unires_jax.cli.{program}")
    flags.FLAGS.unparse_flags()
    monkeypatch.setattr(sys, "argv", [f"unires-{program}", *args])
    with pytest.raises(SystemExit) as exit_:
      module.run()
    out, err = capsys.readouterr()
    return exit_.value.code, out, err

  monkeypatch.delenv("UNIRES_TRACEBACK", raising=False)
  yield run
  flags.FLAGS.unparse_flags()
  flags.FLAGS.set_default("config", None)  # as a program without a default config has it


def one_error_line(program: str, err: str) -> str:
  """The message of stderr's one line `unires-<program>: error: <message>`."""
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  assert lines[0].startswith(f"unires-{program}: error: "), err
  return lines[0].removeprefix(f"unires-{program}: error: ")
