"""gRPC services (retriever) with their clients; `.proto` files and generated stubs in `protos/`."""

from s3_jax.services.retriever_client import RetrieverClient, ServiceUnavailableError

__all__ = ["RetrieverClient", "ServiceUnavailableError"]
