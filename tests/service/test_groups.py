"""Groups through the real server and the SDK: beam search, diverse beam search, forks
(n / best_of) and CoT decoding, on small hand-made logits whose answers are worked out by hand
from the documented rules (Hugging Face's beam search, vLLM's seed + i and best_of, Wang &
Zhou's confidence Δ), and the bad inputs a group can get, each refused with its status and
field while the other sequences of the request stay where they were."""
from __future__ import annotations

import math

import pytest
import torch

from sampler_client import (FailedPreconditionError, InvalidArgumentError, NotFoundError,
                            SamplerClient)
from sampler_client import requests, specs

VOCAB = 12
EOS = 0
PROMPT = [3, 1, 4]


def dist(named: dict[int, float], vocab: int = VOCAB) -> torch.Tensor:
    """Logits (log-probabilities) giving each `named` token its probability; the rest of the
    mass is spread evenly over the other tokens (kept below every named probability)."""
    rest = (1.0 - sum(named.values())) / (vocab - len(named))
    probs = torch.full((vocab,), rest, dtype=torch.float64)
    for token, p in named.items():
        probs[token] = p
    return probs.log().float()


def rows(*named: dict[int, float]) -> torch.Tensor:
    """[len(named), VOCAB] logits, one `dist` per row."""
    return torch.stack([dist(n) for n in named])


def raw_step(client: SamplerClient, keys: list[tuple[str, int | None, int | None]],
             logits: torch.Tensor):
    """A Step with rows given as (sequence id, step, branch), bypassing the handles' bookkeeping."""
    return client._call(client._stub.Step, requests.step_request(keys, logits))


def tokens(choices) -> list[int]:
    return [c.token_id for c in choices]


def ids(hypotheses) -> list[list[int]]:
    return [h.token_ids for h in hypotheses]


@pytest.fixture
def bystander(client):
    """A plain sequence stepped once; each bad step request also carries its row (step 1), and
    the refused request must leave it untouched and still at step 1."""
    seq = client.create_sequence(policy="greedy", prompt_ids=PROMPT)
    seq.step(dist({5: 0.5}))
    before = seq.info()
    yield seq
    assert seq.info() == before
    assert seq.step(dist({6: 0.5})).step == 1


# -- beam search ---------------------------------------------------------------------------------
#
# The hand example: W = 2, EOS = 0, max_new_tokens = 3, length_penalty α (HF: score =
# sum_logprobs / L^α, L counting the EOS), early_stopping false.
#   step 0 (2 identical rows): p(1) = .5, p(2) = .3 -> beams [1] (log .5) and [2] (log .3).
#   step 1: beam [1]: p(EOS) = .6, p(3) = .3; beam [2]: p(4) = .9.
#     candidates: [1,EOS] .30 (a hit among the top W: finished, score log(.30) / 2^α),
#     [2,4] .27, [1,3] .15 -> running beams [2,4] (parent row 1), [1,3] (parent row 0).
#   step 2 (L = 3 = max_new_tokens, every candidate hits): beam [2,4]: p(5) = .7, p(EOS) = .2;
#     beam [1,3]: p(6) = .5, p(7) = .4 -> the top W candidates [2,4,5] .189 and [1,3,6] .075
#     compete with the finished [1,EOS] for the W slots.
BEAM_STEPS = [
    rows({1: 0.5, 2: 0.3}, {1: 0.5, 2: 0.3}),
    rows({EOS: 0.6, 3: 0.3}, {4: 0.9}),
    rows({5: 0.7, EOS: 0.2}, {6: 0.5, 7: 0.4}),
]


def hand_beam_group(client, **options):
    return client.create_beam_group(PROMPT, 2, max_new_tokens=3, eos_token_ids=[EOS], **options)


def test_beam_group_is_created_with_width_running_rows(client):
    group = hand_beam_group(client)
    assert (group.group_kind, group.running_rows) == ("beam", 2)
    info = group.info().group
    assert (info.kind, info.running_rows, info.hypotheses) == ("beam", 2, [])


