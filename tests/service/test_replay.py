"""Crash replay through the real service: the service runs as a child process, is SIGKILLed in
the middle of seeded generations and started again on the same port, and the SDK's replay
gives exactly the choices (and sequence infos) of an uninterrupted run: sync and asyncio
clients, unary steps and streams, plain sequences and groups (beam search, forks, CoT)."""
from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from typing import Any, Callable

import pytest
import torch

from sampler_client import AsyncSamplerClient, NotFoundError, SamplerClient, UnavailableError, specs

VOCAB = 128
STEPS = 12
GENERATIONS = 20
#: Far below the default: a service that does not come back fails the test in seconds.
REPLAY_TIMEOUT_S = 30.0

#: A mix of policies: flat parameters, a mirostat spec (memory a record carries), penalties
#: (counts rebuilt from the tokens), named and adaptive policies, max_tokens and an EOS id.
KINDS = [
    dict(params={"temperature": 0.9}),
    dict(params={"temperature": 0.7, "top_p": 0.9, "top_k": 40}),
    dict(policy={"chain": [], "select": {"mirostat": {"tau": 3.0}}, "overridable": ["seed"]}),
    dict(params={"repetition_penalty": 1.3, "frequency_penalty": 0.4, "presence_penalty": 0.2,
                 "temperature": 1.1, "max_tokens": 9}),
    dict(policy="edt"),
]


class ServiceProcess:
    """`python -m sampler_service serve [flags]` as a child process on one port: `kill`
    SIGKILLs it, `start` starts it again on that port without waiting (replay waits for it)."""

    def __init__(self, *flags: str) -> None:
        self.flags = flags
        self.process = self._spawn(0)
        self.port = int(re.search(r"listening on \S+:(\d+)", self.listening()).group(1))
        self.address = f"127.0.0.1:{self.port}"

    def _spawn(self, port: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "sampler_service", "serve", "--port",
                                 str(port), "--device", "cpu", *self.flags],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def listening(self) -> str:
        """Waits for the service to listen (its first line)."""
        line = self.process.stdout.readline()
        assert "listening on" in line, f"the service did not start: {line!r}"
        return line

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process.stdout.close()

    def start(self) -> None:
        self.process = self._spawn(self.port)

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture(scope="module")
def service():
    process = ServiceProcess()
    yield process
    process.kill()


def logits(generation: int, step: int, rows: int = 1) -> torch.Tensor:
    """Deterministic logits of one generation at one step, [rows, VOCAB]."""
    generator = torch.Generator().manual_seed(1000 * generation + step)
    return torch.randn(rows, VOCAB, generator=generator) * 3


def generation_configs() -> list[dict[str, Any]]:
    return [dict(KINDS[g % len(KINDS)], seed=100 + g, prompt_ids=[g + 1, g + 2, 3],
                 eos_token_ids=[0], sequence_id=f"gen{g}") for g in range(GENERATIONS)]


def unfinished(half: list, choices: dict[str, list], step: int):
    """The sequences of `half` not finished yet, and their logits [len, vocab] at `step`."""
    live = [s for s in half if not (choices[s.sequence_id] and
                                    choices[s.sequence_id][-1].finished)]
    return live, torch.cat([logits(int(s.sequence_id[3:]), step) for s in live])


def plain_run(client: SamplerClient, before_step: Callable[[int], None]):
    """The 20 generations, half by unary steps and half on a StepStream; `before_step(i)` runs
    before step i. Returns the choices of each generation and the infos at the end."""
    sequences = client.create_sequences(generation_configs())
    choices: dict[str, list] = {s.sequence_id: [] for s in sequences}
    with client.stream() as stream:
        for step in range(STEPS):
            before_step(step)
            for stepper, half in ((client, sequences[:10]), (stream, sequences[10:])):
                live, rows = unfinished(half, choices, step)
                for choice in stepper.step(live, rows):
                    choices[choice.sequence_id].append(choice)
    infos = [s.info() for s in sequences]
    assert client.release(sequences) == []
    return choices, infos


async def plain_run_async(client: AsyncSamplerClient, before_step: Callable[[int], None]):
    """`plain_run` on the asyncio client."""
    sequences = await client.create_sequences(generation_configs())
    choices: dict[str, list] = {s.sequence_id: [] for s in sequences}
    async with client.stream() as stream:
        for step in range(STEPS):
            before_step(step)
            for stepper, half in ((client, sequences[:10]), (stream, sequences[10:])):
                live, rows = unfinished(half, choices, step)
                for choice in await stepper.step(live, rows):
                    choices[choice.sequence_id].append(choice)
    infos = [await s.info() for s in sequences]
    assert await client.release(sequences) == []
    return choices, infos


