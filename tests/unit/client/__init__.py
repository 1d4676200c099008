"""Unit tests of the Python SDK (clients/python/sampler_client)."""
