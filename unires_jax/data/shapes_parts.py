"""ShapesParts: procedurally drawn scenes for referring segmentation at every granularity.

An image (default 128x128) holds 1-4 objects on a dark noisy background. There are four kinds,
each made of named parts:

  truck   cargo box, cabin, wheels        person  body, head, legs
  house   walls, roof, door               tree    crown, trunk

An object has one colour of a small palette; its parts are shades of it, so they are visible.
Object boxes never overlap (rejection sampling), parts are drawn into a label map (a later part
paints over an earlier one), so every mask is exact: an object's mask is the union of its parts'
masks and no two masks share a pixel.

References come at four granularities, each unambiguous by construction (a phrase is used only
when it picks out exactly its targets among the image's objects):

  object  "the red truck", "the truck on the left"
  part    "the wheels of the red truck", "the house roof"
  multi   "all trucks", "the red truck and the blue house", "the head and the legs of the person"
  none    "the purple tree", "all houses" (a colour / kind absent from the image)

Generation is deterministic: image `i` of a seed is drawn from its own stream
`np.random.default_rng([seed, i])`, so the same seed gives the same files byte for byte and a
split does not change when another split grows. The data is written in the RefCOCOm raw layout
and built by `tfds_builders/ref_coco_m` unchanged:

  python -m unires_jax.data.shapes_parts --out=RAW --num_train=2000 --num_val=200 --seed=0
  tfds build tfds_builders/ref_coco_m --manual_dir RAW --data_dir DATA

Concepts left out (`--without=door`: a part still drawn but never named; `--without=tree`: a
kind neither drawn nor named) and one concept alone (`--about=door`: only the sentences that
name it), written in your own data's layout (`--layout=ref_custom`, tfds_builders/ref_custom),
give the worked fine-tuning example of docs/finetune.md its base and its new data.
"""

import dataclasses
import itertools
import re
import time
from typing import Mapping, Sequence

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw

from unires_jax.data import schema
from unires_jax.data.writers import common, ref_custom, refcocom

COLOURS = {  # RGB
    "red": (220, 45, 45), "green": (50, 190, 70), "blue": (60, 100, 235),
    "yellow": (235, 210, 50), "white": (235, 235, 235), "purple": (155, 70, 205),
}
PART_SHADES = (1.0, 0.7, 0.5)  # part k of an object is painted in its colour * PART_SHADES[k]


@dataclasses.dataclass(frozen=True)
class Kind:
  """An object kind: its parts and how to draw them.

  `shapes` are drawn in order, each `(part, "rect" | "ellipse" | "polygon", coordinates)` with
  coordinates relative to the object's box (0 = left / top edge, 1 = right / bottom edge).
  """

  plural: str
  aspect: float  # box width / height
  parts: tuple[str, ...]  # part k is label k + 1 and shade PART_SHADES[k]
  shapes: tuple[tuple[str, str, tuple[float, ...]], ...]


KINDS = {
    "truck": Kind("trucks", 1.6, ("cargo box", "cabin", "wheels"), (
        ("cargo box", "rect", (0, .05, .62, .78)),
        ("cabin", "polygon", (.66, .3, .86, .3, 1, .52, 1, .78, .66, .78)),
        ("wheels", "ellipse", (.07, .58, .31, .98)),
        ("wheels", "ellipse", (.69, .58, .93, .98)))),
    "person": Kind("people", .55, ("body", "head", "legs"), (
        ("body", "polygon", (.12, .26, .88, .26, 1, .58, .86, .6, .76, .4, .72, .64, .28, .64,
                             .24, .4, .14, .6, 0, .58)),
        ("head", "ellipse", (.28, 0, .72, .24)),
        ("legs", "rect", (.3, .64, .46, 1)),
        ("legs", "rect", (.54, .64, .7, 1)))),
    "house": Kind("houses", 1.0, ("walls", "roof", "door"), (
        ("walls", "rect", (.1, .42, .9, 1)),
        ("roof", "polygon", (0, .46, .5, 0, 1, .46)),
        ("door", "rect", (.4, .66, .6, 1)))),
    "tree": Kind("trees", .7, ("crown", "trunk"), (
        ("trunk", "rect", (.4, .5, .6, 1)),
        ("crown", "ellipse", (0, 0, 1, .68)))),
}
PART_PLURALS = {
    "cargo box": "cargo boxes", "cabin": "cabins", "wheels": "wheels", "body": "bodies",
    "head": "heads", "legs": "legs", "walls": "walls", "roof": "roofs", "door": "doors",
    "crown": "crowns", "trunk": "trunks",
}

