"""The exemplar run request (``circuits exemplars``): its settings, defaults and command-line flags.

The model pass lives in ``circuits_attribution.exemplars``, the file format in
``circuits_server.exemplar_files``; this module is light (no torch) so the CLI can build its
parser without loading the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from circuits_core.errors import InvalidArgument

#: A token's uid is ``sequence << POSITION_BITS | position``, so sequences are shorter than MAX_SEQ_LEN.
POSITION_BITS = 20
MAX_SEQ_LEN = 1 << POSITION_BITS


@dataclass(frozen=True, slots=True, kw_only=True)
class ExemplarRunSettings:
    """One exemplar run (one shard). Field comments are the CLI help."""

    #: Corpus: a text / JSONL / Parquet file, a directory of them, or builtin:python-docs.
    corpus: str
    #: Output exemplar file (DuckDB); also the checkpoint a resumed run continues.
    output: Path
    #: Model id or checkpoint directory.
    model: str
    #: Field (JSONL) or column (Parquet) holding the text.
    text_field: str = "text"
    #: Layers to record (empty = all).
    layers: tuple[int, ...] = ()
    #: Top-activating contexts kept per neuron.
    top_k: int = 20
    #: Random-sample contexts (shared by all neurons; also the quantile estimate).
    random_samples: int = 256
    #: Tokens shown before / after the activating token.
    context_before: int = 16
    context_after: int = 4
    #: Tokens per packed sequence.
    seq_len: int = 256
    #: Sequences per forward pass.
    batch_size: int = 8
    #: Stop after this many corpus tokens (all shards together; 0 = the whole corpus).
    max_tokens: int = 0
    #: Seed of the random sample.
    seed: int = 0
    #: This shard (0-based) and the number of shards.
    shard_index: int = 0
    shard_count: int = 1
    #: Continue the run stored in the output file.
    resume: bool = False
    #: Seconds between checkpoints.
    checkpoint_seconds: float = 300.0
    #: Show a progress bar.
    progress: bool = True

    def __post_init__(self) -> None:
        if self.shard_count < 1:
            raise InvalidArgument(f"--shard-count must be >= 1, got {self.shard_count}")
        if not 0 <= self.shard_index < self.shard_count:
            raise InvalidArgument(f"--shard-index must be in [0, {self.shard_count}), got {self.shard_index}")
        for name in ("top_k", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("random_samples", "context_before", "context_after", "max_tokens"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.seq_len >= MAX_SEQ_LEN:
            raise InvalidArgument(f"--seq-len must be < {MAX_SEQ_LEN}")
        if any(layer < 0 for layer in self.layers):
            raise InvalidArgument("--layers must be >= 0")



_FIELDS = ExemplarRunSettings.__dataclass_fields__


def add_run_arguments(parser: Any) -> None:
    """Flags shared by ``circuits exemplars`` and the shard worker (defaults from ExemplarRunSettings)."""
    d = _FIELDS
    parser.add_argument("--text-field", default=d["text_field"].default, help="JSONL field / Parquet column of the text")
    parser.add_argument("--layers", default="", help="comma-separated layers to record (default: all)")
    parser.add_argument("--top-k", type=int, default=d["top_k"].default, help="top-activating contexts per neuron")
    parser.add_argument("--random-samples", type=int, default=d["random_samples"].default,
                        help="random-sample contexts shared by all neurons (also the quantile estimate)")
    parser.add_argument("--context-before", type=int, default=d["context_before"].default, help="tokens shown before")
    parser.add_argument("--context-after", type=int, default=d["context_after"].default, help="tokens shown after")
    parser.add_argument("--seq-len", type=int, default=d["seq_len"].default, help="tokens per packed sequence")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"].default, help="sequences per forward pass")
    parser.add_argument("--max-tokens", type=int, default=0, help="corpus tokens to use, all shards together (0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random sample")
    parser.add_argument("--checkpoint-seconds", type=float, default=d["checkpoint_seconds"].default,
                        help="seconds between checkpoints into the output file")


def parse_layers(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, _, hi = part.partition("-")
            if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                raise InvalidArgument(f"--layers: bad range {part!r}")
            out.extend(range(int(lo), int(hi) + 1))
        elif part.isdigit():
            out.append(int(part))
        else:
            raise InvalidArgument(f"--layers: {part!r} is not a layer number or range")
    return tuple(out)


def run_settings_from_args(args: Any, *, output: Path, shard_index: int, resume: bool, progress: bool) -> ExemplarRunSettings:
    return ExemplarRunSettings(
        corpus=args.corpus, output=output, model=args.model, text_field=args.text_field,
        layers=parse_layers(args.layers), top_k=args.top_k, random_samples=args.random_samples,
        context_before=args.context_before, context_after=args.context_after, seq_len=args.seq_len,
        batch_size=args.batch_size, max_tokens=args.max_tokens, seed=args.seed, shard_index=shard_index,
        shard_count=args.shard_count, resume=resume, checkpoint_seconds=args.checkpoint_seconds, progress=progress,
    )  # fmt: skip


