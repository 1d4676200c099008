"""Helpers shared by the unit tests."""
from __future__ import annotations

import math

import torch

from sampler_client.vocabulary import Vocabulary
from sampler_service.engine import Engine
from sampler_service.groups.fork import ForkGroup
from sampler_service.policy.processors.base import GroupSelector, RowInputs
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.policy.sparse import SparseLogits
from sampler_service.policy.spec import parse_policy, resolve
from sampler_service.state import SequenceState

#: A toy tokenizer's token bytes: id 0 is EOS (special); 1 is another special token; the rest
#: are pieces of text (partial UTF-8 among them).
TOY_PIECES = [b"", b"", b"a", b"b", b"ab", b"ba", b"c", b"yes", b"no", b"ye", b"s", b"n", b"o",
              b"y", b"1", b"2", b"12", b"-", b"x", b"abc", b"\xc3", b"\xa9", "é".encode(), b"{",
              b"}", b'"', b":", b'{"', b'":']
TOY_VOCABULARY = Vocabulary(tuple(TOY_PIECES), frozenset({0, 1}), (0,))


def random_logits(seed: int, rows: int = 4, vocab: int = 1000, scale: float = 3.0) -> torch.Tensor:
    """[rows, vocab] normal logits without ties (so every peer orders them alike)."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale
    for row in logits:
        assert len(torch.unique(row)) == vocab
    return logits


def sparse_rows(logits: torch.Tensor, k: int):
    """The reference sparse form of dense rows [S, V]: each row's K best entries (best first)
    and its tail's statistics (max, log-sum-exp, mean and mean square under the tail's own
    softmax), summed in float64 as the worker's one pass does."""
    values, ids = torch.topk(logits, k, dim=1)
    rest = logits.scatter(1, ids, -math.inf)
    top = rest.amax(dim=1)
    shifted = (rest - top.unsqueeze(1)).double()
    weights = torch.exp(shifted)
    total = weights.sum(dim=1)
    shifted = shifted.nan_to_num(neginf=0.0)
    first = (weights * shifted).sum(dim=1) / total
    second = (weights * shifted * shifted).sum(dim=1) / total
    centre = top.double()
    empty = torch.isneginf(top)
    zero = torch.zeros_like(first)
    return SparseLogits(
        ids=ids, values=values, tail_max=top,
        tail_lse=torch.where(empty, torch.full_like(first, -math.inf), centre + torch.log(total)),
        tail_mean=torch.where(empty, zero, centre + first),
        tail_mean_square=torch.where(empty, zero, centre * centre + 2 * centre * first + second),
        vocab=logits.shape[1])


def entropy_varentropy(values: torch.Tensor) -> tuple[float, float]:
    """H and V (nats) of softmax(values) for one row [V] (−inf = outside the support),
    straightforwardly in float64."""
    log_p = torch.log_softmax(values.double(), dim=-1)
    kept = torch.isfinite(log_p)
    p, log_p = log_p[kept].exp(), log_p[kept]
    h = -(p * log_p).sum()
    return float(h), float((p * (log_p + h) ** 2).sum())


def make_group(spec: dict, prompt: tuple[int, ...] = (5, 6), eos: tuple[int, ...] = (0,),
               seed: int = 0, max_rows: int = 64):
    """The group (beam search, CoT decoding or forks) an inline policy spec makes."""
    policy = resolve(parse_policy("test", spec), PolicyVersion(1, "test"), {})
    root = SequenceState("g", policy, prompt, seed, frozenset(eos))
    selector = policy.selector
    if isinstance(selector.stage, GroupSelector):
        return selector.stage.new_group(root, selector.values, max_rows, "select", "params")
    return ForkGroup.create(root, max_rows, "params.")


def group_step(group, logits: torch.Tensor, processed_logprobs: bool = False):
    """One planned and committed step of `group` on `logits` [running rows, V] (CPU engine)."""
    planned = group.plan(Engine(torch.device("cpu")), RowInputs(logits.clone()),
                         processed_logprobs)
    return group.commit(planned)