DEFAULT_SHARES = {"object": 0.35, "part": 0.35, "multi": 0.15, "none": 0.15}
MIN_OBJECT_SIZE = 16  # pixels along an object's long side; every part stays visible down to it
_GAP = 2  # pixels between object boxes: "left of" is then plainly visible
_PLACEMENT_TRIES = 50
_IDS_PER_IMAGE = 64  # segment, ref and sentence ids of image i lie in [64 i, 64 i + 64)
_SPLIT_FIRST_IMAGE_ID = {"train": 1, "val": 10_000_001}
LAYOUTS = {"ref_coco_m": refcocom.write, "ref_custom": ref_custom.write}  # name -> writer
FLAGS = flags.FLAGS

# Sentence templates. `{np}` is a noun phrase that names one object ("red truck",
# "truck on the left"); `vocabulary_texts()` collects every word that can occur.
SIDES = {"left": "on the left", "right": "on the right", "top": "at the top",
         "bottom": "at the bottom"}
OBJECT_TEMPLATES = ("the {np}", "{np}")
PART_TEMPLATES = ("the {part} of the {np}", "{part} of the {np}")
COMPOUND_PART_TEMPLATES = ("the {np} {part}",)  # only when {np} is "[colour] kind"
COLOUR_NP = "{colour} object"
KIND_GROUP_TEMPLATES = ("all {plural}", "all the {plural}", "every {kind}")
PAIR_GROUP_TEMPLATES = ("both {plural}", "the two {plural}")
COLOUR_GROUP_TEMPLATES = ("all {colour} objects", "all the {colour} objects",
                          "every {colour} object")
EVERYTHING_TEMPLATES = ("all objects", "all the objects", "everything")
CONJUNCTION_TEMPLATES = ("the {a} and the {b}", "{a} and {b}")
PARTS_OF_ONE_TEMPLATES = ("the {p1} and the {p2} of the {np}", "the {p1} and {p2} of the {np}")
PART_GROUP_TEMPLATES = ("the {parts} of all {plural}", "the {parts} of all the {plural}")
PART_PAIR_TEMPLATES = ("the {parts} of both {plural}",)


@dataclasses.dataclass(frozen=True)
class _Object:
  """A drawn object: the box it is drawn in (x1, y1, x2, y2, ends exclusive), its segment ids."""

  kind: str
  colour: str
  box: tuple[int, int, int, int]
  segment_id: int
  part_ids: Mapping[str, int]


@dataclasses.dataclass(frozen=True)
class _NounPhrase:
  text: str
  compound: bool  # "[colour] kind": may precede a part name ("the red truck wheels")


_Option = tuple[list[int], list[str]]  # target segment ids, the sentences that refer to them


