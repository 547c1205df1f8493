"""Persistent answer cache: an append-only JSONL file, one record per finished LLM answer.

A record is keyed by ``(model, layer, neuron, pass, prompt hash)``; the prompt hash covers the
system prompt, the user prompt and the answer-token limit, so a changed prompt (e.g. because an
upstream label changed) is asked again while an identical one is never paid twice. Each record is
written with a single ``write`` of one line and (by default) ``fsync``ed before the engine moves
on, so a process killed at any moment loses at most the answers in flight. A torn last line
(killed mid-write) is ignored on load and cut off before the next append.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from circuits_core.errors import CorruptInput


def prompt_hash(*, system: str, user: str, max_tokens: int) -> str:
    payload = json.dumps({"system": system, "user": user, "max_tokens": max_tokens}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True, slots=True, kw_only=True)
class CachedAnswer:
    model: str
    layer: int
    neuron: int
    label_pass: str
    prompt_hash: str
    #: "ok" (parsed answer below) or "failed" (malformed after every re-ask).
    status: str
    label: str = ""
    description: str = ""
    type: str = ""
    confidence: str = ""
    #: Last raw answer text (for failed answers: what could not be parsed).
    raw: str = ""
    error: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    attempts: int = 1

    @property
    def key(self) -> tuple[str, int, int, str, str]:
        return (self.model, self.layer, self.neuron, self.label_pass, self.prompt_hash)


class AnswerCache:
    """Append-only JSONL answer cache (thread-safe). Later records for a key win."""

    def __init__(self, path: str | Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._records: dict[tuple[str, int, int, str, str], CachedAnswer] = {}
        self._load()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for appends

    def _load(self) -> None:
        if not self.path.exists():
            return
        good_bytes = 0
        with open(self.path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                if not raw.endswith(b"\n"):
                    break  # torn tail of a killed writer
                try:
                    record = CachedAnswer(**json.loads(raw))
                except (ValueError, TypeError) as exc:
                    raise CorruptInput(f"{self.path}:{n}: not an answer cache record ({exc.__class__.__name__})") from None
                self._records[record.key] = record
                good_bytes += len(raw)
        if good_bytes != self.path.stat().st_size:
            with open(self.path, "r+b") as fh:
                fh.truncate(good_bytes)

    def get(self, key: tuple[str, int, int, str, str]) -> CachedAnswer | None:
        with self._lock:
            return self._records.get(key)

    def put(self, record: CachedAnswer) -> None:
        """Append ``record`` durably (flush + fsync) and make it visible to ``get``."""
        line = json.dumps(asdict(record), ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
            self._records[record.key] = record

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def __iter__(self) -> Iterator[CachedAnswer]:
        with self._lock:
            return iter(list(self._records.values()))

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()
