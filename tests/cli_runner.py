"""`run_cli`: a command-line program run in the test's process, as its console script runs it."""

import importlib
import logging
import sys

import pytest
from absl import flags
from absl import logging as absl_logging


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
  # absl.app.run and common.start set up logging for a program: put this process's back.
  levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items()
            if isinstance(lg, logging.Logger)}
  root_level, absl_handler = logging.root.level, absl_logging.get_absl_handler()
  absl_handler_before = absl_handler in logging.root.handlers
  yield run
  flags.FLAGS.unparse_flags()
  flags.FLAGS.set_default("config", None)  # as a program without a default config has it
  for name, logger in list(logging.root.manager.loggerDict.items()):
    if isinstance(logger, logging.Logger):
      logger.setLevel(levels.get(name, logging.NOTSET))
  logging.root.setLevel(root_level)
  if not absl_handler_before:
    logging.root.removeHandler(absl_handler)


def one_error_line(program: str, err: str) -> str:
  """The message of stderr's one line `unires-<program>: error: <message>`."""
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  assert lines[0].startswith(f"unires-{program}: error: "), err
  return lines[0].removeprefix(f"unires-{program}: error: ")
