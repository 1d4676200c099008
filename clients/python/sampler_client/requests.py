"""Builds request protos from Python values; shared by the sync and asyncio clients."""
from __future__ import annotations

import itertools
import json
import re
import uuid
from typing import Any, Iterable, Mapping, Sequence

from google.protobuf import struct_pb2
from google.protobuf.message import Message

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_client.errors import MessageTooLargeError
from sampler_client.tensors import encode_rows, encode_tensor
from sampler_client.vocabulary import Vocabulary, vocabulary_from_hf


def check_size(request: Message, limit: int) -> None:
    """Raises MessageTooLargeError when `request` serialises to more than `limit` bytes (the
    channel's max send size): gRPC would refuse it, and on a StepStream that ends the
    stream, with every sequence stepping on it."""
    size = request.ByteSize()
    if size > limit:
        raise MessageTooLargeError(size, limit, type(request).__name__)


def sampling_params(params: Mapping[str, Any] | None, seed: int | None = None) -> pb.SamplingParams:
    """Flat vLLM-named parameters; an unknown name raises ValueError naming it."""
    given = dict(params or {})
    if seed is not None:
        given["seed"] = seed
    known = set(pb.SamplingParams.DESCRIPTOR.fields_by_name)
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}")
    if "bad_words" in given:
        given["bad_words"] = [pb.TokenIds(text=words) if isinstance(words, str)
                              else pb.TokenIds(ids=list(words)) for words in given["bad_words"]]
    if "structured" in given:
        given["structured"] = structured_output(given["structured"])
    if given.get("logit_bias"):
        given["logit_bias"] = logit_bias(given["logit_bias"])
    return pb.SamplingParams(**given)


_DECIMAL = re.compile(r"-?[0-9]+")


def logit_bias(bias: Mapping[Any, float]) -> dict[int, float]:
    """`logit_bias` with int keys for the proto's map<int32, float>: token ids as ints, or as
    their decimal text as OpenAI's JSON sends them (`{"50256": -100}`). ValueError names a key
    that is neither (the service checks the ids and values themselves)."""
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias takes a mapping of token id -> bias, got {bias!r}")
    keys: dict[int, float] = {}
    for key, value in bias.items():
        if isinstance(key, str) and _DECIMAL.fullmatch(key) and len(key) <= 11:
            token = int(key)  # int32's digits at most; the proto refuses what int32 cannot hold
        elif isinstance(key, int) and not isinstance(key, bool):
            token = key
        else:
            raise ValueError(f"logit_bias key {key!r:.40} must be a token id: an int or its "
                             "decimal digits as a string")
        if token in keys:
            raise ValueError(f"logit_bias gives token id {token} twice (key {key!r})")
        keys[token] = value
    return keys


STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")


def structured_output(value: Mapping[str, Any] | pb.StructuredOutput) -> pb.StructuredOutput:
    """`{"json_schema": {...}}` (a mapping or JSON text), `{"json_object": True}`,
    `{"regex": "..."}`, `{"grammar": "..."}` or `{"choice": [...]}` as a StructuredOutput;
    ValueError unless exactly one of those keys is given."""
    if isinstance(value, pb.StructuredOutput):
        return value
    if not isinstance(value, Mapping) or len(value) != 1 or next(iter(value)) not in STRUCTURED_KINDS:
        raise ValueError(f"structured takes a mapping with one key of {list(STRUCTURED_KINDS)}, "
                         f"got {value!r}")
    (kind, item), = value.items()
    if kind == "json_schema" and not isinstance(item, str):
        item = json.dumps(item, separators=(",", ":"), ensure_ascii=False)
    if kind == "choice":
        return pb.StructuredOutput(choice=pb.StringList(values=list(item)))
    return pb.StructuredOutput(**{kind: item})


