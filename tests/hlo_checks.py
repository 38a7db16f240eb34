"""Checks on a lowered program's HLO text (what XLA is given, before its own passes)."""

from __future__ import annotations

import collections
import math
import re


def zero_filled_loop_buffers(hlo_text: str, min_elements: int) -> list[str]:
  """Shapes of the while loops' initial buffers that are a broadcast constant (a zero fill) of >= min_elements.

  XLA's GPU compiler fuses operand-free fills of every layer into one kernel at the program's start, so each such
  buffer is held from the start of the program to its loop: one per layer (found on the H200 at 128K tokens)."""
  lines = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?([\w.\-]+) = (.*)$", line)
    if m:
      lines[m.group(1)] = m.group(2)
  found = []
  for rhs in lines.values():
    loop = re.search(r" while\(([\w.\-]+)\)", rhs)
    init = re.search(r" tuple\(([^)]*)\)", lines.get(loop.group(1), "")) if loop else None
    for operand in init.group(1).split(",") if init else ():
      fill = re.match(r"(\w+)\[([\d,]*)\]\S* broadcast\(([\w.\-]+)\)", lines.get(operand.strip(), ""))
      if fill and " constant(" in lines.get(fill.group(3), ""):
        if math.prod(int(d) for d in fill.group(2).split(",") if d) >= min_elements:
          found.append(f"{fill.group(1)}[{fill.group(2)}]")
  return found


def large_ops(stablehlo_text: str, min_elements: int) -> collections.Counter:
  """How many StableHLO ops of each kind produce a tensor of >= min_elements (their last result type; functions
  outlined by the lowering counted once). Two programs' counters differ by the big copies one of them makes."""
  found = collections.Counter()
  for line in stablehlo_text.splitlines():
    op = re.search(r"= stablehlo\.(\w+)", line)
    types = re.findall(r"tensor<([^>]*)>", line)
    if op and types:
      dims = types[-1].split("x")[:-1]  # "1x384x8xbf16" -> ["1", "384", "8"]; a scalar has none
      if all(d.isdigit() for d in dims) and math.prod(int(d) for d in dims) >= min_elements:
        found[op.group(1)] += 1
  return found
