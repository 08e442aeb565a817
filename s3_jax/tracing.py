"""What a jitted function was traced for, so a test can tell a compile for a new shape from a recompile.

`jax.jit` traces (and compiles) once per distinct argument signature — tree structure, shapes, dtypes, weak
types, static arguments. A second trace with the same shapes and dtypes means something else changed (a new
`jit` wrapper, a weak type, a static value, a new object), and that costs a compile on every step.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def signature(*args: Any, **static: Any) -> str:
  """The tree structure, shapes and dtypes of `args` (arrays or tracers) and the `static` values, as text."""
  leaves, tree = jax.tree.flatten(args)
  shapes = [(tuple(np.shape(x)), str(getattr(x, "dtype", type(x).__name__))) for x in leaves]
  return f"{tree} {shapes} {sorted(static.items())}"
