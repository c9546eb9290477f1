"""Tokenizer with the behaviour the released LISA checkpoints were trained with.

The published checkpoints were tokenized by transformers 4.31's slow sentencepiece ``LlamaTokenizer``
in legacy mode. Reproduced here, independent of the installed transformers version:

- added tokens (``[SEG]``, ``<im_start>``, ``<im_end>``, ...) and special tokens (``<s>``, ``</s>``,
  ``<unk>``) are split out before sentencepiece runs (longest match first);
- whitespace next to an added token (not ``<s>``/``</s>``/``<unk>``) is stripped on both sides (so the ``"\\n"`` after ``<im_end>``
  vanishes and ``"Sure, [SEG]."`` becomes ``▁Sure , [SEG] ▁ .``);
- every remaining chunk is encoded on its own (sentencepiece adds its dummy ``▁`` prefix per chunk);
- one BOS in front.

Two backends encode the plain chunks: a sentencepiece ``tokenizer.model`` (published checkpoints) or a
``tokenizers`` ``tokenizer.json`` (our small checkpoints; a Metaspace pre-tokenizer gives the same
per-chunk ``▁`` prefix). The prompt with its image placeholder is tokenized as LLaVA's
``tokenizer_image_token``: split on ``<image>``, tokenize each piece, keep only the first BOS, put
:data:`~lisa_agent.engine.prompts.IMAGE_TOKEN_INDEX` between pieces.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import CheckpointError
from .prompts import IMAGE_TOKEN, IMAGE_TOKEN_INDEX


class LisaTokenizer:
    """Legacy-faithful tokenizer over a sentencepiece or ``tokenizers`` backend.

    Attributes:
        added_tokens: token string -> id for tokens added on top of the base vocabulary.
        special_tokens: bos/eos/unk/pad strings present in the vocabulary.
    """

    def __init__(self, backend: object, kind: str, added_tokens: dict[str, int], special: dict[str, str]):
        self._backend = backend
        self.kind = kind  # "sentencepiece" or "tokenizers"
        self.added_tokens = dict(added_tokens)
        self.special = dict(special)
        self._id_to_added = {i: t for t, i in self.added_tokens.items()}
        self.bos_token_id = self._base_token_to_id(special.get("bos_token", "<s>"))
        self.eos_token_id = self._base_token_to_id(special.get("eos_token", "</s>"))
        # Split points: added tokens plus special token strings, longest first.
        self._no_split = {**{t: i for t, i in self.added_tokens.items()}}
        for key in ("bos_token", "eos_token", "unk_token"):
            tok = special.get(key)
            if tok and tok not in self._no_split:
                tid = self._base_token_to_id(tok)
                if tid is not None:
                    self._no_split[tok] = tid
        alternatives = sorted(self._no_split, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")") if alternatives else None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, folder: str | Path) -> LisaTokenizer:
        """Load from a checkpoint folder: ``tokenizer.model`` (preferred, as published) or ``tokenizer.json``.

        Raises :class:`CheckpointError` naming the folder for a missing, corrupt or unreadable tokenizer."""
        try:
            return cls._load(Path(folder))
        except CheckpointError:
            raise
        except Exception as exc:  # sentencepiece / tokenizers / json raise many types on corrupt files
            raise CheckpointError(f"cannot read the tokenizer in {folder} ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); the checkpoint's tokenizer "
                                  "files are damaged") from exc

    @classmethod
    def _load(cls, folder: Path) -> LisaTokenizer:
        special = _read_special_tokens(folder)
        added = _read_added_tokens(folder)
        if (folder / "tokenizer.model").is_file():
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor()
            if not sp.Load(str(folder / "tokenizer.model")):
                raise CheckpointError(f"{folder / 'tokenizer.model'} is not a sentencepiece model")
            return cls(sp, "sentencepiece", added, special)
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            # tokenizer.json lists added tokens too; added_tokens.json wins where both exist.
            for t in tok.get_added_tokens_decoder().values():
                if t.content not in added and t.content not in special.values():
                    tid = tok.token_to_id(t.content)
                    assert tid is not None  # the tokenizer's own added token has an id
                    added[t.content] = tid
            return cls(tok, "tokenizers", added, special)
        raise CheckpointError(f"no tokenizer in {folder}: expected tokenizer.model (sentencepiece) or tokenizer.json")

    # ------------------------------------------------------------------ vocabulary
    def _base_token_to_id(self, token: str) -> int | None:
        if self.kind == "sentencepiece":
            tid = self._backend.PieceToId(token)  # type: ignore[attr-defined]
            return None if tid == self._backend.unk_id() and token != self._backend.IdToPiece(tid) else tid  # type: ignore[attr-defined]
        return self._backend.token_to_id(token)  # type: ignore[attr-defined]

    def convert_tokens_to_ids(self, token: str) -> int:
        """Id of one token (added or base vocabulary); raises ``KeyError`` naming it when unknown."""
        if token in self.added_tokens:
            return self.added_tokens[token]
        tid = self._base_token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in the tokenizer's vocabulary")
        return tid

    def __len__(self) -> int:
        base = (self._backend.GetPieceSize() if self.kind == "sentencepiece"  # type: ignore[attr-defined]
                else self._backend.get_vocab_size(with_added_tokens=False))  # type: ignore[attr-defined]
        return max([base - 1, *self.added_tokens.values()]) + 1

    # ------------------------------------------------------------------ encoding
    def _encode_chunk(self, text: str) -> list[int]:
        if self.kind == "sentencepiece":
            return list(self._backend.EncodeAsIds(text))  # type: ignore[attr-defined]
        return list(self._backend.encode(text, add_special_tokens=False).ids)  # type: ignore[attr-defined]

    def tokenize_ids(self, text: str) -> list[int]:
        """Ids of ``text`` without BOS, added tokens split out and their neighbours' whitespace stripped."""
        pieces = self._split_re.split(text) if self._split_re else [text]
        # pieces alternate: plain, token, plain, token, ..., plain. Whitespace is stripped next to added
        # tokens only: 4.31 wraps <s>, </s>, <unk> as AddedToken(lstrip=False, rstrip=False).
        for i in range(1, len(pieces), 2):
            if pieces[i] not in self.added_tokens:
                continue
            if i - 1 >= 0:
                pieces[i - 1] = pieces[i - 1].rstrip()
            if i + 1 < len(pieces):
                pieces[i + 1] = pieces[i + 1].lstrip()
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2 == 1:
                ids.append(self._no_split[piece])
            elif piece:
                ids.extend(self._encode_chunk(piece))
        return ids

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Ids of ``text`` with one BOS in front (as the legacy tokenizer's ``__call__``)."""
        ids = self.tokenize_ids(text)
        return ([self.bos_token_id] if add_bos and self.bos_token_id is not None else []) + ids

    def encode_prompt(self, prompt: str) -> list[int]:
        """LLaVA's ``tokenizer_image_token``: ``<image>`` becomes :data:`IMAGE_TOKEN_INDEX`, one BOS kept."""
        chunks = [self.encode(chunk) for chunk in prompt.split(IMAGE_TOKEN)]
        out: list[int] = []
        for k, chunk in enumerate(chunks):
            if k > 0:
                out.append(IMAGE_TOKEN_INDEX)
            has_bos = bool(chunk) and chunk[0] == self.bos_token_id
            out.extend(chunk if k == 0 else chunk[1 if has_bos else 0:])
        return out

    # ------------------------------------------------------------------ decoding
    def _decode_plain(self, ids: Sequence[int]) -> str:
        if self.kind == "sentencepiece":
            return self._backend.DecodeIds(list(ids))  # type: ignore[attr-defined]
        return self._backend.decode(list(ids), skip_special_tokens=False)  # type: ignore[attr-defined]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` as the legacy slow tokenizer decodes: runs of base ids decoded by the backend,
        added tokens verbatim, parts joined by single spaces; BOS/EOS dropped when ``skip_special_tokens``."""
        parts: list[str] = []
        run: list[int] = []
        specials = {self.bos_token_id, self.eos_token_id}
        for tid in ids:
            if skip_special_tokens and tid in specials:
                continue
            if tid in self._id_to_added:
                if run:
                    parts.append(self._decode_plain(run))
                    run = []
                parts.append(self._id_to_added[tid])
            else:
                run.append(int(tid))
        if run:
            parts.append(self._decode_plain(run))
        return " ".join(parts)

    def id_to_token(self, tid: int) -> str:
        """String of one id (added tokens verbatim, base pieces as the backend names them)."""
        if tid == IMAGE_TOKEN_INDEX:
            return IMAGE_TOKEN
        if tid in self._id_to_added:
            return self._id_to_added[tid]
        if self.kind == "sentencepiece":
            return self._backend.IdToPiece(int(tid))  # type: ignore[attr-defined]
        return self._backend.id_to_token(int(tid)) or ""  # type: ignore[attr-defined]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def _token_str(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_special_tokens(folder: Path) -> dict[str, str]:
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = _read_json(folder / name)
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            tok = _token_str(data.get(key))
            if tok:
                special[key] = tok
    return special


def _read_added_tokens(folder: Path) -> dict[str, int]:
    added = {str(k): int(v) for k, v in _read_json(folder / "added_tokens.json").items()}
    cfg = _read_json(folder / "tokenizer_config.json")
    for tid, entry in (cfg.get("added_tokens_decoder") or {}).items():
        content = _token_str(entry)
        if content and content not in added and not (isinstance(entry, dict) and entry.get("special")):
            added[content] = int(tid)
    return added
