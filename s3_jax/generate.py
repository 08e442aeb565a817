"""Generate a completion with this project's model and sampler; prints only the completion.

  python -m s3_jax.generate --model DIR|asset:NAME --prompt TEXT [--chat] [--max-new-tokens N]
      [--temperature T] [--top-p P] [--top-k K] [--seed S] [--stop STR ...] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from s3_jax import assets
from s3_jax.models.hf import load_hf
from s3_jax.models.sampler import Sampler, SamplingParams
from s3_jax.models.tokenizer import chat_prompt_ids, load_tokenizer


def generate_text(model_dir: str, prompt: str, *, chat: bool = False, params: SamplingParams | None = None,
                  seed: int = 0, stop: tuple[str, ...] = (), dtype: str = "float32") -> str:
  """Loads the model folder (or `asset:NAME`), generates one completion and returns its text."""
  params = params or SamplingParams()
  folder = assets.resolve(model_dir)
  tokenizer = load_tokenizer(folder)
  model = load_hf(folder, dtype=jnp.dtype(dtype))
  ids = chat_prompt_ids(tokenizer, prompt) if chat else tokenizer(prompt)["input_ids"]
  sampler = Sampler(model, tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id or 0)
  out = sampler.generate([ids], params, stop_strings=stop, rng=jax.random.key(seed))
  return tokenizer.decode(out.tokens[0], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m s3_jax.generate", description=__doc__.split("\n")[0])
  parser.add_argument("--model", required=True, help="HF model folder or asset:NAME")
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
  parser.add_argument("--max-new-tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--top-k", type=int, default=0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  args = parser.parse_args(argv)
  try:
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens)
    text = generate_text(args.model, args.prompt, chat=args.chat, params=params, seed=args.seed,
                         stop=tuple(args.stop), dtype=args.dtype)
  except (ValueError, FileNotFoundError, assets.AssetError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
