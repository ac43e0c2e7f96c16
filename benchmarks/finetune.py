r"""The worked fine-tuning example of docs/finetune.md, end to end, and its table.

  python benchmarks/finetune.py --workdir=FT [--steps=600] [--lora_rank=8]

Runs the example's commands (`commands`, the block docs/finetune.md shows) one after another
from the repository root, each printed, timed and logged to FT/logs/:

  1. the base: the demo trained without ever naming a door (`--config.demo.without=door`: the
     houses' doors are drawn, no sentence names one);
  2. the new data: ShapesParts images whose sentences name doors, written as your own data's
     folder (`--layout=ref_custom --about=door`), checked, built beside the base's;
  3. the base scored on the held-out splits of both (`unires-eval`: "before");
  4. two fine-tunes from the base's checkpoint on the new data mixed with the old
     (configs/demo_finetune.py): every parameter, and LoRA on the LLM.

Then prints the table: held-out mIoU and N-acc on the new concept and on the old concepts,
before and after, with the steps and minutes of each run. A step already done is not run again
when its output is there (a work directory's checkpoints resume). Exit status 1 when a
fine-tune misses the bar: new-concept mIoU at least `--min_new_ratio` times the base's, and
old-concept mIoU at most `--max_old_drop` below it.
"""

import glob
import json
import os
import shlex
import subprocess
import sys
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs and the data go.", required=True)
_STEPS = flags.DEFINE_integer("steps", 600, "Fine-tuning steps of each run.")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 8, "Rank of the LoRA run's adapters.")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 2000, "Images drawn for the new data's train "
                                  "split (those with a sentence naming a door are kept).")
_NUM_VAL = flags.DEFINE_integer("num_val", 1000, "Images drawn for its held-out split.")
_BASE_FLAGS = flags.DEFINE_multi_string("base_flag", [], "A flag added to the base's "
                                        "unires-demo (a smaller run: tests/test_finetune.py).")
_TRAIN_FLAGS = flags.DEFINE_multi_string("train_flag", [], "A flag added to both unires-train "
                                         "runs.")
_MIN_NEW_RATIO = flags.DEFINE_float("min_new_ratio", 2.0, "The bar: new-concept mIoU after "
                                    "over before.")
_MAX_OLD_DROP = flags.DEFINE_float("max_old_drop", 0.05, "The bar: old-concept mIoU before "
                                   "minus after.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands for --workdir as given, run "
                             "nothing (docs/finetune.md shows them for FT).")

CONCEPT = "door"  # the base never hears of one
RUNS = ("full", "lora")  # the fine-tunes, each in FT/<run>
EVALS = ("new_val", "old_val")  # configs/demo_finetune.py's evaluators


def commands(ft: str, *, steps: int = 600, lora_rank: int = 8, num_train: int = 2000,
             num_val: int = 1000) -> list[tuple[str, list[str]]]:
  """(name, argv) of each step of the example, for the work directory `ft`."""
  base, new = f"{ft}/base", f"{ft}/{CONCEPT}s"
  config = f"configs/demo_finetune.py:base={base}"
  return [
      ("base", ["unires-demo", f"--workdir={base}", f"--config.demo.without={CONCEPT}"]),
      ("write", ["python", "-m", "unires_jax.data.shapes_parts", f"--out={new}",
                 "--layout=ref_custom", f"--about={CONCEPT}", f"--num_train={num_train}",
                 f"--num_val={num_val}", "--seed=1"]),
      ("check", ["unires-data", "check", f"--manual_dir={new}"]),
      ("build", ["tfds", "build", "tfds_builders/ref_custom", f"--manual_dir={new}",
                 f"--data_dir={base}/tfds"]),
      ("before", ["unires-eval", f"--workdir={base}", f"--config={config}"]),
      ("full", ["unires-train", f"--workdir={ft}/full", f"--config={config},steps={steps}"]),
      ("lora", ["unires-train", f"--workdir={ft}/lora",
                f"--config={config},steps={steps},lora_rank={lora_rank}"]),
  ]


def _executable(argv: list[str]) -> list[str]:
  """The installed programs of this Python's environment (its bin folder), whatever PATH is."""
  if argv[0] == "python":
    return [sys.executable, *argv[1:]]
  return [os.path.join(os.path.dirname(sys.executable), argv[0]), *argv[1:]]


def _done(name: str, ft: str) -> bool:
  if name == "write":
    return os.path.exists(f"{ft}/{CONCEPT}s/instances.json")  # written last
  if name == "build":
    return bool(glob.glob(f"{ft}/base/tfds/ref_custom/*/*/dataset_info.json"))
  if name == "base":  # the demo's last output
    return bool(_results(f"{ft}/base", "shapes_parts_val"))
  if name == "before":
    return bool(_results(f"{ft}/base", "new_val"))
  return False  # the trainer resumes, the check is cheap


