"""A model's vocabulary as exact bytes per token id, read from a Hugging Face tokenizer.

`Vocabulary.tokens[i]` is the byte string token `i` stands for in the output text; control
tokens (those the tokenizer marks special: BOS/EOS/chat markers) have b"" and are listed in
`special_ids`, as `tokenizer.decode(ids, skip_special_tokens=True)` drops them. Concatenating
the bytes of a token sequence and decoding it as UTF-8 (errors="replace") gives the text
Hugging Face decodes, for the decoders below:

* ByteLevel (GPT-2, SmolLM2, Llama 3, Qwen): each character of a token string is one byte
  through the inverse of GPT-2's `bytes_to_unicode` table ("Ġ" → b" "). A token with a
  character outside the table stands for its own UTF-8 bytes, as `tokenizers` decodes it.
* SentencePiece style (Llama 2, Mistral, Gemma: `Replace("▁", " ")`, `ByteFallback`, `Fuse`,
  `Strip`; or `Metaspace`): "▁" → b" ", "<0xAB>" → the byte 0xAB, else the UTF-8 bytes. The
  `Strip` decoder removes the first space of a *whole* decoded text; token bytes keep it (a
  sequence continuing a prompt keeps its leading space, as vLLM's prompt-offset detokenizer
  does), so decoding such a sequence on its own differs from HF by that one leading space.
* No decoder (plain vocabularies): each token stands for its UTF-8 bytes.

Other decoders (WordPiece, BPEDecoder, CTC) join tokens in ways bytes cannot express: ValueError.

The size is what the model's logits use: `len(tokenizer)` (the model's vocabulary plus added
tokens); ids without a token have b"".
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Iterable

GGUF_MAGIC = b"GGUF"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "▁"


@dataclass(frozen=True)
class Vocabulary:
    """Token bytes per id (b"" for control tokens), the control ids and the EOS ids; and,
    when known, the `tokenizers` JSON it was read from (`encoder_json`), which lets the service
    encode text (bad words and DRY breakers given as strings). The encoder is not part of the
    vocabulary's identity (`digest`, equality)."""

    tokens: tuple[bytes, ...]
    special_ids: frozenset[int]
    eos_token_ids: tuple[int, ...] = ()
    encoder_json: str = field(default="", compare=False, repr=False)

    @property
    def size(self) -> int:
        return len(self.tokens)

    @cached_property
    def digest(self) -> str:
        """"sha256:<hex>" of: b"sampler-vocabulary/1", the size, each token as (u32 length,
        bytes), the sorted special ids and the EOS ids in order (each list as u32 count, u32
        ids; all little-endian). Equal vocabularies have equal digests."""
        sha = hashlib.sha256(b"sampler-vocabulary/1")
        sha.update(struct.pack("<I", len(self.tokens)))
        for token in self.tokens:
            sha.update(struct.pack("<I", len(token)))
            sha.update(token)
        for ids in (sorted(self.special_ids), self.eos_token_ids):
            sha.update(struct.pack(f"<I{len(ids)}I", len(ids), *ids))
        return "sha256:" + sha.hexdigest()


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """The inverse of GPT-2's `bytes_to_unicode`: printable Latin-1 bytes stand for themselves,
    the other 68 bytes for the characters U+0100.. in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in set(printable))
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


def _byte_level(token: str) -> bytes:
    table = _byte_of_char()
    if all(c in table for c in token):
        return bytes(table[c] for c in token)
    return token.encode("utf-8")


def _sentencepiece(replacements: tuple[tuple[str, str], ...], byte_fallback: bool):
    def convert(token: str) -> bytes:
        match = _BYTE_TOKEN.fullmatch(token) if byte_fallback else None
        if match:
            return bytes([int(match.group(1), 16)])
        for old, new in replacements:
            token = token.replace(old, new)
        return token.encode("utf-8")
    return convert


def _plain(token: str) -> bytes:
    return token.encode("utf-8")


def _decoder_steps(decoder: dict | None) -> list[dict]:
    if decoder is None:
        return []
    if decoder.get("type") == "Sequence":
        return [step for sub in decoder["decoders"] for step in _decoder_steps(sub)]
    return [decoder]


def _token_converter(data: dict, source: str):
    """The function from a token string to its bytes, from the tokenizer JSON's decoder."""
    steps = _decoder_steps(data.get("decoder"))
    kinds = {step.get("type") for step in steps}
    if "ByteLevel" in kinds:
        return _byte_level
    unsupported = kinds - {"Replace", "ByteFallback", "Fuse", "Strip", "Metaspace"}
    if unsupported:
        raise ValueError(f"{source}: decoder {sorted(unsupported)} cannot be expressed as "
                         f"bytes per token (supported: ByteLevel, Metaspace, Replace, "
                         f"ByteFallback, Fuse, Strip)")
    if not kinds:
        return _plain
    replaces = [step for step in steps if step["type"] == "Replace"]
    if any("String" not in step.get("pattern", {}) for step in replaces):
        raise ValueError(f"{source}: a Replace decoder with a regex pattern is not supported")
    replacements = tuple((step["pattern"]["String"], step["content"]) for step in replaces)
    if "Metaspace" in kinds:
        replacements += ((_METASPACE, " "),)
    byte_fallback = "ByteFallback" in kinds or bool(data["model"].get("byte_fallback"))
    return _sentencepiece(replacements, byte_fallback)