def generate(num_images: int, *, seed: int, image_size: int = 128, first_image_id: int = 1,
             max_objects: int = 4, refs_per_image: tuple[int, int] = (2, 4),
             shares: Mapping[str, float] | None = None,
             max_distractors: int = 2, without: Sequence[str] = ()) -> list[common.Scene]:
  """`num_images` scenes with ids `first_image_id, first_image_id + 1, ...`.

  Args:
    num_images: number of scenes.
    seed: non-negative; the same seed gives the same scenes.
    image_size: side of the square images in pixels (>= 2 * MIN_OBJECT_SIZE).
    first_image_id: id of the first scene; segment, ref and sentence ids derive from image ids,
      so scenes with distinct image ids never share any id.
    max_objects: each image holds 1..max_objects objects (fewer when they do not fit).
    refs_per_image: inclusive range of references per image.
    shares: probability of each granularity ("object", "part", "multi", "none") per reference;
      normalised, DEFAULT_SHARES when None.
    max_distractors: each image gets 0..max_distractors random proposal boxes besides the
      jittered ground-truth boxes.
    without: concepts left out (`left_out`): kinds, never drawn nor named, and parts, drawn
      but never named (no-target sentences do not name them either). Empty: the scenes are
      those of every earlier version.

  Returns:
    the scenes; object and part proposals are x1, y1, x2, y2 float32 `[n, 4]`.
  """
  probs = _granularity_probs(shares)
  kinds, hidden_parts = left_out(without)
  if image_size < 2 * MIN_OBJECT_SIZE:
    raise ValueError(f"image_size={image_size} is below {2 * MIN_OBJECT_SIZE}")
  if not 1 <= max_objects <= 12:  # 4 segments per object must fit in _IDS_PER_IMAGE
    raise ValueError(f"max_objects={max_objects} outside [1, 12]")
  lo, hi = refs_per_image
  if not 1 <= lo <= hi <= 16:  # 2 sentences per reference must fit in _IDS_PER_IMAGE
    raise ValueError(f"refs_per_image={refs_per_image} is not a range within [1, 16]")
  return [_scene(np.random.default_rng([seed, image_id]), image_id, image_size=image_size,
                 max_objects=max_objects, refs_per_image=refs_per_image, probs=probs,
                 max_distractors=max_distractors, kinds=kinds, hidden_parts=hidden_parts)
          for image_id in range(first_image_id, first_image_id + num_images)]


def write(root: str, *, num_train: int, num_val: int, seed: int, image_size: int = 128,
          layout: str = "ref_coco_m", about_concept: str | None = None,
          **generate_kwargs) -> dict[str, list[common.Scene]]:
  """Writes train and val splits (with proposals) in a raw layout under `root`.

  Train image ids start at 1, val at 10_000_001, so no id is shared across splits. Further keyword
  arguments go to `generate`. Returns the scenes written, by split.

  Args:
    layout: one of LAYOUTS: "ref_coco_m" (RefCOCOm's files, built by tfds_builders/ref_coco_m) or
      "ref_custom" (your own data's folder, tfds_builders/ref_custom; masks in every format it
      reads, by turns).
    about_concept: when set, only the sentences that name this kind (or one of its parts) or
      this part are kept (`about`): a dataset of one concept, as the fine-tuning example
      writes (docs/finetune.md).
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
  if about_concept is not None:
    concept_words(about_concept)  # an unknown concept fails before anything is drawn
  counts = {"train": num_train, "val": num_val}
  for split, n in counts.items():
    if not 0 <= n < _SPLIT_FIRST_IMAGE_ID["val"] - _SPLIT_FIRST_IMAGE_ID["train"]:
      raise ValueError(f"num_{split}={n} outside [0, 10_000_000)")
  splits = {split: generate(n, seed=seed, image_size=image_size,
                            first_image_id=_SPLIT_FIRST_IMAGE_ID[split], **generate_kwargs)
            for split, n in counts.items() if n}
  if about_concept is not None:
    splits = {split: about(scenes, about_concept) for split, scenes in splits.items()}
  LAYOUTS[layout](root, splits)
  return splits


def concept_words(concept: str) -> tuple[str, ...]:
  """The words that name `concept`, singular and plural: a kind's own and its parts', or a
  part's."""
  _check_concepts([concept], "about")
  if concept in KINDS:
    k = KINDS[concept]
    return (concept, k.plural) + tuple(w for p in k.parts for w in (p, PART_PLURALS[p]))
  return tuple(dict.fromkeys((concept, PART_PLURALS[concept])))


def about(scenes: Sequence[common.Scene], concept: str) -> list[common.Scene]:
  """The scenes' references cut to the sentences that name `concept` (`concept_words`: for
  "door", "the door of the red house", "the doors of all houses", "the door of the purple
  house" where there is none); a reference left without a sentence is dropped, then a scene
  without a reference. Ids stay as they were."""
  pattern = re.compile(r"\b(" + "|".join(map(re.escape, concept_words(concept))) + r")\b")
  out = []
  for scene in scenes:
    refs = []
    for ref in scene.refs:
      keep = [k for k, sentence in enumerate(ref.sentences) if pattern.search(sentence)]
      if keep:
        refs.append(dataclasses.replace(ref, sentences=[ref.sentences[k] for k in keep],
                                        sent_ids=[ref.sent_ids[k] for k in keep]))
    if refs:
      out.append(dataclasses.replace(scene, refs=refs))
  return out


