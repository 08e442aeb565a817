"""Data readers: both corpus formats, QA JSONL/parquet, question normalisation, and clear errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FIXTURES

from s3_jax.data import (
  DataFormatError,
  Doc,
  QAExample,
  normalize_question,
  read_corpus,
  read_qa,
  split_contents,
)
from s3_jax.reward import normalize_answer


def _write(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def test_both_corpus_formats_give_the_same_docs():
  expected = [
      Doc("0", "Carmen", "Carmen is an opera in four acts by the French composer Georges Bizet."),
      Doc("1", "Paris", "Paris is the capital and largest city of France.\nIt lies on the Seine."),
      Doc("2", 'The "Quoted" Title', "A title that itself holds quotes."),
      Doc("3", "No newline here", ""),
  ]
  assert read_corpus(FIXTURES / "corpus_contents.jsonl") == expected
  assert read_corpus(FIXTURES / "corpus_title_text.jsonl") == expected


def test_contents_round_trip_keeps_wiki18_form():
  line = (FIXTURES / "corpus_contents.jsonl").read_text().splitlines()[0]
  row = json.loads(line)
  (doc,) = read_corpus(FIXTURES / "corpus_contents.jsonl", limit=1)
  assert doc.to_row() == row
  # s3 keeps the quotes when it takes the title from the first line of `contents` (s3_protocol.md §5).
  assert doc.contents.split("\n", 1)[0] == '"Carmen"'


@pytest.mark.parametrize("contents, title, text", [
    ('"A"\nb\nc', "A", "b\nc"),
    ('"A "B" C"\ntext', 'A "B" C', "text"),
    ("no quotes\ntext", "no quotes", "text"),
    ('"', '"', ""),
    ("", "", ""),
])
def test_split_contents(contents, title, text):
  assert split_contents(contents) == (title, text)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
  path = _write(tmp_path / "corpus.jsonl", [
      '{"id": "0", "contents": "\\"A\\"\\ntext"}',
      "",
      '{"id": "1", "contents": "\\"B\\"\\ntext"',  # line 3: truncated JSON
  ])
  with pytest.raises(DataFormatError, match=rf"^{path}:3: invalid JSON") as info:
    read_corpus(path)
  assert (info.value.path, info.value.line) == (str(path), 3)


@pytest.mark.parametrize("bad_row, reason", [
    ('{"id": "1"}', "needs 'contents' or both 'title' and 'text'"),
    ('{"id": "1", "contents": 5}', "'contents' must be a string"),
    ('{"id": null, "contents": "x"}', "'id' must be a string or an integer"),
    ('["id", "contents"]', "expected a JSON object"),
])
def test_bad_corpus_row_is_reported_with_line(tmp_path, bad_row, reason):
  path = _write(tmp_path / "c.jsonl", ['{"id": "0", "contents": "\\"A\\"\\nt"}', bad_row])
  with pytest.raises(DataFormatError, match=rf"^{path}:2: .*{reason}"):
    read_corpus(path)


def test_duplicate_doc_ids_are_an_error(tmp_path):
  path = _write(tmp_path / "c.jsonl", ['{"id": "7", "contents": "a"}', "", '{"id": 7, "contents": "b"}'])
  with pytest.raises(DataFormatError, match=rf"^{path}:3: duplicate doc id '7' \(first at line 1\)"):
    read_corpus(path)


def test_invalid_utf8_is_reported_with_line(tmp_path):
  path = tmp_path / "c.jsonl"
  path.write_bytes(b'{"id": "0", "contents": "ok"}\n{"id": "1", "contents": "\xff"}\n')
  with pytest.raises(DataFormatError, match=rf"^{path}:2: not valid UTF-8"):
    read_corpus(path)


def test_missing_file_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
    read_corpus(tmp_path / "nope.jsonl")
  with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
    read_qa(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("raw, normalized", [
    ("who composed Carmen", "who composed Carmen?"),
    ("  who composed Carmen?  ", "who composed Carmen?"),
    ("\tcapital of France\n", "capital of France?"),
    ("Is it?  ", "Is it?"),
])
def test_normalize_question(raw, normalized):
  assert normalize_question(raw) == normalized


def test_empty_question_is_an_error():
  with pytest.raises(ValueError, match="question is empty"):
    normalize_question("   ")


def test_read_qa_jsonl():
  rows = read_qa(FIXTURES / "qa_small.jsonl")
  assert rows == [
      QAExample("q1", "who composed the opera Carmen?", ("Georges Bizet", "Bizet"), "fixture"),
      QAExample("q2", "What is the capital of France?", ("Paris",), "fixture"),
      QAExample("3", "How many acts does Carmen have?", ("4",), "fixture"),
  ]
  assert rows[1].metadata == {"note": "kept"}


def test_read_qa_parquet_matches_jsonl(tmp_path):
  raw = [json.loads(line) for line in (FIXTURES / "qa_small.jsonl").read_text().splitlines()]
  for row in raw:  # parquet needs one type per column
    row["id"] = str(row["id"])
    row["golden_answers"] = [str(a) for a in row["golden_answers"]]
    row["metadata"] = row.get("metadata", {"note": ""})
  path = tmp_path / "qa.parquet"
  pq.write_table(pa.Table.from_pylist(raw), path)
  from_parquet = read_qa(path)
  from_jsonl = read_qa(FIXTURES / "qa_small.jsonl")
  assert [(r.id, r.question, r.golden_answers, r.data_source) for r in from_parquet] == \
         [(r.id, r.question, r.golden_answers, r.data_source) for r in from_jsonl]


def test_read_qa_s3_verl_parquet(tmp_path):
  # s3's processed files (s3_protocol.md §7): answers under reward_model.ground_truth.target, no id column.
  rows = [{"question": "who wrote hamlet", "data_source": "nq",
           "reward_model": {"style": "rule", "ground_truth": {"question": "who wrote hamlet?",
                                                               "target": ["Shakespeare"]}},
           "extra_info": {"split": "train", "index": 12}}]
  path = tmp_path / "train_e5_s3.parquet"
  pq.write_table(pa.Table.from_pylist(rows), path)
  assert read_qa(path) == [QAExample("nq_12", "who wrote hamlet?", ("Shakespeare",), "nq")]


def test_bare_string_gold_answers_are_one_answer(tmp_path):
  """s3 wraps a bare string target in a list (`rag_2.output_sequence`): "Paris" is one answer, not five."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  jsonl = tmp_path / "qa.jsonl"
  jsonl.write_text('{"id": "1", "question": "capital of france", "golden_answers": "Paris", '
                   '"data_source": "d"}\n')
  assert read_qa(jsonl)[0].golden_answers == ("Paris",)
  rows = [{"question": "capital of france", "data_source": "nq", "extra_info": {"index": 1},
           "reward_model": {"ground_truth": {"target": "Paris"}}},
          {"question": "capital of italy", "data_source": "nq", "extra_info": {"index": 2},
           "reward_model": {"ground_truth": {"target": "Rome"}}}]
  path = tmp_path / "scalar.parquet"
  pq.write_table(pa.Table.from_pylist(rows), path)
  assert [ex.golden_answers for ex in read_qa(path)] == [("Paris",), ("Rome",)]


