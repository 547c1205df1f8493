"""Target tokens of a trace: which vocabulary entry each ``target_tokens`` / ``contrastive`` string
names, checked with the tokenizer alone (before any weights load), and what to tell the user.

Rules (the same in process and on an attribution server, since both run this module):

* a string that is one vocabulary entry, encodes to one token, or is one token once a leading
  space is added (the byte-level ``Ġ`` form) names that token;
* a string that splits into several tokens is traced by its **first** token: the trace is then
  about the logit that starts the word. The split and the traced token are recorded in the graph
  metadata and the summary says so (a multi-token sequence has no single logit; its probability is
  the product over later positions, which one attribution graph at one position cannot trace);
* a string of more than :data:`MAX_TARGET_TOKENS` tokens is refused: a target names the next
  token (a word or a short answer), not a passage;
* a string that encodes to nothing, or only to the tokenizer's unknown token, cannot be traced,
  and neither can a contrastive pair whose two strings start with the same token. Every such
  problem of a request is reported at once, in one line.

After the trace, :func:`target_notes` explains multi-token targets and warns when the
space-prefixed variant of a target is far more probable at the traced position than the target
itself (``Paris`` p=0.001 vs `` Paris`` p=0.77).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from circuits_core.errors import InvalidArgument, echo
from circuits_core.tracing import TraceSettings

#: A space-prefixed variant this many times more probable than the target itself is pointed out.
SPACE_VARIANT_RATIO = 10.0
#: Longest target string, in tokens (its first token is traced).
MAX_TARGET_TOKENS = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedTarget:
    """One target string and the token traced for it."""

    #: The string as the user gave it.
    text: str
    #: Vocabulary id of the traced token.
    token_id: int
    #: The string's tokens as decoded pieces (one piece when it is a single token).
    pieces: tuple[str, ...]

    @property
    def multi_token(self) -> bool:
        return len(self.pieces) > 1

    def record(self, tokenizer: Any) -> dict[str, Any]:
        """JSON-ready description kept in the graph metadata (``generation_settings.targets``)."""
        return {"text": self.text, "token_id": self.token_id, "traced": tokenizer.decode([self.token_id]),
                "pieces": list(self.pieces)}


def resolve_target(tokenizer: Any, text: str, *, vocab: Mapping[str, int] | None = None) -> ResolvedTarget | str:
    """The token traced for ``text``, or a short reason why it cannot be traced."""
    if not isinstance(text, str) or text == "":
        return "is empty"
    vocab = dict(tokenizer.get_vocab()) if vocab is None else vocab
    if text in vocab:
        return ResolvedTarget(text=text, token_id=int(vocab[text]), pieces=(text,))
    ids = [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) == 1 and ids[0] != unk:
        return ResolvedTarget(text=text, token_id=ids[0], pieces=(tokenizer.decode(ids),))
    marked = "Ġ" + text.strip()
    if text.strip() and marked in vocab:
        return ResolvedTarget(text=text, token_id=int(vocab[marked]), pieces=(tokenizer.decode([vocab[marked]]),))
    if not ids:
        return "encodes to no token"
    if unk is not None and ids[0] == unk:
        return "is not in the vocabulary (unknown token)" if len(ids) == 1 else "starts with an unknown token"
    if len(ids) > MAX_TARGET_TOKENS:
        return f"is {len(ids)} tokens long (a target names the next token: at most {MAX_TARGET_TOKENS} tokens, the first is traced)"
    return ResolvedTarget(text=text, token_id=ids[0], pieces=tuple(tokenizer.decode([i]) for i in ids))


def resolve_targets(tokenizer: Any, settings: TraceSettings, *, model_name: str = "the model") -> dict[str, Any]:
    """The targets of ``settings`` resolved with ``tokenizer``: ``{"target_tokens": [...]}`` or
    ``{"contrastive": (pos, neg)}`` of :class:`ResolvedTarget` (empty dict for top-k traces).

    Raises InvalidArgument naming every target that cannot be traced, in one line.
    """
    texts = list(settings.contrastive) if settings.contrastive is not None else list(settings.target_tokens)
    if not texts:
        return {}
    vocab = dict(tokenizer.get_vocab())
    resolved: list[ResolvedTarget] = []
    problems: list[str] = []
    for text in texts:
        found = resolve_target(tokenizer, text, vocab=vocab)
        if isinstance(found, str):
            problems.append(f"{echo(text)} {found}")
        else:
            resolved.append(found)
    if settings.contrastive is not None and not problems and resolved[0].token_id == resolved[1].token_id:
        pos, neg = resolved
        same = tokenizer.decode([pos.token_id])
        problems.append(f"contrastive {echo(pos.text)} and {echo(neg.text)} both trace the token {same!r}")
    if problems:
        kind = "contrastive token" if settings.contrastive is not None else "target token"
        plural = "s" if len(problems) > 1 else ""
        raise InvalidArgument(f"{len(problems)} {kind}{plural} cannot be traced for {model_name}: " + "; ".join(problems))
    if settings.contrastive is not None:
        return {"contrastive": (resolved[0], resolved[1])}
    return {"target_tokens": resolved}


def target_notes(
    tokenizer: Any, targets: Sequence[ResolvedTarget], probabilities: Any, *, ratio: float = SPACE_VARIANT_RATIO
) -> tuple[list[str], list[str]]:
    """(notes, warnings): what the user should know about the traced targets, one line each.

    ``probabilities``: the next-token distribution at the traced position (a [V] tensor or
    sequence). A multi-token target gets a note with its split; a target whose space-prefixed
    variant is at least ``ratio`` times more probable gets a warning naming that variant.
    """
    notes: list[str] = []
    warnings: list[str] = []
    vocab = dict(tokenizer.get_vocab())
    for target in targets:
        traced = tokenizer.decode([target.token_id])
        if target.multi_token:
            notes.append(f"target {target.text!r} is {len(target.pieces)} tokens {list(target.pieces)}: "
                         f"traced its first token {traced!r}")
        if target.text.startswith((" ", "Ġ")):
            continue
        variant = resolve_target(tokenizer, " " + target.text, vocab=vocab)
        if isinstance(variant, str) or variant.token_id == target.token_id:
            continue
        p_target = float(probabilities[target.token_id])
        p_variant = float(probabilities[variant.token_id])
        if p_variant > ratio * p_target:
            shown = tokenizer.decode([variant.token_id])
            warnings.append(f"target {target.text!r} traces {traced!r} (p={p_target:.2g}), but {shown!r} with a leading "
                            f"space is {p_variant / max(p_target, 1e-300):.0f}x more probable here (p={p_variant:.2g}): "
                            f"pass {' ' + target.text!r} to trace it")
    return notes, warnings
