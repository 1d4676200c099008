"""`serve --state-dir`: the service as a user runs it (a subprocess) is killed (SIGKILL) or
stopped (SIGTERM) in the middle of 20 seeded generations and a beam group, with a step in
flight, and restarted on the same address with the same directory. A client that does not
replay sends the step it was sending again, then steps on with the same step numbers: every
answer, and every sequence's final state, equals an uninterrupted run's; a sequence released
before the restart stays released. Raw gRPC stubs: no SDK involved."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_proto.sampler.v1 import sampler_pb2_grpc as rpc
from sampler_service.server.convert import dict_to_struct

VOCAB = 1000
STEPS = 10
#: The step in flight when the service is stopped, sent again after the restart.
STOP_AT = 5
#: Released after step 2: NOT_FOUND after the restart too.
RELEASED = "gen-19"
PLAIN = [pb.SequenceConfig(
    sequence_id=f"gen-{i}", prompt_ids=[1, 2, 3 + i], eos_token_ids=[0],
    params=pb.SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.2, seed=100 + i,
                             max_tokens=6 + i % 5))
    for i in range(20)]
BEAM = pb.SequenceConfig(sequence_id="beam", prompt_ids=[4, 5], eos_token_ids=[0], policy_spec=
                         dict_to_struct({"chain": [], "select": {"beam": {"width": 3}},
                                         "defaults": {"max_tokens": 8, "seed": 1}}))


def logits(sequence: int, step: int, rows: int = 1) -> pb.Tensor:
    """Random logits of one sequence's step (EOS, id 0, a close second at step 3)."""
    values = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(
        1000 * sequence + step)) * 3
    if step == 3:
        values[:, 0] = values.amax(dim=1) - 0.5
    return pb.Tensor(dtype=pb.FP32, shape=[rows, VOCAB], raw=values.numpy().tobytes())


class Generations:
    """The client: which sequences still run and how many rows the beam sends, the requests of
    each step (explicit step numbers), and what the answers said."""

    def __init__(self):
        self.running = [config.sequence_id for config in PLAIN]
        self.beam_rows = 3
        self.answers: list[list[tuple]] = []

    def requests(self, step: int) -> list[pb.StepRequest]:
        plain = [pb.StepRequest(rows=[pb.StepRow(sequence_id=sid, step=step)],
                                logits=logits(int(sid.split("-")[1]), step))
                 for sid in self.running]
        beam = [pb.StepRequest(rows=[pb.StepRow(sequence_id="beam", step=step)] * self.beam_rows,
                               logits=logits(99, step, self.beam_rows))] if self.beam_rows else []
        return plain + beam

    def take(self, responses: list[pb.StepResponse]) -> None:
        choices = [c for r in responses for c in r.choices]
        self.answers.append([(c.sequence_id, c.parent_row, c.token_id, c.logprob, c.score,
                              c.finished) for c in choices])
        self.running = [c.sequence_id for c in choices
                        if c.sequence_id != "beam" and not c.finished]
        self.beam_rows = sum(1 for c in choices if c.sequence_id == "beam" and not c.finished)


