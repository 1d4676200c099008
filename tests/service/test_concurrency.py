"""Many workers at once: concurrent unary steps and streams give each sequence exactly the
tokens it gets alone, and the server answers every call."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from sampler_client import SamplerClient

WORKERS, SEQUENCES, STEPS, VOCAB = 6, 4, 15, 400


def logits_for(worker: int, step: int) -> torch.Tensor:
    return torch.randn(SEQUENCES, VOCAB, generator=torch.Generator().manual_seed(worker * 100 + step))


def run_worker(address: str, worker: int, stream: bool) -> list[list[int]]:
    with SamplerClient(address) as client:
        sequences = client.create_sequences([dict(policy="creative", seed=worker * 10 + i)
                                             for i in range(SEQUENCES)])
        tokens = [[] for _ in sequences]
        if stream:
            with client.stream() as steps:
                for step in range(STEPS):
                    for out, c in zip(tokens, steps.step(sequences, logits_for(worker, step))):
                        out.append(c.token_id)
        else:
            for step in range(STEPS):
                for out, c in zip(tokens, client.step(sequences, logits_for(worker, step))):
                    out.append(c.token_id)
        client.release(sequences)
        return tokens


def test_concurrent_workers_get_the_tokens_they_get_alone(server):
    alone = [run_worker(server.address, w, stream=False) for w in range(WORKERS)]
    with ThreadPoolExecutor(WORKERS) as pool:
        together = list(pool.map(lambda w: run_worker(server.address, w, stream=w % 2 == 0),
                                 range(WORKERS)))
    assert together == alone
    assert len(server.core.store) == 0  # every worker released its sequences