def test_beam_first_step_continues_the_first_of_its_identical_rows(client):
    plain = client.create_sequence(policy="greedy")
    group = hand_beam_group(client)
    logits = torch.cat([dist({9: 0.9})[None], BEAM_STEPS[0]])
    plain_choice, *choices = client.step([plain, group], logits)
    assert plain_choice.token_id == 9
    assert tokens(choices) == [1, 2]
    assert [c.parent_row for c in choices] == [1, 1]  # request-wide: beam 0 is row 1
    assert [c.branch for c in choices] == [0, 1]
    assert [c.score for c in choices] == pytest.approx([math.log(0.5), math.log(0.3)], rel=1e-6)
    assert [c.logprob for c in choices] == pytest.approx([math.log(0.5), math.log(0.3)], rel=1e-6)


def test_beam_step_reorders_beams_and_keeps_the_early_eos(client):
    group = hand_beam_group(client)
    group.step(BEAM_STEPS[0])
    choices = group.step(BEAM_STEPS[1])
    assert tokens(choices) == [4, 3]
    assert [c.parent_row for c in choices] == [1, 0]
    assert [c.branch for c in choices] == [0, 1]
    assert [c.score for c in choices] == pytest.approx([math.log(0.27), math.log(0.15)], rel=1e-5)
    assert not any(c.finished for c in choices) and group.running_rows == 2
    info = group.info()
    assert not info.finished
    assert (info.group.kind, info.group.running_rows) == ("beam", 2)
    assert ids(info.group.running) == [[2, 4], [1, 3]]
    assert [h.score for h in info.group.running] == pytest.approx(
        [math.log(0.27), math.log(0.15)], rel=1e-5)
    [early] = info.group.hypotheses
    assert (early.token_ids, early.finish_reason) == ([1, EOS], "stop")
    assert early.score == pytest.approx(math.log(0.30) / 2, rel=1e-5)


@pytest.mark.parametrize("length_penalty, returned, expected", [
    (1.0, 2, [([2, 4, 5], math.log(0.189), 3, "length"), ([1, EOS], math.log(0.30), 2, "stop")]),
    (1.0, 1, [([2, 4, 5], math.log(0.189), 3, "length")]),
    (0.0, 2, [([1, EOS], math.log(0.30), 2, "stop"), ([2, 4, 5], math.log(0.189), 3, "length")]),
], ids=["alpha1-width-sequences", "alpha1-best-only", "alpha0-short-eos-wins"])
def test_beam_result_follows_hf_length_penalty(client, length_penalty, returned, expected):
    group = hand_beam_group(client, length_penalty=length_penalty, num_return_sequences=returned)
    for logits in BEAM_STEPS[:2]:
        group.step(logits)
    last = group.step(BEAM_STEPS[2])
    assert all(c.finished and c.finish_reason == "length" for c in last)
    assert group.running_rows == 0
    hypotheses = group.result.hypotheses
    assert ids(hypotheses) == [token_ids for token_ids, *_ in expected]
    assert [h.sum_logprobs for h in hypotheses] == pytest.approx([s for _, s, _, _ in expected], rel=1e-5)
    assert [h.score for h in hypotheses] == pytest.approx(
        [s / n ** length_penalty for _, s, n, _ in expected], rel=1e-5)
    assert [h.finish_reason for h in hypotheses] == [reason for *_, reason in expected]
    info = group.info()
    assert info.finished and info.group.running_rows == 0 and info.group.running == []
    assert info.group.hypotheses == hypotheses


def test_beam_retried_step_answers_again_without_advancing(client):
    group = hand_beam_group(client, num_return_sequences=2)
    group.step(BEAM_STEPS[0])
    first = group.step(BEAM_STEPS[1])
    before = group.info()
    group.next_step = 1
    again = group.step(BEAM_STEPS[1])
    assert again == first
    assert group.info() == before
    group.step(BEAM_STEPS[2])
    assert ids(group.result.hypotheses) == [[2, 4, 5], [1, EOS]]  # as without the retry


