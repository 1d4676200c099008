from google.protobuf import struct_pb2 as _struct_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FP32: _ClassVar[DType]
    FP16: _ClassVar[DType]
    BF16: _ClassVar[DType]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    STOP: _ClassVar[FinishReason]
    LENGTH: _ClassVar[FinishReason]
DTYPE_UNSPECIFIED: DType
FP32: DType
FP16: DType
BF16: DType
FINISH_REASON_UNSPECIFIED: FinishReason
STOP: FinishReason
LENGTH: FinishReason

class RegisterTokenizerRequest(_message.Message):
    __slots__ = ("name", "tokens", "special_ids", "eos_token_ids", "tokenizer_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_IDS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    tokens: _containers.RepeatedScalarFieldContainer[bytes]
    special_ids: _containers.RepeatedScalarFieldContainer[int]
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokenizer_json: str
    def __init__(self, name: _Optional[str] = ..., tokens: _Optional[_Iterable[bytes]] = ..., special_ids: _Optional[_Iterable[int]] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., tokenizer_json: _Optional[str] = ...) -> None: ...

class RegisterTokenizerResponse(_message.Message):
    __slots__ = ("tokenizer_id", "vocab_size")
    TOKENIZER_ID_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    tokenizer_id: str
    vocab_size: int
    def __init__(self, tokenizer_id: _Optional[str] = ..., vocab_size: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "raw", "shared_memory", "cuda_ipc")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    raw: bytes
    shared_memory: RegionRef
    cuda_ipc: RegionRef
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., raw: _Optional[bytes] = ..., shared_memory: _Optional[_Union[RegionRef, _Mapping]] = ..., cuda_ipc: _Optional[_Union[RegionRef, _Mapping]] = ...) -> None: ...

class RegionRef(_message.Message):
    __slots__ = ("region", "offset", "byte_size")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    byte_size: int
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...

class SparseRows(_message.Message):
    __slots__ = ("rows", "vocab_size", "token_ids", "logits", "tails")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    TAILS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedScalarFieldContainer[int]
    vocab_size: int
    token_ids: bytes
    logits: Tensor
    tails: _containers.RepeatedCompositeFieldContainer[TailStats]
    def __init__(self, rows: _Optional[_Iterable[int]] = ..., vocab_size: _Optional[int] = ..., token_ids: _Optional[bytes] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., tails: _Optional[_Iterable[_Union[TailStats, _Mapping]]] = ...) -> None: ...

class TailStats(_message.Message):
    __slots__ = ("max", "log_sum_exp", "mean", "mean_square")
    MAX_FIELD_NUMBER: _ClassVar[int]
    LOG_SUM_EXP_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    MEAN_SQUARE_FIELD_NUMBER: _ClassVar[int]
    max: float
    log_sum_exp: float
    mean: float
    mean_square: float
    def __init__(self, max: _Optional[float] = ..., log_sum_exp: _Optional[float] = ..., mean: _Optional[float] = ..., mean_square: _Optional[float] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "min_tokens", "stop_token_ids", "max_tokens", "seed", "logprobs", "logit_bias", "allowed_token_ids", "bad_words", "n", "best_of", "stop", "include_stop_str_in_output", "structured", "ignore_eos", "top_logprobs", "top_p_rule")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BAD_WORDS_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    BEST_OF_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STOP_STR_IN_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_P_RULE_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    frequency_penalty: float
    presence_penalty: float
    min_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    seed: int
    logprobs: int
    logit_bias: _containers.ScalarMap[int, float]
    allowed_token_ids: _containers.RepeatedScalarFieldContainer[int]
    bad_words: _containers.RepeatedCompositeFieldContainer[TokenIds]
    n: int
    best_of: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    include_stop_str_in_output: bool
    structured: StructuredOutput
    ignore_eos: bool
    top_logprobs: int
    top_p_rule: str
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., min_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., logprobs: _Optional[int] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., allowed_token_ids: _Optional[_Iterable[int]] = ..., bad_words: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ..., n: _Optional[int] = ..., best_of: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., include_stop_str_in_output: _Optional[bool] = ..., structured: _Optional[_Union[StructuredOutput, _Mapping]] = ..., ignore_eos: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., top_p_rule: _Optional[str] = ...) -> None: ...

