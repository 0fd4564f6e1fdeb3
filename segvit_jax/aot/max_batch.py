"""The search for the largest train batch that fits, given a way to measure one batch.

Memory is close to affine in the batch: the totals measured so far predict where the limit
lies, and every guess is compiled (by the caller's `measure`) inside a shrinking bracket.
"""

from typing import Callable, Optional


def search_max_batch(measure: Callable[[int], tuple], start: int, first: tuple,
                     usable_gib: float, unit: int = 1, limit: int = 1 << 16) -> tuple:
  """The largest per-shard train batch (a multiple of `unit`) that fits, and the compiles.

  measure(b) compiles at per-shard batch b and returns (total GiB per chip or None, fits);
  `first` is measure(start), already known. Memory is close to affine in the batch, so the
  measured totals (the compiler reports one for programs that do not fit too) predict the
  limit; every guess is compiled, within the bracket of the largest batch that fits and the
  smallest that does not, which shrinks by a quarter at least each time. Usually 3-4 compiles.
  Returns (0, log) when even `unit` does not fit; log: {b: (total, fits)}.
  """
  log = {start: first}
  for _ in range(24):
    lo = max((b for b, (_, ok) in log.items() if ok), default=None)
    hi = min((b for b, (_, ok) in log.items() if not ok), default=None)
    if lo is None:
      if hi <= unit:
        return 0, log
      guess = max(unit, hi // 2 // unit * unit)
    elif (hi is not None and hi - lo <= unit) or lo >= limit:
      return lo, log
    else:
      guess = _predict_max_batch(log, lo, hi, usable_gib)
      guess = guess // unit * unit
      if hi is None:
        guess = min(max(guess, lo + unit), limit)
      else:
        quarter = max(unit, (hi - lo) // 4 // unit * unit)
        guess = min(max(guess, lo + quarter), hi - quarter)
    log[guess] = measure(guess)
  raise RuntimeError(f'search_max_batch did not converge: {log}')


def _predict_max_batch(log: dict, lo: int, hi: Optional[int], usable_gib: float) -> int:
  """Where the affine fit through the two measured totals nearest the limit crosses it."""
  measured = {b: total for b, (total, _) in log.items() if total is not None}
  near = [b for b in (lo, hi) if b in measured]
  if len(near) < 2:
    near = sorted(measured)[-2:]
  if len(near) < 2:
    return 2 * lo
  (b0, t0), (b1, t1) = sorted((b, measured[b]) for b in near)
  slope = (t1 - t0) / (b1 - b0)
  if slope <= 0:
    return 2 * lo
  return int(b0 + (usable_gib - t0) / slope)