def test_beam_processed_logprobs_are_what_each_beam_score_added(client):
    """Without a chain a row's processed log-probabilities are log_softmax of its logits: here
    log p. Each beam reports its parent's value at its token (Hugging Face's `scores`); a
    running beam's score is its parent's plus that value, and a hypothesis' values along its
    parent links sum to its sum_logprobs. (At the last step every candidate hits max_tokens,
    so the rows answered are among equal scores of −1e9, as in HF.)"""
    group = hand_beam_group(client, num_return_sequences=2)
    paths = [((), 0.0)] * 2  # per running row: its tokens and the sum of its processed logprobs
    for step, logits in enumerate(BEAM_STEPS):
        choices = group.step(logits, processed_logprobs=True)
        assert [c.processed_logprob for c in choices] == pytest.approx(
            [float(logits[c.parent_row, c.token_id]) for c in choices], rel=1e-5)
        if step < 2:
            assert [c.processed_logprob for c in choices] == pytest.approx(
                [[math.log(0.5), math.log(0.3)], [math.log(0.9), math.log(0.3)]][step], rel=1e-5)
            assert [c.score for c in choices] == pytest.approx(
                [paths[c.parent_row][1] + c.processed_logprob for c in choices], rel=1e-6)
            paths = [(paths[c.parent_row][0] + (c.token_id,),
                      paths[c.parent_row][1] + c.processed_logprob) for c in choices]
    best = group.result.hypotheses[0]
    assert best.token_ids == [2, 4, 5] and paths[0][0] == (2, 4)
    assert best.sum_logprobs == pytest.approx(paths[0][1] + float(BEAM_STEPS[2][0, 5]), rel=1e-6)


def test_group_steps_report_processed_logprobs_only_when_asked(client):
    beam = hand_beam_group(client).step(BEAM_STEPS[0])
    _, cot = run_cot(client)
    for c in beam + [c for choices in cot for c in choices]:
        assert (c.processed_logprob, c.processed_top_logprobs, c.processed_entropy) == (
            None, [], None)


class Paths:
    """Each row of a group followed through the choices' parent rows: its tokens and the stats
    the choices reported for them (`running` in the order of the next step's rows)."""

    def __init__(self, rows: int):
        self.running: list[tuple[tuple[int, ...], tuple[tuple[float, float], ...]]] = \
            [((), ())] * rows
        self.finished: list[tuple[tuple[int, ...], tuple[tuple[float, float], ...]]] = []
        #: Every path a choice made, and the stats of each row a choice continued (by tokens).
        self.made: dict[tuple[int, ...], tuple[tuple[float, float], ...]] = {}
        self.continued: dict[tuple[int, ...], tuple[float, float]] = {}

    def take(self, choices) -> None:
        rows, self.running = self.running, []
        for c in choices:
            tokens, stats = rows[c.parent_row]
            path = (tokens + (c.token_id,), stats + ((c.entropy, c.varentropy),))
            self.continued[tokens] = (c.entropy, c.varentropy)
            self.made[path[0]] = path[1]
            (self.finished if c.finished else self.running).append(path)

    def beam_stats(self, hypothesis) -> tuple[tuple[float, float], ...]:
        """A beam hypothesis' stats: a path a choice made, or one that finished from a row
        (its stats, then the ones that step's choices continuing the row reported)."""
        ids = tuple(hypothesis.token_ids)
        if ids in self.made:
            return self.made[ids]
        return self.made.get(ids[:-1], ()) + (self.continued[ids[:-1]],)


def stats_of(hypothesis) -> tuple[tuple[float, float], ...]:
    assert len(hypothesis.entropies) == len(hypothesis.varentropies) == len(hypothesis.token_ids)
    return tuple(zip(hypothesis.entropies, hypothesis.varentropies))


def test_get_sequence_gives_each_beam_and_hypothesis_its_history(client):
    group = hand_beam_group(client, num_return_sequences=2)
    paths = Paths(2)
    for logits in BEAM_STEPS:
        paths.take(group.step(logits))
        info = group.info()
        assert info.output_ids == [] and info.entropies == []
        assert [(h.token_ids, stats_of(h)) for h in info.group.running] == [
            (list(tokens), stats) for tokens, stats in paths.running]
        for hypothesis in info.group.hypotheses:
            assert stats_of(hypothesis) == paths.beam_stats(hypothesis)
    early = group.info().group.hypotheses[1]
    assert early.token_ids == [1, EOS]  # finished at step 1; no choice of step 2 continued it
    assert group.result.hypotheses == group.info().group.hypotheses


