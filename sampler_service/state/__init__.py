"""Per-sequence state (`SequenceState`) and the map of live sequences (`SequenceStore`)."""

from sampler_service.state.history import TokenHistory
from sampler_service.state.sequence import (FinishReason, RowOutcome, SequenceState, StepRecord,
                                            TopList)
from sampler_service.state.store import SequenceStore

__all__ = ["FinishReason", "RowOutcome", "SequenceState", "SequenceStore", "StepRecord",
           "TokenHistory", "TopList"]
