"""Where each peer's sampling parameter goes here: vLLM's `SamplingParams`, OpenAI's chat and
completions requests, Hugging Face's `GenerationConfig` and llama.cpp's sampler parameters
(`common_params_sampling`, the llama-server request fields).

One `Row` per peer field. `ours` names what takes it here: a flat request parameter
(`SamplingParams` field, e.g. `top_k`), a stage key (`penalties`, a policy's chain or
selector) or one of a stage's parameters (`penalties.frequency`); empty when it is not
supported, `note` then saying why. `docgen` renders the table into docs/policies.md, and
tests/unit/policy/test_parity.py checks that every `SamplingParams` proto field is some row's
`ours` and that every `ours` is a real flat parameter, stage or stage parameter.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """One peer parameter: the peer, its field, what takes it here ("" = not supported), how."""

    peer: str
    field: str
    ours: str
    note: str = ""


VLLM = "vLLM `SamplingParams`"
OPENAI = "OpenAI chat / completions"
HF = "Hugging Face `GenerationConfig`"
LLAMA = "llama.cpp (`common_params_sampling` / llama-server)"

#: The peers in the order the table lists them.
PEERS = (VLLM, OPENAI, HF, LLAMA)

_NO_TEXT = ("not supported: the worker owns the prompt and the text it returns; the service's "
            "own text (stop strings, `SequenceInfo.text`) is the output tokens' bytes")

ROWS: tuple[Row, ...] = (
    # -- vLLM -----------------------------------------------------------------------------------
    Row(VLLM, "n", "n", "fork group: fork i draws with seed + i"),
    Row(VLLM, "best_of", "best_of", "the n forks with the highest cumulative raw logprob"),
    Row(VLLM, "presence_penalty", "presence_penalty", "[-2, 2], as vLLM validates it"),
    Row(VLLM, "frequency_penalty", "frequency_penalty", "[-2, 2], as vLLM validates it"),
    Row(VLLM, "repetition_penalty", "repetition_penalty", "> 0"),
    Row(VLLM, "temperature", "temperature", "< 1e-5 is greedy"),
    Row(VLLM, "top_p", "top_p", "(0, 1]; boundary rule `top_p_rule`"),
    Row(VLLM, "top_k", "top_k", "0 or -1 = off (-1 stored as 0); other negatives refused"),
    Row(VLLM, "min_p", "min_p"),
    Row(VLLM, "seed", "seed", "uint64; the same seed gives the same tokens in any batch"),
    Row(VLLM, "stop", "stop", "needs the sequence's tokenizer"),
    Row(VLLM, "stop_token_ids", "stop_token_ids"),
    Row(VLLM, "ignore_eos", "ignore_eos",
        "EOS no longer finishes; stop ids, stop strings and max_tokens still do; min_tokens "
        "still masks EOS (vLLM's `all_stop_token_ids`)"),
    Row(VLLM, "max_tokens", "max_tokens", "0 = no limit (vLLM's default is 16)"),
    Row(VLLM, "min_tokens", "min_tokens"),
    Row(VLLM, "logprobs", "logprobs", "0..20 raw-distribution top logprobs; the chosen "
                                      "token's logprob always comes"),
    Row(VLLM, "prompt_logprobs", "",
        "not supported: the worker streams the last position's logits of generated steps, "
        "never the prompt's"),
    Row(VLLM, "include_stop_str_in_output", "include_stop_str_in_output"),
    Row(VLLM, "structured_outputs (guided_decoding)", "structured",
        "json schema, json object, regex, grammar, choice (xgrammar)"),
    Row(VLLM, "logit_bias", "logit_bias", "keys as ints or decimal text; [-100, 100]"),
    Row(VLLM, "allowed_token_ids", "allowed_token_ids"),
    Row(VLLM, "bad_words", "bad_words", "strings (with a tokenizer) or token-id sequences"),
    Row(VLLM, "logits_processors", "",
        "not supported as request callables: install a plug-in stage (docs: plug-ins)"),
    Row(VLLM, "detokenize / skip_special_tokens / spaces_between_special_tokens", "", _NO_TEXT),
    Row(VLLM, "truncate_prompt_tokens", "", "not supported: the worker owns the prompt"),
    Row(VLLM, "output_kind", "", "not supported: streaming to the user is the worker's"),
    Row(VLLM, "extra_args", "", "not supported: parameters are typed and checked"),
    Row(VLLM, "BeamSearchParams (beam_width, length_penalty)", "beam",
        "the `beam` selector, with Hugging Face's beam semantics"),
    # -- OpenAI ---------------------------------------------------------------------------------
    Row(OPENAI, "temperature", "temperature", "OpenAI allows [0, 2]; any T ≥ 0 here"),
    Row(OPENAI, "top_p", "top_p"),
    Row(OPENAI, "frequency_penalty", "frequency_penalty", "[-2, 2]"),
    Row(OPENAI, "presence_penalty", "presence_penalty", "[-2, 2]"),
    Row(OPENAI, "logit_bias", "logit_bias",
        "string keys (`{\"50256\": -100}`) taken by the SDK and inline specs; values in "
        "[-100, 100], outside refused"),
    Row(OPENAI, "logprobs (chat: true / false)", "",
        "always on: every choice carries the chosen token's logprob"),
    Row(OPENAI, "logprobs (completions: 0..5)", "logprobs"),
    Row(OPENAI, "top_logprobs", "top_logprobs",
        "0..20; another name for `logprobs` (both given: they must be equal)"),
    Row(OPENAI, "max_tokens / max_completion_tokens", "max_tokens"),
    Row(OPENAI, "n", "n"),
    Row(OPENAI, "best_of (completions)", "best_of"),
    Row(OPENAI, "seed", "seed"),
    Row(OPENAI, "stop", "stop", "up to 64 strings here (OpenAI: 4)"),
    Row(OPENAI, "response_format (json_schema, json_object)", "structured"),
    # -- Hugging Face ---------------------------------------------------------------------------
    Row(HF, "do_sample", "sample", "do_sample=False: the `greedy` selector"),
    Row(HF, "temperature", "temperature"),
    Row(HF, "top_k", "top_k"),
    Row(HF, "top_p", "top_p",
        "`top_p_rule: hf` (stage `rule: hf`) gives TopPLogitsWarper's kept set bit for bit"),
    Row(HF, "TopPLogitsWarper's boundary (cumsum ≤ 1 − top_p in float32)", "top_p_rule"),
    Row(HF, "min_p", "min_p"),
    Row(HF, "typical_p", "typical_p"),
    Row(HF, "epsilon_cutoff", "epsilon_cutoff"),
    Row(HF, "eta_cutoff", "eta_cutoff"),
    Row(HF, "top_h", "top_h"),
    Row(HF, "min_tokens_to_keep (warper argument)", "top_p.min_keep",
        "every truncation's `min_keep`"),
    Row(HF, "repetition_penalty", "repetition_penalty"),
    Row(HF, "no_repeat_ngram_size", "no_repeat_ngram"),
    Row(HF, "bad_words_ids", "bad_words"),
    Row(HF, "sequence_bias", "logit_bias", "single-token biases only; longer sequences: not "
                                           "supported"),
    Row(HF, "exponential_decay_length_penalty", "exponential_decay_length_penalty"),
    Row(HF, "suppress_tokens", "suppress_tokens", "with `steps` listing every position"),
    Row(HF, "begin_suppress_tokens", "suppress_tokens", "`steps: [0]`, the default"),
    Row(HF, "forced_bos_token_id / forced_eos_token_id", "forced_tokens",
        "`{output position: token id}`, e.g. EOS at the last position max_new_tokens allows"),
    Row(HF, "min_new_tokens", "min_tokens"),
    Row(HF, "max_new_tokens", "max_tokens"),
    Row(HF, "eos_token_id", "",
        "`SequenceConfig.eos_token_ids` (per sequence, not a sampling parameter)"),
    Row(HF, "stop_strings", "stop"),
    Row(HF, "num_beams / num_beam_groups / diversity_penalty / length_penalty / early_stopping",
        "beam"),
    Row(HF, "num_return_sequences (sampling)", "n"),
    Row(HF, "num_return_sequences (beams)", "beam.num_return_sequences"),
    Row(HF, "renormalize_logits", "",
        "not needed: selectors and reported processed logprobs renormalise"),
    Row(HF, "remove_invalid_values", "",
        "not needed: NaN and +inf logits are refused on arrival (INVALID_ARGUMENT)"),
    Row(HF, "encoder_repetition_penalty / encoder_no_repeat_ngram_size", "",
        "not supported: decoder-only (no encoder input ids reach the service)"),
    Row(HF, "guidance_scale", "",
        "not supported: classifier-free guidance needs a second forward pass of the model"),
    Row(HF, "force_words_ids / constraints", "",
        "not supported: constrained beam search (deprecated in transformers)"),
    Row(HF, "penalty_alpha (contrastive search)", "",
        "not supported: needs the model's hidden states"),
    Row(HF, "watermarking_config", "", "not supported"),
    # -- llama.cpp ------------------------------------------------------------------------------
    Row(LLAMA, "temp / temperature", "temp_ext.temperature",
        "≤ 0 (here < 1e-5) keeps the best token only"),
    Row(LLAMA, "dynatemp_range", "temp_ext.delta"),
    Row(LLAMA, "dynatemp_exponent", "temp_ext.exponent"),
    Row(LLAMA, "top_k", "top_k", "llama.cpp: any k ≤ 0 is off; here 0 or -1"),
    Row(LLAMA, "top_p", "top_p", "`exact`: llama.cpp's rule (keep until the sum reaches p)"),
    Row(LLAMA, "min_p", "min_p"),
    Row(LLAMA, "typ_p / typical_p", "typical_p",
        "Hugging Face's rule (llama.cpp stops at C > p and keeps no ties)"),
    Row(LLAMA, "top_n_sigma", "top_n_sigma"),
    Row(LLAMA, "xtc_probability", "xtc.probability"),
    Row(LLAMA, "xtc_threshold", "xtc.threshold"),
    Row(LLAMA, "min_keep", "xtc.min_keep", "0 taken (as 1) by `xtc`; other truncations need ≥ 1"),
    Row(LLAMA, "penalty_last_n / repeat_last_n", "penalties.last_n", "-1 = the whole context"),
    Row(LLAMA, "penalty_repeat / repeat_penalty", "penalties.repeat", "> 0"),
    Row(LLAMA, "penalty_freq / frequency_penalty", "penalties.frequency", "no cap, as llama.cpp"),
    Row(LLAMA, "penalty_present / presence_penalty", "penalties.presence",
        "no cap, as llama.cpp"),
    Row(LLAMA, "dry_multiplier", "dry.multiplier"),
    Row(LLAMA, "dry_base", "dry.base", "< 1 is off (llama-server replaces it with 1.75)"),
    Row(LLAMA, "dry_allowed_length", "dry.allowed_length"),
    Row(LLAMA, "dry_penalty_last_n", "dry.last_n"),
    Row(LLAMA, "dry_sequence_breakers", "dry.breakers"),
    Row(LLAMA, "mirostat (0 / 1 / 2)", "mirostat.version", "0: another selector"),
    Row(LLAMA, "mirostat_tau", "mirostat.tau"),
    Row(LLAMA, "mirostat_eta", "mirostat.eta"),
    Row(LLAMA, "seed", "seed"),
    Row(LLAMA, "n_probs", "logprobs"),
    Row(LLAMA, "n_predict", "max_tokens", "-1 (unlimited) is 0 here"),
    Row(LLAMA, "stop", "stop"),
    Row(LLAMA, "ignore_eos", "ignore_eos",
        "vLLM's meaning here (EOS is produced and does not finish); llama.cpp instead biases "
        "every end-of-generation token by −inf so none is produced: add `logit_bias` −100 on "
        "the EOS ids for that"),
    Row(LLAMA, "logit_bias", "logit_bias",
        "[-100, 100] here (llama.cpp takes any bias, and `false` for -inf: use -100)"),
    Row(LLAMA, "grammar", "structured.grammar", "GBNF, in xgrammar's dialect"),
    Row(LLAMA, "json_schema", "structured.json_schema"),
    Row(LLAMA, "samplers (order)", "", "a policy's `chain` is run in the order written"),
    Row(LLAMA, "n_prev", "", "not needed: the service keeps the whole token history"),
)
