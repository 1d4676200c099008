"""Seeded sampling depends only on (seed, position, logits): not on batch mates, not on the
process. The same seeds give the same tokens on a restarted server."""
from __future__ import annotations

import torch

from sampler_client import SamplerClient

STEPS, VOCAB = 12, 500


def logits_for(step: int, rows: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(1000 + step))


def generate_alone(address: str, policy: str, seed: int, row: int, rows: int) -> list[int]:
    with SamplerClient(address) as client:
        seq = client.create_sequence(policy=policy, seed=seed, prompt_ids=[1, 2, 3])
        return [seq.step(logits_for(s, rows)[row]).token_id for s in range(STEPS)]


def generate_batched(address: str, specs: list[tuple[str, int]]) -> list[list[int]]:
    with SamplerClient(address) as client:
        sequences = [client.create_sequence(policy=p, seed=s, prompt_ids=[1, 2, 3]) for p, s in specs]
        tokens = [[] for _ in specs]
        for step in range(STEPS):
            for out, choice in zip(tokens, client.step(sequences, logits_for(step, len(specs)))):
                out.append(choice.token_id)
        return tokens


MIXED = [("creative", 1), ("default", 2), ("greedy", 0), ("creative", 3), ("default", 4)]


def test_tokens_do_not_depend_on_batch_mates(server):
    batched = generate_batched(server.address, MIXED)
    for row, (policy, seed) in enumerate(MIXED):
        assert generate_alone(server.address, policy, seed, row, len(MIXED)) == batched[row]


def test_seeded_tokens_survive_a_restart(start_server):
    first = start_server()
    before = generate_batched(first.address, MIXED)
    first.stop(0)
    after = generate_batched(start_server().address, MIXED)
    assert before == after
    assert len({tuple(t) for t in before}) == len(MIXED)  # different seeds differ


def test_different_seeds_give_different_samples(server):
    runs = {tuple(generate_alone(server.address, "default", seed, 0, 1)) for seed in range(5)}
    assert len(runs) == 5