def spec_struct(spec: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(dict(spec))
    return struct


def sequence_config(*, sequence_id: str | None, policy: str | Mapping[str, Any] | None,
                    prompt_ids: Iterable[int], seed: int | None, params: Mapping[str, Any] | None,
                    eos_token_ids: Iterable[int], tokenizer: str = "") -> pb.SequenceConfig:
    """One sequence to create. `policy` is a registry name or an inline spec dict; `tokenizer`
    a registered tokenizer's name or id (`register_tokenizer_request`)."""
    config = pb.SequenceConfig(sequence_id=sequence_id or uuid.uuid4().hex,
                               params=sampling_params(params, seed),
                               prompt_ids=list(prompt_ids), eos_token_ids=list(eos_token_ids),
                               tokenizer=tokenizer)
    if isinstance(policy, Mapping):
        config.policy_spec.CopyFrom(spec_struct(policy))
    elif policy:
        config.policy = policy
    return config


def create_request(configs: Iterable[Mapping[str, Any]]) -> pb.CreateSequencesRequest:
    """Sequences to create; each config takes `sequence_config`'s keywords (all optional)."""
    return pb.CreateSequencesRequest(sequences=[
        sequence_config(**{"sequence_id": None, "policy": None, "prompt_ids": (), "seed": None,
                           "params": None, "eos_token_ids": (), **config})
        for config in configs])


def register_tokenizer_request(tokenizer: Any, name: str = "") -> pb.RegisterTokenizerRequest:
    """RegisterTokenizer of a Hugging Face tokenizer or a `Vocabulary`: the bytes of every
    token id, the special and EOS ids, and the tokenizer JSON when known (so that the service
    can encode bad words and DRY breakers given as text)."""
    vocabulary = tokenizer if isinstance(tokenizer, Vocabulary) else vocabulary_from_hf(tokenizer)
    return pb.RegisterTokenizerRequest(name=name, tokens=vocabulary.tokens,
                                       special_ids=sorted(vocabulary.special_ids),
                                       eos_token_ids=vocabulary.eos_token_ids,
                                       tokenizer_json=vocabulary.encoder_json)


def _rows_tensor(values: Any, rows: int) -> pb.Tensor:
    return values if isinstance(values, pb.Tensor) else encode_rows(values, rows)


def step_request(rows: Sequence[tuple[str, int | None, int | None]], logits: Any, *,
                 processed_logprobs: bool = False, request_id: str = "",
                 reference_logits: Any = None,
                 signals: Sequence[Mapping[str, float]] | None = None,
                 sparse: pb.SparseRows | None = None,
                 resume_records: bool = False) -> pb.StepRequest:
    """`rows`: (sequence id, step or None, branch or None) per logits row. `logits`: values
    (sent inline) or a placed `sampler.v1.Tensor` of the rows not in `sparse`, None when every
    row is. `reference_logits`: [len(rows), vocab] likewise (KL-guided temperature);
    `signals`: one mapping per row of entropix's attention terms (attention_entropy,
    attention_varentropy, agreement, interaction_strength); `resume_records`: also answer
    each sequence's ResumeRecord (for replay)."""
    fields: dict[str, Any] = {}
    if logits is not None:
        fields["logits"] = _rows_tensor(logits, len(rows))
    if reference_logits is not None:
        fields["reference_logits"] = _rows_tensor(reference_logits, len(rows))
    if sparse is not None:
        fields["sparse"] = sparse
    request = pb.StepRequest(request_id=request_id, processed_logprobs=processed_logprobs,
                             signals=[pb.RowSignals(**s) for s in signals or ()],
                             resume_records=resume_records, **fields)
    for sequence_id, step, branch in rows:
        row = request.rows.add(sequence_id=sequence_id)
        if step is not None:
            row.step = step
        if branch is not None:
            row.branch = branch
    return request


def verify_request(rows: Sequence[tuple[str, int | None, int | None]],
                   drafts: Sequence[Sequence[int]], logits: Any,
                   draft_probs: Sequence[Any] = (), *, processed_logprobs: bool = False,
                   request_id: str = "", resume_records: bool = False) -> pb.StepRequest:
    """A speculative verification (docs/speculative.md): `rows` as for `step_request`, each
    with its draft ids (k_i >= 0), `logits` [sum of (k_i + 1), vocab] and, per row, its
    `draft_probs` [k_i, vocab] or None (empty: none); tensors as values (sent inline) or placed
    `sampler.v1.Tensor`s. Shared by the sync and asyncio clients and their streams."""
    request = step_request(rows, None, processed_logprobs=processed_logprobs,
                           request_id=request_id, resume_records=resume_records)
    request.logits.CopyFrom(_rows_tensor(logits, sum(len(d) + 1 for d in drafts)))
    for row, ids, probs in itertools.zip_longest(request.rows, drafts, draft_probs):
        row.draft_token_ids.extend(ids)
        if probs is not None:
            row.draft_probs.CopyFrom(_rows_tensor(probs, len(ids)))
    return request


def preview_request(logits: Any, *, policy: str | Mapping[str, Any] | None,
                    params: Mapping[str, Any] | None, history: Iterable[int] = (),
                    prompt_ids: Iterable[int] = (), eos_token_ids: Iterable[int] = (),
                    max_candidates: int = 0, reference_logits: Any = None) -> pb.PreviewRequest:
    """A Preview request; `logits` None asks for the planned chain alone."""
    request = pb.PreviewRequest(params=sampling_params(params), history=list(history),
                                prompt_ids=list(prompt_ids), eos_token_ids=list(eos_token_ids),
                                max_candidates=max_candidates)
    if logits is not None:
        request.logits.CopyFrom(encode_tensor(logits))
    if reference_logits is not None:
        request.reference_logits.CopyFrom(encode_tensor(reference_logits))
    if isinstance(policy, Mapping):
        request.policy_spec.CopyFrom(spec_struct(policy))
    elif policy:
        request.policy = policy
    return request
