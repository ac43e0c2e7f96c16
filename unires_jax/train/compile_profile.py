"""Where a compile spends its time, and its program its peak memory, by the model's named scopes.

`aot.compile_train_step(..., profile_dir=DIR)` compiles under `jax.profiler`; XLA:TPU's backend
records one event per HLO instruction it emits ("XLA::TPU emitting for fusion.123") with its
code-generation passes (LLO scheduling, register allocation, ...) nested inside. `by_scope`
adds up those nested passes per instruction and groups the instructions by the named scope
their `op_name` carries (`jax.named_scope` in `models/unires.py` and `train/step.py`:
"jit(step)/transpose(jvp(mask_decoder))/..." -> "mask_decoder").

Only the nested passes count: an emission event also spans time its thread waits for others
(seen: a 435 s event over a 2 x 16 integer fusion with no work inside), so its own duration
says little.

`peak_memory_by_scope` reads the buffers live at the compiled program's peak from XLA's dump
(`XLA_FLAGS=--xla_dump_to=DIR`: the "Stack trace breakdown for peak usage" of
`*after_optimizations-live-range.txt`) and groups them the same way.
"""

import collections
import dataclasses
import glob
import os
import re

import jax

EMITTING = "XLA::TPU emitting for "
INPUTS = "(inputs: parameters, batch)"
NO_SCOPE = "(outside the named scopes)"
NO_METADATA = "(no op_name: collectives, copies, layout changes)"

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"")


@dataclasses.dataclass(frozen=True)
class ScopeTime:
  """The backend's code-generation work for one scope's instructions."""

  scope: str
  seconds: float
  instructions: int


def scope_of(op_name: str) -> str:
  """The named scope of an op: "jit(step)/transpose(jvp(mask_decoder))/while/body/dot_general"
  -> "mask_decoder", "jit(step)/optimizer/add" -> "optimizer"; "jit(step)/jvp()/select_n" ->
  NO_SCOPE; a parameter's or input's name ("batch['image_high']") -> INPUTS; "" -> NO_METADATA."""
  if not op_name or re.fullmatch(r"[\w\-]+\.\d+(\{[\d,]*\})?", op_name):
    return NO_METADATA  # none, or an instruction's own name ("copy-start.132{0}")
  parts = op_name.split("/")
  if len(parts) < 2 or not parts[0].startswith("jit("):
    return INPUTS
  if len(parts) == 2:  # the op itself, under no scope
    return NO_SCOPE
  wrappers = re.match(r"^((?:\w+\()*)(.*?)\)*$", parts[1])  # "jvp(vmap(" and the name inside
  if wrappers.group(1).endswith("jit("):  # a jitted function's name ("jvp(jit(cumsum))")
    return NO_SCOPE
  return wrappers.group(2) or NO_SCOPE


def op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> op_name, from a compiled program's text (`Compiled.as_text()`)."""
  names = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      names.setdefault(match.group(1), match.group(2))
  return names


def _trace_file(profile_dir: str) -> str:
  files = glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no profile (*.xplane.pb) under {profile_dir}")
  return max(files, key=os.path.getmtime)


def _nested_seconds(events: list[tuple[int, int, str]]) -> dict[str, float]:
  """For each emission event of one thread: the seconds of the events directly inside it."""
  events = sorted(events, key=lambda e: (e[0], -e[1]))
  out: dict[str, float] = collections.defaultdict(float)
  stack: list[tuple[int, int, str]] = []  # open events, outermost first
  for start, end, name in events:
    while stack and stack[-1][1] <= start:
      stack.pop()
    if stack and stack[-1][2].startswith(EMITTING) and end <= stack[-1][1]:
      out[stack[-1][2][len(EMITTING):]] += (end - start) / 1e9
    stack.append((start, end, name))
  return out


def by_scope(profile_dir: str, hlo_text: str) -> list[ScopeTime]:
  """The backend's per-instruction code-generation seconds of the compile profiled into
  `profile_dir`, summed by named scope (`scope_of`), largest first. Raises ValueError when the
  profile has no per-instruction events (another backend, or a libtpu that does not record
  them)."""
  data = jax.profiler.ProfileData.from_file(_trace_file(profile_dir))
  work: dict[str, float] = collections.defaultdict(float)
  for plane in data.planes:
    for line in plane.lines:
      events = [(e.start_ns, e.end_ns, e.name) for e in line.events]
      if any(name.startswith(EMITTING) for _, _, name in events):
        for instruction, seconds in _nested_seconds(events).items():
          work[instruction] += seconds
  if not work:
    raise ValueError(f"the profile in {profile_dir} has no '{EMITTING}<instruction>' events "
                     "with work inside: per-instruction times need XLA:TPU (libtpu)")
  names = op_names(hlo_text)
  seconds: dict[str, float] = collections.defaultdict(float)
  counts: collections.Counter = collections.Counter()
  for instruction, s in work.items():
    scope = scope_of(names.get(instruction, ""))
    seconds[scope] += s
    counts[scope] += 1
  return sorted((ScopeTime(k, v, counts[k]) for k, v in seconds.items()),
                key=lambda t: -t.seconds)


_PEAK = "Stack trace breakdown for peak usage:"
_PEAK_ENTRY = re.compile(r"^ {6}[├└]── (.*) \([\d.]+%, total: ([\d ]+) bytes")


def peak_memory_by_scope(dump_dir: str) -> list[tuple[str, int]]:
  """(scope, bytes) of the buffers live at the peak of the newest train step (`jit_step`)
  program XLA dumped into `dump_dir`, largest first; their sum is the program's peak (the
  arguments it holds there included, as INPUTS)."""
  files = glob.glob(os.path.join(dump_dir, "*jit_step*after_optimizations-live-range.txt"))
  if not files:
    raise FileNotFoundError(f"no *jit_step*after_optimizations-live-range.txt in {dump_dir}: "
                            "compile with XLA_FLAGS=--xla_dump_to={dump_dir}")
  path = max(files, key=os.path.getmtime)
  totals: dict[str, int] = collections.defaultdict(int)
  with open(path, encoding="utf-8") as f:
    lines = iter(f)
    for line in lines:
      if line.strip().startswith(_PEAK):
        break
    else:
      raise ValueError(f"{path} has no '{_PEAK}' section")
    next(lines)  # the program's own line, 100%
    for line in lines:
      if not line.startswith(" " * 6):
        break
      entry = _PEAK_ENTRY.match(line)
      if entry:
        totals[scope_of(entry.group(1))] += int(entry.group(2).replace(" ", ""))
  return sorted(totals.items(), key=lambda kv: -kv[1])
