"""UniRES++ in PyTorch (torch, transformers, timm; no JAX), loaded from an export directory:

  model = unires_jax.torch.UniRESPP.from_pretrained(out_dir)  # written by convert.unires
  with torch.no_grad():
    outputs = model(batch)  # the JAX model's batch layout
"""

from unires_jax import utils

utils.check_triton_after_tensorflow("unires_jax.torch")

from unires_jax.torch.model import UniRESOutput, UniRESPP

__all__ = ["UniRESOutput", "UniRESPP"]
