"""Runs the real `tfds build` command line and reads datasets back in a separate process.

The reader process imports nothing but `tensorflow_datasets` and NumPy (the acceptance of the data
issue: a user reads our datasets with TFDS alone) and hands the decoded examples back as `.npz`.
"""

import json
import os
import subprocess
import sys

import numpy as np

from tests.repo import ROOT as REPO_ROOT

BUILDERS_DIR = os.path.join(REPO_ROOT, "tfds_builders")
_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}


def build(name: str, manual_dir: str, data_dir: str, *args: str,
          check: bool = True) -> subprocess.CompletedProcess:
  """`tfds build tfds_builders/<name> --manual_dir M --data_dir D [args]` in a subprocess."""
  cmd = [sys.executable, "-c",
         "from tensorflow_datasets.scripts.cli.main import launch_cli; launch_cli()", "build",
         os.path.join(BUILDERS_DIR, name), "--manual_dir", manual_dir, "--data_dir", data_dir,
         *args]
  os.makedirs(data_dir, exist_ok=True)
  proc = subprocess.run(cmd, capture_output=True, text=True, env=_ENV, cwd=data_dir)
  if check and proc.returncode != 0:
    raise AssertionError(f"tfds build {name} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
  return proc


_READER = r"""
import sys, json
import numpy as np
import tensorflow_datasets as tfds
assert "unires_jax" not in sys.modules
name, split, data_dir, out = sys.argv[1:5]
source = tfds.data_source(name, split=split, data_dir=data_dir)
arrays, meta = {}, []
for i in range(len(source)):
  ex = source[i]
  t, e = ex["targets"], ex["expressions"]
  arrays[f"{i}/image"] = ex["image"]
  for j, m in enumerate(t["mask"]):
    arrays[f"{i}/mask/{j}"] = m[..., 0]
  arrays[f"{i}/object_boxes"] = ex["proposals"]["object_boxes"]
  arrays[f"{i}/part_boxes"] = ex["proposals"]["part_boxes"]
  meta.append({
      "image_id": ex["image_id"].decode(), "file_name": ex["file_name"].decode(),
      "targets": [{"id": int(t["id"][j]), "box": [float(v) for v in t["box"][j]],
                   "category": t["category"][j].decode(), "granularity": int(t["granularity"][j]),
                   "raw": t["raw"][j].decode()} for j in range(len(t["id"]))],
      "expressions": [{"text": e["text"][j].decode(), "id": int(e["id"][j]),
                       "ref_id": int(e["ref_id"][j]),
                       "target_indices": [int(v) for v in e["target_indices"][j]],
                       "granularity": int(e["granularity"][j]),
                       "no_target": bool(e["no_target"][j])} for j in range(len(e["id"]))],
  })
np.savez(out, meta=np.array(json.dumps(meta)), **arrays)
"""

GRANULARITIES = ("object", "part", "multi", "none")
TARGET_GRANULARITIES = ("object", "part")


def read_back(name: str, split: str, data_dir: str, tmp_dir: str) -> list[dict]:
  """Every example of `name` (e.g. "ref_coco/refcoco_unc") `split`, read in a TFDS-only process.

  Returns one dict per example: the meta fields (granularities as names) plus `image` [H, W, 3]
  uint8, `masks` (list of [H, W] uint8), `object_boxes`, `part_boxes`.
  """
  out = os.path.join(tmp_dir, f"{name.replace('/', '_')}-{split}.npz")
  proc = subprocess.run([sys.executable, "-c", _READER, name, split, data_dir, out],
                        capture_output=True, text=True, env=_ENV)
  if proc.returncode != 0:
    raise AssertionError(f"reading {name}/{split} failed:\n{proc.stderr[-6000:]}")
  with np.load(out) as f:
    meta = json.loads(str(f["meta"]))
    examples = []
    for i, m in enumerate(meta):
      for t in m["targets"]:
        t["granularity"] = TARGET_GRANULARITIES[t["granularity"]]
      for e in m["expressions"]:
        e["granularity"] = GRANULARITIES[e["granularity"]]
      m["image"] = f[f"{i}/image"]
      m["masks"] = [f[f"{i}/mask/{j}"] for j in range(len(m["targets"]))]
      m["object_boxes"] = f[f"{i}/object_boxes"]
      m["part_boxes"] = f[f"{i}/part_boxes"]
      examples.append(m)
  return examples