def test_get_sequence_gives_each_fork_its_history(client):
    group = client.create_forks(PROMPT, FORKS, seed=SEED, eos_token_ids=[EOS], params={
        **FORK_PARAMS, "max_tokens": 4})
    paths = Paths(1)
    for t, logits in enumerate(fork_logits(4)):
        logits[:, EOS] = -100.0
        if t == 1:
            logits[2, EOS] = 100.0  # fork 2 stops at its second token
        paths.take(group.step(logits[:group.running_rows]))
        info = group.info().group
        assert [(h.token_ids, stats_of(h)) for h in info.running] == [
            (list(tokens), stats) for tokens, stats in paths.running]
        assert sorted((h.token_ids, stats_of(h)) for h in info.hypotheses) == sorted(
            (list(tokens), stats) for tokens, stats in paths.finished)
    assert sorted(len(h.token_ids) for h in group.result.hypotheses) == [2, 4, 4, 4]
    assert group.result.hypotheses == group.info().group.hypotheses


def test_get_sequence_gives_each_cot_branch_its_history(client):
    group = client.create_cot_group(PROMPT, 3, max_new_tokens=3, eos_token_ids=[EOS])
    paths = Paths(1)
    for logits in COT_STEPS:
        paths.take(group.step(logits))
        info = group.info().group
        assert [(h.token_ids, stats_of(h)) for h in info.running] == [
            (list(tokens), stats) for tokens, stats in paths.running]
        assert sorted((h.token_ids, stats_of(h)) for h in info.hypotheses) == sorted(
            (list(tokens), stats) for tokens, stats in paths.finished)
    assert ids(group.result.hypotheses) == [[3, 7, 4], [2, EOS], [1, 7, 4]]
    assert group.result.hypotheses == group.info().group.hypotheses


# -- diverse beam search -------------------------------------------------------------------------

@pytest.mark.parametrize("penalty, expected", [(0.0, [1, 1]), (10.0, [1, 2])])
def test_diversity_penalty_makes_the_groups_first_tokens_differ(client, penalty, expected):
    """Two groups of one beam each: without a penalty both take the favourite token 1; a large
    penalty pushes the second group off it (log .6 − 10 < log .3)."""
    group = client.create_beam_group(PROMPT, 2, max_new_tokens=2, num_beam_groups=2,
                                     diversity_penalty=penalty)
    choices = group.step(rows({1: 0.6, 2: 0.3}, {1: 0.6, 2: 0.3}))
    assert tokens(choices) == expected
    assert [c.parent_row for c in choices] == [0, 1]  # each group continues its own row
    assert choices[1].score == pytest.approx(math.log(0.6 if penalty == 0 else 0.3), rel=1e-6)


# -- forks ---------------------------------------------------------------------------------------

FORKS = 4
SEED = 1234
FORK_PARAMS = {"temperature": 0.9, "top_k": 8}


def fork_logits(steps: int) -> list[torch.Tensor]:
    """Step 0: one row; later steps: one distinct row per fork (fixed by a seeded generator)."""
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(1 if t == 0 else FORKS, VOCAB, generator=generator) for t in range(steps)]


def run_forks(client, logits: list[torch.Tensor]) -> list[list[int]]:
    """Each fork's tokens (no EOS: every fork runs every step, so branch = fork index)."""
    group = client.create_forks(PROMPT, FORKS, seed=SEED, params=FORK_PARAMS)
    outputs: list[list[int]] = [[] for _ in range(FORKS)]
    for t, step_logits in enumerate(logits):
        choices = group.step(step_logits)
        assert [c.branch for c in choices] == list(range(FORKS))
        assert [c.parent_row for c in choices] == ([0] * FORKS if t == 0 else list(range(FORKS)))
        for choice in choices:
            outputs[choice.branch].append(choice.token_id)
    return outputs


def test_forks_answer_n_rows_from_one(client):
    group = client.create_forks(PROMPT, FORKS, seed=SEED, params=FORK_PARAMS)
    assert (group.group_kind, group.running_rows) == ("fork", 1)
    choices = group.step(fork_logits(1)[0])
    assert len(choices) == FORKS and {c.parent_row for c in choices} == {0}
    assert group.running_rows == FORKS and group.info().group.running_rows == FORKS


def test_forks_differ_and_repeat_on_a_fresh_server(client, start_server):
    logits = fork_logits(6)
    first = run_forks(client, logits)
    with SamplerClient(start_server().address) as fresh:
        second = run_forks(fresh, logits)
    assert first == second
    assert len({tuple(f) for f in first}) == FORKS


