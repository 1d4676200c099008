"""One engine step per sampling configuration, against llama.cpp's sampler chain, Hugging
Face's processors and two floors, on the same tensors in the same run.

For each configuration, batch size B and vocabulary V: Zipf-shaped float32 logits
(common.zipf_logits) and a 64-token history per row; the median wall time of
- ours: `SamplerCore.step` (validation, raw log-normaliser / entropy / varentropy / chosen
  logprob, the chain, the selector) with the configuration as an inline policy;
- llama.cpp: its sampler chain with the same samplers through llama-cpp-python's C API, one
  chain per sequence, run one row after another as llama.cpp's server does; each row's
  `llama_token_data` array is refilled from the logits first, as `llama_sampler_sample` does
  (optional: llama-cpp-python is built from source, `pip install llama-cpp-python diskcache`;
  skipped with a message when absent);
- Hugging Face: `LogitsProcessorList` + softmax + multinomial, where it has the samplers;
- floors: one `torch.amax` pass and one `torch.softmax` pass over the batch.

    python benchmarks/engine_vs_peers.py [--rows 1 8 64] [--vocab 32000 128256] [--threads 2]
                                         [--configs greedy top_p ...] [--markdown FILE]
"""
from __future__ import annotations

import os

# As `sampler-service serve` runs: torch's OpenMP threads sleep when idle instead of spinning
# on the cores the engine's kernels (and, in a pod, the model worker) need next.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import ctypes
import platform
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from common import median_ms, zipf_logits
from sampler_service.engine import Engine
from sampler_service.policy.registry import PolicyRegistry
from sampler_service.service import SamplerCore, SequenceRequest, StepRow
from sampler_service.state import SequenceStore

HISTORY = 64


@dataclass(frozen=True)
class Config:
    """One sampling configuration as each implementation spells it. `ours`: the keyword
    arguments of a SequenceRequest; `llama`: (sampler name, arguments) in chain order;
    `hf`: (processor name, arguments) in order, None when Hugging Face lacks a sampler."""

    name: str
    ours: dict[str, Any]
    llama: tuple[tuple[str, tuple], ...]
    hf: tuple[tuple[str, tuple], ...] | None = None
    greedy: bool = False
    penalties: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _inline(*chain: dict, select: str = "sample") -> dict[str, Any]:
    return {"policy_spec": {"chain": list(chain), "select": select}}


T = {"temperature": {"temperature": 0.8}}
CONFIGS = (
    Config("greedy", _inline(select="greedy"), (("greedy", ()),), greedy=True),
    Config("temperature 0.8", _inline(T), (("temp", (0.8,)),), (("Temperature", (0.8,)),)),
    Config("top-k 40, T 0.8", _inline({"top_k": {"k": 40}}, T),
           (("top_k", (40,)), ("temp", (0.8,))), (("TopK", (40,)), ("Temperature", (0.8,)))),
    Config("top-p 0.95, T 0.8", _inline(T, {"top_p": {"p": 0.95}}),
           (("temp", (0.8,)), ("top_p", (0.95, 1))), (("Temperature", (0.8,)), ("TopP", (0.95,)))),
    Config("min-p 0.05, T 0.8", _inline(T, {"min_p": {"p": 0.05}}),
           (("temp", (0.8,)), ("min_p", (0.05, 1))), (("Temperature", (0.8,)), ("MinP", (0.05,)))),
    Config("typical 0.95, T 0.8", _inline(T, {"typical_p": {"p": 0.95}}),
           (("temp", (0.8,)), ("typical", (0.95, 1))),
           (("Temperature", (0.8,)), ("Typical", (0.95,)))),
    Config("top-nσ 1.0, T 0.8", _inline(T, {"top_n_sigma": {"n": 1.0}}),
           (("temp", (0.8,)), ("top_n_sigma", (1.0,)))),
    Config("temp_ext (dynatemp policy)", {"policy": "dynatemp"},
           (("top_k", (40,)), ("top_p", (0.95, 1)), ("min_p", (0.05, 1)),
            ("temp_ext", (0.8, 0.5, 1.0)))),
    Config("flat vLLM params", {"params": {"repetition_penalty": 1.1, "temperature": 0.8,
                                           "min_p": 0.05, "top_k": 50, "top_p": 0.95}},
           (("penalties", (HISTORY, 1.1, 0.0, 0.0)), ("temp", (0.8,)), ("min_p", (0.05, 1)),
            ("top_k", (50,)), ("top_p", (0.95, 1))),
           (("RepetitionPenalty", (1.1,)), ("Temperature", (0.8,)), ("MinP", (0.05,)),
            ("TopK", (50,)), ("TopP", (0.95,))), penalties=True),
    Config("shipped creative", {"policy": "creative"},
           (("penalties", (HISTORY, 1.1, 0.0, 0.0)), ("temp", (0.8,)), ("top_k", (40,)),
            ("top_p", (0.95, 1)), ("min_p", (0.05, 1))),
           (("RepetitionPenalty", (1.1,)), ("Temperature", (0.8,)), ("TopK", (40,)),
            ("TopP", (0.95,)), ("MinP", (0.05,))), penalties=True),
)


