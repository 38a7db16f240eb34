"""The double-buffered DMA pipeline the Mosaic TPU block-sparse kernels share (forward, dQ and dK/dV).

Each program walks `n_rows` items (a query-block row, or a key block for dK/dV). Per item it needs, in SMEM, one
index row (which inner blocks it visits) and, in VMEM, the item's own operands (q; q, dO and stats; K and V), and
then streams its visits through two VMEM slots. The schedule, identical in the three kernels:

    prologue:   index row 0 and item 0's operands start; index row 0 lands; visit 0 of item 0 starts
    item i:     item i's operands land; index row i + 1 and item i + 1's operands start (overlapping item i)
    last visit: index row i + 1 lands and visit 0 of item i + 1 starts into the free slot (`prefetch_next`)

so an item's first inner DMA is in flight before its body runs (`RowPipeline`; `visit_loop` runs an item's visits,
`when_masked` traces a visit with and without its token mask, `program_items` reads the shared grid). VMEM: two
slots of each operand, as the kernels' budgets count; SMEM: two index rows.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def program_items(*, rows: int, num_items: int):
  """(batch element, head, first item, items of this program) of the grid (B, heads, item groups of `rows`) the
  three kernels share; the last group of a head may be short."""
  b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  first = c * rows
  return b, h, first, jnp.minimum(rows, num_items - first)


def load_counts(src, dst, sem) -> None:
  """Blocking copy of this program's visit counts (HBM -> SMEM) before the pipeline starts."""
  copy = pltpu.make_async_copy(src, dst, sem)
  copy.start()
  copy.wait()


@dataclasses.dataclass(frozen=True)
class RowPipeline:
  n_rows: object  # traced int: the items of this program
  index_copy: Callable[[object], object]  # i -> the DMA of item i's index row into SMEM slot i % 2
  item_copies: Callable[[object], Sequence]  # i -> the DMAs of item i's own operands into slot i % 2
  num_visits: Callable[[object], object]  # i -> visits of item i (its index row must be in SMEM)
  first_visit_copies: Callable[[object, object], Sequence]  # (i, slot) -> the DMAs of item i's first visit

  def start_first_visit(self, i, slot) -> None:
    @pl.when(self.num_visits(i) > 0)
    def _():
      for cp in self.first_visit_copies(i, slot):
        cp.start()

  def prologue(self) -> None:
    self.index_copy(0).start()
    for cp in self.item_copies(0):
      cp.start()
    self.index_copy(0).wait()
    self.start_first_visit(0, 0)

  def advance(self, i) -> None:
    """At the top of item i's body: wait for its operands, start item i + 1's index row and operands."""
    for cp in self.item_copies(i):
      cp.wait()

    @pl.when(i + 1 < self.n_rows)
    def _():
      self.index_copy(i + 1).start()
      for cp in self.item_copies(i + 1):
        cp.start()

  def prefetch_next(self, i, slot) -> None:
    """During item i's last visit: item i + 1's first visit into `slot` (the one that visit does not use)."""

    @pl.when(i + 1 < self.n_rows)
    def _():
      self.index_copy(i + 1).wait()
      self.start_first_visit(i + 1, slot)

  def visit_loop(self, i, slot0, steps, visit_copies, body, init):
    """Item i's `steps` visits through the two VMEM slots, visit j in slot (slot0 + j) % 2: wait for its DMAs,
    start visit j + 1's, during the last visit prefetch item i + 1's first one (`prefetch_next`; with no visit at
    all, right away), then carry = body(j, slot, carry). `visit_copies(slot, j)` are visit j's DMAs into `slot`
    (j None: any visit's, to wait on). Returns the last carry."""

    def step(j, carry):
      slot = (slot0 + j) % 2
      for cp in visit_copies(slot, None):
        cp.wait()

      @pl.when(j + 1 < steps)
      def _():
        for cp in visit_copies((slot0 + j + 1) % 2, j + 1):
          cp.start()

      @pl.when(j + 1 == steps)
      def _():
        self.prefetch_next(i, (slot0 + steps) % 2)

      return body(j, slot, carry)

    carry = lax.fori_loop(0, steps, step, init)

    @pl.when(steps == 0)
    def _():
      self.prefetch_next(i, slot0 % 2)

    return carry


def when_masked(needs_mask, update) -> None:
  """update(masked=True) where `needs_mask` holds, else update(masked=False): two traced variants, so the common
  unmasked visit builds no iota mask."""
  pl.when(needs_mask)(functools.partial(update, masked=True))
  pl.when(jnp.logical_not(needs_mask))(functools.partial(update, masked=False))