def test_fork_i_samples_like_a_plain_sequence_seeded_seed_plus_i(client):
    logits = fork_logits(6)
    forks = run_forks(client, logits)
    for i in range(FORKS):
        plain = client.create_sequence(prompt_ids=PROMPT, seed=SEED + i, params=FORK_PARAMS)
        alone = [plain.step(step_logits[0 if t == 0 else i]).token_id
                 for t, step_logits in enumerate(logits)]
        assert forks[i] == alone, f"fork {i}"


def test_best_of_returns_the_n_forks_with_the_highest_cumulative_logprob(client):
    group = client.create_forks(PROMPT, 2, best_of=FORKS, seed=SEED,
                                params={**FORK_PARAMS, "max_tokens": 3})
    assert group.running_rows == 1
    sums, outputs = [0.0] * FORKS, [[] for _ in range(FORKS)]
    for step_logits in fork_logits(3):
        for choice in group.step(step_logits):
            sums[choice.branch] += choice.logprob
            outputs[choice.branch].append(choice.token_id)
            assert choice.score == pytest.approx(sums[choice.branch], rel=1e-5)
    best = sorted(range(FORKS), key=lambda i: -sums[i])[:2]
    hypotheses = group.result.hypotheses
    assert [h.branch for h in hypotheses] == best
    assert ids(hypotheses) == [outputs[i] for i in best]
    assert [h.score for h in hypotheses] == pytest.approx([sums[i] for i in best], rel=1e-5)
    assert all(h.finish_reason == "length" for h in hypotheses)
    assert group.info().group.hypotheses == hypotheses


def test_a_fork_that_stops_sends_no_more_rows(client):
    group = client.create_forks(PROMPT, FORKS, seed=SEED, eos_token_ids=[EOS])
    no_eos = torch.zeros(FORKS, VOCAB)
    no_eos[:, EOS] = -100.0
    group.step(no_eos[:1])
    eos_for_fork_1 = no_eos.clone()
    eos_for_fork_1[1, EOS] = 100.0
    choices = group.step(eos_for_fork_1)
    assert [c.finished for c in choices] == [False, True, False, False]
    assert (choices[1].token_id, choices[1].finish_reason) == (EOS, "stop")
    assert group.running_rows == 3
    info = group.info().group
    assert info.running_rows == 3 and [h.branch for h in info.running] == [0, 2, 3]
    [stopped] = info.hypotheses
    assert (stopped.branch, stopped.token_ids[-1], stopped.finish_reason) == (1, EOS, "stop")
    choices = group.step(no_eos[:3])
    assert [c.parent_row for c in choices] == [0, 1, 2] and [c.branch for c in choices] == [0, 1, 2]


# -- CoT decoding --------------------------------------------------------------------------------
#
# k = 3, EOS = 0, max_new_tokens = 3; margin m = p(top1) − p(top2) of the raw distribution.
#   step 0: p(1) = .5, p(2) = .3, p(3) = .15 -> branches [1], [2], [3]; m = .2 for all.
#   step 1: [1]: p(7) = .6, p(8) = .35 (m .25); [2]: p(EOS) = .9, p(5) = .05 (m .85, stops);
#           [3]: p(7) = .8, p(9) = .15 (m .65).
#   step 2: [1,7]: p(4) = .5, p(5) = .45 (m .05); [3,7]: p(4) = .7, p(6) = .25 (m .45).
# Spans (the EOS excluded): [1,7,4] Δ = (.2+.25+.05)/3, [2] Δ = .2, [3,7,4] Δ = (.2+.65+.45)/3.
# With answer_after = [7]: [4] Δ = .05, [] Δ = 0, [4] Δ = .45; the answer [4] gets .05 + .45.
COT_STEPS = [
    rows({1: 0.5, 2: 0.3, 3: 0.15}),
    rows({7: 0.6, 8: 0.35}, {EOS: 0.9, 5: 0.05}, {7: 0.8, 9: 0.15}),
    rows({4: 0.5, 5: 0.45}, {4: 0.7, 6: 0.25}),
]


def run_cot(client, **options):
    group = client.create_cot_group(PROMPT, 3, max_new_tokens=3, eos_token_ids=[EOS], **options)
    return group, [group.step(logits) for logits in COT_STEPS]