class Ours:
    """The engine in process, one set of sequences per configuration."""

    def __init__(self) -> None:
        self.core = SamplerCore(PolicyRegistry.from_files(), SequenceStore(),
                                Engine(torch.device("cpu")))
        self.made = 0

    def step_fn(self, config: Config, logits: torch.Tensor,
                history: torch.Tensor) -> Callable[[], object]:
        requests = []
        for row in range(logits.shape[0]):
            self.made += 1
            ours = dict(config.ours)
            if "policy_spec" in ours:
                ours["policy_spec"] = {**ours["policy_spec"], "defaults": {"seed": row}}
            else:
                ours["params"] = {**ours.get("params", {}), "seed": row}
            requests.append(SequenceRequest(f"s{self.made}", prompt_ids=tuple(history[row].tolist()),
                                            **ours))
        rows = [StepRow(s.sequence_id) for s in self.core.create_sequences(requests)]
        return lambda: self.core.step(rows, logits)


class LlamaCpp:
    """llama.cpp's sampler chain through llama-cpp-python's C API (None when absent)."""

    def __init__(self, api: Any):
        self.api = api
        api.llama_backend_init()

    @classmethod
    def load(cls) -> "LlamaCpp | None":
        try:
            import llama_cpp.llama_cpp as api
        except ImportError as exc:
            print(f"llama.cpp column skipped: llama-cpp-python is not importable ({exc}); "
                  "pip install llama-cpp-python diskcache (builds llama.cpp from source)")
            return None
        return cls(api)

    def _chain(self, config: Config, vocab: int, history: list[int], seed: int):
        api = self.api
        chain = api.llama_sampler_chain_init(api.llama_sampler_chain_default_params())
        for name, arguments in config.llama:
            if name == "penalties":  # this build's signature starts with n_vocab
                arguments = (vocab, *arguments)
            api.llama_sampler_chain_add(chain, getattr(api, f"llama_sampler_init_{name}")(*arguments))
        if not config.greedy:
            api.llama_sampler_chain_add(chain, api.llama_sampler_init_dist(seed))
        if config.penalties:
            for token in history:
                api.llama_sampler_accept(chain, token)
        return chain

    def step_fn(self, config: Config, logits: torch.Tensor,
                history: torch.Tensor) -> Callable[[], object]:
        api = self.api
        rows, vocab = logits.shape
        chains = [self._chain(config, vocab, history[r].tolist(), r) for r in range(rows)]
        dtype = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        ids = np.arange(vocab, dtype=np.int32)
        row = np.zeros(vocab, dtype=dtype)  # one cache-resident candidate array, as llama.cpp reuses
        source = logits.numpy()
        pointer = ctypes.POINTER(api.llama_token_data)

        def step() -> list[int]:
            chosen = []
            for r, chain in enumerate(chains):
                # What llama_sampler_sample does first: the row's candidates from its logits.
                row["id"] = ids
                row["logit"] = source[r]
                array = api.llama_token_data_array(row.ctypes.data_as(pointer), vocab, -1, False)
                api.llama_sampler_apply(chain, ctypes.byref(array))
                chosen.append(int(row["id"][array.selected]))
            return chosen
        return step


