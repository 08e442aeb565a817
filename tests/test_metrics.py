"""Metric writing, the non-finite guard and the training-curve plot."""

import json
import math

import pytest

from s3_jax import metrics as metrics_lib


def test_non_finite_loss_stops_naming_keys_and_steps():
  with pytest.raises(metrics_lib.NonFiniteError, match=r"actor/pg_loss=nan at step 7.*Steps 5\.\.7.*step 4"):
    metrics_lib.check_finite({"actor/pg_loss": math.nan, "reward/mean": 0.5}, 7, 4)
  with pytest.raises(metrics_lib.NonFiniteError, match=r"critic/grad_norm=inf.*Steps 1\.\.2.*the start"):
    metrics_lib.check_finite({"critic/grad_norm": math.inf}, 2, None)
  # Undefined diagnostics (explained variance of constant returns) are not losses: no stop.
  metrics_lib.check_finite({"actor/pg_loss": 0.1, "critic/explained_variance": math.nan}, 3, None)


def test_writer_rows_truncation_and_plot(tmp_path):
  writer = metrics_lib.MetricWriter(tmp_path, print_fn=lambda *_: None)
  for step in (1, 2, 3):
    writer.write(step, {"reward/mean": 0.1 * step, "critic/explained_variance": math.nan, "time/update": 1.0})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[0]) == {"step": 1, "reward/mean": 0.1, "critic/explained_variance": None,
                                  "time/update": 1.0}
  writer.truncate_after(2)  # a resumed run drops rows written after its checkpoint
  assert [r["step"] for r in metrics_lib.read_metrics(tmp_path)] == [1, 2]
  writer.close()
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  png = metrics_lib.plot_curves(tmp_path)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
  assert "mean=0.2" in writer.summary_line(2, 3, {"reward/mean": 0.2})


def test_plot_without_rows_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no metrics\.jsonl rows"):
    metrics_lib.plot_curves(tmp_path)
