"""On CUDA the engine chooses what it chooses on the CPU (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

from sampler_service.engine import Engine
from sampler_service.policy.registry import PolicyRegistry
from sampler_service.policy.spec import resolve
from sampler_service.state import SequenceState

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def states(policy_name: str, rows: int) -> list[SequenceState]:
    spec, version, _ = PolicyRegistry.from_files().get(policy_name)
    policy = resolve(spec, version, {})
    return [SequenceState(f"s{i}", policy, prompt_ids=(1, 2, 3), seed=i, eos_token_ids=frozenset({0}))
            for i in range(rows)]


@pytest.mark.parametrize("policy", ["greedy", "creative", "default"])
def test_cuda_and_cpu_choose_the_same_tokens(policy):
    logits = torch.randn(16, 4096, generator=torch.Generator().manual_seed(0)) * 3
    cpu = Engine(torch.device("cpu")).step(states(policy, 16), logits)
    cuda = Engine(torch.device("cuda")).step(states(policy, 16), logits.cuda())
    assert [o.token_id for o in cuda] == [o.token_id for o in cpu]
    assert [o.entropy for o in cuda] == pytest.approx([o.entropy for o in cpu], abs=1e-4)