def kill_before(service: ServiceProcess, at: int) -> Callable[[int], None]:
    return lambda step: service.restart() if step == at else None


def no_kill(step: int) -> None:
    pass


def replayed(caplog) -> bool:
    """Whether the client logged a replay (the kill did interrupt the run)."""
    return any(r.name == "sampler_client.replay" and "replaying" in r.getMessage()
               for r in caplog.records)


def test_sync_replay_gives_the_uninterrupted_choices(service, caplog):
    """Here the service is back before the next step: the unary one finds its shared-memory
    region and its sequences gone (NOT_FOUND), the stream its call broken."""
    with SamplerClient(service.address, transport="shm",
                       replay_timeout=REPLAY_TIMEOUT_S) as client:
        def restart_and_wait(step: int) -> None:
            if step == 5:
                service.restart()
                service.listening()
                client.wait_ready()

        expected = plain_run(client, no_kill)
        got = plain_run(client, restart_and_wait)
    assert replayed(caplog)
    assert "no region named" in caplog.text
    assert any(c[-1].finished for c in expected[0].values())  # some ended before the others
    assert got == expected


def test_async_replay_gives_the_uninterrupted_choices(service, caplog):
    async def both():
        async with AsyncSamplerClient(service.address, transport="inline",
                                      replay_timeout=REPLAY_TIMEOUT_S) as client:
            return (await plain_run_async(client, no_kill),
                    await plain_run_async(client, kill_before(service, 7)))

    expected, got = asyncio.run(both())
    assert replayed(caplog)
    assert got == expected


def group_configs() -> list[dict[str, Any]]:
    return [specs.beam_group_config([5, 6, 7], 3, max_new_tokens=10, sequence_id="beam",
                                    eos_token_ids=[0], num_return_sequences=2),
            specs.fork_config([5, 6], 3, seed=11, sequence_id="forks",
                              params={"temperature": 0.9, "max_tokens": 10}),
            specs.cot_group_config([5], 3, max_new_tokens=10, sequence_id="cot")]


def group_rows(groups, step: int) -> torch.Tensor:
    return torch.cat([logits(g, step, group.running_rows) for g, group in enumerate(groups)])


def check_groups(expected, got, caplog) -> None:
    assert replayed(caplog)
    assert got == expected
    results = expected[1]
    assert [len(r.hypotheses) for r in results] == [2, 3, 3]


def test_sync_replay_of_groups(service, caplog):
    def run(client, before_step):
        groups = client.create_sequences(group_configs())
        steps = []
        for step in range(10):
            before_step(step)
            running = [g for g in groups if g.result is None]
            if not running:
                break
            steps.append(client.step(running, group_rows(running, step)))
        assert client.release(groups) == []
        return steps, [g.result for g in groups]

    with SamplerClient(service.address, replay_timeout=REPLAY_TIMEOUT_S) as client:
        check_groups(run(client, no_kill), run(client, kill_before(service, 4)), caplog)


def test_async_replay_of_groups_on_a_stream(service, caplog):
    async def run(client, before_step):
        groups = await client.create_sequences(group_configs())
        steps = []
        async with client.stream() as stream:
            for step in range(10):
                before_step(step)
                running = [g for g in groups if g.result is None]
                if not running:
                    break
                steps.append(await stream.step(running, group_rows(running, step)))
        assert await client.release(groups) == []
        return steps, [g.result for g in groups]

    async def both():
        async with AsyncSamplerClient(service.address, replay_timeout=REPLAY_TIMEOUT_S) as client:
            return await run(client, no_kill), await run(client, kill_before(service, 6))

    check_groups(*asyncio.run(both()), caplog)


def test_a_service_that_restores_its_sequences_is_only_waited_for(tmp_path, caplog):
    """With --state-dir the restarted service has every sequence where it stood: replay
    waits, finds them there and sends the step again."""
    service = ServiceProcess("--state-dir", str(tmp_path / "state"))
    try:
        with SamplerClient(service.address, replay_timeout=REPLAY_TIMEOUT_S) as client:
            expected = plain_run(client, no_kill)
            got = plain_run(client, kill_before(service, 3))
    finally:
        service.kill()
    assert replayed(caplog)
    assert got == expected


def test_without_replay_the_failures_reach_the_caller(service):
    with SamplerClient(service.address, replay=False) as client:
        sequence = client.create_sequence(params={"temperature": 0.9}, seed=1)
        sequence.step(logits(0, 0))
        service.kill()
        with pytest.raises(UnavailableError):
            sequence.step(logits(0, 1))
        service.start()
        client.wait_ready()
        with pytest.raises(NotFoundError):
            sequence.step(logits(0, 1))
        assert client.release([sequence]) == [sequence.sequence_id]
