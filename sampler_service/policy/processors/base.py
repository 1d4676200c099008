"""What every processor and selector is: a small object with a key, a parameter schema and
one batched operation, plus `RowBatch`, the per-step view of the rows it works on."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import torch

from sampler_service.errors import InvalidArgument
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.noise import seed_to_int64
from sampler_service.policy.params import Param
from sampler_service.policy.sparse import SparseLogits, TailBound
from sampler_service.policy.statistics import RawStatistics, raw_statistics, top_two_logits
from sampler_service.text import encode

if TYPE_CHECKING:
    from sampler_service.groups.base import Group


def row_pairs(per_row: Sequence[torch.Tensor],
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, value) on `device` for every element of each row's 1-D CPU tensor."""
    lengths = torch.tensor([len(t) for t in per_row], dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(per_row)), lengths).to(device)
    values = torch.cat(list(per_row)) if per_row else torch.empty(0, dtype=torch.int64)
    return rows, values.to(device)


#: Names of the optional per-row worker signals (StepRequest.signals), entropix's attention terms.
SIGNAL_NAMES = ("attention_entropy", "attention_varentropy", "agreement", "interaction_strength")


@dataclass(frozen=True)
class RowInputs:
    """What a batch's stages may read besides the logits they transform: the untouched raw
    logits [R, V] (and their statistics, when the engine already has them), the worker's
    optional reference logits [R, V] (KL-guided temperature) and per-row signals
    (name -> [R], entropix).

    Rows sent sparse (`sparse`: their K best raw entries and tail statistics) have no `raw`
    tensor: a stage reads the raw rows through `raw_top_two` and `raw_at`, which answer from
    either form, and the statistics (exact from the tail statistics); a stage that needs more
    of the raw row refuses sparse rows in its `sparse_tail` rule."""

    raw: torch.Tensor | None
    statistics: RawStatistics | None = None
    reference: torch.Tensor | None = None
    signals: Mapping[str, torch.Tensor] | None = None
    sparse: SparseLogits | None = None

    def select(self, rows: torch.Tensor) -> "RowInputs":
        """The inputs of a subset of rows (`rows`: int64 indices on the device)."""
        stats = self.statistics
        return RowInputs(
            raw=None if self.raw is None else self.raw.index_select(0, rows),
            statistics=None if stats is None else stats.select(rows),
            reference=None if self.reference is None else self.reference.index_select(0, rows),
            signals=None if self.signals is None else {
                k: v.index_select(0, rows) for k, v in self.signals.items()},
            sparse=None if self.sparse is None else self.sparse.select(rows))

    def with_statistics(self) -> "RowInputs":
        if self.statistics is not None:
            return self
        return replace(self, statistics=raw_statistics(self.raw) if self.sparse is None
                       else self.sparse.statistics())

    def raw_top_two(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's largest and second largest raw logit, [R] each (`top_two_logits`)."""
        return top_two_logits(self.raw) if self.sparse is None else self.sparse.top_two()

    def raw_at(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits at `tokens` [A, C] of the rows `rows` [A] (all rows when None); a sparse
        row answers −inf for a token it did not send."""
        if self.sparse is not None:
            return self.sparse.logits_at(tokens, rows)
        raw = self.raw if rows is None else self.raw.index_select(0, rows)
        return raw.gather(1, tokens)


class RowBatch:
    """The rows of one policy group in one step.

    Per-row tensors are built once per step and cached here: positions, seeds, and the
    (row, token) index pairs the penalties need, gathered from each sequence's token counts.
    `greedy` marks rows whose temperature asked for argmax (set by the temperature processor,
    read by the selectors).
    """

    def __init__(self, states: Sequence[Any], device: torch.device,
                 inputs: RowInputs | None = None):
        self.states = states
        self.device = device
        self.inputs = inputs
        #: Per stage key, per field, one value per row (None: nothing to say for that row).
        self.explanations: dict[str, dict[str, list[Any]]] = {}
        #: True while no stage has run on the candidates yet (the engine clears it after the
        #: first): they are still the raw logits, so `raw_statistics()` describes them.
        self.pristine = inputs is not None
        self.rows = len(states)
        self.positions = torch.tensor([s.position for s in states], dtype=torch.int64, device=device)
        self.seeds = torch.tensor([seed_to_int64(s.seed) for s in states], dtype=torch.int64,
                                  device=device)
        self.greedy = torch.zeros(self.rows, dtype=torch.bool, device=device)
        #: Per-sequence state to store once the step's tokens are accepted: key -> row values.
        self.pending: dict[str, list[Any]] = {}

    def token_sequences(self, row: int, rule: str, items: tuple[Any, ...], field: str
                        ) -> tuple[tuple[int, ...], ...]:
        """A row's `int_lists` value as token-id sequences, its texts encoded by `rule` with the
        row's tokenizer (`sampler_service.text.encode.token_sequences`; cached)."""
        text = getattr(self.states[row], "text", None)
        return encode.token_sequences(None if text is None else text.vocabulary, rule, items,
                                      field)

    def memory(self, key: str, default: Any) -> list[Any]:
        """Each row's per-sequence state under `key` (`default` for a sequence without it).
        Stages read their state here and never write a SequenceState themselves."""
        return [s.processor_state.get(key, default) for s in self.states]

    def remember(self, key: str, values: Sequence[Any]) -> None:
        """Per-row new state under `key`, stored when the step is accepted (not on retries,
        not when the step fails), so the engine stays free of side effects."""
        self.pending[key] = list(values)

    def pending_for(self, row: int) -> dict[str, Any]:
        """The state updates of one row."""
        return {key: values[row] for key, values in self.pending.items()}

    # -- what adaptive stages read and report --------------------------------------------------
    def raw_statistics(self) -> RawStatistics:
        """Entropy and varentropy (nats) of each row's raw distribution at this step."""
        if self.inputs is None:
            raise RuntimeError("this batch has no raw inputs")  # programming error, not input
        self.inputs = self.inputs.with_statistics()
        return self.inputs.statistics  # type: ignore[return-value]

    def raw_argmax(self) -> torch.Tensor | None:
        """[R] each row's first argmax while no stage has run and the candidates are the
        whole raw rows, when the step's raw statistics already hold it (no pass over the
        rows); None otherwise."""
        stats = None if self.inputs is None else self.inputs.statistics
        if not self.pristine or self.inputs.sparse is not None or stats is None:
            return None
        return stats.best_id

    def entropy_summary(self) -> dict[str, torch.Tensor]:
        """Each row's summaries of its earlier steps' raw entropy history (nats), [R] float32:
        `ema_entropy`, `ema_varentropy`, `mean_entropy`, `mean_varentropy` (0 before the first
        step; see `SequenceState`)."""
        names = ("ema_entropy", "ema_varentropy", "mean_entropy", "mean_varentropy")
        return {name: torch.tensor([getattr(s, name) for s in self.states], device=self.device)
                for name in names}

    def reference_logits(self, key: str) -> torch.Tensor:
        """The worker's reference logits [R, V], or INVALID_ARGUMENT naming the stage that
        needs them."""
        if self.inputs is None or self.inputs.reference is None:
            raise InvalidArgument(f"the policy's {key!r} stage needs reference_logits (the same "
                                  "model's logits without the grounding context) with every step",
                                  "reference_logits")
        return self.inputs.reference

    def signal(self, name: str) -> torch.Tensor:
        """A worker signal per row ([R] float32), 0 where the worker sent none."""
        if self.inputs is None or not self.inputs.signals or name not in self.inputs.signals:
            return torch.zeros(self.rows, device=self.device)
        return self.inputs.signals[name]

    def explain(self, key: str, **fields: Sequence[Any] | torch.Tensor) -> None:
        """Reports what stage `key` decided for each row (one value per row per field; None =
        nothing to report for that row). The choices carry it as their `explanation`."""
        self.explanations.setdefault(key, {}).update(
            {name: values.tolist() if torch.is_tensor(values) else list(values)
             for name, values in fields.items()})

    def explanation_for(self, row: int) -> dict[str, dict[str, Any]]:
        """The explanation of one row: {stage key: {field: value}}, None values left out."""
        result = {}
        for key, fields in self.explanations.items():
            said = {name: values[row] for name, values in fields.items() if values[row] is not None}
            if said:
                result[key] = said
        return result

    def seen_token_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row index, token id) for every distinct token of each row's prompt ∪ output."""
        return self._pairs([s.history.seen_ids() for s in self.states])

    def output_count_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row index, token id, count) for every distinct token of each row's output."""
        per_row = [s.history.output_counts() for s in self.states]
        rows, ids = self._pairs([ids for ids, _ in per_row])
        counts = torch.cat([c for _, c in per_row]).to(self.device)
        return rows, ids, counts

    def stop_token_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row index, token id) for each row's EOS and stop ids (`min_tokens_ids`: EOS even
        under ignore_eos)."""
        return self._pairs([torch.tensor(sorted(s.min_tokens_ids), dtype=torch.int64)
                            for s in self.states])

    def _pairs(self, per_row: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return row_pairs(per_row, self.device)


#: Keys of the plug-in stages (`sampler_service.policy.plugins` adds them). Built-in stages
#: change candidate values only through `Candidates`' methods; a plug-in may write into
#: `candidates.values` itself, so the engine gives it values of its own first.
PLUGIN_KEYS: set[str] = set()


class Stage(ABC):
    """Common description of processors and selectors: the spec key and the parameters."""

    key: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    #: The flat (vLLM-named) request parameter that sets each spec parameter, if any.
    flat_names: ClassVar[dict[str, str]] = {}

    #: A flat request parameter that sets all of the stage's values at once, as a mapping
    #: (`structured`), instead of one flat name per parameter.
    flat_group: ClassVar[str | None] = None

    #: The categorical decisions the stage reports in its explanations (`RowBatch.explain`):
    #: each text or true/false field and every value it can take ("true" / "false" for a
    #: flag). The metrics count exactly these; any other value counts as "other".
    decisions: ClassVar[dict[str, tuple[str, ...]]] = {}

    @classmethod
    def check_values(cls, values: dict[str, Any], field: str) -> None:
        """Checks the validated values together (InvalidArgument naming `field`'s parameter);
        this default accepts any."""

    def sparse_tail(self, candidates: Candidates, args: dict[str, Any], batch: RowBatch,
                    tail: TailBound) -> bool:
        """The stage's exactness rule on sparse rows (`sampler_service.policy.sparse`).

        Called before the stage runs on rows sent as their K best entries, with the
        candidates it is about to see: updates `tail` to what is known of the tails after the
        stage, refuses (`tail.refuse`) each row whose result could depend on a tail's missing
        values, and returns whether the stage can run on the batch (False: it is skipped; the
        step fails with the refusals anyway).

        This default is for a stage without a rule: a row whose tail an earlier stage excluded
        is exact (its K entries are the whole row, and the stage reads only the candidates);
        every other row is refused."""
        live = tail.live()
        tail.refuse_unless_excluded(live, f"{self.key}: has no sparse rule")
        return not bool(live.any())

    # -- what a resume record carries (`sampler_service.state.resume`) -------------------------
    def saved_memory(self, value: Any) -> Any:
        """This stage's per-sequence memory `value` as plain data (numbers, strings, lists,
        mappings) for a resume record, or None when the stage rebuilds it from the tokens
        (an index over the history) or keeps none: this default."""
        return None

    def restored_memory(self, value: Any, field: str) -> Any:
        """The memory a resume record brings back, checked (InvalidArgument naming `field`).
        This default refuses it: the stage carries none (`saved_memory`)."""
        raise InvalidArgument(f"stage {self.key!r} keeps no memory a resume record carries",
                              field)


class Processor(Stage):
    """One logits transform. `apply` works in place on `candidates` (dense or truncated).

    `args` maps each parameter name to a [R] tensor on the batch's device. A row whose
    parameters are off must come out bit-identical.
    """

    #: "filter" (masks tokens to -inf), "transform" (changes values), "constraint", or
    #: "monitor" (changes nothing; only explains, e.g. SED's chaotic points).
    role: ClassVar[str]
    #: A link whose parameters are all at their off values is left out of the chain the
    #: engine runs. Stages that explain or remember something even when off say False.
    drops_when_off: ClassVar[bool] = True
    #: The stage only masks tokens and never one whose value equals the row's maximum (nor
    #: changes any value, remembers or explains anything), so the argmax (lowest id among the
    #: best) of its output is that of its input: a plan for a selector that reads only the
    #: argmax leaves it out when only such stages follow it (`ResolvedPolicy.active_links`).
    keeps_argmax: ClassVar[bool] = False

    @abstractmethod
    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        ...


class Selector(Stage):
    """Picks one token per row from processed candidates; returns int64 token ids [R]."""

    #: The choice is the argmax of the candidates (lowest id among the best) and the
    #: distribution a point mass on it, whatever else they hold (greedy).
    reads_only_argmax: ClassVar[bool] = False

    @abstractmethod
    def select(self, candidates: Candidates, args: dict[str, torch.Tensor],
               batch: RowBatch) -> torch.Tensor:
        ...

    def distribution(self, candidates: Candidates, args: dict[str, Any],
                     batch: RowBatch) -> Candidates:
        """Log-probabilities the selector draws from (−inf outside the support)."""
        return candidates.log_softmax()


class GroupSelector(Stage):
    """A selector that makes its sequence a group of rows (beam search, CoT decoding): see
    `sampler_service.groups`. `new_group` checks the selector's values against the sequence
    (InvalidArgument naming `field`, the selector's spec path, or `params_field` + a setting;
    at most `max_rows` rows) and builds the group."""

    kind: ClassVar[str]

    def sparse_tail(self, candidates: Candidates, args: dict[str, Any], batch: RowBatch,
                    tail: TailBound) -> bool:
        """Groups rank and fork rows by their whole raw distributions: never on sparse rows."""
        tail.refuse(torch.ones_like(tail.pristine),
                    lambda _: f"{self.key}: groups need full rows", structural=True)
        return False

    @abstractmethod
    def new_group(self, root: Any, values: Mapping[str, Any], max_rows: int, field: str,
                  params_field: str) -> "Group":
        ...