def test_cot_branches_on_the_k_most_likely_tokens(client):
    group, (first, second, last) = run_cot(client)
    assert group.group_kind == "cot"
    assert tokens(first) == [1, 2, 3] and [c.parent_row for c in first] == [0, 0, 0]
    assert [c.branch for c in first] == [0, 1, 2]
    assert tokens(second) == [7, EOS, 7] and [c.finished for c in second] == [False, True, False]
    assert [c.parent_row for c in second] == [0, 1, 2]
    assert tokens(last) == [4, 4] and [c.parent_row for c in last] == [0, 1]
    assert all(c.finish_reason == "length" for c in last)


def test_cot_ranks_paths_by_mean_top2_margin(client):
    group, _ = run_cot(client)
    hypotheses = group.result.hypotheses
    assert ids(hypotheses) == [[3, 7, 4], [2, EOS], [1, 7, 4]]
    assert [h.branch for h in hypotheses] == [2, 1, 0]
    assert [h.confidence for h in hypotheses] == pytest.approx(
        [(0.2 + 0.65 + 0.45) / 3, 0.2, (0.2 + 0.25 + 0.05) / 3], abs=1e-5)
    assert [h.answer_ids for h in hypotheses] == [[3, 7, 4], [2], [1, 7, 4]]
    assert [(v.answer_ids, v.paths) for v in group.result.answers] == [
        ([3, 7, 4], 1), ([2], 1), ([1, 7, 4], 1)]
    assert group.info().group.hypotheses == hypotheses


def test_cot_answer_after_restricts_the_span_and_votes_sum_confidence(client):
    group, _ = run_cot(client, answer_after=[7])
    hypotheses = group.result.hypotheses
    assert [h.answer_ids for h in hypotheses] == [[4], [4], []]
    assert [h.branch for h in hypotheses] == [2, 0, 1]
    assert [h.confidence for h in hypotheses] == pytest.approx([0.45, 0.05, 0.0], abs=1e-5)
    answers = group.result.answers
    assert [(v.answer_ids, v.paths) for v in answers] == [([4], 2), ([], 1)]
    assert [v.total_confidence for v in answers] == pytest.approx([0.5, 0.0], abs=1e-5)
    assert group.info().group.answers == answers


def test_cot_at_a_chaotic_point_decodes_one_trunk_row_then_branches_there(client):
    """With branch_at: chaotic_point the group is one greedy row until `sed` flags a step
    (here the raw entropy exceeds 1.5 nats): the branches start there and share the trunk."""
    policy = {"chain": [{"sed": {"entropy_threshold": 1.5, "ratio_threshold": 0.0}}],
              "select": {"cot": {"k": 2, "branch_at": "chaotic_point"}},
              "defaults": {"max_tokens": 3}}
    group = client.create_sequence(policy, PROMPT, eos_token_ids=[EOS])
    calm = group.step(rows({5: 0.97}))
    assert tokens(calm) == [5] and group.running_rows == 1
    assert calm[0].explanation["sed"]["chaotic"] is False
    fork = group.step(rows({6: 0.3, 7: 0.25, 8: 0.2}))
    assert tokens(fork) == [6, 7] and [c.parent_row for c in fork] == [0, 0]
    assert fork[0].explanation["sed"]["chaotic"] is True
    group.step(rows({9: 0.9}, {10: 0.9}))
    assert ids(group.result.hypotheses) in ([[5, 6, 9], [5, 7, 10]], [[5, 7, 10], [5, 6, 9]])


def test_cot_processed_logprobs_branch_under_the_chains_distribution(client):
    """The branching step: each branch's first token under softmax of the chain's output (no
    chain: the raw distribution); after it the branches continue greedily and report the
    point mass, as a plain greedy sequence does."""
    group = client.create_cot_group(PROMPT, 3, max_new_tokens=3, eos_token_ids=[EOS])
    first, *later = [group.step(logits, processed_logprobs=True) for logits in COT_STEPS]
    assert [c.processed_logprob for c in first] == pytest.approx(
        [math.log(0.5), math.log(0.3), math.log(0.15)], rel=1e-5)
    assert all(c.processed_entropy == pytest.approx(c.entropy, rel=1e-5) for c in first)
    assert [c.processed_logprob for choices in later for c in choices] == [0.0] * 5
    plain = client.create_sequence(policy="greedy", prompt_ids=PROMPT)
    assert plain.step(COT_STEPS[1][0], processed_logprobs=True).processed_logprob == 0.0


