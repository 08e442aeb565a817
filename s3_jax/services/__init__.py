"""gRPC services (retriever, generator) with their clients; `.proto` files and stubs in `protos/`."""

from s3_jax.services.generator_client import GeneratorClient
from s3_jax.services.retriever_client import RetrieverClient, ServiceUnavailableError

__all__ = ["GeneratorClient", "RetrieverClient", "ServiceUnavailableError"]
