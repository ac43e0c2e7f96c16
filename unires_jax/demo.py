"""The demo (the project's main job): ShapesParts end to end on a CPU in minutes.

  1. write the ShapesParts raw data (RefCOCOm layout; without the concepts `config.demo.without`
     names, if any) to `workdir/raw`
  2. build it with the `ref_coco_m` TFDS builder into `workdir/tfds`
  3. train a word-level tokenizer on the ShapesParts vocabulary (`workdir/tokenizer`)
  4. train the tiny UniRES++ of configs/demo.py (checkpoints in `workdir/checkpoints`), then
     calibrate its no-target threshold on the training images it left out
     (`config.calibration`, stored with the final checkpoint)
  5. evaluate the held-out split (the evaluator `config.evals.shapes_parts_val`) beside the
     trivial baselines, print the table, save overlays (`workdir/overlays/*.png`) and
     `workdir/eval/shapes_parts_val_<step>.json`

Steps 1-3 are skipped when their output is already there; training resumes from the latest
checkpoint. The run passes when the held-out mIoU is at least `config.demo.min_baseline_ratio`
(2) times the best baseline's and N-acc is above `config.demo.min_n_acc` (0.8) (`check`);
otherwise it exits with status 1. In a multi-process run (`--coordinator_address`, the `local`
launcher) process 0 writes the data while the others wait, and process 0 alone prints and saves
overlays.
"""

import logging
import os
import time

import ml_collections
from PIL import Image

from unires_jax import parallel, utils
from unires_jax.data import build, pipeline, shapes_parts, tokenizer
from unires_jax.evaluation import calibration, evals, evaluator, overlays

log = logging.getLogger(__name__)


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Steps 1-3; sets `config.input.data_dir` and `config.input.tokenizer` to their outputs."""
  demo = config.demo
  without = [c for c in demo.without.split(",") if c]
  try:
    shapes_parts.left_out(without)
  except ValueError as e:
    raise ValueError(f"config.demo.without={demo.without!r}: {e}") from None
  raw = os.path.join(workdir, "raw")
  if not os.path.isdir(raw):
    t0 = time.time()
    with utils.new_directory(raw) as tmp:
      shapes_parts.write(tmp, num_train=demo.num_train, num_val=demo.num_val, seed=demo.seed,
                         without=without)
    log.info("wrote %d + %d ShapesParts images%s to %s in %.0f s", demo.num_train,
             demo.num_val, f" without {demo.without}" if without else "", raw, time.time() - t0)
  data_dir = os.path.join(workdir, "tfds")
  try:
    pipeline.dataset_dir(config.evals.shapes_parts_val.dataset, data_dir)
  except FileNotFoundError:
    t0 = time.time()
    build.prepare("ref_coco_m", manual_dir=raw, data_dir=data_dir)
    log.info("built ref_coco_m into %s in %.0f s", data_dir, time.time() - t0)
  tok_dir = os.path.join(workdir, "tokenizer")
  if not os.path.isdir(tok_dir):
    tokenizer.train_tokenizer(
        shapes_parts.vocabulary_texts() + [config.input.template, config.input.answer],
        config.model.llm.vocab_size, tok_dir)
  config.input.data_dir = data_dir
  config.input.tokenizer = tok_dir


def check(metrics: dict[str, float], baselines: dict[str, dict[str, float]],
          demo: ml_collections.ConfigDict) -> list[str]:
  """The demo's bar (`demo.min_baseline_ratio`, `demo.min_n_acc`); returns what failed."""
  best_name = max(baselines, key=lambda k: baselines[k]["mIoU"])
  best = baselines[best_name]["mIoU"]
  failures = []
  if not metrics["mIoU"] >= demo.min_baseline_ratio * best:
    failures.append(f"mIoU {metrics['mIoU']:.3f} < {demo.min_baseline_ratio} x {best:.3f} "
                    f"(baseline {best_name})")
  if not metrics["N-acc"] > demo.min_n_acc:
    failures.append(f"N-acc {metrics['N-acc']:.3f} <= {demo.min_n_acc}")
  return failures


def save_overlays(examples: list[evaluator.Example], out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  for i, ex in enumerate(examples):
    name = f"{i:03d}_{ex.granularity}_{'_'.join(ex.text.split())[:60]}.png"
    pred = ex.pred_mask & (not ex.pred_no_target)
    Image.fromarray(overlays.side_by_side(ex.image, pred, ex.gt_mask)).save(
        os.path.join(out_dir, name))


def run(config: ml_collections.ConfigDict, workdir: str, *, show_progress: bool = True) -> int:
  """Runs the demo in `workdir`; returns the exit status (0 passed, 1 below the bar)."""
  import jax  # after the flags set up JAX
  from jax.experimental import multihost_utils

  from unires_jax.train import trainer

  t_start = time.time()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  lead = jax.process_index() == 0
  if lead:
    prepare_data(config, workdir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("unires-demo: data written")
  if not lead:
    prepare_data(config, workdir)  # finds process 0's files (or writes the same, per host)
  t_train = time.time()
  result = trainer.train(config, workdir, show_progress=show_progress, final_eval=False)
  if result.preempted:
    return 0
  t_eval = time.time()
  config = calibration.applied(config, result.calibration)
  (val,) = [e for e in evals.from_config(config) if e.name == "shapes_parts_val"]
  model = result.factory.model
  ev = evaluator.evaluate(config, result.state.params, parallel.make_predict(model), model.mesh,
                          result.tokenize, val.dataset, val.split, batch_size=val.batch_size,
                          protocol=val.protocol, resolution=val.resolution, with_baselines=True,
                          num_examples=config.demo.num_overlays)
  path = evals.write_json(ev, val, workdir, int(result.state.step),
                          config.model.no_target_threshold)
  failures = check(ev.metrics, ev.baselines, config.demo)
  if not lead:
    return 1 if failures else 0
  save_overlays(ev.examples, os.path.join(workdir, "overlays"))
  columns = {"UniRES++ (tiny)": ev.metrics, **{f"baseline: {k}": v
                                               for k, v in ev.baselines.items()}}
  print(f"\nShapesParts held-out split ({int(ev.metrics['count'])} expressions), "
        f"step {int(result.state.step)}:\n")
  print(evaluator.format_table(columns))
  if result.calibration is not None:
    print("\n" + calibration.describe(result.calibration))
  print(f"\ndata + build {t_train - t_start:.0f} s, train {t_eval - t_train:.0f} s, "
        f"eval {time.time() - t_eval:.0f} s; total {time.time() - t_start:.0f} s")
  print(f"metrics: {path}\noverlays: {os.path.join(workdir, 'overlays')}\n"
        f"checkpoint: {os.path.join(workdir, 'checkpoints')}")
  if failures:
    print("DEMO FAILED its bar: " + "; ".join(failures))
    return 1
  print(f"passed: mIoU >= {config.demo.min_baseline_ratio} x the best baseline, "
        f"N-acc > {config.demo.min_n_acc}")
  return 0
