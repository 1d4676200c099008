"""Sampler Sidecar: a gRPC service that applies named decoding policies to streamed logits."""

__version__ = "0.1.0"