def run(stub: rpc.SamplerStub, restart=None) -> tuple[Generations, list[pb.SequenceInfo]]:
    """The generations through `stub`; at STOP_AT `restart(requests)` gets the step's
    requests, sends them without waiting, stops and restarts the service, and returns the new
    stub; the requests are sent again."""
    stub.CreateSequences(pb.CreateSequencesRequest(sequences=PLAIN + [BEAM]))
    client = Generations()
    for step in range(STEPS):
        if step == 2:
            stub.ReleaseSequences(pb.ReleaseSequencesRequest(sequence_ids=[RELEASED]))
            client.running.remove(RELEASED)
        requests = client.requests(step)
        if step == STOP_AT and restart is not None:
            stub = restart(requests)
        client.take([stub.Step(request, timeout=30) for request in requests])
    with pytest.raises(grpc.RpcError) as gone:
        stub.GetSequence(pb.GetSequenceRequest(sequence_id=RELEASED))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    infos = [stub.GetSequence(pb.GetSequenceRequest(sequence_id=config.sequence_id))
             for config in PLAIN + [BEAM] if config.sequence_id != RELEASED]
    return client, infos


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Service:
    """`sampler-service serve --state-dir` on a fixed port, its log in a file."""

    def __init__(self, port: int, state_dir: Path, log: Path):
        self.log = log
        with open(log, "a") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sampler_service", "serve", "--port", str(port),
                 "--device", "cpu", "--state-dir", str(state_dir)],
                stdout=subprocess.PIPE, stderr=stderr, text=True)
        line = self.process.stdout.readline()
        assert re.search(r"listening on 127.0.0.1:%d" % port, line), (line, log.read_text())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = rpc.SamplerStub(self.channel)

    def stop(self, how: signal.Signals) -> None:
        self.process.send_signal(how)
        code = self.process.wait(timeout=30)
        assert code == (0 if how == signal.SIGTERM else -signal.SIGKILL), self.log.read_text()
        self.channel.close()
        self.process.stdout.close()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_restarted_service_continues_every_generation_exactly(server, tmp_path, how):
    expected, expected_infos = run(rpc.SamplerStub(grpc.insecure_channel(server.address)))
    port, state_dir, log = free_port(), tmp_path / "state", tmp_path / "service.log"
    services = [Service(port, state_dir, log)]

    def restart(requests: list[pb.StepRequest]) -> rpc.SamplerStub:
        # In flight: committed or not when the signal lands; the first surely committed, its
        # answer lost (a retry after the restart gets it again).
        futures = [services[-1].stub.Step.future(request) for request in requests]
        futures[0].result()
        services[-1].stop(how)
        services.append(Service(port, state_dir, log))
        return services[-1].stub

    try:
        got, infos = run(services[0].stub, restart)
        assert got.answers == expected.answers
        assert infos == expected_infos
        assert "restored 20 of 20 sequences" in log.read_text()
        services[-1].stop(signal.SIGTERM)
        assert sorted(p.name for p in state_dir.iterdir()) == ["lock", "snapshot"]
    finally:
        for service in services:
            service.process.kill()
            service.process.wait()


def test_a_tokenizer_registered_over_rpc_survives_a_restart(start_server, tmp_path, caplog):
    """A sequence with stop strings on an RPC-registered vocabulary comes back with it (the
    name too), and finds a stop string spanning the restart; a corrupt tokenizer file is
    skipped with a log line, and so is the sequence that named it."""
    from sampler_client import SamplerClient
    from sampler_client.vocabulary import Vocabulary
    from sampler_service.state.snapshot import TOKENIZERS_NAME
    pieces = [b"", b"Hel", b"lo", b" wor", b"ld", b"!"]
    toy, other = (Vocabulary(tuple(pieces), frozenset({0}), (0,)),
                  Vocabulary(tuple(pieces[:5]), frozenset({0}), (0,)))

    def forcing(token: int, width: int) -> torch.Tensor:
        row = torch.zeros(width)
        row[token] = 10.0
        return row

    first = start_server(state_dir=tmp_path)
    with SamplerClient(first.address) as client:
        toy_id = client.register_tokenizer(toy, name="toy")
        other_id = client.register_tokenizer(other, name="other")
        seq = client.create_sequence("greedy", tokenizer="toy", params={"stop": ["o wo"]},
                                     sequence_id="t")
        doomed = client.create_sequence("greedy", tokenizer="other", sequence_id="doomed")
        assert seq.step(forcing(1, 6)).token_id == 1 and seq.step(forcing(2, 6)).token_id == 2
        doomed.step(forcing(1, 5))
    first.stop(0)
    files = sorted(p.name for p in (tmp_path / TOKENIZERS_NAME).iterdir())
    assert files == sorted(i.replace(":", "-") for i in (toy_id, other_id))
    (tmp_path / TOKENIZERS_NAME / other_id.replace(":", "-")).write_bytes(b"garbage")
    again = start_server(state_dir=tmp_path)
    with SamplerClient(again.address) as client:
        info = client.get_sequence("t")
        assert (info.text, info.tokenizer_id) == ("Hello", toy_id)
        choice = client.step([seq], forcing(3, 6))[0]  # " wor": "o wo" spans the restart
        assert choice.finished and choice.stop_string == "o wo"
        assert client.create_sequence("greedy", tokenizer="toy").sequence_id  # the name too
        with pytest.raises(Exception, match="doomed"):
            client.get_sequence("doomed")
    assert "tokenizer" in caplog.text and "not restored" in caplog.text
