"""BERT and DeeBERT in plain PyTorch: embeddings, self-attention, layers, off-ramps.

BERT (Devlin et al. 2019) as the original code computes it, so real checkpoints give the numbers of Hugging Face
`transformers` (tested to 1e-5 at every layer): learned positions, post-LayerNorm residuals, the exact erf GELU,
LayerNorm eps from the config. DeeBERT (Xin et al. 2020, section 3) adds an off-ramp, a classifier, after every layer.

    input_ids (B, T) -> Embeddings -> Layer 1 -> Layer 2 -> ... -> Layer n
                                         |          |                 |
                                    OffRamp 1   OffRamp 2   ...   OffRamp n  -> logits (B, C) each

Shapes: B batch, T tokens, H hidden size, nh heads, hs = H / nh head size, C classes. Module names are
ours; `checkpoint.py` holds the one table that maps them to the checkpoint's names."""

import torch
import torch.nn.functional as F
from torch import nn

from deebert.config import BertConfig

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu,  # BERT's "gelu" is the exact one: x * Phi(x), with the erf
               "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class Embedding(nn.Embedding):
    """nn.Embedding without its own N(0, 1) draw, which BERT never uses: the model's constructor draws BERT's
    N(0, 0.02) for every weight (init_weights), and on the meta device, where checkpoint.py builds a model to fill
    from a file, that first draw alone would load torch's compiler (about 1.7 s)."""

    def reset_parameters(self):
        pass


class Embeddings(nn.Module):
    """Token ids -> vectors: word + position + token type (segment A or B), then LayerNorm and dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None):
        if token_type_ids is None:  # one text: every token in segment A
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)  # (B, T, H)
        x = x + self.position_embeddings(positions)  # (T, H) broadcasts over the batch
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention: every token looks at every (non-padding) token."""

    def __init__(self, config: BertConfig):
        super().__init__()
        H = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(H, H)
        self.value = nn.Linear(H, H)
        self.output = nn.Linear(H, H)
        self.dropout_prob = config.attention_probs_dropout_prob

    def forward(self, x, mask):
        B, T, H = x.shape
        nh, hs = self.num_heads, H // self.num_heads
        q = self.query(x).view(B, T, nh, hs).transpose(1, 2)  # (B, T, H) -> (B, nh, T, hs)
        k = self.key(x).view(B, T, nh, hs).transpose(1, 2)
        v = self.value(x).view(B, T, nh, hs).transpose(1, 2)
        # softmax(q k^T / sqrt(hs)) v, where mask False (padding keys) gets weight 0; dropout on the weights.
        # scaled_dot_product_attention computes exactly that, with a fused kernel where one fits.
        dropout = self.dropout_prob if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, H)  # (B, nh, T, hs) -> (B, T, H): heads side by side
        return self.output(y)


class Layer(nn.Module):
    """One transformer layer, post-LayerNorm as in BERT: x = LN(x + attention(x)); x = LN(x + FFN(x))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = SelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)  # H -> 4H
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)  # 4H -> H
        self.output_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.activation = ACTIVATIONS[config.hidden_act]

    def forward(self, x, mask):
        x = self.attention_norm(x + self.dropout(self.attention(x, mask)))
        feed_forward = self.output(self.activation(self.intermediate(x)))
        return self.output_norm(x + self.dropout(feed_forward))


def attention_mask_for(attention_mask):
    """(B, T) of 1 (token) / 0 (padding) -> (B, 1, 1, T) booleans that broadcast over heads and queries.
    None stays None: nothing is padded, attention needs no mask and can take its fastest kernel. (Whether a batch
    is padded at all is decided on the CPU, before it goes to the device: see `model_inputs` in device.py.)"""
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, None, :]


class Encoder(nn.Module):
    """BERT without a head: embeddings, then n layers. Returns the hidden state after every layer."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids, token_type_ids=None, attention_mask=None) -> list:
        mask = attention_mask_for(attention_mask)
        x = self.embeddings(input_ids, token_type_ids)
        hidden_states = []
        for layer in self.layers:
            x = layer(x, mask)
            hidden_states.append(x)  # (B, T, H), one per layer
        return hidden_states


class Pooler(nn.Module):
    """BERT's pooler: the [CLS] token's vector through Linear(H, H) and tanh."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, T, H) -> (B, H)


class BertModel(nn.Module):
    """Plain BERT, as `transformers.BertModel`: the encoder and its pooler. Used to check parity."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.pooler = Pooler(config)
        self.apply(init_weights)  # BERT's initialisation: a model built here is valid before any checkpoint

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        hidden_states = self.encoder(input_ids, token_type_ids, attention_mask)
        return hidden_states, self.pooler(hidden_states[-1])


class OffRamp(nn.Module):
    """DeeBERT's off-ramp f_i: pool the layer's output -> Linear(H, H) + tanh -> dropout -> Linear(H, C).
    pooling="cls" is the paper's: the [CLS] token's vector, exactly BERT's own classification head.
    pooling="mean" (not the paper) averages the real tokens: checkpoints trained with mean pooling, such as
    all-MiniLM-L6-v2, leave [CLS] almost constant in their lower layers, where the mean carries the information."""

    def __init__(self, config: BertConfig, pooling: str = "cls"):
        super().__init__()
        self.pooling = pooling
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def pool(self, hidden, attention_mask):
        if self.pooling == "cls":
            return hidden[:, 0]  # (B, T, H) -> (B, H)
        if attention_mask is None:  # no padding: one op, not five (it counts at batch 1, once per layer)
            return hidden.mean(dim=1)  # (B, T, H) -> (B, H)
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T) -> (B, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1)  # (B, T, H) -> (B, H)

    def forward(self, hidden, attention_mask):
        pooled = torch.tanh(self.pooler(self.pool(hidden, attention_mask)))
        return self.classifier(self.dropout(pooled))  # (B, H) -> (B, C)


class DeeBert(nn.Module):
    """BERT with an off-ramp after every layer; with [CLS] pooling the last is BERT's own classifier head."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.off_ramps = nn.ModuleList(OffRamp(config, config.off_ramp_pooling) for _ in self.encoder.layers)
        self.apply(init_weights)  # BERT's initialisation: a model built here is ready to fine-tune

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layers)

    def off_ramp_logits(self, hidden_states, attention_mask) -> list:
        """Every off-ramp on its own layer's output: a list of n tensors (B, C)."""
        return [ramp(h, attention_mask) for ramp, h in zip(self.off_ramps, hidden_states)]

    def forward(self, input_ids, token_type_ids=None, attention_mask=None) -> list:
        """All layers, all off-ramps (training, and the cheap S sweep). Early exit lives in exit.py."""
        hidden_states = self.encoder(input_ids, token_type_ids, attention_mask)
        return self.off_ramp_logits(hidden_states, attention_mask)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorm. A tensor on the meta device has
    a shape and no values (checkpoint.py builds there and fills the model from a file): nothing to draw."""
    if any(p.is_meta for p in module.parameters(recurse=False)):
        return
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