def _run(name: str, argv: list[str], ft: str, extra: list[str]) -> float:
  """Runs one step (its log in ft/logs/<name>.log); returns its wall time in seconds."""
  if _done(name, ft):
    print(f"{name}: done before, skipped", flush=True)
    return float("nan")
  argv = argv + extra
  print(f"{name}: {shlex.join(argv)}", flush=True)
  os.makedirs(f"{ft}/logs", exist_ok=True)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as the README
  t0 = time.time()
  with open(f"{ft}/logs/{name}.log", "w", encoding="utf-8") as log:
    proc = subprocess.run(_executable(argv), stdout=log, stderr=subprocess.STDOUT, env=env,
                          check=False)
  seconds = time.time() - t0
  if proc.returncode != 0:
    with open(f"{ft}/logs/{name}.log", encoding="utf-8") as log:
      tail = log.read()[-3000:]
    raise SystemExit(f"{name} exited with {proc.returncode} after {seconds:.0f} s; the end of "
                     f"{ft}/logs/{name}.log:\n{tail}")
  print(f"{name}: {seconds:.0f} s", flush=True)
  return seconds


def _results(workdir: str, evaluator: str) -> dict | None:
  """The metrics of `evaluator` at the run's last evaluated step, or None."""
  folder = os.path.join(workdir, "eval")
  if not os.path.isdir(folder):
    return None
  steps = [int(n[len(evaluator) + 1:-5]) for n in os.listdir(folder)
           if n.startswith(evaluator + "_") and n.endswith(".json")]
  if not steps:
    return None
  with open(os.path.join(folder, f"{evaluator}_{max(steps)}.json"), encoding="utf-8") as f:
    return json.load(f)


def table(ft: str, seconds: dict[str, float]) -> tuple[str, list[str]]:
  """The before/after table (markdown) and the bar's failures."""
  rows, failures = {}, []
  for run in ("base",) + RUNS:
    rows[run] = {e: _results(f"{ft}/{run}", e) for e in EVALS}
  base_new, base_old = (rows["base"][e]["metrics"]["mIoU"] for e in EVALS)
  lines = ["| model | steps | minutes | new concept mIoU | N-acc | old concepts mIoU | N-acc | "
           "threshold |", "|---|---|---|---|---|---|---|---|"]
  for run, results in rows.items():
    new, old = (results[e]["metrics"] for e in EVALS)
    minutes = seconds.get(run, float("nan")) / 60
    lines.append(
        f"| {run if run != 'base' else 'base (before)'} | {results['new_val']['step']} | "
        f"{minutes:.1f} | {new['mIoU']:.3f} ({new['mIoU'] / base_new:.2f}x) | "
        f"{new['N-acc']:.3f} | {old['mIoU']:.3f} ({old['mIoU'] - base_old:+.3f}) | "
        f"{old['N-acc']:.3f} | {results['new_val']['no_target_threshold']:.3f} |")
    if run != "base":
      if not new["mIoU"] >= _MIN_NEW_RATIO.value * base_new:
        failures.append(f"{run}: new-concept mIoU {new['mIoU']:.3f} < {_MIN_NEW_RATIO.value} x "
                        f"{base_new:.3f}")
      if not old["mIoU"] >= base_old - _MAX_OLD_DROP.value:
        failures.append(f"{run}: old-concept mIoU {old['mIoU']:.3f} < {base_old:.3f} - "
                        f"{_MAX_OLD_DROP.value}")
  return "\n".join(lines), failures


def main(argv) -> int:
  del argv
  sizes = dict(steps=_STEPS.value, lora_rank=_LORA_RANK.value, num_train=_NUM_TRAIN.value,
               num_val=_NUM_VAL.value)
  if _DRY_RUN.value:
    print("\n".join(shlex.join(argv) for _, argv in commands(_WORKDIR.value, **sizes)))
    return 0
  ft = os.path.abspath(_WORKDIR.value)
  os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tfds_builders/, configs/
  extra = {"base": _BASE_FLAGS.value, "full": _TRAIN_FLAGS.value, "lora": _TRAIN_FLAGS.value}
  seconds = {}
  for name, command in commands(ft, **sizes):
    seconds[name] = _run(name, command, ft, extra.get(name, []))
  text, failures = table(ft, seconds)
  print(f"\nheld out: new concept = {ft}/{CONCEPT}s val (the sentences naming a {CONCEPT}), old "
        "concepts = the demo's val; minutes: the whole command (data, compile, calibration, "
        "evaluation)\n")
  print(text)
  if failures:
    print("\nBELOW THE BAR: " + "; ".join(failures))
    return 1
  print(f"\npassed: new-concept mIoU >= {_MIN_NEW_RATIO.value} x the base's, old-concept mIoU "
        f"within {_MAX_OLD_DROP.value} of it")
  return 0


if __name__ == "__main__":
  app.run(main)
