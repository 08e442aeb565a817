"""Optional TFDS `array_record` staging for QA sets and corpora, without TensorFlow.

Cloud users stage data the TFDS way (a versioned folder with `dataset_info.json` and sharded
`array_record` files on local disk or GCS) and read it back with random access:

    build_array_record("nq_s3", {"train": "train.jsonl", "test": "test.jsonl"}, "gs://b/tfds", kind="qa")
    source = load_data_source("gs://b/tfds/nq_s3/1.0.0", "train")   # len(), source[i] -> dict

Rows go through the same readers as everywhere else (`read_qa` / `iter_corpus`), so a malformed row
fails at staging time with its file and line. `as_dataset` (tf.data) needs TensorFlow and is not used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from s3_jax.data.corpus import iter_corpus
from s3_jax.data.qa import iter_qa

VERSION = "1.0.0"


def _features(kind: str):
  import tensorflow_datasets as tfds

  text = tfds.features.Text()
  if kind == "qa":
    return tfds.features.FeaturesDict({
        "id": text, "question": text, "golden_answers": tfds.features.Sequence(text),
        "data_source": text, "metadata_json": text})
  if kind == "corpus":
    return tfds.features.FeaturesDict({"id": text, "title": text, "text": text})
  raise ValueError(f"kind must be 'qa' or 'corpus', got {kind!r}")


def _examples(kind: str, path: str):
  if kind == "qa":
    for ex in iter_qa(path):
      yield ex.id, {"id": ex.id, "question": ex.question, "golden_answers": list(ex.golden_answers),
                    "data_source": ex.data_source, "metadata_json": json.dumps(ex.metadata)}
  else:
    for doc in iter_corpus(path):
      yield doc.id, {"id": doc.id, "title": doc.title, "text": doc.text}


def build_array_record(name: str, files: Mapping[str, str | os.PathLike], data_dir: str | os.PathLike,
                       kind: str = "qa") -> Path:
  """Writes `data_dir/name/1.0.0/` with one split per entry of `files` (split -> JSONL/parquet path).

  Returns the version folder, which `load_data_source` reads.
  """
  import tensorflow_datasets as tfds

  features = _features(kind)
  for split, file in files.items():
    if not Path(file).is_file():
      raise FileNotFoundError(f"split {split!r}: data file not found: {file}")

  class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(VERSION)

    def _info(self) -> tfds.core.DatasetInfo:
      # DatasetInfo directly: dataset_info_from_configs needs a package directory (environment.md §1).
      # Unshuffled, so row i of a staged corpus is row i of its JSONL (FAISS ids are row indices).
      return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True,
                                   description=f"s3_jax {kind} data staged from JSONL/parquet")

    def _split_generators(self, dl_manager: Any):
      del dl_manager
      return {split: self._generate_examples(str(file)) for split, file in files.items()}

    def _generate_examples(self, path: str):
      return _examples(kind, path)

  _Builder.name = name
  builder = _Builder(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return Path(builder.data_dir)


def load_data_source(version_dir: str | os.PathLike, split: str):
  """Random-access source over a staged split: `len(source)`, `source[i]` -> dict of numpy/bytes."""
  import tensorflow_datasets as tfds

  builder = tfds.builder_from_directory(str(version_dir))
  if split not in builder.info.splits:
    raise KeyError(f"{version_dir}: no split {split!r}; splits: {sorted(builder.info.splits)}")
  return builder.as_data_source(split=split)