@pytest.mark.parametrize("bad_row, reason", [
    ('{"id": "x", "golden_answers": ["a"], "data_source": "d"}', "missing 'question'"),
    ('{"id": "x", "question": "q", "golden_answers": {"a": 1}, "data_source": "d"}',
     "'golden_answers' must be a string or a list of strings, got dict"),
    ('{"id": "x", "question": "q", "golden_answers": [], "data_source": "d"}', "is empty"),
    ('{"id": "x", "question": "q", "golden_answers": [["a"]], "data_source": "d"}',
     "a gold answer must be a string or a number"),
    ('{"id": "x", "question": "q", "golden_answers": ["a"], "data_source": ""}', "'data_source'"),
    ('{"id": "x", "question": " ", "golden_answers": ["a"], "data_source": "d"}', "question is empty"),
])
def test_bad_qa_row_is_reported_with_line(tmp_path, bad_row, reason):
  good = '{"id": "ok", "question": "q", "golden_answers": ["a"], "data_source": "d"}'
  path = _write(tmp_path / "qa.jsonl", [good, good, bad_row])
  with pytest.raises(DataFormatError, match=rf"^{path}:3: .*{reason}"):
    read_qa(path)


def test_rows_without_a_data_source_take_the_files_name(tmp_path):
  row = '{"id": "x", "question": "q", "golden_answers": ["a"]}'
  assert read_qa(_write(tmp_path / "my_questions.jsonl", [row]))[0].data_source == "my_questions"
  (tmp_path / "nq").mkdir()
  assert read_qa(_write(tmp_path / "nq" / "test.jsonl", [row]))[0].data_source == "nq"  # a split: the folder
  assert read_qa(_write(tmp_path / "given.jsonl", [row]), default_source="mine")[0].data_source == "mine"
  tagged = '{"id": "x", "question": "q", "golden_answers": ["a"], "data_source": "hotpotqa"}'
  assert read_qa(_write(tmp_path / "tagged.jsonl", [tagged]))[0].data_source == "hotpotqa"  # a row's own wins


def test_bad_parquet_row_is_reported_with_row_number(tmp_path):
  path = tmp_path / "qa.parquet"
  pq.write_table(pa.Table.from_pylist([
      {"id": "a", "question": "q", "golden_answers": ["x"], "data_source": "d"},
      {"id": "b", "question": "q", "golden_answers": None, "data_source": "d"}]), path)
  with pytest.raises(DataFormatError, match=rf"^{path}: row 2: missing 'golden_answers'"):
    read_qa(path)


def test_unsupported_qa_file_type(tmp_path):
  path = tmp_path / "qa.csv"
  path.write_text("question,answer\n")
  with pytest.raises(ValueError, match=r"qa\.csv: unsupported QA file type '\.csv'"):
    read_qa(path)


@pytest.mark.parametrize("text, normalized", [
    # s3_protocol.md §3.2 order: lowercase, drop string.punctuation, drop articles as words, collapse spaces.
    ("The  Barack Obama!", "barack obama"),
    ("An apple a day", "apple day"),
    ("Théâtre", "théâtre"),
    ("U.S.A.", "usa"),
    ("the-end", "theend"),  # punctuation goes first, so "the-end" is one word, not an article
    ("  anthem  ", "anthem"),
    ("", ""),
])
def test_normalize_answer_follows_spec_order(text, normalized):
  assert normalize_answer(text) == normalized
