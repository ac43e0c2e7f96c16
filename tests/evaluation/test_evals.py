"""Evaluators from `config.evals`: every field read, a bad entry named, when each one runs, and
what its JSON records."""

import json
import os

import ml_collections
import pytest

from tests.repo import ROOT
from unires_jax.config_lib import load_config
from unires_jax.evaluation import evals, evaluator


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


def test_protocol_and_resolution_are_read():
  config = _config(g=_entry(dataset="grefcoco", protocol="rela", resolution=480),
                   r=_entry(protocol="classic"))
  assert evals.from_config(config) == [
      evals.Evaluator("g", "grefcoco", "val", 8, "rela", 2, resolution=480),
      evals.Evaluator("r", "ref_coco_m", "val", 8, "classic", 2, resolution=0)]


def test_json_records_protocol_resolution_and_threshold(tmp_path):
  ev = evals.Evaluator("g", "grefcoco", "val", 8, "rela", 2, resolution=480)
  result = evaluator.EvalResult(metrics={"gIoU": 0.5, "N-acc": float("nan"), "count": 2},
                                baselines={}, examples=[])
  path = evals.write_json(result, ev, str(tmp_path), 7, 0.375)
  with open(path, encoding="utf-8") as f:
    record = json.load(f)
  assert {k: record[k] for k in ("evaluator", "dataset", "split", "protocol", "resolution",
                                 "step", "no_target_threshold")} == {
      "evaluator": "g", "dataset": "grefcoco", "split": "val", "protocol": "rela",
      "resolution": 480, "step": 7, "no_target_threshold": 0.375}
  assert record["metrics"]["gIoU"] == 0.5


def test_due_at_multiples_of_every_and_never_for_zero():
  every2, end_only = (evals.Evaluator("x", "d", "s", 1, "lisa", e) for e in (2, 0))
  assert [s for s in range(1, 7) if every2.due(s)] == [2, 4, 6]
  assert not any(end_only.due(s) for s in range(1, 7))


@pytest.mark.parametrize("entry, message", [
    (_entry(protocol="ReLA"),
     r"config.evals.x.protocol='ReLA'; protocols: \('classic', 'rela', 'lisa'\)"),
    (_entry(resolution=-1), r"config.evals.x.resolution=-1 must be an int >= 0"),
    (_entry(resolution=480.0), r"config.evals.x.resolution=480.0 must be an int >= 0"),
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
  assert evals.from_config(_checkout_config(name))


def _checkout_config(name):
  return load_config(os.path.join(ROOT, "configs", f"{name}.py"))


def test_benchmark_evaluators_use_the_benchmarks_protocols():
  by_name = {ev.name: ev for ev in evals.from_config(_checkout_config("unires_pp_7b"))}
  assert (by_name["refcocom_val"].protocol, by_name["grefcoco_val"].protocol) == ("classic",
                                                                                  "rela")
