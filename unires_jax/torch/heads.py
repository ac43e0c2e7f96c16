"""The projectors and the no-target head in PyTorch (`unires_jax.models.unires.Projector`,
`unires_jax.models.no_target.NoTargetHead`), attribute names as in Flax."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Match logit of padded proposals, as `unires_jax.models.no_target.INVALID_LOGIT`.
INVALID_LOGIT = -1e4

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
  """An activation by its config name (`unires_jax.models.layers.ACTIVATIONS`)."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


class Projector(nn.Module):
  """LLaVA's `mlp2x_gelu`: Linear(in, width) -> act -> Linear(width, width) (and deeper)."""

  def __init__(self, in_features: int, width: int, num_layers: int, hidden_act: str):
    super().__init__()
    if num_layers < 1:
      raise ValueError(f"projector.num_layers must be >= 1, got {num_layers}")
    self.layers = nn.ModuleList(
        [nn.Linear(in_features, width)] + [nn.Linear(width, width) for _ in range(num_layers - 1)])
    self.act = activation(hidden_act)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """`[..., in_features]` -> `[..., width]`."""
    for i, layer in enumerate(self.layers):
      x = layer(x if i == 0 else self.act(x))
    return x


class NoTargetHead(nn.Module):
  """`no_target_logit = prior([SEG]) - evidence(match([SEG], regions))`: the logsumexp of the
  valid proposals' match logits, 0 without a valid proposal.

  See `unires_jax.models.no_target` for the design.
  """

  def __init__(self, in_features: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(in_features, hidden)
    self.fc2 = nn.Linear(hidden, 1)
    self.query = nn.Linear(in_features, hidden)
    self.region = nn.Linear(in_features, hidden)
    self.match_fc1 = nn.Linear(hidden, hidden)
    self.match_fc2 = nn.Linear(hidden, 1)

  def forward(self, seg_state: torch.Tensor, regions: torch.Tensor,
              region_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores the expression against the proposals.

    Args:
      seg_state: `[batch, width]` LLM hidden state of the [SEG] token.
      regions: `[batch, regions, width]` projected object and part features.
      region_valid: `[batch, regions]` bool, proposal present.

    Returns:
      (no_target_logits `[batch]`, match_logits `[batch, regions]`, INVALID_LOGIT where padded).
    """
    q = self.query(seg_state)[:, None]
    r = self.region(regions)
    hidden = F.gelu(self.match_fc1(F.gelu(q * r + q + r)))
    match = torch.where(region_valid, self.match_fc2(hidden)[..., 0].float(), INVALID_LOGIT)
    prior = self.fc2(F.gelu(self.fc1(seg_state)))[..., 0]
    any_valid = (match > 0.5 * INVALID_LOGIT).any(dim=-1)
    evidence = torch.where(any_valid, torch.logsumexp(match, dim=-1),
                           torch.zeros((), dtype=match.dtype))
    return prior.float() - evidence, match
