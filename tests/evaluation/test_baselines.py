"""Trivial baselines: whole image and largest proposal box."""

import numpy as np
import pytest

from unires_jax.evaluation.baselines import largest_proposal, whole_image

_NO_BOXES = np.zeros((0, 4), np.float32)


def test_whole_image():
  mask = whole_image(2, 3)
  assert mask.shape == (2, 3) and mask.dtype == np.bool_ and mask.all()


def test_box_rasterisation_uses_pixel_centres():
  # x centres 0.5 .. 3.5 in [0.5, 2.5] (closed): columns 0, 1, 2; y centres in [1, 2]: row 1.
  mask = largest_proposal(np.array([[0.5, 1.0, 2.5, 2.0]], np.float32), _NO_BOXES, 3, 4)
  np.testing.assert_array_equal(mask, np.array([
      [0, 0, 0, 0],
      [1, 1, 1, 0],
      [0, 0, 0, 0]], np.bool_))
  assert mask.dtype == np.bool_


def test_box_edges_between_centres_and_outside_the_image():
  # x in [1.2, 2.9]: centre 1.5 and 2.5; y in [-3, 9]: every row of the 2 x 4 image.
  mask = largest_proposal(_NO_BOXES, np.array([[1.2, -3.0, 2.9, 9.0]]), 2, 4)
  np.testing.assert_array_equal(mask, np.array([
      [0, 1, 1, 0],
      [0, 1, 1, 0]], np.bool_))


def test_largest_box_across_object_and_part_boxes():
  objects = np.array([[0, 0, 2, 2], [1, 1, 2, 2]], np.float32)  # Areas 4, 1.
  parts = np.array([[0, 0, 1, 1], [1, 0, 4, 2]], np.float32)  # Areas 1, 6.
  expected = np.zeros((3, 4), np.bool_)
  expected[0:2, 1:4] = True
  np.testing.assert_array_equal(largest_proposal(objects, parts, 3, 4), expected)
  expected = np.zeros((3, 4), np.bool_)
  expected[0:2, 0:2] = True
  np.testing.assert_array_equal(largest_proposal(objects, parts[:1], 3, 4), expected)


def test_tie_goes_to_the_first_box_objects_first():
  objects = np.array([[0, 0, 1, 2]], np.float32)
  parts = np.array([[2, 0, 4, 1]], np.float32)  # Same area, 2.
  expected = np.zeros((2, 4), np.bool_)
  expected[:, 0] = True
  np.testing.assert_array_equal(largest_proposal(objects, parts, 2, 4), expected)


def test_inverted_box_has_zero_area():
  inverted = np.array([[4, 4, 0, 0]], np.float32)  # (x2 - x1) * (y2 - y1) would be 16.
  small = np.array([[0, 0, 1, 1]], np.float32)
  expected = np.zeros((4, 4), np.bool_)
  expected[0, 0] = True
  np.testing.assert_array_equal(largest_proposal(inverted, small, 4, 4), expected)


@pytest.mark.parametrize("objects, parts", [(_NO_BOXES, _NO_BOXES), ([], [])])
def test_no_proposal_gives_an_empty_mask(objects, parts):
  mask = largest_proposal(objects, parts, 3, 5)
  assert mask.shape == (3, 5) and mask.dtype == np.bool_ and not mask.any()


@pytest.mark.parametrize("objects, parts, name", [
    (np.zeros((2, 3)), _NO_BOXES, "object_boxes"),
    (_NO_BOXES, np.zeros(4), "part_boxes"),
])
def test_bad_box_shape(objects, parts, name):
  with pytest.raises(ValueError, match=name):
    largest_proposal(objects, parts, 3, 5)
