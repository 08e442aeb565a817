"""`python -m s3_jax.generate` end to end on the real SmolLM2 export."""

import subprocess
import sys

import pytest
import transformers
from conftest import REPO


def _run(*args):
  return subprocess.run([sys.executable, "-m", "s3_jax.generate", *args], capture_output=True, text=True,
                        cwd=REPO)


@pytest.mark.entry
def test_cli_prints_only_the_completion(asset):
  folder = asset("smollm2-135m-instruct")
  done = _run("--model", str(folder), "--prompt", "What is the capital of France?", "--chat",
              "--max-new-tokens", "24")
  assert done.returncode == 0, done.stderr
  # Reference: transformers greedy on the same chat prompt.
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder)
  ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
  expected = model.generate(ids["input_ids"], max_new_tokens=24, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:]
  assert done.stdout == tokenizer.decode(expected, skip_special_tokens=True) + "\n"
  assert "Paris" in done.stdout


@pytest.mark.entry
def test_cli_errors_are_clear(asset, tmp_path):
  missing = _run("--model", str(tmp_path), "--prompt", "hi")
  assert missing.returncode == 1 and "no tokenizer.json" in missing.stderr
  bad = _run("--model", "asset:smollm2-135m-instruct", "--prompt", "hi", "--top-p", "0")
  assert bad.returncode == 1 and "top_p=0.0 must be in (0, 1]" in bad.stderr
