"""Turns wire tensors into torch tensors on the service device (and back, for the SDK)."""
