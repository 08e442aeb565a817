"""Checkpoint integrity with real orbax files: a flipped byte, a cut-short data file, a cut-short JSON record
or a missing manifest in the newest step is reported by path and the previous intact step restored; with none
intact, one clear error; an unwritable folder fails at once with its path; pre-manifest checkpoints still
restore."""

import json
import time

import numpy as np
import pytest

from s3_jax.checkpoint import MANIFEST, Checkpointer, CheckpointError, CheckpointMismatchError, check_manifest

pytestmark = pytest.mark.faults


def _state(step):
  rng = np.random.default_rng(step)
  return {"w": rng.normal(size=(64, 32)).astype(np.float32), "b": np.full((32,), float(step), np.float32)}


def _saved(tmp_path, steps=(1, 2)):
  logs = []
  ckpt = Checkpointer(tmp_path / "checkpoints", keep=5, log=logs.append)
  for s in steps:
    ckpt.save(s, _state(s), {"step": s})
  return ckpt, logs


def _largest_file(folder):
  files = [p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST]
  return max(files, key=lambda p: p.stat().st_size)


def _assert_restored(ckpt, step):
  state, meta, got = ckpt.restore(_state(0))
  assert got == step and meta == {"step": step}
  for k, v in _state(step).items():
    np.testing.assert_array_equal(np.asarray(state[k]), v, err_msg=k)


def _overwrite(path):
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes((b + 1) % 256 for b in data[middle:middle + 64])
  path.write_bytes(bytes(data))


def _truncate(path):
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _meta_record(folder):
  return next(p for p in (folder / "meta").rglob("*") if p.is_file())


@pytest.mark.parametrize("damage", ["overwrite", "truncate", "meta", "manifest", "delete"])
def test_a_damaged_newest_step_is_reported_and_the_previous_restored(tmp_path, damage):
  ckpt, logs = _saved(tmp_path)
  step2 = tmp_path / "checkpoints" / "2"
  assert check_manifest(step2) is None and check_manifest(tmp_path / "checkpoints" / "1") is None
  target = _meta_record(step2) if damage == "meta" else _largest_file(step2)
  if damage == "overwrite":  # 64 bytes changed in the largest data file
    _overwrite(target)
  elif damage in ("truncate", "meta"):  # the largest data file, or the JSON record, cut short
    _truncate(target)
  elif damage == "manifest":
    (step2 / MANIFEST).unlink()
  else:
    target.unlink()
  if damage == "overwrite":  # the negative control: orbax alone restores the damaged step without a word
    import jax
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state(0))
    silent = ckpt.manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    assert any(not np.array_equal(np.asarray(silent["state"][k]), v) for k, v in _state(2).items())
  problem = check_manifest(step2)
  assert problem is not None
  expected = {"overwrite": "differs from what was written", "truncate": "bytes,", "meta": "bytes,",
              "manifest": "is missing (the save did not finish)", "delete": "is missing"}[damage]
  assert expected in problem
  if damage != "manifest":
    assert str(target) in problem  # the file, by path
  _assert_restored(ckpt, 1)
  said = "\n".join(logs)
  assert "checkpoint of step 2 is corrupt or incomplete" in said
  assert "restored the checkpoint of step 1" in said
  # the bad step was moved aside, so the run can save step 2 again, and a later restore takes it
  assert not step2.exists() and len(list((tmp_path / "checkpoints_corrupt").iterdir())) == 1
  ckpt.save(2, _state(2), {"step": 2})
  _assert_restored(ckpt, 2)
  ckpt.close()


