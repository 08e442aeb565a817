"""The exported model folders load in PyTorch `transformers` and behave like the models they came from."""

import json

import numpy as np
import pytest
import torch

from s3_jax import assets

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def smollm2(asset):
  folder = asset("smollm2-135m-instruct")
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  return folder, tokenizer, model


def test_smollm2_folder_is_a_plain_hf_folder(smollm2):
  folder, tokenizer, model = smollm2
  config = json.loads((folder / "config.json").read_text())
  assert "quantization_config" not in config  # vLLM rejects `quant_method: gguf`
  assert config["architectures"] == ["LlamaForCausalLM"]
  assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
  assert config["rms_norm_eps"] == 1e-5
  assert sum(p.numel() for p in model.parameters()) == 134_515_008
  assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
  assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
  assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]


def test_smollm2_answers_capital_of_france(smollm2):
  _, tokenizer, model = smollm2
  messages = [{"role": "user", "content": "What is the capital of France?"}]
  input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
  with torch.no_grad():
    output = model.generate(input_ids, max_new_tokens=20, do_sample=False,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  answer = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
  assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm2_export_matches_the_gguf_model(smollm2):
  """Reference: transformers' own GGUF loader on the package file (dequantised the same way)."""
  _, tokenizer, model = smollm2
  source = assets._source_dir(assets.get("smollm2-135m-instruct"))
  gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
  reference_tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=gguf)
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      source, gguf_file=gguf, dtype=torch.float32).eval()
  texts = ["What is the capital of France?", "<|im_start|>user\nDoc 1 (Title: \"Carmen\") é ü 😀\n"]
  for text in texts:
    assert tokenizer(text)["input_ids"] == reference_tokenizer(text)["input_ids"]
  ids = torch.tensor([tokenizer(texts[1])["input_ids"]])
  with torch.no_grad():
    np.testing.assert_array_equal(model(ids).logits.numpy(), reference(ids).logits.numpy())


def test_minilm_folder_embeds_related_text_closer(asset):
  folder = asset("minilm-l6-v2")
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  model = transformers.AutoModel.from_pretrained(folder).eval()
  texts = ["Who composed the opera Carmen?",
           "Carmen is an opera in four acts by the French composer Georges Bizet.",
           "The mitochondrion is the powerhouse of the cell."]
  batch = tokenizer(texts, padding=True, return_tensors="pt")
  with torch.no_grad():
    hidden = model(**batch).last_hidden_state
  mask = batch["attention_mask"].unsqueeze(-1).float()
  vectors = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
  assert vectors.shape == (3, 384)
  assert vectors[0] @ vectors[1] > 0.5 > vectors[0] @ vectors[2]
