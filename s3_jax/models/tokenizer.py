"""The one tokenizer loader: a Hugging Face tokenizer from a model folder, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tokenizer(path: str | Path) -> Any:
  """`transformers.AutoTokenizer` from a local folder (never a hub download)."""
  import transformers

  folder = Path(path)
  if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
    raise FileNotFoundError(f"{folder}: no tokenizer.json or tokenizer_config.json")
  return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
  """Token ids of a chat (`[{"role", "content"}, ...]`) with the generation prompt appended, by the
  tokenizer's chat template."""
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("this tokenizer has no chat template; drop --chat or use an instruct model")
  encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=True)
  return list(encoded["input_ids"])


def chat_prompt_ids(tokenizer: Any, user_message: str) -> list[int]:
  """Token ids of a one-turn chat with the generation prompt appended."""
  return chat_ids(tokenizer, [{"role": "user", "content": user_message}])
