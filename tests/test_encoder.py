"""The JAX BERT encoder against PyTorch `transformers` mean-pooled MiniLM embeddings."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from s3_jax.models import load_encoder

TEXTS = [
    "Who composed the opera Carmen?",
    "Carmen is an opera in four acts by the French composer Georges Bizet.",
    "x",
    "",
    "Théâtre, 東京, naïve café — unicode text with ümlauts.",
    "The mitochondrion is the powerhouse of the cell. " * 60,  # longer than max_length: truncated
    *[f"query: passage number {i} about the history of Paris" for i in range(70)],  # > one batch
]


@pytest.fixture(scope="module")
def minilm(asset):
  return asset("minilm-l6-v2")


def _reference(folder, texts, max_length):
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  model = transformers.AutoModel.from_pretrained(folder).eval()
  batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
  with torch.no_grad():
    hidden = model(**batch).last_hidden_state
  mask = batch["attention_mask"].unsqueeze(-1).float()
  return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()


def test_embeddings_match_transformers(minilm):
  encoder = load_encoder(minilm)
  assert encoder.max_length == 256  # sentence-transformers' max_seq_length for this model
  vectors = encoder.encode(TEXTS)
  expected = _reference(minilm, TEXTS, 256)
  assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
  cosines = np.sum(vectors * expected, axis=1)
  assert cosines.min() >= 0.99999, cosines.min()
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=0, atol=1e-5)


def test_length_buckets_do_not_retrace(minilm):
  encoder = load_encoder(minilm)
  encoder.encode(["a short text", "another one"])
  traces = encoder.trace_count
  encoder.encode(["different words", "same bucket"])
  assert encoder.trace_count == traces
  single = encoder.encode(["Who composed the opera Carmen?"])[0]
  batched = encoder.encode(["Who composed the opera Carmen?", "padding partner text"])[0]
  np.testing.assert_allclose(single, batched, rtol=0, atol=1e-6)  # padding does not leak into rows


def test_bad_inputs(minilm, tmp_path):
  encoder = load_encoder(minilm)
  with pytest.raises(TypeError, match="list of strings"):
    encoder.encode("one string")
  assert encoder.encode([]).shape == (0, 384)
  with pytest.raises(FileNotFoundError, match=r"no config\.json"):
    load_encoder(tmp_path)
  shutil.copytree(minilm, tmp_path / "m", dirs_exist_ok=True)
  config = json.loads((tmp_path / "m" / "config.json").read_text())
  (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
  with pytest.raises(ValueError, match="unsupported encoder model_type 'roberta'"):
    load_encoder(tmp_path / "m")
