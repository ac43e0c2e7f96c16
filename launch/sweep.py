"""Sweeps: products and zips of value lists over config keys, written as a small expression.

  product({"optimizer.learning_rate": [1e-3, 3e-4]}, zip({"train.seed": [0, 1]},
                                                         {"input.seed": [0, 1]}))

gives 4 trials. `product(a, b, ...)` takes every combination (the last argument varies fastest),
`zip(a, b, ...)` pairs the i-th values of equally long arguments; an argument is a nested call
or a dict of config keys to lists of literal values (several keys in one dict combine as the
enclosing call does). A bare dict is a product. The text is parsed, never evaluated: only these
two names and literals are accepted.
"""

import ast
import itertools
from typing import Any

Point = dict[str, Any]  # config key -> value, one trial's share of a sweep


def parse(spec: str) -> list[Point]:
  """The trials' overrides, in order; `""` is the one trial with no override."""
  if not spec.strip():
    return [{}]
  try:
    tree = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"--sweep is not a sweep expression: {e.msg} in {spec!r}") from None
  points = _points(tree, spec, "product")
  keys = list(points[0])
  for p in points:
    if list(p) != keys:
      raise ValueError(f"--sweep {spec!r} sets different keys in different trials")
  return points


def _points(node: ast.AST, spec: str, combine: str) -> list[Point]:
  if isinstance(node, ast.Dict):
    parts = [_values(k, v, spec) for k, v in zip(node.keys, node.values)]
  elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and node.func.id in ("product", "zip") and not node.keywords):
    combine = node.func.id
    parts = [_points(arg, spec, combine) for arg in node.args]
  else:
    raise ValueError(f"--sweep {spec!r}: expected product(...), zip(...) or a dict of lists, "
                     f"got {ast.unparse(node)!r}")
  if not parts:
    raise ValueError(f"--sweep {spec!r}: {ast.unparse(node)!r} is empty")
  if combine == "zip":
    lengths = {len(p) for p in parts}
    if len(lengths) > 1:
      raise ValueError(f"--sweep {spec!r}: zip of lists of lengths {sorted(lengths)}")
    combos = zip(*parts)
  else:
    combos = itertools.product(*parts)
  points = []
  for combo in combos:
    point: Point = {}
    for part in combo:
      for key, value in part.items():
        if key in point:
          raise ValueError(f"--sweep {spec!r} sets {key!r} twice")
        point[key] = value
    points.append(point)
  return points


def _values(key: ast.AST | None, values: ast.AST, spec: str) -> list[Point]:
  if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
    raise ValueError(f"--sweep {spec!r}: keys are quoted config keys such as \"train.seed\"")
  try:
    literal = ast.literal_eval(values)
  except ValueError:
    raise ValueError(f"--sweep {spec!r}: the values of {key.value!r} are not literals") from None
  if not isinstance(literal, list) or not literal:
    raise ValueError(f"--sweep {spec!r}: {key.value!r} needs a non-empty list of values")
  return [{key.value: v} for v in literal]
