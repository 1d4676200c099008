"""An example Sampler Sidecar plug-in: one processor, `logit_softcap`, registered through the
`sampler_service.processors` entry point in this package's pyproject.toml."""
from sampler_plugin_example.softcap import LogitSoftcap

__all__ = ["LogitSoftcap"]