def test_cot_chaotic_point_needs_a_sed_stage(client):
    with pytest.raises(InvalidArgumentError) as err:
        client.create_sequence({"chain": [], "select": {"cot": {"branch_at": "chaotic_point"}}})
    assert err.value.fields == ["sequences[0].policy_spec.select.cot.branch_at"]


# -- bad input -----------------------------------------------------------------------------------

def test_group_step_with_the_wrong_number_of_rows(client, bystander):
    group = hand_beam_group(client)
    keys = [(bystander.sequence_id, 1, None), (group.sequence_id, 0, None)]
    with pytest.raises(InvalidArgumentError) as err:
        raw_step(client, keys, torch.randn(2, VOCAB))
    assert err.value.fields == ["rows[1]"]
    assert "2 running rows" in err.value.message and "sends 1" in err.value.message
    assert group.info().vocab_size == 0 and group.info().group.running_rows == 2


def test_group_rows_in_the_wrong_branch_order(client, bystander):
    group = hand_beam_group(client)
    keys = [(bystander.sequence_id, 1, None), (group.sequence_id, 0, 1), (group.sequence_id, 0, 0)]
    with pytest.raises(InvalidArgumentError) as err:
        raw_step(client, keys, torch.randn(3, VOCAB))
    assert err.value.fields == ["rows[1].branch"]
    assert "branch 0 is due" in err.value.message
    assert group.info().vocab_size == 0  # the group was not stepped either


def test_group_rows_not_consecutive(client, bystander):
    group = hand_beam_group(client)
    keys = [(group.sequence_id, 0, 0), (bystander.sequence_id, 1, None), (group.sequence_id, 0, 1)]
    with pytest.raises(InvalidArgumentError) as err:
        raw_step(client, keys, torch.randn(3, VOCAB))
    assert err.value.fields == ["rows[2].sequence_id"]
    assert group.info().vocab_size == 0


def test_stepping_a_finished_group(client, bystander):
    group = client.create_forks(PROMPT, 2, seed=SEED, params={"max_tokens": 1})
    group.step(torch.randn(VOCAB))
    assert group.result is not None and group.running_rows == 0
    keys = [(bystander.sequence_id, 1, None), (group.sequence_id, 1, 0), (group.sequence_id, 1, 1)]
    with pytest.raises(FailedPreconditionError) as err:
        raw_step(client, keys, torch.randn(3, VOCAB))
    assert err.value.fields == ["rows[1].sequence_id"]
    assert "finished" in err.value.message
    assert group.info().group.hypotheses == group.result.hypotheses


def test_group_wider_than_the_service_cap(start_server):
    with SamplerClient(start_server(max_group_rows=4).address) as client:
        assert client.create_beam_group(PROMPT, 4, max_new_tokens=2).running_rows == 4
        with pytest.raises(InvalidArgumentError) as err:
            client.create_sequences([
                dict(sequence_id="plain", policy="greedy"),
                dict(sequence_id="wide", policy=specs.beam_search_policy(8, max_new_tokens=2))])
        assert err.value.fields == ["sequences[1].policy_spec.select.beam.width"]
        assert "cap of 4" in err.value.message
        with pytest.raises(NotFoundError):
            client.get_sequence("plain")  # creation is atomic


@pytest.mark.parametrize("config, field", [
    (dict(policy=specs.beam_search_policy(2, max_new_tokens=3, num_return_sequences=3)),
     "sequences[1].policy_spec.select.beam.num_return_sequences"),
    (dict(params={"n": 3, "best_of": 2}), "sequences[1].params.best_of"),
    (dict(policy={"chain": [], "select": {"beam": {"width": 2}}}), "sequences[1].params.max_tokens"),
], ids=["num-return-sequences-above-width", "best-of-below-n", "beam-without-max-tokens"])
def test_invalid_group_settings_name_the_field(client, config, field):
    with pytest.raises(InvalidArgumentError) as err:
        client.create_sequences([dict(sequence_id="plain", policy="greedy"),
                                 dict(sequence_id="bad", **config)])
    assert err.value.fields == [field]
    with pytest.raises(NotFoundError):
        client.get_sequence("plain")  # creation is atomic
