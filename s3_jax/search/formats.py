"""The three document formats of s3 (s3_protocol.md §2.5), in one place. Titles in the prompt and in
observations are the quoted first line of wiki-18 `contents` (`"Carmen"`), as s3 prints them; the generator's
context has them unquoted, as s3's D_s3 parser leaves them."""

from __future__ import annotations

from collections.abc import Sequence

from s3_jax.data.corpus import Doc


def initial_block(docs: Sequence[Doc]) -> str:
  """The naive-RAG docs in the searcher's first prompt: `Doc {i} (Title: "{title}") {text}\\n`."""
  return "".join(f'Doc {i} (Title: "{d.title}") {d.text}\n' for i, d in enumerate(docs, start=1))


def observation(docs: Sequence[Doc]) -> str:
  """Retrieved docs shown to the searcher after a query: `Doc {i}(Title: "{title}") {text}\\n`."""
  return "".join(f'Doc {i}(Title: "{d.title}") {d.text}\n' for i, d in enumerate(docs, start=1))


def generator_context(docs: Sequence[Doc]) -> str:
  """The context handed to the generator: `Doc {n} (Title: {title})\\n{text}\\n\\n`, numbered from 1,
  documents with the same (title, text) given once."""
  seen: set[tuple[str, str]] = set()
  parts = []
  for d in docs:
    if (d.title, d.text) not in seen:
      seen.add((d.title, d.text))
      parts.append(f"Doc {len(parts) + 1} (Title: {d.title})\n{d.text}\n\n")
  return "".join(parts)


RAG_CONTEXT_FORMATS = ("s3", "d_s3")


def rag_context(retrieved: Sequence[Doc], k: int, context_format: str = "s3") -> str:
  """The naive-RAG baseline's generator context from a question's ranked retrieval
  (`reward.rag_context_format`, s3_protocol.md §3.3). "s3": what s3's RAG cache answered from — e5_retrieval's
  one line per doc, `Doc {i} (Title: "{title}") {text}\\n`, over the whole retrieval, cut before the first
  `Doc {k+1}` (as `context.py` splits it); "d_s3": the top `k` in the D_s3 context format
  (`generator_context`)."""
  if context_format == "s3":
    return initial_block(retrieved).split(f"Doc {k + 1}")[0]
  if context_format == "d_s3":
    return generator_context(retrieved[:k])
  raise ValueError(f"reward.rag_context_format={context_format!r} must be one of "
                   f"{', '.join(RAG_CONTEXT_FORMATS)}")