class StructuredOutput(_message.Message):
    __slots__ = ("json_schema", "json_object", "regex", "grammar", "choice")
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    JSON_OBJECT_FIELD_NUMBER: _ClassVar[int]
    REGEX_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    json_schema: str
    json_object: bool
    regex: str
    grammar: str
    choice: StringList
    def __init__(self, json_schema: _Optional[str] = ..., json_object: _Optional[bool] = ..., regex: _Optional[str] = ..., grammar: _Optional[str] = ..., choice: _Optional[_Union[StringList, _Mapping]] = ...) -> None: ...

class StringList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids", "text")
    IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ...) -> None: ...

class SequenceConfig(_message.Message):
    __slots__ = ("sequence_id", "policy", "policy_spec", "params", "prompt_ids", "eos_token_ids", "tokenizer", "resume")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    POLICY_SPEC_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    policy: str
    policy_spec: _struct_pb2.Struct
    params: SamplingParams
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokenizer: str
    resume: ResumeState
    def __init__(self, sequence_id: _Optional[str] = ..., policy: _Optional[str] = ..., policy_spec: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., tokenizer: _Optional[str] = ..., resume: _Optional[_Union[ResumeState, _Mapping]] = ...) -> None: ...

class ResumeState(_message.Message):
    __slots__ = ("output_ids", "stats", "record")
    OUTPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    output_ids: _containers.RepeatedScalarFieldContainer[int]
    stats: _containers.RepeatedCompositeFieldContainer[StepStats]
    record: ResumeRecord
    def __init__(self, output_ids: _Optional[_Iterable[int]] = ..., stats: _Optional[_Iterable[_Union[StepStats, _Mapping]]] = ..., record: _Optional[_Union[ResumeRecord, _Mapping]] = ...) -> None: ...

class ResumeRecord(_message.Message):
    __slots__ = ("sequence_id", "version", "position", "policy_hash", "state", "seed")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    POLICY_HASH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    version: int
    position: int
    policy_hash: str
    state: _struct_pb2.Struct
    seed: int
    def __init__(self, sequence_id: _Optional[str] = ..., version: _Optional[int] = ..., position: _Optional[int] = ..., policy_hash: _Optional[str] = ..., state: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...

class CreateSequencesRequest(_message.Message):
    __slots__ = ("sequences",)
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceConfig]
    def __init__(self, sequences: _Optional[_Iterable[_Union[SequenceConfig, _Mapping]]] = ...) -> None: ...

class CreatedSequence(_message.Message):
    __slots__ = ("sequence_id", "policy", "policy_version", "seed", "group_kind", "running_rows")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GROUP_KIND_FIELD_NUMBER: _ClassVar[int]
    RUNNING_ROWS_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    policy: str
    policy_version: PolicyVersion
    seed: int
    group_kind: str
    running_rows: int
    def __init__(self, sequence_id: _Optional[str] = ..., policy: _Optional[str] = ..., policy_version: _Optional[_Union[PolicyVersion, _Mapping]] = ..., seed: _Optional[int] = ..., group_kind: _Optional[str] = ..., running_rows: _Optional[int] = ...) -> None: ...

class CreateSequencesResponse(_message.Message):
    __slots__ = ("sequences",)
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[CreatedSequence]
    def __init__(self, sequences: _Optional[_Iterable[_Union[CreatedSequence, _Mapping]]] = ...) -> None: ...

class ReleaseSequencesRequest(_message.Message):
    __slots__ = ("sequence_ids",)
    SEQUENCE_IDS_FIELD_NUMBER: _ClassVar[int]
    sequence_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sequence_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseSequencesResponse(_message.Message):
    __slots__ = ("released", "not_found")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    released: _containers.RepeatedScalarFieldContainer[str]
    not_found: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, released: _Optional[_Iterable[str]] = ..., not_found: _Optional[_Iterable[str]] = ...) -> None: ...

class GetSequenceRequest(_message.Message):
    __slots__ = ("sequence_id",)
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    def __init__(self, sequence_id: _Optional[str] = ...) -> None: ...

class PolicyVersion(_message.Message):
    __slots__ = ("number", "hash")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    number: int
    hash: str
    def __init__(self, number: _Optional[int] = ..., hash: _Optional[str] = ...) -> None: ...

