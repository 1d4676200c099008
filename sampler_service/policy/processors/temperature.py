"""Temperature scaling."""
from __future__ import annotations

import torch

from sampler_service.policy.candidates import Candidates
from sampler_service.policy.params import Param
from sampler_service.policy.processors.base import Processor, RowBatch
from sampler_service.policy.sparse import TailBound

#: Below this temperature a row is decoded greedily (vLLM's `_SAMPLING_EPS`).
GREEDY_TEMPERATURE = 1e-5


class Temperature(Processor):
    """Divides the logits by the temperature: l' = l / T.

    Peer: vLLM (`temperature`). T < 1e-5 (0 included) means greedy: the row's logits are left
    as they are and the row is marked so the selector takes the argmax (ties to the lowest id),
    as vLLM does for its greedy requests. Transform; keeps no per-sequence state.
    Off: T = 1.0.
    Sparse rows: always exact; the tail's max bound is divided by T as the logits are.
    """

    key = "temperature"
    role = "transform"
    params = (Param("temperature", "float", default=1.0, off=1.0, minimum=0.0,
                    doc="T; 0 (or < 1e-5) means greedy"),)
    flat_names = {"temperature": "temperature"}

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        temperature = args["temperature"]
        greedy = temperature < GREEDY_TEMPERATURE
        batch.greedy |= greedy
        if bool(((temperature != 1.0) & ~greedy).any()):
            divisor = torch.where(greedy, torch.ones_like(temperature), temperature)
            candidates.divide(divisor)  # T > 0 keeps a sparse batch's order

    def sparse_tail(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch,
                    tail: TailBound) -> bool:
        """The tail's max bound is divided by T with the same float32 division as the logits
        and its mass bounds follow (`TailBound.scale`); greedy rows keep their tail as is."""
        temperature = args["temperature"]
        tail.scale(temperature, (temperature != 1.0) & (temperature >= GREEDY_TEMPERATURE))
        return True
