"""QA datasets and corpora: records, readers, question normalisation."""

from s3_jax.data.corpus import Doc, doc_from_row, iter_corpus, read_corpus, split_contents
from s3_jax.data.jsonl import DataFormatError, iter_jsonl, write_jsonl
from s3_jax.data.qa import QAExample, example_from_row, iter_qa, normalize_question, read_qa

__all__ = [
    "DataFormatError", "Doc", "QAExample", "doc_from_row", "example_from_row", "iter_corpus",
    "iter_jsonl", "iter_qa", "normalize_question", "read_corpus", "read_qa", "split_contents",
    "write_jsonl",
]
