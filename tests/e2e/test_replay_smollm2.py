"""End to end on SmolLM2-135M-Instruct: `hf.generate` survives a SIGKILL of the service in the
middle of a generation (restarted on the same port): the client's replay re-creates the
sequences where they stood and the output is the uninterrupted run's, token for token."""
from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from sampler_client import SamplerClient, hf
from tests.e2e.test_smollm2 import PROMPTS
from tests.service.test_replay import ServiceProcess

MAX_NEW_TOKENS = 12


class RestartingModel:
    """The model, but before its `at`-th forward pass (1: the prompt's) the service is killed
    and started again: the step after it finds the service away."""

    def __init__(self, model: Any, service: ServiceProcess, at: int):
        self.model, self.service, self.at, self.calls = model, service, at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            self.service.restart()
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # generation_config, forward
        return getattr(self.model, name)


@pytest.fixture
def service():
    process = ServiceProcess()
    yield process
    process.kill()


def replayed(caplog) -> bool:
    return any("replaying" in r.getMessage() for r in caplog.records
               if r.name == "sampler_client.replay")


@pytest.mark.e2e
@pytest.mark.parametrize("prompts, options", [
    (PROMPTS[:2], dict(policy="creative", seed=7)),
    (PROMPTS[:1], dict(num_beams=3, num_return_sequences=2, length_penalty=0.6)),
], ids=["sampled", "beam"])
def test_generate_after_a_restart_between_steps_equals_the_uninterrupted_run(
        smollm2, service, caplog, prompts, options):
    pytest.importorskip("transformers")
    model, tokenizer = smollm2
    prompts = [hf.chat_ids(tokenizer, p)[0].tolist() for p in prompts]
    with SamplerClient(service.address, replay_timeout=60) as client:
        expected = hf.generate(model, prompts, client, max_new_tokens=MAX_NEW_TOKENS, **options)
        with caplog.at_level(logging.WARNING, logger="sampler_client.replay"):
            got = hf.generate(RestartingModel(model, service, at=5), prompts, client,
                              max_new_tokens=MAX_NEW_TOKENS, **options)
    assert replayed(caplog)
    assert got == expected


@pytest.mark.e2e
def test_generate_survives_a_kill_from_another_thread(smollm2, service, caplog):
    """The kill lands wherever the generation is (between steps or during one); min_tokens
    keeps the generation running well past it."""
    pytest.importorskip("transformers")
    model, tokenizer = smollm2
    input_ids = hf.chat_ids(tokenizer, PROMPTS[1])
    params = {"temperature": 0.9, "top_p": 0.95, "min_tokens": MAX_NEW_TOKENS}
    with SamplerClient(service.address, replay_timeout=60) as client:
        expected = hf.generate(model, input_ids, client, params=params, seed=5,
                               max_new_tokens=MAX_NEW_TOKENS)
        trace: list = []
        finished = threading.Event()

        def kill_after_a_few_steps() -> None:
            while len(trace) < 3 and not finished.wait(0.001):
                pass
            if not finished.is_set():
                service.restart()

        killer = threading.Thread(target=kill_after_a_few_steps)
        killer.start()
        with caplog.at_level(logging.WARNING, logger="sampler_client.replay"):
            try:
                got = hf.generate(model, input_ids, client, params=params, seed=5,
                                  max_new_tokens=MAX_NEW_TOKENS, trace=trace)
            finally:
                finished.set()
                killer.join()
    assert replayed(caplog)
    assert got == expected and len(got[0]) == MAX_NEW_TOKENS
