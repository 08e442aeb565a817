"""Imported first by the benchmark scripts: puts the checkout they live in first on `sys.path`, so
`python benchmarks/X.py` run in a worktree of another commit measures that commit's `s3_jax`. Without it a
script (whose own folder, not the working directory, heads `sys.path`) imports the venv's editable install,
which points at whichever checkout ran `pip install -e .`: a "before" run in another worktree would silently
measure today's code."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path[:1] != [str(ROOT)]:
  sys.path.insert(0, str(ROOT))
if "s3_jax" in sys.modules and not sys.modules["s3_jax"].__file__.startswith(str(ROOT)):
  raise ImportError(f"s3_jax was imported from {sys.modules['s3_jax'].__file__} before benchmarks/here.py "
                    f"put {ROOT} first on sys.path: import here first")
