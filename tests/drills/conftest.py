"""Fixtures of the reliability drills: service subprocesses, a tiny model, a small atlas, the
tokens file, the session log, and the drill summary table printed at the end of the run.

Everything binds 127.0.0.1 and port 0; nothing reaches the network. Helpers live in
drill_support.py.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# drill_support sits beside this file; make it importable under --import-mode=importlib too.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from drill_support import (
    ADMIN_TOKEN,
    CHAT_TEMPLATE,
    DRILL_ROWS,
    READ_TOKEN,
    SPECIALS,
    WORDS,
    WRITE_TOKEN,
    ServiceProcess,
    aggregated_export,
    write_labels,
)  # fmt: skip


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not DRILL_ROWS:
        return
    tr = terminalreporter
    tr.section("reliability drills")
    header = f"{'drill':<44} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'faults':>6} {'recovered':>9}  note"
    tr.write_line(header)
    tr.write_line("-" * len(header))

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:8.1f}"

    for r in DRILL_ROWS:
        tr.write_line(f"{r.drill:<44} {r.requests:>8} {r.errors:>6} {ms(r.p50_ms):>8} {ms(r.p99_ms):>8} "
                      f"{r.faults:>6} {r.recovered:>9}  {r.note}")  # fmt: skip


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("drill-logs")


@pytest.fixture(scope="session", autouse=True)
def session_log(log_dir: Path) -> Iterator[Path]:
    """All in-process log records of the drills (INFO and up) also go to one file, for the secret scan."""
    path = log_dir / "in-process.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(min(old_level or logging.WARNING, logging.INFO))
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


@pytest.fixture(scope="session")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens.txt"
    path.write_text(f"# drill tokens\n{READ_TOKEN} read\n{WRITE_TOKEN} read,write\n{ADMIN_TOKEN} admin\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def spawn(log_dir: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Factory of ServiceProcess; every process it made is stopped at the end of the session."""
    made: list[ServiceProcess] = []

    def make(module: str, *args: str, name: str | None = None, env: dict[str, str] | None = None) -> ServiceProcess:
        proc = ServiceProcess(module=module, args=list(args), log_path=log_dir / f"{name or module}-{len(made)}.log",
                              env=dict(env or {}))  # fmt: skip
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.stop(timeout=10)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 3-layer Llama (float32) with an offline word-level tokenizer and chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", unk_token="<unk>",
                                        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"])  # fmt: skip
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=4)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.25 if "embed" in name or "lm_head" in name else 0.15)
    path = tmp_path_factory.mktemp("models") / "tiny-llama-drill"
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint: Path):
    from circuits_attribution.models import load_engine

    return load_engine(str(tiny_checkpoint), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def small_atlas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An atlas file built by the real pipeline (aggregator store export + labels + Infomap)."""
    from circuits_atlas import ClusterSettings, build_atlas

    tmp = tmp_path_factory.mktemp("atlas")
    export = aggregated_export(tmp)
    out = tmp / "atlas.duckdb"
    build_atlas(export_dir=export, output_path=out, labels_path=write_labels(tmp / "labels.jsonl"),
                clustering=ClusterSettings(min_edge_count=2, num_trials=2), min_edge_count=1, model="drill")  # fmt: skip
    return out


