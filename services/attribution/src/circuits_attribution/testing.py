"""Tiny offline models, tokenizer and an independent linearized-model oracle for tests.

Tiny random Llama / Qwen3 / OLMo-2 / OLMo-3 models (float64, eager attention), an offline
word-level tokenizer with a chat template, and :class:`LinearOracle`, which evaluates the explicit
linearized model with frozen constants (relp-spec §J). The oracle shares no code with the engine:
it captures the clean forward's constants with plain forward hooks / ``output_attentions`` on the
*unpatched* model and re-implements the blocks with explicit matrix products.

Used by the test suites and benchmarks; nothing in the engine imports it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

WORDS = (
    "the capital of france is paris london rome city a b c d e f g h i j k l m n o p q r s t u v w x y z "
    "one two three four five six seven eight nine ten red green blue big small cat dog sun moon"
).split()
SPECIALS = ["<unk>", "<bos>", "<|user|>", "<|assistant|>", "<|end|>"]
VOCAB_SIZE = 97
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}"
    "{% if not loop.last %} <|end|> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %} <|end|> <|assistant|>{% endif %}"
)
ARCHS = ("llama", "qwen3", "olmo2", "olmo3")


def build_tokenizer(*, words: Iterable[str] = WORDS, vocab_size: int | None = VOCAB_SIZE):
    """A word-level tokenizer (whitespace split) that adds <bos>, with a chat template.

    The vocabulary is the special tokens, then ``words``, padded with ``w0, w1, ...`` up to
    ``vocab_size`` (None: no padding).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    n = 0
    while vocab_size is not None and len(vocab) < vocab_size:
        vocab[f"w{n}"] = len(vocab)
        n += 1
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(
    arch: str, *, seed: int = 0, dtype=torch.float64, max_positions: int = 64, attn: str = "eager", **overrides
):
    """A random tiny model of the given architecture (4 layers, GQA 4/2, hidden 64, F=96);
    ``overrides`` replace config fields (e.g. ``num_attention_heads=16`` for a pattern-heavy model)."""
    import transformers

    config_cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
        "olmo3": ("Olmo3Config", "Olmo3ForCausalLM"),
    }[arch]
    if not hasattr(transformers, config_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {config_cls}")
    config = getattr(transformers, config_cls)(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=max_positions,
        attn_implementation=attn,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=4,
    )
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    # Larger-than-default weights make the nonlinearities matter (a stricter test).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.25 if "embed" in name or "lm_head" in name else 0.12)
            elif "norm" in name:
                param.uniform_(0.5, 1.5)
    model = model.to(dtype).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------- oracle
@dataclass
class OracleRun:
    """Outputs of one oracle evaluation: logits row [V] and h~ per layer ([T, F] each)."""

    logits: torch.Tensor
    neurons: list[torch.Tensor] = field(default_factory=list)


class LinearOracle:
    """The explicit linearized model: frozen norm factors, attention patterns and MLP constants
    from a clean run; RelP half-rule MLPs ``h~(v) = 1/2 (Wg v * sig) * z + 1/2 s * (Wu v)``.
    """

    def __init__(self, model, input_ids: list[int], target_position: int) -> None:
        self.model = model
        self.t = target_position
        self.post_norm = type(model).__name__.startswith("Olmo")
        ids = torch.tensor([input_ids])
        norm_io: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        gates: dict[int, torch.Tensor] = {}
        ups: dict[int, torch.Tensor] = {}
        neurons: dict[int, torch.Tensor] = {}
        handles = []
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                handles.append(module.register_forward_hook(
                    lambda m, i, o: norm_io.__setitem__(id(m), (i[0][0].clone(), o[0].clone()))))
        for idx, layer in enumerate(model.model.layers):
            handles.append(layer.mlp.gate_proj.register_forward_hook(lambda m, i, o, idx=idx: gates.__setitem__(idx, o[0].clone())))
            handles.append(layer.mlp.up_proj.register_forward_hook(lambda m, i, o, idx=idx: ups.__setitem__(idx, o[0].clone())))
            handles.append(layer.mlp.down_proj.register_forward_hook(lambda m, i, o, idx=idx: neurons.__setitem__(idx, i[0][0].clone())))
        try:
            with torch.no_grad():
                out = model(input_ids=ids, use_cache=False, output_attentions=True)
        finally:
            for h in handles:
                h.remove()
        self.hf_logits = out.logits[0, target_position].clone()
        self.patterns = [a[0].clone() for a in out.attentions]  # [H, T, T] each
        self.embeds = model.get_input_embeddings()(ids)[0].clone()  # [T, D]

        def factor(module) -> torch.Tensor:
            x, y = norm_io[id(module)]
            return y / x

        self.norm_factor = factor
        self.clean_neurons = [neurons[i] for i in range(len(model.model.layers))]
        self.sig = [torch.sigmoid(gates[i]) for i in range(len(gates))]
        self.s = [model.model.layers[i].mlp.act_fn(gates[i]) for i in range(len(gates))]
        self.z = [ups[i] for i in range(len(ups))]
        self.norm_io = norm_io

    def run(
        self,
        *,
        embeds: torch.Tensor | None = None,
        zero_neurons: Iterable[tuple[int, int, int]] = (),
        zero_embeddings: Iterable[int] = (),
        hold_layers: Iterable[int] = (),
        mlp_rule: str = "relp",
    ) -> OracleRun:
        """Evaluate the linear model; `hold_layers` keep their clean h (MLP output held), zeroed
        neurons are set to 0 after the MLP computes them (and stay 0 in held layers' place)."""
        model = self.model
        e = (self.embeds if embeds is None else embeds).clone()
        for p in zero_embeddings:
            e[p] = 0
        zero_neurons = list(zero_neurons)
        hold = set(hold_layers)
        r = e
        run = OracleRun(logits=torch.empty(0))
        for l, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            u = r if self.post_norm else r * self.norm_factor(layer.input_layernorm)
            T = u.shape[0]
            n_heads = model.config.num_attention_heads
            n_kv = model.config.num_key_value_heads
            d_h = attn.head_dim
            values = (u @ attn.v_proj.weight.T).view(T, n_kv, d_h).transpose(0, 1)  # [K, T, dh]
            values = values.repeat_interleave(n_heads // n_kv, dim=0)  # [H, T, dh]
            heads = self.patterns[l] @ values  # [H, T, dh]
            a = heads.transpose(0, 1).reshape(T, n_heads * d_h) @ attn.o_proj.weight.T
            if self.post_norm:
                r_mid = r + a * self.norm_factor(layer.post_attention_layernorm)
                v = r_mid
            else:
                r_mid = r + a
                v = r_mid * self.norm_factor(layer.post_attention_layernorm)
            mlp = layer.mlp
            if l in hold:
                h = self.clean_neurons[l].clone()
            else:
                g = v @ mlp.gate_proj.weight.T
                z = v @ mlp.up_proj.weight.T
                if mlp_rule == "relp":
                    h = 0.5 * (g * self.sig[l]) * self.z[l] + 0.5 * self.s[l] * z
                elif mlp_rule == "stop_grad_gate":
                    h = self.s[l] * z
                else:
                    raise ValueError(mlp_rule)
            for zl, p, i in zero_neurons:
                if zl == l:
                    h[p, i] = 0
            run.neurons.append(h)
            m = h @ mlp.down_proj.weight.T
            r = r_mid + (m * self.norm_factor(layer.post_feedforward_layernorm) if self.post_norm else m)
        final = r * self.norm_factor(model.model.norm)
        run.logits = final[self.t] @ model.lm_head.weight.T
        return run



PROMPT = "the capital of france is paris"  # 7 tokens with <bos>


def all_neuron_selection(node_scores):
    """A Selection holding every neuron (l, p, i): the complete source set of relp-spec §J.4."""
    import numpy as np

    from circuits_attribution.attributor import Selection

    L, T, F = node_scores.scores.shape
    layers, positions, indices = np.meshgrid(np.arange(L), np.arange(T), np.arange(F), indexing="ij")
    return Selection(
        layers=layers.ravel(),
        positions=positions.ravel(),
        indices=indices.ravel(),
        scores=node_scores.scores.reshape(-1).to(torch.float64).cpu().numpy(),
        activations=node_scores.activations.reshape(-1).to(torch.float64).cpu().numpy(),
        nodes_exceeded=False,
    )




def plant_token_neuron(model, *, layer: int, neuron: int, token_id: int, dim: int, strength: float = 4.0) -> None:
    """Make MLP neuron ``(layer, neuron)`` of a tiny Llama-style model fire on one token only.

    Hidden dimension ``dim`` becomes a private channel: only ``token_id``'s embedding has it
    (``strength``), no attention or MLP of layers <= ``layer`` writes to it, and the neuron's
    gate and up rows read only it. The neuron's activation is then ``silu(c) * c > 0`` on that
    token (c = the normed channel value) and exactly 0 on every other token. Give each planted
    neuron its own ``dim``.
    """
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[:, dim] = 0.0
        embed[token_id, dim] = strength
        for l in range(layer + 1):
            block = model.model.layers[l]
            block.self_attn.o_proj.weight[dim, :] = 0.0
            if l < layer:
                block.mlp.down_proj.weight[dim, :] = 0.0
        mlp = model.model.layers[layer].mlp
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[neuron, :] = 0.0
            proj.weight[neuron, dim] = 1.0
