"""The searcher's weights: a training run's newest HF export, an HF folder (or `asset:NAME`), or a random
decoder of the config's `searcher.model` section."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import ml_collections

from s3_jax import assets
from s3_jax.models import precision
from s3_jax.models.config import DecoderConfig


def decoder_config(config: ml_collections.ConfigDict, tokenizer: Any) -> DecoderConfig:
  """The randomly initialised searcher of a config without `searcher.init_from` (`searcher.model`)."""
  return DecoderConfig.from_fields(config.searcher.model, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id,
                                   max_position_embeddings=max(8192, 2 * config.rollout.max_prompt_length))


def resolve_checkpoint(checkpoint: str) -> tuple[Path, str]:
  """An HF folder (or `asset:NAME`) as is; a training workdir (or its `hf/`) -> its newest `hf/step_N`
  export. Returns the folder and a description."""
  folder = assets.resolve(checkpoint) if checkpoint.startswith("asset:") else Path(checkpoint).expanduser()
  # A training workdir holds a config.json too (the run's config record): it is a run when it has hf/ or
  # checkpoints/.
  run = (folder / "hf").is_dir() or (folder / "checkpoints").is_dir()
  if (folder / "config.json").is_file() and not run:
    return folder, str(folder)
  exports = folder / "hf" if (folder / "hf").is_dir() else folder
  steps = sorted((int(m.group(1)), p) for p in exports.glob("step_*")
                 if (m := re.fullmatch(r"step_(\d+)", p.name)) and (p / "config.json").is_file())
  if steps:
    step, path = steps[-1]
    return path, f"{folder} (step {step})"
  if (folder / "checkpoints").is_dir():
    raise FileNotFoundError(f"{folder}: a training run without HF exports; evaluate one of its exports "
                            f"(train with checkpoint.hf_export_every > 0) or pass an HF model folder")
  raise FileNotFoundError(f"checkpoint {checkpoint!r}: not an HF model folder (no config.json) nor a "
                          f"training run with hf/step_N exports")


def load_searcher(config: ml_collections.ConfigDict, checkpoint: str | None) -> tuple[Any, Any, str]:
  """`(decoder, tokenizer, description)`: `checkpoint`, else `searcher.init_from`, else a random searcher
  (`searcher.model`, seeded by `seed`)."""
  from flax import nnx

  from s3_jax.models.decoder import Decoder
  from s3_jax.models.hf import load_hf
  from s3_jax.models.tokenizer import load_tokenizer

  dtype = precision.DTYPES[config.searcher.param_dtype]
  compute = precision.dtype(config.searcher.compute_dtype)
  source = checkpoint or config.searcher.init_from
  if source:
    folder, description = resolve_checkpoint(source)
    tokenizer = load_tokenizer(folder if (folder / "tokenizer.json").is_file()
                               else assets.resolve(config.searcher.tokenizer))
    return load_hf(folder, dtype=dtype, compute_dtype=compute), tokenizer, description
  tokenizer = load_tokenizer(assets.resolve(config.searcher.tokenizer))
  model = Decoder(decoder_config(config, tokenizer), rngs=nnx.Rngs(config.seed), param_dtype=dtype,
                  compute_dtype=compute)
  return model, tokenizer, f"random searcher (seed {config.seed})"