class StepStats(_message.Message):
    __slots__ = ("entropy", "varentropy")
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    VARENTROPY_FIELD_NUMBER: _ClassVar[int]
    entropy: float
    varentropy: float
    def __init__(self, entropy: _Optional[float] = ..., varentropy: _Optional[float] = ...) -> None: ...

class SequenceInfo(_message.Message):
    __slots__ = ("sequence_id", "policy", "policy_version", "prompt_ids", "output_ids", "stats", "finished", "finish_reason", "stop_token_id", "seed", "resolved_spec", "vocab_size", "group", "entropy_summary", "split", "text", "stop_string", "tokenizer_id")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_SPEC_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STOP_STRING_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_ID_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    policy: str
    policy_version: PolicyVersion
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    output_ids: _containers.RepeatedScalarFieldContainer[int]
    stats: _containers.RepeatedCompositeFieldContainer[StepStats]
    finished: bool
    finish_reason: FinishReason
    stop_token_id: int
    seed: int
    resolved_spec: _struct_pb2.Struct
    vocab_size: int
    group: GroupInfo
    entropy_summary: EntropySummary
    split: str
    text: str
    stop_string: str
    tokenizer_id: str
    def __init__(self, sequence_id: _Optional[str] = ..., policy: _Optional[str] = ..., policy_version: _Optional[_Union[PolicyVersion, _Mapping]] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., output_ids: _Optional[_Iterable[int]] = ..., stats: _Optional[_Iterable[_Union[StepStats, _Mapping]]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., stop_token_id: _Optional[int] = ..., seed: _Optional[int] = ..., resolved_spec: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., vocab_size: _Optional[int] = ..., group: _Optional[_Union[GroupInfo, _Mapping]] = ..., entropy_summary: _Optional[_Union[EntropySummary, _Mapping]] = ..., split: _Optional[str] = ..., text: _Optional[str] = ..., stop_string: _Optional[str] = ..., tokenizer_id: _Optional[str] = ...) -> None: ...

class EntropySummary(_message.Message):
    __slots__ = ("mean_entropy", "mean_varentropy", "ema_entropy", "ema_varentropy", "ema_alpha")
    MEAN_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    MEAN_VARENTROPY_FIELD_NUMBER: _ClassVar[int]
    EMA_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    EMA_VARENTROPY_FIELD_NUMBER: _ClassVar[int]
    EMA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    mean_entropy: float
    mean_varentropy: float
    ema_entropy: float
    ema_varentropy: float
    ema_alpha: float
    def __init__(self, mean_entropy: _Optional[float] = ..., mean_varentropy: _Optional[float] = ..., ema_entropy: _Optional[float] = ..., ema_varentropy: _Optional[float] = ..., ema_alpha: _Optional[float] = ...) -> None: ...

class GroupInfo(_message.Message):
    __slots__ = ("kind", "running_rows", "running", "hypotheses", "answers")
    KIND_FIELD_NUMBER: _ClassVar[int]
    RUNNING_ROWS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    HYPOTHESES_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    running_rows: int
    running: _containers.RepeatedCompositeFieldContainer[Hypothesis]
    hypotheses: _containers.RepeatedCompositeFieldContainer[Hypothesis]
    answers: _containers.RepeatedCompositeFieldContainer[AnswerVote]
    def __init__(self, kind: _Optional[str] = ..., running_rows: _Optional[int] = ..., running: _Optional[_Iterable[_Union[Hypothesis, _Mapping]]] = ..., hypotheses: _Optional[_Iterable[_Union[Hypothesis, _Mapping]]] = ..., answers: _Optional[_Iterable[_Union[AnswerVote, _Mapping]]] = ...) -> None: ...

class StepRow(_message.Message):
    __slots__ = ("sequence_id", "step", "branch", "draft_token_ids", "draft_probs")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PROBS_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    step: int
    branch: int
    draft_token_ids: _containers.RepeatedScalarFieldContainer[int]
    draft_probs: Tensor
    def __init__(self, sequence_id: _Optional[str] = ..., step: _Optional[int] = ..., branch: _Optional[int] = ..., draft_token_ids: _Optional[_Iterable[int]] = ..., draft_probs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("rows", "logits", "request_id", "processed_logprobs", "reference_logits", "signals", "sparse", "resume_records")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROCESSED_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_LOGITS_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    RESUME_RECORDS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[StepRow]
    logits: Tensor
    request_id: str
    processed_logprobs: bool
    reference_logits: Tensor
    signals: _containers.RepeatedCompositeFieldContainer[RowSignals]
    sparse: SparseRows
    resume_records: bool
    def __init__(self, rows: _Optional[_Iterable[_Union[StepRow, _Mapping]]] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., request_id: _Optional[str] = ..., processed_logprobs: _Optional[bool] = ..., reference_logits: _Optional[_Union[Tensor, _Mapping]] = ..., signals: _Optional[_Iterable[_Union[RowSignals, _Mapping]]] = ..., sparse: _Optional[_Union[SparseRows, _Mapping]] = ..., resume_records: _Optional[bool] = ...) -> None: ...

class RowSignals(_message.Message):
    __slots__ = ("attention_entropy", "attention_varentropy", "agreement", "interaction_strength")
    ATTENTION_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_VARENTROPY_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    INTERACTION_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    attention_entropy: float
    attention_varentropy: float
    agreement: float
    interaction_strength: float
    def __init__(self, attention_entropy: _Optional[float] = ..., attention_varentropy: _Optional[float] = ..., agreement: _Optional[float] = ..., interaction_strength: _Optional[float] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class Choice(_message.Message):
    __slots__ = ("sequence_id", "parent_row", "step", "token_id", "logprob", "top_logprobs", "stats", "finished", "finish_reason", "stop_token_id", "processed_logprob", "processed_top_logprobs", "processed_stats", "branch", "score", "stop_string", "explanation", "accepted_token_ids", "accepted_stats")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ROW_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PROCESSED_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    PROCESSED_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROCESSED_STATS_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    STOP_STRING_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_STATS_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    parent_row: int
    step: int
    token_id: int
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    stats: StepStats
    finished: bool
    finish_reason: FinishReason
    stop_token_id: int
    processed_logprob: float
    processed_top_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    processed_stats: StepStats
    branch: int
    score: float
    stop_string: str
    explanation: _struct_pb2.Struct
    accepted_token_ids: _containers.RepeatedScalarFieldContainer[int]
    accepted_stats: _containers.RepeatedCompositeFieldContainer[StepStats]
    def __init__(self, sequence_id: _Optional[str] = ..., parent_row: _Optional[int] = ..., step: _Optional[int] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., stats: _Optional[_Union[StepStats, _Mapping]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., stop_token_id: _Optional[int] = ..., processed_logprob: _Optional[float] = ..., processed_top_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., processed_stats: _Optional[_Union[StepStats, _Mapping]] = ..., branch: _Optional[int] = ..., score: _Optional[float] = ..., stop_string: _Optional[str] = ..., explanation: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., accepted_token_ids: _Optional[_Iterable[int]] = ..., accepted_stats: _Optional[_Iterable[_Union[StepStats, _Mapping]]] = ...) -> None: ...

class Hypothesis(_message.Message):
    __slots__ = ("token_ids", "score", "sum_logprobs", "finish_reason", "branch", "confidence", "answer_ids", "stats")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SUM_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    ANSWER_IDS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    score: float
    sum_logprobs: float
    finish_reason: FinishReason
    branch: int
    confidence: float
    answer_ids: _containers.RepeatedScalarFieldContainer[int]
    stats: _containers.RepeatedCompositeFieldContainer[StepStats]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., score: _Optional[float] = ..., sum_logprobs: _Optional[float] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., branch: _Optional[int] = ..., confidence: _Optional[float] = ..., answer_ids: _Optional[_Iterable[int]] = ..., stats: _Optional[_Iterable[_Union[StepStats, _Mapping]]] = ...) -> None: ...

class AnswerVote(_message.Message):
    __slots__ = ("answer_ids", "total_confidence", "paths")
    ANSWER_IDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    answer_ids: _containers.RepeatedScalarFieldContainer[int]
    total_confidence: float
    paths: int
    def __init__(self, answer_ids: _Optional[_Iterable[int]] = ..., total_confidence: _Optional[float] = ..., paths: _Optional[int] = ...) -> None: ...

class GroupResult(_message.Message):
    __slots__ = ("sequence_id", "hypotheses", "answers")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    HYPOTHESES_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    hypotheses: _containers.RepeatedCompositeFieldContainer[Hypothesis]
    answers: _containers.RepeatedCompositeFieldContainer[AnswerVote]
    def __init__(self, sequence_id: _Optional[str] = ..., hypotheses: _Optional[_Iterable[_Union[Hypothesis, _Mapping]]] = ..., answers: _Optional[_Iterable[_Union[AnswerVote, _Mapping]]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("choices", "error", "request_id", "service_micros", "results", "resume")
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_MICROS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    choices: _containers.RepeatedCompositeFieldContainer[Choice]
    error: _status_pb2.Status
    request_id: str
    service_micros: int
    results: _containers.RepeatedCompositeFieldContainer[GroupResult]
    resume: _containers.RepeatedCompositeFieldContainer[ResumeRecord]
    def __init__(self, choices: _Optional[_Iterable[_Union[Choice, _Mapping]]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., request_id: _Optional[str] = ..., service_micros: _Optional[int] = ..., results: _Optional[_Iterable[_Union[GroupResult, _Mapping]]] = ..., resume: _Optional[_Iterable[_Union[ResumeRecord, _Mapping]]] = ...) -> None: ...

class PreviewRequest(_message.Message):
    __slots__ = ("policy", "policy_spec", "params", "logits", "history", "prompt_ids", "eos_token_ids", "max_candidates", "reference_logits")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    POLICY_SPEC_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_LOGITS_FIELD_NUMBER: _ClassVar[int]
    policy: str
    policy_spec: _struct_pb2.Struct
    params: SamplingParams
    logits: Tensor
    history: _containers.RepeatedScalarFieldContainer[int]
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_candidates: int
    reference_logits: Tensor
    def __init__(self, policy: _Optional[str] = ..., policy_spec: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., history: _Optional[_Iterable[int]] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., max_candidates: _Optional[int] = ..., reference_logits: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("token_id", "probability")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    probability: float
    def __init__(self, token_id: _Optional[int] = ..., probability: _Optional[float] = ...) -> None: ...

class PreviewResponse(_message.Message):
    __slots__ = ("candidates", "survivors", "planned_chain")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    PLANNED_CHAIN_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    survivors: int
    planned_chain: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., survivors: _Optional[int] = ..., planned_chain: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterSystemRegionRequest(_message.Message):
    __slots__ = ("name", "key", "offset", "byte_size", "client_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    key: str
    offset: int
    byte_size: int
    client_id: str
    def __init__(self, name: _Optional[str] = ..., key: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ..., client_id: _Optional[str] = ...) -> None: ...

class RegisterCudaRegionRequest(_message.Message):
    __slots__ = ("name", "raw_handle", "device_id", "byte_size", "client_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RAW_HANDLE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    raw_handle: bytes
    device_id: int
    byte_size: int
    client_id: str
    def __init__(self, name: _Optional[str] = ..., raw_handle: _Optional[bytes] = ..., device_id: _Optional[int] = ..., byte_size: _Optional[int] = ..., client_id: _Optional[str] = ...) -> None: ...

class RegisterRegionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnregisterRegionRequest(_message.Message):
    __slots__ = ("name", "client_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    client_id: str
    def __init__(self, name: _Optional[str] = ..., client_id: _Optional[str] = ...) -> None: ...

class UnregisterRegionResponse(_message.Message):
    __slots__ = ("unregistered",)
    UNREGISTERED_FIELD_NUMBER: _ClassVar[int]
    unregistered: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, unregistered: _Optional[_Iterable[str]] = ...) -> None: ...

class RegionStatusRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RegionInfo(_message.Message):
    __slots__ = ("name", "kind", "key", "offset", "byte_size", "device_id", "client_id", "in_use")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    IN_USE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    key: str
    offset: int
    byte_size: int
    device_id: int
    client_id: str
    in_use: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., key: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ..., device_id: _Optional[int] = ..., client_id: _Optional[str] = ..., in_use: _Optional[int] = ...) -> None: ...

class RegionStatusResponse(_message.Message):
    __slots__ = ("regions",)
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedCompositeFieldContainer[RegionInfo]
    def __init__(self, regions: _Optional[_Iterable[_Union[RegionInfo, _Mapping]]] = ...) -> None: ...

class PolicyInfo(_message.Message):
    __slots__ = ("name", "kind", "spec", "version", "origin", "live_sequences")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    LIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    spec: _struct_pb2.Struct
    version: PolicyVersion
    origin: str
    live_sequences: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., spec: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., version: _Optional[_Union[PolicyVersion, _Mapping]] = ..., origin: _Optional[str] = ..., live_sequences: _Optional[int] = ...) -> None: ...

class ListPoliciesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPoliciesResponse(_message.Message):
    __slots__ = ("policies",)
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[PolicyInfo]
    def __init__(self, policies: _Optional[_Iterable[_Union[PolicyInfo, _Mapping]]] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class PutPolicyRequest(_message.Message):
    __slots__ = ("name", "spec")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class PutPolicyResponse(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: PolicyVersion
    def __init__(self, name: _Optional[str] = ..., version: _Optional[_Union[PolicyVersion, _Mapping]] = ...) -> None: ...

class DeletePolicyRequest(_message.Message):
    __slots__ = ("name", "force")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    force: bool
    def __init__(self, name: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class DeletePolicyResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: PolicyInfo
    def __init__(self, deleted: _Optional[_Union[PolicyInfo, _Mapping]] = ...) -> None: ...

class ValidatePolicyRequest(_message.Message):
    __slots__ = ("document", "spec", "name")
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    document: str
    spec: _struct_pb2.Struct
    name: str
    def __init__(self, document: _Optional[str] = ..., spec: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., name: _Optional[str] = ...) -> None: ...

class ValidatePolicyResponse(_message.Message):
    __slots__ = ("names",)
    NAMES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ...) -> None: ...

class SavedPolicy(_message.Message):
    __slots__ = ("name", "version", "spec_json", "split", "follow_latest", "overrides_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_LATEST_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: PolicyVersion
    spec_json: str
    split: str
    follow_latest: bool
    overrides_json: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[_Union[PolicyVersion, _Mapping]] = ..., spec_json: _Optional[str] = ..., split: _Optional[str] = ..., follow_latest: _Optional[bool] = ..., overrides_json: _Optional[str] = ...) -> None: ...

class SavedLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class SavedRow(_message.Message):
    __slots__ = ("step", "token_id", "logprob", "top_logprobs", "entropy", "varentropy", "finished", "finish_reason", "stop_token_id", "processed_logprob", "processed_top_logprobs", "processed_entropy", "processed_varentropy", "parent", "score", "explanation_json", "stop_string", "accepted_token_ids", "accepted_stats")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    VARENTROPY_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PROCESSED_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    PROCESSED_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROCESSED_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    PROCESSED_VARENTROPY_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_JSON_FIELD_NUMBER: _ClassVar[int]
    STOP_STRING_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_STATS_FIELD_NUMBER: _ClassVar[int]
    step: int
    token_id: int
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[SavedLogprob]
    entropy: float
    varentropy: float
    finished: bool
    finish_reason: FinishReason
    stop_token_id: int
    processed_logprob: float
    processed_top_logprobs: _containers.RepeatedCompositeFieldContainer[SavedLogprob]
    processed_entropy: float
    processed_varentropy: float
    parent: int
    score: float
    explanation_json: str
    stop_string: str
    accepted_token_ids: _containers.RepeatedScalarFieldContainer[int]
    accepted_stats: _containers.RepeatedCompositeFieldContainer[StepStats]
    def __init__(self, step: _Optional[int] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[SavedLogprob, _Mapping]]] = ..., entropy: _Optional[float] = ..., varentropy: _Optional[float] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., stop_token_id: _Optional[int] = ..., processed_logprob: _Optional[float] = ..., processed_top_logprobs: _Optional[_Iterable[_Union[SavedLogprob, _Mapping]]] = ..., processed_entropy: _Optional[float] = ..., processed_varentropy: _Optional[float] = ..., parent: _Optional[int] = ..., score: _Optional[float] = ..., explanation_json: _Optional[str] = ..., stop_string: _Optional[str] = ..., accepted_token_ids: _Optional[_Iterable[int]] = ..., accepted_stats: _Optional[_Iterable[_Union[StepStats, _Mapping]]] = ...) -> None: ...

class SavedRecord(_message.Message):
    __slots__ = ("sequence_id", "version", "position", "policy_hash", "seed", "state_json")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    POLICY_HASH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STATE_JSON_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    version: int
    position: int
    policy_hash: str
    seed: int
    state_json: str
    def __init__(self, sequence_id: _Optional[str] = ..., version: _Optional[int] = ..., position: _Optional[int] = ..., policy_hash: _Optional[str] = ..., seed: _Optional[int] = ..., state_json: _Optional[str] = ...) -> None: ...

class SavedGroupAnswer(_message.Message):
    __slots__ = ("step", "rows_in", "rows", "result")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROWS_IN_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    step: int
    rows_in: int
    rows: _containers.RepeatedCompositeFieldContainer[SavedRow]
    result: GroupResult
    def __init__(self, step: _Optional[int] = ..., rows_in: _Optional[int] = ..., rows: _Optional[_Iterable[_Union[SavedRow, _Mapping]]] = ..., result: _Optional[_Union[GroupResult, _Mapping]] = ...) -> None: ...

class SavedAnswer(_message.Message):
    __slots__ = ("row", "group")
    ROW_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    row: SavedRow
    group: SavedGroupAnswer
    def __init__(self, row: _Optional[_Union[SavedRow, _Mapping]] = ..., group: _Optional[_Union[SavedGroupAnswer, _Mapping]] = ...) -> None: ...

class SavedSequence(_message.Message):
    __slots__ = ("sequence_id", "policy", "prompt_ids", "eos_token_ids", "output_ids", "entropies", "varentropies", "record", "vocab_size", "last_answer", "tokenizer_id")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    ENTROPIES_FIELD_NUMBER: _ClassVar[int]
    VARENTROPIES_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAST_ANSWER_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_ID_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    policy: SavedPolicy
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    output_ids: _containers.RepeatedScalarFieldContainer[int]
    entropies: _containers.RepeatedScalarFieldContainer[float]
    varentropies: _containers.RepeatedScalarFieldContainer[float]
    record: SavedRecord
    vocab_size: int
    last_answer: SavedAnswer
    tokenizer_id: str
    def __init__(self, sequence_id: _Optional[str] = ..., policy: _Optional[_Union[SavedPolicy, _Mapping]] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., output_ids: _Optional[_Iterable[int]] = ..., entropies: _Optional[_Iterable[float]] = ..., varentropies: _Optional[_Iterable[float]] = ..., record: _Optional[_Union[SavedRecord, _Mapping]] = ..., vocab_size: _Optional[int] = ..., last_answer: _Optional[_Union[SavedAnswer, _Mapping]] = ..., tokenizer_id: _Optional[str] = ...) -> None: ...

class SavedStep(_message.Message):
    __slots__ = ("record", "answer", "vocab_size", "policy")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    record: SavedRecord
    answer: SavedAnswer
    vocab_size: int
    policy: SavedPolicy
    def __init__(self, record: _Optional[_Union[SavedRecord, _Mapping]] = ..., answer: _Optional[_Union[SavedAnswer, _Mapping]] = ..., vocab_size: _Optional[int] = ..., policy: _Optional[_Union[SavedPolicy, _Mapping]] = ...) -> None: ...

class SavedRelease(_message.Message):
    __slots__ = ("sequence_ids",)
    SEQUENCE_IDS_FIELD_NUMBER: _ClassVar[int]
    sequence_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sequence_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class JournalEntry(_message.Message):
    __slots__ = ("created", "stepped", "released")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STEPPED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    created: SavedSequence
    stepped: SavedStep
    released: SavedRelease
    def __init__(self, created: _Optional[_Union[SavedSequence, _Mapping]] = ..., stepped: _Optional[_Union[SavedStep, _Mapping]] = ..., released: _Optional[_Union[SavedRelease, _Mapping]] = ...) -> None: ...

class SavedTokenizer(_message.Message):
    __slots__ = ("vocabulary", "names")
    VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    vocabulary: RegisterTokenizerRequest
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, vocabulary: _Optional[_Union[RegisterTokenizerRequest, _Mapping]] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...
