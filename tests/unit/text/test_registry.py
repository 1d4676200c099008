"""sampler_service.text.registry: vocabularies by digest and name, and what it reports."""
from __future__ import annotations

import pytest

from sampler_client.vocabulary import Vocabulary
from sampler_service.errors import AlreadyExists
from sampler_service.text.registry import TokenizerRegistry

TOY = Vocabulary((b"", b"a", b"b"), frozenset({0}), (0,))


def test_on_change_reports_new_vocabularies_and_names_but_not_repeats():
    registry, changes = TokenizerRegistry(), []
    registry.on_change = lambda vocabulary, names: changes.append((vocabulary.digest, names))
    digest = registry.register(TOY)
    registry.register(TOY)                      # known, no name: nothing new
    registry.register(TOY, "toy")               # a new name
    registry.register(TOY, "toy")               # the same name again
    registry.register(TOY, "alias")
    assert changes == [(digest, ()), (digest, ("toy",)), (digest, ("toy", "alias"))]
    with pytest.raises(AlreadyExists):
        registry.register(Vocabulary((b"", b"c"), frozenset({0}), (0,)), "toy")
    assert len(changes) == 3
