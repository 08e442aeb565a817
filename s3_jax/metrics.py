"""Training metrics: one flat, namespaced dict per step (`reward/mean`, `actor/entropy`, `time/update`, ...)
written to `WORKDIR/metrics.jsonl` (one JSON object per line, with `step`), TensorBoard event files in
`WORKDIR/tensorboard`, a one-line summary on stdout, and optionally Weights & Biases; a non-finite guard; a
stopwatch for the time split; the PNG of training curves.

Only process 0 writes (multi-host runs compute the same metrics everywhere).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# The keys whose non-finite value stops a run (a NaN here means the parameters are already corrupt).
GUARDED = ("actor/pg_loss", "actor/grad_norm", "critic/vf_loss", "critic/grad_norm", "actor/entropy")
SUMMARY = ("reward/mean", "reward/genacc", "reward/kl", "actor/entropy", "critic/vf_loss", "rollout/turns",
           "time/step")


class NonFiniteError(FloatingPointError):
  pass


def check_finite(metrics: Mapping[str, float], step: int, last_checkpoint: int | None) -> None:
  """Raises `NonFiniteError` naming the keys and the steps to redo when a guarded metric is NaN or inf."""
  bad = [k for k in GUARDED if k in metrics and not math.isfinite(metrics[k])]
  if bad:
    since = "the start" if last_checkpoint is None else f"the checkpoint of step {last_checkpoint}"
    values = ", ".join(f"{k}={metrics[k]}" for k in bad)
    raise NonFiniteError(f"non-finite {values} at step {step}; the parameters after it are not saved. Steps "
                         f"{(last_checkpoint or 0) + 1}..{step} must be redone from {since} (lower the "
                         f"learning rate or check the rewards).")


class Stopwatch:
  """Accumulates wall time per named phase: `with watch("sample"): ...`; `take()` returns and resets."""

  def __init__(self):
    self.seconds: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self.add(name, time.perf_counter() - start)

  def add(self, name: str, seconds: float) -> None:
    self.seconds[name] = self.seconds.get(name, 0.0) + seconds

  def take(self) -> dict[str, float]:
    out, self.seconds = self.seconds, {}
    return out


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
  path = Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
  def __init__(self, workdir: str | Path, *, enabled: bool = True, wandb: Mapping[str, Any] | None = None,
               config: Mapping[str, Any] | None = None, print_fn=print):
    self.workdir = Path(workdir)
    self.enabled = enabled
    self.print_fn = print_fn
    self._tb = None
    self._wandb = None
    if not enabled:
      return
    from tensorboardX import SummaryWriter

    self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
    if wandb and wandb.get("project"):
      try:
        import wandb as wandb_lib
      except ImportError:
        raise ImportError("config.wandb.project is set but wandb is not installed: pip install wandb, or "
                          "set --config.wandb.project=''") from None
      self._wandb = wandb_lib.init(project=wandb["project"], entity=wandb.get("entity") or None,
                                   mode=wandb.get("mode", "online"), config=dict(config or {}),
                                   dir=str(self.workdir), resume="allow")

  def truncate_after(self, step: int) -> None:
    """Drops rows past `step` (written by a run killed after its last checkpoint), so a resumed run's
    `metrics.jsonl` has each step once."""
    if not self.enabled:
      return
    rows = [r for r in read_metrics(self.workdir) if r["step"] <= step]
    path = self.workdir / "metrics.jsonl"
    if path.is_file():
      tmp = path.with_suffix(".tmp")
      tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
      tmp.replace(path)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": step, **{k: float(v) for k, v in sorted(metrics.items())}}
    # Undefined values (NaN, e.g. explained variance of constant returns) are written as null: strict JSON.
    line = {k: v if math.isfinite(v) else None for k, v in row.items()}
    with open(self.workdir / "metrics.jsonl", "a", encoding="utf-8") as f:
      f.write(json.dumps(line, sort_keys=True) + "\n")
    for k, v in row.items():
      if k != "step" and math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(dict(row), step=step)

  def summary_line(self, step: int, total: int, metrics: Mapping[str, float]) -> str:
    parts = [f"{k.split('/')[-1] if k != 'time/step' else 's/step'}={metrics[k]:.4g}"
             for k in SUMMARY if k in metrics]
    return f"step {step}/{total}: " + " ".join(parts)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


PLOTS = (("reward", ("reward/mean", "reward/genacc", "reward/rag_genacc")),
         ("policy", ("actor/entropy", "actor/pg_clipfrac", "actor/approx_kl")),
         ("KL to the reference", ("reward/kl",)),
         ("critic", ("critic/vf_loss", "critic/explained_variance")),
         ("rollout", ("rollout/turns", "rollout/searches", "rollout/docs_selected",
                      "rollout/invalid_action_rate")),
         ("seconds per step", ("time/sample", "time/retrieve", "time/reward", "time/score", "time/update")))


def plot_curves(workdir: str | Path, out: str | Path | None = None) -> Path:
  """Writes the training curves of `WORKDIR/metrics.jsonl` to a PNG (default
  `WORKDIR/training_curves.png`)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_metrics(workdir)
  if not rows:
    raise FileNotFoundError(f"{workdir}: no metrics.jsonl rows to plot")
  out = Path(out) if out is not None else Path(workdir) / "training_curves.png"
  fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
  steps = [r["step"] for r in rows]
  for ax, (title, keys) in zip(axes.flat, PLOTS, strict=True):
    for key in keys:
      values = [math.nan if r.get(key) is None else r[key] for r in rows]
      if any(math.isfinite(v) for v in values):
        ax.plot(steps, values, marker="o", markersize=3, label=key.split("/", 1)[1])
    ax.set_title(title)
    ax.set_xlabel("PPO step")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  fig.suptitle(f"s3_jax training: {Path(workdir).name}")
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out
