"""The committed gRPC stubs are what grpc_tools generates from the committed .proto files."""

import shutil
import subprocess
import sys

from conftest import REPO


def test_generated_stubs_are_up_to_date(tmp_path):
  protos = sorted((REPO / "s3_jax/services/protos").glob("*.proto"))
  assert protos
  target = tmp_path / "s3_jax/services/protos"
  target.mkdir(parents=True)
  for proto in protos:
    shutil.copy(proto, target)
  subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
                  "--grpc_python_out=.", *(f"s3_jax/services/protos/{p.name}" for p in protos)],
                 cwd=tmp_path, check=True)
  for generated in target.glob("*_pb2*"):
    committed = REPO / "s3_jax/services/protos" / generated.name
    assert committed.read_text() == generated.read_text(), f"{committed.name} is stale: run make protos"