def hf_step_fn(config: Config, logits: torch.Tensor,
               history: torch.Tensor) -> Callable[[], object] | None:
    if config.hf is None:
        return None
    import transformers
    processors = transformers.LogitsProcessorList([
        getattr(transformers, f"{name}LogitsWarper" if name != "RepetitionPenalty"
                else "RepetitionPenaltyLogitsProcessor")(*arguments)
        for name, arguments in config.hf])
    return lambda: torch.multinomial(torch.softmax(processors(history, logits.clone()), dim=-1), 1)


def run(rows: int, vocab: int, configs: list[Config], llama: LlamaCpp | None,
        repeats: int) -> list[tuple[str, float, float | None, float | None]]:
    logits = zipf_logits(rows, vocab)
    history = torch.randint(0, vocab, (rows, HISTORY), generator=torch.Generator().manual_seed(0))
    ours = Ours()
    results = []
    slow = max(1, repeats // 3)
    for config in configs:
        mine = median_ms(ours.step_fn(config, logits, history), repeats=repeats)
        theirs = (None if llama is None
                  else median_ms(llama.step_fn(config, logits, history), repeats=slow, warmup=1))
        hf = hf_step_fn(config, logits, history)
        hf_ms = None if hf is None else median_ms(hf, repeats=slow, warmup=1)
        results.append((config.name, mine, theirs, hf_ms))
    return results


def table(rows: int, vocab: int, threads: int, results, amax: float, softmax: float) -> str:
    def ms(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}"

    def ratio(other: float | None, mine: float) -> str:
        return "—" if other is None else f"{other / mine:.2f}×"

    lines = [f"### B = {rows}, V = {vocab}, {threads} threads",
             f"Floors: one amax pass {amax:.2f} ms, one softmax pass {softmax:.2f} ms.", "",
             "| configuration | ours ms | ours / amax | llama.cpp ms | ours vs llama.cpp "
             "| Hugging Face ms | ours vs HF |",
             "|---|---|---|---|---|---|---|"]
    for name, mine, llama, hf in results:
        lines.append(f"| {name} | {mine:.2f} | {mine / amax:.1f}× | {ms(llama)} | "
                     f"{ratio(llama, mine)} | {ms(hf)} | {ratio(hf, mine)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--configs", nargs="+", default=None,
                        help="configuration names (prefixes) to run; default all")
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = [c for c in CONFIGS
               if args.configs is None or any(c.name.startswith(p) for p in args.configs)]
    llama = LlamaCpp.load()
    sections = []
    for vocab in args.vocab:
        for rows in args.rows:
            logits = zipf_logits(rows, vocab)
            amax = median_ms(lambda: logits.amax(dim=1))
            softmax = median_ms(lambda: torch.softmax(logits, dim=1))
            results = run(rows, vocab, configs, llama, args.repeats)
            section = table(rows, vocab, args.threads, results, amax, softmax)
            print(section + "\n", flush=True)
            sections.append(section)
    if args.markdown:
        machine = (f"{platform.processor() or platform.machine()}, {args.threads} torch threads, "
                   f"torch {torch.__version__}, Python {platform.python_version()}")
        with open(args.markdown, "w") as out:
            out.write(MARKDOWN_HEAD.format(machine=machine) + "\n\n".join(sections) + "\n")


MARKDOWN_HEAD = """# Performance: one engine step against peers

Written by `make bench` (`benchmarks/engine_vs_peers.py --markdown docs/performance.md`); every
figure in a table comes from the same run, on the same Zipf-shaped float32 logits and 64-token
histories. "ours" is `SamplerCore.step` in process: validation, the raw statistics every choice
reports (log-normaliser, entropy, varentropy, chosen logprob), the chain and the selector.
llama.cpp is its sampler chain through llama-cpp-python's C API, one chain per sequence, rows
one after another, each row's candidate array refilled from the logits as
`llama_sampler_sample` does. Hugging Face is `LogitsProcessorList` + softmax + multinomial.
Ratios above 1× mean ours is faster. The process runs with `OMP_WAIT_POLICY=PASSIVE`, as
`sampler-service serve` does. Timings vary ±30% between runs on a shared machine.

Machine: {machine}.

"""


if __name__ == "__main__":
    main()
