"""Models: the Flax NNX decoder family and its value head, HF safetensors import/export, the KV-cache
sampler, the BERT-family dense encoder, the tokenizer loader, and GGUF -> HF conversion (`gguf_export`)."""

from s3_jax.models.config import DecoderConfig
from s3_jax.models.decoder import Decoder, ValueModel
from s3_jax.models.encoder import Encoder, load_encoder
from s3_jax.models.hf import load_hf, save_hf
from s3_jax.models.sampler import SampleOutput, Sampler, SamplingParams
from s3_jax.models.tokenizer import load_tokenizer

__all__ = ["Decoder", "DecoderConfig", "Encoder", "SampleOutput", "Sampler", "SamplingParams", "ValueModel",
           "load_encoder", "load_hf", "load_tokenizer", "save_hf"]
