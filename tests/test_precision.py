"""`compute_dtype=auto`: bf16 where the hardware has bf16 units, read from the CPU's flags."""

import pytest

from s3_jax.models import precision


def test_cpu_flags_decide(tmp_path):
  amx = tmp_path / "amx"
  amx.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n")
  plain = tmp_path / "plain"
  plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16x\n")  # a near miss
  assert precision.cpu_has_bf16_units(str(amx)) is True
  assert precision.cpu_has_bf16_units(str(plain)) is False
  assert precision.cpu_has_bf16_units(str(tmp_path / "missing")) is False


def test_resolve():
  assert precision.resolve("auto", "tpu") == "bfloat16" and precision.resolve("auto", "gpu") == "bfloat16"
  expected = "bfloat16" if precision.cpu_has_bf16_units() else "float32"
  assert precision.resolve("auto", "cpu") == expected
  assert precision.resolve("float32", "tpu") == "float32"
  with pytest.raises(ValueError, match="'fp16' must be auto, float32 or bfloat16"):
    precision.resolve("fp16")
