"""The generator's answer prompts (s3_protocol.md §4)."""

from __future__ import annotations

from s3_jax.reward.judge import Messages

# Bumped whenever a prompt below changes: the reward cache keys on it.
PROMPT_VERSION = "s3-v1"

_INSTRUCTION = "Important: You MUST directly answer the question without any other text and thinking."


def answer_messages(question: str, context: str) -> Messages:
  """s3's `format_qa_chat_messages`: the context in the system message, the question as the user's."""
  return [{"role": "system", "content": "Use the following contexts (some might be irrelevant) on demand:\n"
                                        f"Contexts:\n{context}\n\n{_INSTRUCTION}"},
          {"role": "user", "content": question}]


def closed_book_messages(question: str) -> Messages:
  """s3's zero-shot answer (no context)."""
  return [{"role": "system", "content": _INSTRUCTION}, {"role": "user", "content": question}]