def ref_granularity(scene: common.Scene, ref: common.Ref) -> str:
  """"object" | "part" | "multi" | "none", as the builder's schema derives it."""
  if len(ref.segment_ids) != 1:
    return "multi" if ref.segment_ids else "none"
  return "object" if scene.segment(ref.segment_ids[0]).part is None else "part"


def vocabulary_texts() -> list[str]:
  """Texts that hold every word a ShapesParts sentence can contain (to train a tokenizer)."""
  templates = (OBJECT_TEMPLATES + PART_TEMPLATES + COMPOUND_PART_TEMPLATES + (COLOUR_NP,)
               + KIND_GROUP_TEMPLATES + PAIR_GROUP_TEMPLATES + COLOUR_GROUP_TEMPLATES
               + EVERYTHING_TEMPLATES + CONJUNCTION_TEMPLATES + PARTS_OF_ONE_TEMPLATES
               + PART_GROUP_TEMPLATES + PART_PAIR_TEMPLATES + tuple(SIDES.values()))
  words = [re.sub(r"\{\w+\}", " ", t) for t in templates]
  words += list(COLOURS) + list(PART_PLURALS) + list(PART_PLURALS.values())
  words += [w for name, kind in KINDS.items() for w in (name, kind.plural)]
  return [" ".join(w.split()) for w in words if w.strip()]


def _check_concepts(names: Sequence[str], what: str) -> None:
  """A ValueError that names, under `what`, each of `names` that is neither a kind nor a part."""
  unknown = sorted(set(names) - set(KINDS) - set(PART_PLURALS))
  if unknown:
    raise ValueError(f"{what}: {unknown} are neither kinds {list(KINDS)} nor parts "
                     f"{list(PART_PLURALS)}")


def left_out(without: Sequence[str]) -> tuple[tuple[str, ...], frozenset[str]]:
  """(the kinds drawn and named, in KINDS order; the parts drawn but never named) when the
  concepts `without` (kinds or parts) are left out. An error names any unknown one."""
  _check_concepts(without, "without")
  kinds = tuple(k for k in KINDS if k not in without)
  if not kinds:
    raise ValueError(f"without: {list(without)} leaves no kind to draw")
  return kinds, frozenset(p for p in without if p in PART_PLURALS)


def _granularity_probs(shares: Mapping[str, float] | None) -> np.ndarray:
  """`[4]` probabilities in schema.GRANULARITIES order."""
  shares = DEFAULT_SHARES if shares is None else shares
  unknown = set(shares) - set(schema.GRANULARITIES)
  if unknown:
    raise ValueError(f"shares has unknown granularities {sorted(unknown)}; "
                     f"expected some of {schema.GRANULARITIES}")
  p = np.array([float(shares.get(g, 0.0)) for g in schema.GRANULARITIES])
  if np.any(p < 0) or not p.sum() > 0:
    raise ValueError(f"shares must be non-negative with a positive sum, got {dict(shares)}")
  return p / p.sum()