def test_no_intact_step_is_one_clear_error(tmp_path):
  ckpt, _ = _saved(tmp_path)
  for s in (1, 2):
    _overwrite(_largest_file(tmp_path / "checkpoints" / str(s)))
  with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*checkpoints \(steps 2, 1 are"):
    ckpt.restore(_state(0))
  ckpt.close()


def test_an_intact_run_restores_its_newest_step_without_a_word(tmp_path):
  ckpt, logs = _saved(tmp_path, steps=(1, 2, 3))
  _assert_restored(ckpt, 3)
  assert logs == []
  manifest = json.loads((tmp_path / "checkpoints" / "3" / MANIFEST).read_text())["files"]
  assert any(name.startswith("state/") for name in manifest) and any(name.startswith("meta/")
                                                                      for name in manifest)
  ckpt.close()


def test_checkpoints_without_manifests_restore_unchecked_and_say_so(tmp_path):
  ckpt, logs = _saved(tmp_path)
  for s in (1, 2):
    (tmp_path / "checkpoints" / str(s) / MANIFEST).unlink()
  _assert_restored(ckpt, 2)
  assert "checkpoint of step 2" in logs[0] and "has no manifest (written before s3_jax checked" in logs[0]
  ckpt.close()


def test_steps_older_than_the_first_manifest_are_kept_as_unchecked(tmp_path):
  """A run resumed across the version that added manifests: 1 and 2 have none, 3 has one and is damaged:
  step 2 is restored (unchecked, said so), not moved aside as an unfinished save."""
  ckpt, logs = _saved(tmp_path, steps=(1, 2, 3))
  for s in (1, 2):
    (tmp_path / "checkpoints" / str(s) / MANIFEST).unlink()
  _overwrite(_largest_file(tmp_path / "checkpoints" / "3"))
  _assert_restored(ckpt, 2)
  said = "\n".join(logs)
  assert "checkpoint of step 3 is corrupt" in said
  assert "step 2 in" in said and "restoring it unchecked" in said
  assert (tmp_path / "checkpoints" / "2").is_dir()
  ckpt.close()


def test_an_orbax_error_on_an_intact_step_is_raised_and_the_step_kept(tmp_path):
  """A template that no longer matches the saved state (the config changed) is the caller's problem, not the
  checkpoint's: one error names the step and the paths that differ (orbax's error chained) and nothing is
  moved aside."""
  ckpt, logs = _saved(tmp_path)
  assert logs == []
  with pytest.raises(CheckpointMismatchError, match=r"step 2 in .*checkpoints does not fit this run's state "
                     r"\(only in the checkpoint: b; only in this run: extra\)") as raised:
    ckpt.restore({"w": np.zeros((64, 32), np.float32), "extra": np.zeros((3,), np.float32)})
  assert not isinstance(raised.value, CheckpointError)
  assert raised.value.__cause__ is not None  # orbax's own report
  # the same tree with another shape: orbax would hand back the saved (64, 32) array
  with pytest.raises(CheckpointMismatchError, match=r"shapes differ: w \(64, 32\) saved, \(64, 16\) here"):
    ckpt.restore({"w": np.zeros((64, 16), np.float32), "b": np.zeros((32,), np.float32)})
  assert (tmp_path / "checkpoints" / "2").is_dir() and not (tmp_path / "checkpoints_corrupt").exists()
  ckpt.close()


def test_an_unwritable_folder_fails_at_once_with_its_path(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")  # works as root too, where a read-only mode would not stop writes
  start = time.perf_counter()
  with pytest.raises(CheckpointError, match=f"cannot write checkpoints to {blocker / 'checkpoints'}"):
    Checkpointer(blocker / "checkpoints")
  assert time.perf_counter() - start < 5  # orbax alone waited out a 300 s directory timeout


def test_a_save_that_cannot_write_stops_with_the_path(tmp_path):
  ckpt, _ = _saved(tmp_path, steps=(1,))
  folder = tmp_path / "checkpoints"
  blocked = tmp_path / "moved"
  folder.rename(blocked)
  folder.write_text("now a file")  # the folder is gone and a file stands in its place
  with pytest.raises(CheckpointError, match=f"cannot write checkpoints to {folder}"):
    ckpt.save(2, _state(2), {"step": 2})
