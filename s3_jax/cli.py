"""The command-line rules every config-taking program shares (train, evaluate, precompute, sft, probe, demo,
memory_plan, config_lib): a locked `--config configs/NAME.py[:arg]` with `--config.KEY=VALUE` overrides, no
stray arguments, absl and orbax quiet unless `--verbosity` is given, and a bad flag, config or input ending
the program with one line `error: ...` (what and where) instead of a trace.

  config = cli.config_flag()
  out = flags.DEFINE_string("out", None, "...")
  cli.run(lambda config: work(config, out.value), config, errors=(FileNotFoundError,))
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any


def config_flag(default: str | None = None, *, required: bool = True) -> Any:
  """Defines `--config` (locked: a typo'd key fails at once); required unless it has a `default` or
  `required=False` (the program then gets None without it)."""
  from absl import flags
  from ml_collections import config_flags

  flag = config_flags.DEFINE_config_file("config", default, "configs/NAME.py[:arg]", lock_config=True)
  if required and default is None:
    flags.mark_flag_as_required("config")
  return flag


def config_filename() -> str:
  """The `--config` value as given (`configs/NAME.py[:arg]`), e.g. to name a default output folder."""
  from absl import flags
  from ml_collections import config_flags

  return config_flags.get_config_filename(flags.FLAGS["config"])


def run(body: Callable[[Any], None], flag: Any, *, argv: Sequence[str] | None = None,
        errors: tuple[type[BaseException], ...] = ()) -> None:
  """Parses the flags and runs `body(config)`: the config validated (`config_lib.validate`; None when
  `--config` is optional and absent). A config that does not validate and the `errors` `body` raises end the
  program with `error: ...`; any other exception keeps its trace (a bug, not bad input)."""
  from absl import app, flags, logging

  from s3_jax import config_lib

  def main(args: Sequence[str]) -> None:
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(args[1:])}")
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # absl would print JAX's INFO lines, orbax every file it writes
    try:
      config = None if flag.value is None else config_lib.validate(flag.value)
    except ValueError as e:
      sys.exit(f"error: {e}")
    try:
      body(config)
    except errors as e:
      sys.exit(f"error: {e}")

  app.run(main, argv=None if argv is None else list(argv), flags_parser=parse_flags)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing: a `--config.KEY` override that names no key or carries a value of the wrong type
  ends the program with one line naming the flag, instead of a trace from inside ml_collections."""
  from absl import flags

  try:
    return flags.FLAGS(list(argv))
  except flags.Error as e:
    sys.exit(f"error: {e}")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    inner = e.args[0] if e.args else e
    while isinstance(inner, KeyError) and inner.args:  # ml_collections wraps the KeyError's text
      inner = inner.args[0]
    name, _, hint = str(inner).partition("\n")
    name = name.strip("'\"")
    culprit = next((a for a in argv[1:] if a.startswith("--config.")
                    and name in a.partition("=")[0][len("--config."):].split(".")), None)
    if culprit is None:  # not an override's fault (a config file's own error, say): its trace is the clue
      raise
    sys.exit(f"error: {culprit}: no config key {name!r}" + (f" ({hint.strip()})" if hint else ""))
