"""Forks: each fork's history of raw statistics, against a recomputation from the logits."""
from __future__ import annotations

import pytest

from tests.unit.helpers import entropy_varentropy, group_step, make_group, random_logits

VOCAB = 30
FORKS = 3


def test_each_fork_keeps_the_raw_statistics_of_each_of_its_tokens():
    """Every fork's first token comes from the prompt's one row; then fork i's tokens from its
    own row. A fork that stops (EOS) keeps its history in its hypothesis."""
    group = make_group({"chain": [{"temperature": {"temperature": 0.8}}], "select": "sample",
                        "defaults": {"n": FORKS, "max_tokens": 4, "seed": 3}}, eos=(0,))
    logits = random_logits(0, 1, VOCAB)
    logits[0, 0] = -30.0
    group_step(group, logits)
    histories = [[entropy_varentropy(logits[0])] for _ in range(FORKS)]
    live, step = list(range(FORKS)), 1
    while not group.finished:
        logits = random_logits(step, len(live), VOCAB)
        logits[:, 0] = -30.0
        if step == 1:
            logits[1, 0] = 30.0  # fork 1 stops here
        for row, fork in enumerate(live):
            histories[fork].append(entropy_varentropy(logits[row]))
        rows = group_step(group, logits).rows
        live = [fork for fork, row in zip(live, rows) if not row.finished]
        for hypothesis in group.running() + group.hypotheses():
            assert len(hypothesis.entropies) == len(hypothesis.token_ids)
            assert list(hypothesis.entropies) == pytest.approx(
                [h for h, _ in histories[hypothesis.branch]], rel=1e-5, abs=1e-6)
            assert list(hypothesis.varentropies) == pytest.approx(
                [v for _, v in histories[hypothesis.branch]], rel=1e-5, abs=1e-6)
        step += 1
    assert sorted(len(h.token_ids) for h in group.hypotheses()) == [2, 4, 4]
