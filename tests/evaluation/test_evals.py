"""Evaluators from `config.evals`: every field read, a bad entry named, when each one runs."""

import ml_collections
import pytest

from unires_jax.config_lib import load_config
from unires_jax.evaluation import evals


def _config(**entries) -> ml_collections.ConfigDict:
  config = load_config("tiny")
  config.evals = ml_collections.ConfigDict(entries)
  return config


def _entry(**overrides) -> dict:
  return {**dict(dataset="ref_coco_m", split="val", batch_size=8, protocol="lisa", every=2),
          **overrides}


def test_entries_become_evaluators_by_name():
  config = _config(b=_entry(split="testA", every=0), a=_entry(batch_size=4))
  assert evals.from_config(config) == [
      evals.Evaluator("a", "ref_coco_m", "val", 4, "lisa", 2),
      evals.Evaluator("b", "ref_coco_m", "testA", 8, "lisa", 0)]


def test_due_at_multiples_of_every_and_never_for_zero():
  every2, end_only = (evals.Evaluator("x", "d", "s", 1, "lisa", e) for e in (2, 0))
  assert [s for s in range(1, 7) if every2.due(s)] == [2, 4, 6]
  assert not any(end_only.due(s) for s in range(1, 7))


@pytest.mark.parametrize("entry, message", [
    (_entry(protocol="ReLA"), r"config.evals.x.protocol='ReLA'; protocols: \('lisa',\)"),
    ({k: v for k, v in _entry().items() if k != "split"}, "config.evals.x: missing field 'split'"),
    (_entry(datasett="y"), "config.evals.x: unknown field 'datasett'"),
    (_entry(every=-1), "config.evals.x: batch_size=8 must be >= 1 and every=-1 >= 0"),
    (_entry(batch_size=0), "config.evals.x: batch_size=0 must be >= 1"),
])
def test_bad_entries_are_named(entry, message):
  with pytest.raises(ValueError, match=message):
    evals.from_config(_config(x=entry))


def test_result_path_names_evaluator_and_step():
  assert evals.result_path("/w", "refcocom_val", 300) == "/w/eval/refcocom_val_300.json"


@pytest.mark.parametrize("name", ["unires_pp_7b", "tiny", "demo"])
def test_shipped_configs_have_valid_evaluators(name):
  assert evals.from_config(load_config(name))
