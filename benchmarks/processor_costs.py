"""Cost of each processor and selector on 64 x 128256 fp32 logits, relative to one torch.amax.

Every stage runs alone on a dense batch (the worst case: a stage after a top-k runs on the
survivors only) with its parameters from sampler_service/policy/examples.py, over Zipf-shaped logits (see
common.zipf_logits) and sequences with a 256-token history (128 prompt + 128 output ids), so
that history-reading stages have work. Printed: median time of the stage alone (each run gets
a fresh copy of the logits, made outside the timing) and the ratio to amax.

    python benchmarks/processor_costs.py [--rows 64] [--vocab 128256] [--threads 2]
"""
from __future__ import annotations

import argparse

import torch

from common import median_ms, print_table, zipf_logits
from sampler_service.engine import Engine
from sampler_service.policy.statistics import raw_statistics
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.examples import STAGE_EXAMPLES
from sampler_service.policy.processors import PROCESSORS
from sampler_service.policy.processors.base import RowBatch, RowInputs, Selector
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.policy.selectors import SELECTORS
from sampler_service.policy.spec import parse_policy, resolve
from sampler_service.state import SequenceState

def states_for(spec: dict, rows: int, vocab: int) -> list[SequenceState]:
    policy = resolve(parse_policy("bench", spec), PolicyVersion(1, "bench"), {})
    generator = torch.Generator().manual_seed(1)
    history = torch.randint(0, vocab, (rows, 256), generator=generator).tolist()
    return [SequenceState(f"s{i}", policy, tuple(h[:128]), seed=i, eos_token_ids=frozenset({2}),
                          output_ids=list(h[128:])) for i, h in enumerate(history)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    engine = Engine(device)
    logits = zipf_logits(args.rows, args.vocab)
    # What the engine hands every stage: raw rows with their statistics (computed once per
    # step, timed on their own below) and, for kl_temperature, reference logits.
    inputs = RowInputs(logits, raw_statistics(logits), reference=logits.roll(1, dims=1))
    amax = median_ms(lambda: logits.amax(dim=1))
    rows = [("torch.amax", amax, "1.0x"),
            ("raw entropy + varentropy (every step)", median_ms(lambda: raw_statistics(logits)), "")]
    rows[1] = (rows[1][0], rows[1][1], f"{rows[1][1] / amax:.1f}x")
    for key in sorted(PROCESSORS):
        states = states_for({"chain": [{key: STAGE_EXAMPLES[key]}], "select": "greedy"},
                            args.rows, args.vocab)
        link = states[0].policy.links[0]
        stage_args = engine._stage_args(link.stage, [s.policy.links[0] for s in states])
        ms = median_ms(lambda c, b: link.stage.apply(c, stage_args, b),
                       setup=lambda: (Candidates(logits.clone()),
                                      RowBatch(states, device, inputs)))
        rows.append((f"processor {key}", ms, f"{ms / amax:.1f}x"))
    for key in sorted(k for k, cls in SELECTORS.items() if issubclass(cls, Selector)):
        states = states_for({"select": {key: STAGE_EXAMPLES[key]}}, args.rows, args.vocab)
        link = states[0].policy.selector
        stage_args = engine._stage_args(link.stage, [s.policy.selector for s in states])
        ms = median_ms(lambda c, b: link.stage.select(c, stage_args, b),
                       setup=lambda: (Candidates(logits.clone()),
                                      RowBatch(states, device, inputs)))
        rows.append((f"selector {key} (dense)", ms, f"{ms / amax:.1f}x"))
    print_table(f"{args.rows} x {args.vocab} fp32, {args.threads} threads; ratio to one torch.amax",
                rows)


if __name__ == "__main__":
    main()