def _scene(rng: np.random.Generator, image_id: int, *, image_size: int, max_objects: int,
           refs_per_image: tuple[int, int], probs: np.ndarray,
           max_distractors: int, kinds: tuple[str, ...],
           hidden_parts: frozenset[str]) -> common.Scene:
  """One image: placement, drawing, segments, references and proposals."""
  placed = _place(rng, image_size, max_objects, kinds)
  pixels = np.empty((image_size, image_size, 3), np.float32)
  pixels[:] = rng.integers(15, 50, 3)
  segments, objects = [], []
  next_id = itertools.count(image_id * _IDS_PER_IMAGE)
  for kind, colour, box in placed:
    x1, y1, x2, y2 = box
    labels = draw_labels(kind, x2 - x1, y2 - y1)
    obj_id = next(next_id)
    segments.append(common.Segment(obj_id, _paste(labels > 0, box, image_size), category=kind))
    part_ids = {}
    for k, part in enumerate(KINDS[kind].parts):
      pixels[y1:y2, x1:x2][labels == k + 1] = np.array(COLOURS[colour]) * PART_SHADES[k]
      part_ids[part] = next(next_id)
      segments.append(common.Segment(part_ids[part], _paste(labels == k + 1, box, image_size),
                                     category=kind, part=part, parent=obj_id))
    objects.append(_Object(kind, colour, box, obj_id, part_ids))
  pixels += rng.normal(0.0, 8.0, pixels.shape)
  pixels = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
  scene = common.Scene(image_id, f"shapes_parts_{image_id:08d}.jpg", pixels, segments,
                       _refs(rng, image_id, objects, refs_per_image, probs, kinds,
                             hidden_parts))
  scene.object_proposals, scene.part_proposals = _proposals(rng, scene, max_distractors)
  return scene


def _place(rng: np.random.Generator, image_size: int, max_objects: int,
           kinds: tuple[str, ...]) -> list[tuple[str, str, tuple[int, int, int, int]]]:
  """(kind, colour, box) for 1..max_objects objects whose boxes are at least _GAP apart."""
  placed = []
  for _ in range(int(rng.integers(1, max_objects + 1))):
    kind, colour = str(rng.choice(list(kinds))), str(rng.choice(list(COLOURS)))
    for _ in range(_PLACEMENT_TRIES):
      long_side = max(MIN_OBJECT_SIZE, round(rng.uniform(0.25, 0.45) * image_size))
      aspect = KINDS[kind].aspect
      w = long_side if aspect >= 1 else round(long_side * aspect)
      h = round(long_side / aspect) if aspect >= 1 else long_side
      x1, y1 = int(rng.integers(0, image_size - w + 1)), int(rng.integers(0, image_size - h + 1))
      box = (x1, y1, x1 + w, y1 + h)
      if all(_apart(box, other) for _, _, other in placed):
        placed.append((kind, colour, box))
        break
  return placed


def _apart(a: Sequence[int], b: Sequence[int]) -> bool:
  """Whether boxes (x1, y1, x2, y2) are separated by at least _GAP pixels along x or y."""
  return (a[2] + _GAP <= b[0] or b[2] + _GAP <= a[0] or a[3] + _GAP <= b[1]
          or b[3] + _GAP <= a[1])


def draw_labels(kind: str, width: int, height: int) -> np.ndarray:
  """`[height, width]` uint8 label map of one object: 0 background, k + 1 its part k."""
  canvas = Image.new("L", (width, height), 0)
  draw = ImageDraw.Draw(canvas)
  parts = KINDS[kind].parts
  for part, shape, rel in KINDS[kind].shapes:
    xy = [round(v * ((width, height)[i % 2] - 1)) for i, v in enumerate(rel)]
    label = parts.index(part) + 1
    if shape == "rect":
      draw.rectangle(xy, fill=label)
    elif shape == "ellipse":
      draw.ellipse(xy, fill=label)
    else:
      draw.polygon(xy, fill=label)
  return np.asarray(canvas)


def _paste(mask: np.ndarray, box: Sequence[int], image_size: int) -> np.ndarray:
  """An object-box mask `[h, w]` placed into an image-sized `[S, S]` bool mask."""
  full = np.zeros((image_size, image_size), bool)
  full[box[1]:box[3], box[0]:box[2]] = mask
  return full


