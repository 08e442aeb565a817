"""Binding policy and bearer-token auth shared by every gRPC service."""

from __future__ import annotations

import hmac
import ipaddress
import os

import grpc

TOKEN_ENV = "S3_JAX_AUTH_TOKEN"


def is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host.strip("[]")).is_loopback
  except ValueError:
    return False


def resolve_token(host: str, token: str | None) -> str | None:
  """The token to require: the given one or `$S3_JAX_AUTH_TOKEN`; a non-loopback bind needs one."""
  token = token or os.environ.get(TOKEN_ENV) or None
  if not is_loopback(host) and not token:
    raise ValueError(f"binding {host} exposes the service beyond this machine: pass --auth-token or set "
                     f"{TOKEN_ENV} (or bind 127.0.0.1)")
  return token


def check(context: grpc.ServicerContext, token: str | None) -> None:
  """Aborts the call with UNAUTHENTICATED unless it carries `authorization: Bearer <token>`."""
  if token is None:
    return
  sent = dict(context.invocation_metadata()).get("authorization", "")
  if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
  return (("authorization", f"Bearer {token}"),) if token else ()
