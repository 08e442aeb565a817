"""The one tokenizer loader: a Hugging Face tokenizer from a model folder, offline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def stop_prefix_length(ids: Sequence[int], decode: Callable[[Sequence[int]], str],
                       stop_strings: Sequence[str]) -> int | None:
  """The length of the shortest prefix of `ids` whose text (`decode`) holds one of `stop_strings`, or None
  when the whole text holds none. A binary search: containment only grows with the prefix."""
  ids = list(ids)
  if not any(s in decode(ids) for s in stop_strings):
    return None
  low, high = 1, len(ids)
  while low < high:
    mid = (low + high) // 2
    if any(s in decode(ids[:mid]) for s in stop_strings):
      high = mid
    else:
      low = mid + 1
  return low


def load_tokenizer(path: str | Path) -> Any:
  """`transformers.AutoTokenizer` from a local folder (never a hub download)."""
  import transformers

  folder = Path(path)
  if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
    raise FileNotFoundError(f"{folder}: no tokenizer.json or tokenizer_config.json")
  return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def pad_id(tokenizer: Any) -> int:
  """The id rows are padded with: the tokenizer's pad token, else 0 (padding is masked out either way)."""
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
  """Token ids of a chat (`[{"role", "content"}, ...]`) with the generation prompt appended, by the
  tokenizer's chat template.

  A chat that ends with an `assistant` message is a continuation (vLLM's `continue_final_message`): the
  earlier messages are templated with the generation prompt and the assistant's text follows as is, without
  an end-of-turn token, so the model goes on writing that message (multi-turn agents append tool results to
  their own text this way)."""
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("this tokenizer has no chat template; drop --chat or use an instruct model")
  if not messages:
    raise ValueError("a chat needs at least one message")
  partial = messages[-1]["role"] == "assistant"
  if partial and len(messages) == 1:
    raise ValueError("a chat cannot consist of an assistant message alone")
  encoded = tokenizer.apply_chat_template(messages[:-1] if partial else messages, add_generation_prompt=True,
                                          tokenize=True, return_dict=True)
  ids = list(encoded["input_ids"])
  if partial:
    ids += tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
  return ids


def chat_prompt_ids(tokenizer: Any, user_message: str) -> list[int]:
  """Token ids of a one-turn chat with the generation prompt appended."""
  return chat_ids(tokenizer, [{"role": "user", "content": user_message}])
