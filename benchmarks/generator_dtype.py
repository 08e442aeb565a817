"""What bf16 compute does to the reward's generator: the same answer prompts as `reward.py` (FanOutQA
questions with their BM25 top-3 wiki-vital documents as D_s3, s3's answer prompt), greedy, answered by the
jax backend (SmolLM2-135M-Instruct, fp32 weights) computing in float32 and in bfloat16: how many answers
change, the span check's GenAcc of each, and the time of each (after a warm-up on the first 8 prompts, which
compiles).

  python benchmarks/generator_dtype.py [--n 120] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import time

import here  # noqa: F401  (this checkout's s3_jax first on sys.path)
from reward import reward_questions


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=120)
  parser.add_argument("--max-tokens", type=int, default=32)
  args = parser.parse_args()

  from s3_jax.reward.answers import span_match
  from s3_jax.reward.prompts import answer_messages
  from s3_jax.search.formats import generator_context
  from s3_jax.services.generator_backends import GenerationParams, JaxBackend

  questions, docs = reward_questions(args.n)
  chats = [answer_messages(q.question, generator_context(tuple(d)))
           for q, d in zip(questions, docs, strict=True)]
  params = GenerationParams(temperature=0.0, top_p=1.0, max_tokens=args.max_tokens)
  answers, seconds = {}, {}
  for dtype in ("float32", "bfloat16"):
    backend = JaxBackend("asset:smollm2-135m-instruct", compute_dtype=dtype)
    backend.generate(chats[:8], params)  # warm-up: compiles the first shapes
    start = time.perf_counter()
    answers[dtype] = [c.text for c in backend.generate(chats, params)]
    seconds[dtype] = time.perf_counter() - start
    del backend
  pairs = zip(answers["float32"], answers["bfloat16"], strict=True)
  changed = [i for i, (a, b) in enumerate(pairs) if a != b]
  print(f"{len(chats)} reward answer prompts (FanOutQA + BM25 top-3), greedy, <= {args.max_tokens} tokens, "
        "jax backend, SmolLM2-135M-Instruct, fp32 weights")
  for dtype in ("float32", "bfloat16"):
    genacc = sum(span_match(a, q.golden_answers) for a, q in zip(answers[dtype], questions, strict=True))
    print(f"  compute {dtype:<9} {seconds[dtype]:7.2f} s   span GenAcc {genacc}/{len(chats)}")
  flips = sum(span_match(answers["float32"][i], questions[i].golden_answers)
              != span_match(answers["bfloat16"][i], questions[i].golden_answers) for i in changed)
  print(f"  answers that differ: {len(changed)}/{len(chats)}; of them the span verdict differs for {flips}; "
        f"bf16 / fp32 time = {seconds['bfloat16'] / seconds['float32']:.2f}")
  for i in changed[:5]:
    print(f"    [{i}] fp32 {answers['float32'][i]!r}\n         bf16 {answers['bfloat16'][i]!r}")


if __name__ == "__main__":
  main()
