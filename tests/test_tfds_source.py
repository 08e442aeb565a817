"""TFDS array_record staging without TensorFlow: rows read back equal the JSONL readers' rows."""

import json

import pytest
from conftest import FIXTURES

from s3_jax.data import DataFormatError, read_corpus, read_qa

tfds_source = pytest.importorskip("s3_jax.data.tfds_source")


def test_qa_splits_round_trip(tmp_path):
  qa = FIXTURES / "qa_small.jsonl"
  version_dir = tfds_source.build_array_record("qa_small", {"train": qa, "test": qa}, tmp_path, kind="qa")
  assert (version_dir / "dataset_info.json").is_file()
  source = tfds_source.load_data_source(version_dir, "test")
  expected = read_qa(qa)
  assert len(source) == len(expected)
  for i, ex in enumerate(expected):  # unshuffled: row i is line i
    row = source[i]
    assert row["id"].decode() == ex.id
    assert row["question"].decode() == ex.question
    assert [a.decode() for a in row["golden_answers"]] == list(ex.golden_answers)
    assert row["data_source"].decode() == ex.data_source
    assert json.loads(row["metadata_json"].decode()) == ex.metadata
  with pytest.raises(KeyError, match=r"no split 'dev'; splits: \['test', 'train'\]"):
    tfds_source.load_data_source(version_dir, "dev")


def test_corpus_round_trip_keeps_row_order(tmp_path):
  corpus = FIXTURES / "corpus_title_text.jsonl"
  version_dir = tfds_source.build_array_record("corpus_small", {"corpus": corpus}, tmp_path,
                                               kind="corpus")
  source = tfds_source.load_data_source(version_dir, "corpus")
  docs = read_corpus(corpus)
  assert [(r["id"].decode(), r["title"].decode(), r["text"].decode()) for r in
          (source[i] for i in range(len(source)))] == [(d.id, d.title, d.text) for d in docs]


def test_staging_rejects_a_malformed_row_with_its_line(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": "1", "question": "q", "golden_answers": ["a"], "data_source": "d"}\n'
                 '{"id": "2", "question": "q", "data_source": "d"}\n')
  with pytest.raises(DataFormatError, match=rf"{bad}:2: .*golden_answers"):
    tfds_source.build_array_record("bad", {"train": bad}, tmp_path / "out", kind="qa")
