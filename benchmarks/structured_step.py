"""What structured outputs cost: a step of 64 rows x 49152 fp32 logits (SmolLM2's vocabulary)
through the service with a JSON schema on every row, against the same flat parameters without
it (each step commits, so the matchers advance as in a real generation), and the compile time
of a typical schema, cold and cached.

    python benchmarks/structured_step.py [--rows 64] [--steps 12] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import zipf_logits
from sampler_service.engine import Engine
from sampler_service.policy.registry import PolicyRegistry
from sampler_service.service import SamplerCore, SequenceRequest, StepRow
from sampler_service.state import SequenceStore
from sampler_service.text import grammar

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string"},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "email": {"type": "string", "format": "email"},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}},
                         "address": {"type": "object",
                                     "properties": {"city": {"type": "string"},
                                                    "zip": {"type": "string",
                                                            "pattern": "[0-9]{5}"}},
                                     "required": ["city", "zip"]}},
          "required": ["name", "age", "address"]}


def vocabulary():
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from sampler_client.hf import smollm2_gguf_path
    from sampler_client.vocabulary import vocabulary_from_hf
    hf_logging.disable_progress_bar()
    path = smollm2_gguf_path()
    return vocabulary_from_hf(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                                            local_files_only=True))


def step_ms(vocab, rows: int, steps: int, structured: bool) -> float:
    core = SamplerCore(PolicyRegistry.from_files(), SequenceStore(), Engine(torch.device("cpu")))
    core.tokenizers.register(vocab, "smollm2")
    params = {"temperature": 0.7, "top_p": 0.95, "seed": 1}
    if structured:
        params["structured"] = {"json_schema": SCHEMA}
    ids = [f"s{i}" for i in range(rows)]
    core.create_sequences([SequenceRequest(sid, params=params, tokenizer="smollm2",
                                           eos_token_ids=vocab.eos_token_ids) for sid in ids])
    logits = zipf_logits(rows, vocab.size)
    samples = []
    for index in range(steps + 3):
        live = [sid for sid in ids if not core.store.get(sid).finished]
        batch = logits[:len(live)].clone()
        start = time.perf_counter()
        core.step([StepRow(sid) for sid in live], batch)
        if index >= 3:
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vocab = vocabulary()
    text = grammar.canonical_schema(SCHEMA, "json_schema")
    grammar.cache_clear()
    start = time.perf_counter()
    grammar.compiled(vocab, "json_schema", text)
    cold = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    grammar.compiled(vocab, "json_schema", text)
    cached = (time.perf_counter() - start) * 1e3
    grammar.cache_clear()
    grammar.compiled(vocab, "regex", "[a-z]+")  # the compiler for the vocabulary (once per model)
    start = time.perf_counter()
    grammar.compiled(vocab, "json_schema", text)
    warm_compiler = (time.perf_counter() - start) * 1e3
    plain = step_ms(vocab, args.rows, args.steps, structured=False)
    constrained = step_ms(vocab, args.rows, args.steps, structured=True)
    print(f"\nstructured outputs, {args.rows} x {vocab.size} fp32, {args.threads} threads "
          "(temperature 0.7, top_p 0.95; median step, committed)")
    print(f"  step without structured            {plain:9.2f} ms")
    print(f"  step with a JSON schema on each row {constrained:9.2f} ms  "
          f"(+{constrained - plain:.2f} ms)")
    print(f"  compile a typical schema, cold (incl. the vocabulary's compiler) {cold:9.2f} ms")
    print(f"  compile a typical schema, compiler ready                        "
          f"{warm_compiler:9.2f} ms")
    print(f"  compile a typical schema, cached                                {cached:9.3f} ms")


if __name__ == "__main__":
    main()
