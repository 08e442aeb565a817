"""What a jitted function was traced for, so a test can tell a compile for a new shape from a recompile.

`jax.jit` traces (and compiles) once per distinct argument signature — tree structure, shapes, dtypes, weak
types, static arguments. A second trace with the same shapes and dtypes means something else changed (a new
`jit` wrapper, a weak type, a static value, a new object), and that costs a compile on every step.

The bucketing functions choose the padded shapes, so a run compiles a handful of programs: `bucket_length`
for sequence lengths, `bucket_pow2` for batch sizes and decode lengths.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def bucket_pow2(n: int, minimum: int) -> int:
  """`n` rounded up to a power of two, at least `minimum`."""
  return max(minimum, 1 << max(0, n - 1).bit_length())


def bucket_length(n: int, minimum: int, *, min_step: int = 16) -> int:
  """`n` rounded up to one of four steps per power of two (at most 25% padding, where powers of two pad up
  to 100%: a 700-token prompt runs at 768, not 1024), steps of at least `min_step`, at least `minimum`."""
  if n <= minimum:
    return minimum
  step = max(min_step, 1 << max(0, (n - 1).bit_length() - 3))
  return -(-n // step) * step


def signature(*args: Any, **static: Any) -> str:
  """The tree structure, shapes and dtypes of `args` (arrays or tracers) and the `static` values, as text."""
  leaves, tree = jax.tree.flatten(args)
  shapes = [(tuple(np.shape(x)), str(getattr(x, "dtype", type(x).__name__))) for x in leaves]
  return f"{tree} {shapes} {sorted(static.items())}"
