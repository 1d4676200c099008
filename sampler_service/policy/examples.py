"""One representative, switched-on parameter set per processor and selector.

Shown in docs/policies.md as the stage's YAML example, timed by benchmarks/processor_costs.py
and exercised through the service by tests/service/test_preview_every_stage.py, which also
checks that every registered stage has an entry here.
"""
from __future__ import annotations

from typing import Any

STAGE_EXAMPLES: dict[str, dict[str, Any]] = {
    # truncation
    "top_k": {"k": 40},
    "top_p": {"p": 0.95},
    "min_p": {"p": 0.05},
    "typical_p": {"p": 0.9},
    "epsilon_cutoff": {"epsilon": 3e-4},
    "eta_cutoff": {"epsilon": 3e-4},
    "top_n_sigma": {"n": 1.0},
    "xtc": {"probability": 0.5, "threshold": 0.1},
    "top_h": {"top_h": 0.4},
    # temperature
    "temperature": {"temperature": 0.8},
    # adaptive
    "temp_ext": {"temperature": 0.8, "delta": 0.5, "exponent": 1.0},
    "edt": {"t0": 0.8, "theta": 1.0, "base": 0.8},
    "hot_or_cold": {"hot": 0.9, "cold": 0.3, "rule": "newline", "newline_ids": [198]},
    "kl_temperature": {"t0": 1.0, "t_min": 0.3, "scale": 1.0},
    "sed": {"entropy_threshold": 2.5, "ratio_threshold": 0.5},
    # penalties
    "repetition_penalty": {"penalty": 1.1},
    "frequency_penalty": {"penalty": 0.5},
    "presence_penalty": {"penalty": 0.5},
    "penalties": {"last_n": 64, "repeat": 1.1, "frequency": 0.1, "presence": 0.1},
    "dry": {"multiplier": 0.8, "base": 1.75, "allowed_length": 2, "last_n": -1,
            "breakers": [[198], [25]]},
    # constraints
    "min_tokens": {"min_tokens": 4},
    "logit_bias": {"bias": {"13": -5.0, "42": 2.5}},
    "allowed_token_ids": {"ids": [3, 5, 7, 9, 11, 13]},
    "bad_words": {"sequences": [[5, 6, 7], [11]]},
    "no_repeat_ngram": {"size": 3},
    "exponential_decay_length_penalty": {"start": 10, "factor": 1.05},
    "suppress_tokens": {"ids": [1, 2, 3], "steps": [0]},
    "forced_tokens": {"tokens": {"0": 7}},
    # structured outputs (needs the sequence's tokenizer)
    "structured": {"json_schema": {"type": "object", "properties": {"answer": {"type": "string"}},
                                   "required": ["answer"]}},
    # selectors
    "greedy": {},
    "sample": {},
    "mirostat": {"version": 2, "tau": 5.0, "eta": 0.1},
    "entropix": {"preset": "first", "clarifying_token_id": 13, "min_p": 0.03,
                 "n_adaptive_samples": 5},
    "beam": {"width": 4, "length_penalty": 1.0, "early_stopping": "never",
             "num_return_sequences": 2},
    "cot": {"k": 5},
}
