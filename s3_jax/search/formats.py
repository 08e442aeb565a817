"""The three document formats of s3 (spec §2.5), in one place. Titles in the prompt and in observations are
the quoted first line of wiki-18 `contents` (`"Carmen"`), as s3 prints them; the generator's context has
them unquoted, as s3's D_s3 parser leaves them."""

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
