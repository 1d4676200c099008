"""A policy resolved for one sequence: stage instances with concrete parameter values."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from sampler_service.errors import InvalidArgument
from sampler_service.policy.params import Param
from sampler_service.policy.processors.base import GroupSelector, Processor, Selector, Stage

#: Sequence-level settings: not logits transforms, but they decide when a sequence ends and
#: what a choice reports. Set in a policy's `defaults:` or by request parameters.
SETTINGS: tuple[Param, ...] = (
    Param("max_tokens", "int", default=0, off=0, minimum=0,
          doc="finish with LENGTH after this many tokens; 0 = no limit"),
    Param("stop_token_ids", "int_list", default=(), off=(),
          doc="ids that finish the sequence with STOP (besides its EOS ids)"),
    Param("seed", "int", default=None, off=None, minimum=0, maximum=2 ** 64 - 1,
          doc="noise seed; not set: drawn by the service and reported"),
    Param("logprobs", "int", default=0, off=0, minimum=0, maximum=20,
          doc="top-N raw logprobs returned with each choice (vLLM logprobs; the chosen token's "
              "logprob is always returned)"),
    Param("top_logprobs", "int", default=None, off=None, minimum=0, maximum=20,
          doc="OpenAI's name for `logprobs` (its `logprobs: true` is always on here): setting it "
              "sets `logprobs`; given together with `logprobs` (in one request, or in one "
              "`defaults:`) the two must be equal"),
    Param("n", "int", default=1, off=1, minimum=1,
          doc="forks: n samples of the prompt, fork i seeded with seed + i (vLLM n)"),
    Param("best_of", "int", default=0, off=0, minimum=0,
          doc="forks: sample best_of and return the n with the highest cumulative raw logprob "
              "(vLLM best_of); 0 = n"),
    Param("stop", "str_list", default=(), off=(),
          doc="finish with STOP once the output text contains one of these strings (vLLM "
              "stop); needs the sequence's tokenizer"),
    Param("include_stop_str_in_output", "bool", default=False, off=False,
          doc="the text reported keeps the stop string that ended it (vLLM)"),
    Param("ignore_eos", "bool", default=False, off=False,
          doc="vLLM ignore_eos: producing an EOS id does not finish the sequence (EOS is a "
              "token like any other; stop_token_ids, stop strings and max_tokens still "
              "finish it; min_tokens still masks EOS, as vLLM's does); not with structured "
              "outputs, which end at EOS"),
)
SETTING_NAMES = frozenset(p.name for p in SETTINGS)
#: Settings a request may always set, whatever the policy's `overridable` list says: they
#: change what is reported, where the caller's generation ends or how many samples are
#: drawn, never how any one token is chosen.
ALWAYS_OVERRIDABLE = frozenset({"logprobs", "top_logprobs", "n", "best_of", "stop",
                                "include_stop_str_in_output", "ignore_eos"})


def fold_aliases(settings: Mapping[str, Any], given: Iterable[str], field: str) -> dict[str, Any]:
    """Validated `settings` with `top_logprobs` folded into `logprobs` and itself left unset
    (None): when it is among the names `given` in one place (a request's parameters, or one
    `defaults:`) it sets `logprobs`, and if `logprobs` is given there too the two must be
    equal (InvalidArgument naming `field.top_logprobs` otherwise)."""
    folded = dict(settings)
    given = set(given)
    top = folded.get("top_logprobs")
    if "top_logprobs" in given and top is not None:
        if "logprobs" in given and folded["logprobs"] != top:
            raise InvalidArgument(
                f"top_logprobs = {top} and logprobs = {folded['logprobs']} disagree: they are "
                "two names of one count (OpenAI's and vLLM's); give one, or both equal",
                f"{field}.top_logprobs")
        folded["logprobs"] = top
    folded["top_logprobs"] = None
    return folded


@dataclass(frozen=True)
class PolicyVersion:
    """`number` grows with each change of a name's spec; `hash` digests the canonical spec."""

    number: int
    hash: str


@dataclass(frozen=True)
class Link:
    """One stage of a resolved chain and its parameter values."""

    stage: Stage
    values: Mapping[str, Any]

    def spec(self) -> dict[str, Any]:
        return {self.stage.key: {p.name: p.plain(self.values[p.name]) for p in self.stage.params}}

    @property
    def is_off(self) -> bool:
        """Every parameter that has an off value holds it, so the stage leaves every row
        bit-identical (and the stage may be dropped: `Processor.drops_when_off`)."""
        declared = [p for p in self.stage.params if p.off is not None]
        return (bool(declared) and getattr(self.stage, "drops_when_off", False)
                and all(self.values[p.name] == p.off for p in declared))


@dataclass(frozen=True)
class ResolvedPolicy:
    """What a sequence pinned at creation: policy name and version, chain, selector, settings.

    `active_links` is the chain the engine runs, planned once (not every step): `links`
    without the stages whose values are all off (they leave every row bit-identical), and,
    before a selector that reads only the argmax (greedy), without the stages after which only
    argmax-keeping stages follow (`Processor.keeps_argmax`: masks that never remove a best
    token, so the argmax, lowest id among the best, and the selector's point mass are those
    of their input). Sequences whose `signature` is equal run as one batch through the same
    stages. `explain_plan` lists them.
    """

    name: str
    version: PolicyVersion
    links: tuple[Link, ...]
    selector: Link
    settings: Mapping[str, Any]
    #: The A/B split the policy was assigned through ("" when named directly).
    split: str = ""
    #: The policy's `follow_latest`: running sequences move to a newer version of the name.
    follow_latest: bool = False
    #: The request's overrides, applied again when a follow_latest sequence moves.
    overrides: Mapping[str, Any] = field(default_factory=dict)
    active_links: tuple[Link, ...] = field(init=False, repr=False, compare=False)
    #: The keys of the stages the engine runs, then the selector's (per row of every step).
    signature: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        assert all(isinstance(l.stage, Processor) for l in self.links)
        assert isinstance(self.selector.stage, (Selector, GroupSelector))
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))
        active = [l for l in self.links if not l.is_off]
        if getattr(self.selector.stage, "reads_only_argmax", False):
            while active and active[-1].stage.keeps_argmax:
                active.pop()
        object.__setattr__(self, "active_links", tuple(active))
        object.__setattr__(self, "signature",
                           tuple(l.stage.key for l in active) + (self.selector.stage.key,))

    def explain_plan(self) -> list[str]:
        """The stages the engine runs, in order, then the selector: `key(param=value, ...)`."""
        def described(link: Link) -> str:
            values = ", ".join(f"{p.name}={p.plain(link.values[p.name])}" for p in link.stage.params)
            return f"{link.stage.key}({values})"
        return [described(l) for l in (*self.active_links, self.selector)]

    def spec(self) -> dict[str, Any]:
        """The resolved values as a policy spec (reported by GetSequence)."""
        return {
            "chain": [l.spec() for l in self.links],
            "select": self.selector.spec(),
            "defaults": {p.name: p.plain(self.settings[p.name]) for p in SETTINGS
                         if self.settings[p.name] is not None},
        }
