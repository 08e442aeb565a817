"""A user's corpus with bad rows: errors name the user's file and its own line (blank lines
counted, not the cache copy's), invalid UTF-8 says so with the byte, and a failed build leaves nothing in the
index cache that looks like an index; a good subset builds, moves into place and serves."""

import json

import pytest

from s3_jax.data.jsonl import DataFormatError
from s3_jax.retrieval.index_dir import MANIFEST, ensure_index, load_retriever

pytestmark = pytest.mark.faults

ROWS = [{"id": str(i), "contents": f'"Title {i}"\nText about topic {i} and opera {i % 3}.'} for i in range(6)]


def _corpus(path, lines):
  path.write_bytes(b"".join(line if isinstance(line, bytes) else (line + "\n").encode() for line in lines))
  return path


def _cache_entries(root):
  return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) if root.exists() else []


@pytest.mark.parametrize("bad, reason", [
    ('{"id": "9", "title": "T"}', "a corpus row needs 'contents' or both 'title' and 'text'"),
    ('{"id": "9", "contents": ', "Expecting value"),
    (b'{"id": "9", "contents": "caf\xe9"}\n',
     r"not valid UTF-8 \(invalid continuation byte at byte 28 of the line\)"),
    ('{"id": "1", "contents": "\\"Again\\"\\nduplicate"}', "duplicate doc id '1'")])
def test_a_bad_row_names_the_users_file_and_line_and_leaves_no_index(tmp_path, bad, reason):
  lines = [json.dumps(ROWS[0]), "", json.dumps(ROWS[1]), "   ", bad, json.dumps(ROWS[2])]
  corpus = _corpus(tmp_path / "my_corpus.jsonl", lines)
  root = tmp_path / "cache"
  with pytest.raises(DataFormatError, match=rf"^{corpus}:5: .*{reason}"):  # line 5 of the user's file
    ensure_index(corpus, "bm25", corpus_limit=4, root=root, show_progress=False)
  assert _cache_entries(root) == []  # no half-built index, no partial folder


def test_a_subset_builds_moves_into_place_and_serves(tmp_path):
  corpus = _corpus(tmp_path / "my_corpus.jsonl", [json.dumps(r) for r in ROWS[:2]] + [""] +
                   [json.dumps(r) for r in ROWS[2:]] + [b"\xff not even JSON\n"])  # past the subset: unread
  root = tmp_path / "cache"
  index = ensure_index(corpus, "bm25", corpus_limit=4, root=root, show_progress=False)
  assert _cache_entries(root) == [index.name]
  manifest = json.loads((index / MANIFEST).read_text())
  assert manifest["count"] == 4 and manifest["corpus"]["path"] == str(index / "corpus.jsonl")
  [hits] = load_retriever(index).search(["topic 3"], 1)
  assert hits[0].id == "3" and hits[0].title == "Title 3"
  assert ensure_index(corpus, "bm25", corpus_limit=4, root=root, show_progress=False) == index  # reused
