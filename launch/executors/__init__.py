"""Executors: `local` (processes on this machine), `tpu_vm` (a Cloud TPU slice), `xm` (XManager)."""