def _refs(rng: np.random.Generator, image_id: int, objects: list[_Object],
          refs_per_image: tuple[int, int], probs: np.ndarray,
          kinds: tuple[str, ...], hidden_parts: frozenset[str]) -> list[common.Ref]:
  """References with 1-2 sentences each. In one image no sentence is used twice and no target set
  (but the empty one) is referred to twice, which keeps the language varied. Only `kinds` and
  the parts not in `hidden_parts` are named."""
  first = image_id * _IDS_PER_IMAGE
  refs, used, referred = [], set(), set()
  options = {"object": _object_options,
             "part": lambda objects: _part_options(objects, hidden_parts),
             "multi": lambda objects: _multi_options(objects, hidden_parts),
             "none": lambda objects: _none_options(objects, kinds, hidden_parts)}

  def add(granularity: str) -> bool:
    picked = _pick(rng, options[granularity](objects), used, referred)
    if picked is None:
      return False
    ids, sentences = picked
    used.update(sentences)
    referred.add(tuple(ids))
    sent_id = first + sum(len(r.sentences) for r in refs)
    refs.append(common.Ref(first + len(refs), ids, sentences,
                           list(range(sent_id, sent_id + len(sentences)))))
    return True

  for _ in range(int(rng.integers(refs_per_image[0], refs_per_image[1] + 1))):
    add(schema.GRANULARITIES[int(rng.choice(len(probs), p=probs))])
  # Every image needs an expression: when all draws failed, the likeliest granularity that has one.
  for i in np.argsort(-probs, kind="stable"):
    if refs or probs[i] == 0:
      break
    add(schema.GRANULARITIES[i])
  return refs


def _pick(rng: np.random.Generator, groups: list[list[_Option]], used: set[str],
          referred: set[tuple[int, ...]]) -> _Option | None:
  """A random option of a random group: targets not yet `referred` to (unless none) and 1-2 of
  its sentences not yet `used`; a second sentence differs by more than its article."""
  groups = [g for g in ([(ids, [s for s in sents if s not in used]) for ids, sents in group
                         if not ids or tuple(ids) not in referred] for group in groups)
            if any(sents for _, sents in g)]
  if not groups:
    return None
  options = [o for o in groups[int(rng.integers(len(groups)))] if o[1]]
  ids, pool = options[int(rng.integers(len(options)))]
  first = pool[int(rng.integers(len(pool)))]
  others = [s for s in pool if _without_article(s) != _without_article(first)]
  if others and rng.random() < 0.5:
    return ids, [first, others[int(rng.integers(len(others)))]]
  return ids, [first]


def _without_article(sentence: str) -> str:
  return sentence.removeprefix("the ")


def _noun_phrases(obj: _Object, objects: list[_Object]) -> list[_NounPhrase]:
  """Phrases that name `obj` and no other object of the image."""
  same_kind = [o for o in objects if o.kind == obj.kind]
  same_both = [o for o in same_kind if o.colour == obj.colour]
  phrases = []
  if len(same_kind) == 1:
    phrases.append(_NounPhrase(obj.kind, True))
  if len(same_both) == 1:
    phrases.append(_NounPhrase(f"{obj.colour} {obj.kind}", True))
  if sum(o.colour == obj.colour for o in objects) == 1:
    phrases.append(_NounPhrase(COLOUR_NP.format(colour=obj.colour), False))
  for side, words in SIDES.items():
    if len(same_kind) > 1 and _extreme(obj, same_kind, side):
      phrases.append(_NounPhrase(f"{obj.kind} {words}", False))
    if len(same_both) > 1 and _extreme(obj, same_both, side):
      phrases.append(_NounPhrase(f"{obj.colour} {obj.kind} {words}", False))
  return phrases


def _extreme(obj: _Object, group: list[_Object], side: str) -> bool:
  """Whether `obj`'s box lies wholly to `side` of every other box of `group`.

  The boxes are those the objects are drawn in; they hold all of an object's pixels, so the
  relation holds for what is visible too.
  """
  x1, y1, x2, y2 = obj.box
  others = [o.box for o in group if o is not obj]
  return all({"left": x2 <= b[0], "right": b[2] <= x1, "top": y2 <= b[1],
              "bottom": b[3] <= y1}[side] for b in others)


def _unique(sentences) -> list[str]:
  return list(dict.fromkeys(sentences))


def _object_options(objects: list[_Object]) -> list[list[_Option]]:
  """One group: each object with every sentence that names it."""
  return [[([o.segment_id], _unique(t.format(np=p.text) for p in _noun_phrases(o, objects)
                                    for t in OBJECT_TEMPLATES))
           for o in objects]]


