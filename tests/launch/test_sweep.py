"""Sweep expressions: products, zips, nesting, and clear errors for what is not a sweep."""

import pytest

from launch import sweep


def test_product_of_a_list_and_a_zip():
  points = sweep.parse('product({"optimizer.learning_rate": [1e-3, 3e-4]}, '
                       'zip({"train.seed": [0, 1]}, {"input.seed": [5, 6]}))')
  assert points == [
      {"optimizer.learning_rate": 1e-3, "train.seed": 0, "input.seed": 5},
      {"optimizer.learning_rate": 1e-3, "train.seed": 1, "input.seed": 6},
      {"optimizer.learning_rate": 3e-4, "train.seed": 0, "input.seed": 5},
      {"optimizer.learning_rate": 3e-4, "train.seed": 1, "input.seed": 6},
  ]


def test_keys_of_one_dict_combine_as_the_enclosing_call():
  assert sweep.parse('{"a": [1, 2], "b": ["x"]}') == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
  assert sweep.parse('zip({"a": [1, 2], "b": [3, 4]})') == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
  assert sweep.parse("") == [{}]


@pytest.mark.parametrize("spec, message", [
    ('zip({"a": [1, 2]}, {"b": [1]})', "lengths"),
    ('product({"a": [1]}, {"a": [2]})', "sets 'a' twice"),
    ('product({"a": []})', "non-empty list"),
    ('product({"a": 3})', "non-empty list"),
    ('product({a: [1]})', "quoted config keys"),
    ('__import__("os").system("true")', "expected product"),
    ('product({"a": [open("x")]})', "not literals"),
    ('product(', "not a sweep expression"),
])
def test_bad_sweeps_are_rejected_without_evaluating_them(spec, message):
  with pytest.raises(ValueError, match=message):
    sweep.parse(spec)