def _model_vocab(model: dict) -> Iterable[tuple[str, int]]:
    vocab = model["vocab"]
    if isinstance(vocab, dict):  # BPE, WordLevel: token → id
        return vocab.items()
    return ((piece[0], i) for i, piece in enumerate(vocab))  # Unigram: [piece, score] by id


def vocabulary_from_json(data: dict, *, size: int | None = None,
                         eos_token_ids: Iterable[int] = (), source: str = "tokenizer",
                         encoder_json: str = "") -> Vocabulary:
    """A vocabulary from a `tokenizers` JSON document (tokenizer.json's content; `encoder_json`
    its text, kept so the service can encode). `size` defaults to the highest id + 1; ids at
    or beyond it are dropped."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict) \
            or "vocab" not in data["model"]:
        raise ValueError(f"{source}: not a tokenizer (no model.vocab in its JSON)")
    convert = _token_converter(data, source)
    by_id: dict[int, bytes] = {i: convert(token) for token, i in _model_vocab(data["model"])}
    special: set[int] = set()
    for added in data.get("added_tokens") or ():
        if added.get("special"):
            special.add(added["id"])
            by_id[added["id"]] = b""
        else:
            by_id[added["id"]] = added["content"].encode("utf-8")
    if size is None:
        size = max(by_id, default=-1) + 1
    return Vocabulary(tokens=tuple(by_id.get(i, b"") for i in range(size)),
                      special_ids=frozenset(i for i in special if i < size),
                      eos_token_ids=tuple(eos_token_ids), encoder_json=encoder_json)


def _eos_ids(tokenizer: Any) -> tuple[int, ...]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return ()
    return (eos,) if isinstance(eos, int) else tuple(eos)


def vocabulary_from_hf(tokenizer: Any) -> Vocabulary:
    """A vocabulary from a transformers fast tokenizer: its backend JSON, `len(tokenizer)` ids
    and its `eos_token_id`."""
    text = tokenizer.backend_tokenizer.to_str()
    return vocabulary_from_json(json.loads(text), size=len(tokenizer),
                                eos_token_ids=_eos_ids(tokenizer),
                                source=type(tokenizer).__name__, encoder_json=text)


def _auto_tokenizer(directory: Path, **kwargs):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)


def load_vocabulary(path: str | Path) -> Vocabulary:
    """A vocabulary from a local file or directory, never fetching from a hub:

    * a GGUF file (starts with b"GGUF"): transformers' GGUF tokenizer
      (`AutoTokenizer.from_pretrained(dir, gguf_file=name)`);
    * a tokenizer.json file (`tokenizers` JSON): read directly; no EOS ids (the file has none);
    * a Hugging Face tokenizer directory: `AutoTokenizer.from_pretrained(dir)`, or its
      tokenizer.json when transformers is not installed.

    Raises ValueError naming the path for anything else.
    """
    path = Path(path)
    if path.is_dir():
        try:
            import transformers  # noqa: F401  (the `hf` extra)
        except ImportError:
            if (path / "tokenizer.json").is_file():
                return load_vocabulary(path / "tokenizer.json")
            raise ValueError(f"{path}: loading a tokenizer directory without a tokenizer.json "
                             f"needs transformers") from None
        try:
            return vocabulary_from_hf(_auto_tokenizer(path))
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{path}: not a Hugging Face tokenizer directory ({err})") from err
    if not path.is_file():
        raise ValueError(f"{path}: no such tokenizer file or directory")
    with path.open("rb") as file:
        magic = file.read(len(GGUF_MAGIC))
    if magic == GGUF_MAGIC:
        try:
            return vocabulary_from_hf(_auto_tokenizer(path.parent, gguf_file=path.name))
        except (OSError, ValueError, KeyError, IndexError, struct.error) as err:
            raise ValueError(f"{path}: GGUF file without a usable tokenizer ({err})") from err
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a tokenizer (neither GGUF nor tokenizer JSON: {err})") from err
    return vocabulary_from_json(data, source=str(path), encoder_json=text)