def _part_options(objects: list[_Object], hidden: frozenset[str]) -> list[list[_Option]]:
  """One group: each part (not `hidden`) of each object with every sentence that names it."""
  options = []
  for o in objects:
    phrases = _noun_phrases(o, objects)
    for part, part_id in o.part_ids.items():
      if part in hidden:
        continue
      sentences = [t.format(part=part, np=p.text) for p in phrases for t in PART_TEMPLATES]
      sentences += [t.format(part=part, np=p.text) for p in phrases if p.compound
                    for t in COMPOUND_PART_TEMPLATES]
      options.append(([part_id], _unique(sentences)))
  return [options]


def _multi_options(objects: list[_Object], hidden: frozenset[str]) -> list[list[_Option]]:
  """Groups of several-target references: kind groups, colour groups, all objects, pairs of named
  objects, two parts of one object, one part of every object of a kind (no part `hidden`)."""
  kind_groups, part_groups, colour_groups, pairs, parts_of_one = [], [], [], [], []
  for kind, members in _group_by(objects, lambda o: o.kind).items():
    if len(members) < 2:
      continue
    words = {"kind": kind, "plural": KINDS[kind].plural}
    pair = len(members) == 2
    kind_groups.append(([o.segment_id for o in members],
                        [t.format(**words) for t in KIND_GROUP_TEMPLATES
                         + (PAIR_GROUP_TEMPLATES if pair else ())]))
    for part in [p for p in KINDS[kind].parts if p not in hidden]:
      part_groups.append(([o.part_ids[part] for o in members],
                          [t.format(parts=PART_PLURALS[part], **words)
                           for t in PART_GROUP_TEMPLATES + (PART_PAIR_TEMPLATES if pair else ())]))
  for colour, members in _group_by(objects, lambda o: o.colour).items():
    if len(members) > 1:
      colour_groups.append(([o.segment_id for o in members],
                            [t.format(colour=colour) for t in COLOUR_GROUP_TEMPLATES]))
  everything = ([[([o.segment_id for o in objects], list(EVERYTHING_TEMPLATES))]]
                if len(objects) > 1 else [])
  phrases = {o.segment_id: [p.text for p in _noun_phrases(o, objects)] for o in objects}
  for a, b in itertools.combinations(objects, 2):
    pairs.append(([a.segment_id, b.segment_id],
                  _unique(t.format(a=pa, b=pb) for pa in phrases[a.segment_id]
                          for pb in phrases[b.segment_id] for t in CONJUNCTION_TEMPLATES)))
  for o in objects:
    named = [p for p in KINDS[o.kind].parts if p not in hidden]
    for p1, p2 in itertools.combinations(named, 2):
      parts_of_one.append(([o.part_ids[p1], o.part_ids[p2]],
                           _unique(t.format(p1=p1, p2=p2, np=np_) for np_ in phrases[o.segment_id]
                                   for t in PARTS_OF_ONE_TEMPLATES)))
  groups = [kind_groups, part_groups, colour_groups, pairs, parts_of_one]
  return [g for g in groups if g] + everything


def _none_options(objects: list[_Object], kinds: tuple[str, ...],
                  hidden: frozenset[str]) -> list[list[_Option]]:
  """Groups of no-target references: an absent colour-kind (or a part of one), absent kind,
  absent colour; only `kinds` and parts not `hidden` are named."""
  present = {(o.kind, o.colour) for o in objects}
  absent_objects, absent_parts, absent_kinds, absent_colours = [], [], [], []
  for kind, colour in itertools.product(kinds, COLOURS):
    if (kind, colour) in present:
      continue
    np_ = f"{colour} {kind}"
    absent_objects.append(([], [t.format(np=np_) for t in OBJECT_TEMPLATES]))
    absent_parts.extend(([], [t.format(part=part, np=np_) for t in PART_TEMPLATES])
                        for part in KINDS[kind].parts if part not in hidden)
  for kind in [k for k in kinds if k not in {o.kind for o in objects}]:
    words = {"kind": kind, "plural": KINDS[kind].plural}
    absent_kinds.append(([], [t.format(np=kind) for t in OBJECT_TEMPLATES]
                         + [t.format(**words) for t in KIND_GROUP_TEMPLATES]))
  for colour in [c for c in COLOURS if c not in {o.colour for o in objects}]:
    absent_colours.append(([], [t.format(np=COLOUR_NP.format(colour=colour))
                                for t in OBJECT_TEMPLATES]
                           + [t.format(colour=colour) for t in COLOUR_GROUP_TEMPLATES]))
  return [g for g in (absent_objects, absent_parts, absent_kinds, absent_colours) if g]


def _group_by(objects: list[_Object], key) -> dict[str, list[_Object]]:
  groups: dict[str, list[_Object]] = {}
  for o in objects:
    groups.setdefault(key(o), []).append(o)
  return groups


def _proposals(rng: np.random.Generator, scene: common.Scene,
               max_distractors: int) -> tuple[np.ndarray, np.ndarray]:
  """Object and part proposals `[n, 4]` x1, y1, x2, y2: every ground-truth box moved by up to
  10% of its size, plus 0..max_distractors random boxes, each list in random order."""
  size = scene.pixels.shape[0]
  boxes = {False: [], True: []}  # is a part -> boxes
  for seg in scene.segments:
    x, y, w, h = seg.box_xywh
    shift = rng.uniform(-0.1, 0.1, 4) * np.array([w, h, w, h])
    boxes[seg.part is not None].append(np.array([x, y, x + w, y + h]) + shift)
  for _ in range(int(rng.integers(0, max_distractors + 1))):
    x1, y1 = rng.uniform(0, 0.8 * size, 2)
    w, h = rng.uniform(0.1, 0.4, 2) * size
    boxes[bool(rng.random() < 0.5)].append(np.array([x1, y1, x1 + w, y1 + h]))
  out = []
  for is_part in (False, True):
    b = np.clip(np.array(boxes[is_part], np.float64).reshape(-1, 4), 0, size)
    b[:, 2:] = np.maximum(b[:, 2:], np.minimum(b[:, :2] + 1, size))  # at least a pixel wide
    out.append(np.round(b[rng.permutation(len(b))], 2).astype(np.float32))
  return out[0], out[1]


def _summary(splits: dict[str, list[common.Scene]]) -> str:
  lines = []
  for split, scenes in splits.items():
    counts = dict.fromkeys(schema.GRANULARITIES, 0)
    for scene in scenes:
      for ref in scene.refs:
        counts[ref_granularity(scene, ref)] += len(ref.sentences)
    total = sum(counts.values())
    shares = ", ".join(f"{g} {n / total:.0%}" for g, n in counts.items())
    lines.append(f"{split}: {len(scenes)} images, {sum(len(s.refs) for s in scenes)} references, "
                 f"{total} expressions ({shares})")
  return "\n".join(lines)


def main(argv):
  del argv
  start = time.perf_counter()
  try:
    splits = write(FLAGS.out, num_train=FLAGS.num_train, num_val=FLAGS.num_val, seed=FLAGS.seed,
                   image_size=FLAGS.image_size, layout=FLAGS.layout,
                   without=FLAGS.without or (), about_concept=FLAGS.about)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  print(_summary(splits))
  print(f"wrote {FLAGS.out} ({FLAGS.layout} layout) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  # Defined only when run as a program, so importing the module adds no global flags.
  flags.DEFINE_string("out", None, "Directory to write the raw files into.", required=True)
  flags.DEFINE_integer("num_train", 2000, "Training images.")
  flags.DEFINE_integer("num_val", 200, "Validation images.")
  flags.DEFINE_integer("seed", 0, "Random seed (the same seed writes the same files).")
  flags.DEFINE_integer("image_size", 128, "Side of the square images in pixels.")
  flags.DEFINE_enum("layout", "ref_coco_m", list(LAYOUTS), "The raw layout: RefCOCOm's "
                    "(tfds_builders/ref_coco_m) or your own data's (tfds_builders/ref_custom).")
  flags.DEFINE_list("without", None, f"Concepts left out: kinds ({', '.join(KINDS)}), never "
                    "drawn nor named, or parts (door, roof, ...), drawn but never named.")
  flags.DEFINE_string("about", None, "Keep only the sentences that name this concept (a kind "
                      "and its parts, or a part): a dataset of one concept, docs/finetune.md.")
  app.run(main)
