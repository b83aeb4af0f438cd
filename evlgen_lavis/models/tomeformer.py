"""TomeFormer: the EVLGen connector.

BERT-architecture layers (no word or position embeddings: the vision tokens already carry position)
that merge similar tokens after every self-attention with ToMe's bipartite soft matching, using the mean
attention key over heads as the similarity metric, as the EVLGen paper does. Parameter names follow
Hugging Face's ``BertLayer``, so any HF BERT checkpoint (hub name or local folder) initialises it.

    image_embeds (B, N, Cv) -> LayerNorm -> VL_proj -> (B, N, H) -> [BERT layer + merge] x L -> (B, N', H)
"""
import logging
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.activations import ACT2FN

from evlgen_lavis.models.tome import RSpec, bipartite_soft_matching, check_schedule, merge_wavg, parse_r, token_counts


class TomeSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not divisible by num_attention_heads "
                f"{config.num_attention_heads}"
            )
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)

    def forward(
        self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=self.dropout_p if self.training else 0.0
        )  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)
        return out, k.mean(dim=1)  # metric: (B, N, d), the mean key over heads


class TomeSelfOutput(nn.Module):
    def __init__(self, config: BertConfig, in_features: Optional[int] = None):
        super().__init__()
        self.dense = nn.Linear(in_features or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class TomeAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = TomeSelfAttention(config)
        self.output = TomeSelfOutput(config)


class TomeIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        act = config.hidden_act
        self.act = ACT2FN[act] if isinstance(act, str) else act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class TomeLayer(nn.Module):
    """One post-LN BERT layer; tokens are merged between the attention block and the feed-forward block."""

    def __init__(self, config: BertConfig, r: int, class_token: bool, prop_attn: bool):
        super().__init__()
        self.attention = TomeAttention(config)
        self.intermediate = TomeIntermediate(config)
        self.output = TomeSelfOutput(config, in_features=config.intermediate_size)
        self.r = r
        self.class_token = class_token
        self.prop_attn = prop_attn

    def forward(self, x: torch.Tensor, size: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # Proportional attention: a token standing for s merged tokens gets log(s) added to its logits.
        bias = size.log().transpose(1, 2)[:, None].to(x.dtype) if self.prop_attn else None  # (B, 1, 1, N)
        attn, metric = self.attention.self(x, bias)
        x = self.attention.output(attn, x)  # (B, N, H)
        if self.r > 0:
            merge, _ = bipartite_soft_matching(metric, self.r, class_token=self.class_token)
            x, size = merge_wavg(merge, x, size)  # (B, N - r, H), (B, N - r, 1)
        x = self.output(self.intermediate(x), x)
        return x, size


class TomeFormer(nn.Module):
    """The EVLGen connector.

    Args:
        config: a ``transformers.BertConfig`` (hidden size, heads, layers, dropout).
        r: merge schedule: int, ``(r, inflection)`` or a per-layer list (see ``tome.parse_r``).
        vision_width: width of the vision encoder's tokens.
        class_token: whether token 0 is a class token to protect (ViTs: yes; CNN feature maps: no).
        prop_attn: proportional attention (ToMe section 3); off by default like the EVLGen paper.
    """

    def __init__(
        self,
        config: BertConfig,
        r: RSpec,
        vision_width: int,
        class_token: bool = True,
        prop_attn: bool = False,
    ):
        super().__init__()
        self.config = config
        self.schedule = parse_r(config.num_hidden_layers, r)
        self.class_token = class_token
        self.ln_vision = nn.LayerNorm(vision_width)
        self.vl_proj = nn.Linear(vision_width, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layer = nn.ModuleList(
            TomeLayer(config, r_i, class_token, prop_attn) for r_i in self.schedule
        )
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:  # BERT's initialisation
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, self.config.initializer_range)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def token_counts(self, num_tokens: int) -> Sequence[int]:
        """Tokens left after each layer for ``num_tokens`` input tokens."""
        return token_counts(num_tokens, self.schedule, self.class_token)

    def check_input_tokens(self, num_tokens: int) -> int:
        """Validate the schedule for this input length; returns the output token count."""
        check_schedule(num_tokens, self.schedule, self.class_token)
        return self.token_counts(num_tokens)[-1] if self.schedule else num_tokens

    def forward(self, image_embeds: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, N, Cv) vision tokens -> ((B, N', H) merged tokens, (B, N', 1) how many inputs each holds)."""
        x = self.vl_proj(self.ln_vision(image_embeds))  # (B, N, H)
        x = self.dropout(self.LayerNorm(x))
        size = x.new_ones(x.shape[0], x.shape[1], 1, dtype=torch.float32)  # (B, N, 1)
        for layer in self.layer:
            x, size = layer(x, size)
        return x, size

    # -- initialisation from a BERT checkpoint ---------------------------------------------------------

    @classmethod
    def from_bert(
        cls,
        name_or_path: str,
        r: RSpec,
        vision_width: int,
        num_layers: Optional[int] = None,
        class_token: bool = True,
        prop_attn: bool = False,
        **config_overrides,
    ) -> "TomeFormer":
        """Build a TomeFormer whose layers come from the first ``num_layers`` layers of an HF BERT checkpoint
        (a hub name or a local folder). The vision projection is new (random)."""
        config = BertConfig.from_pretrained(name_or_path, **config_overrides)
        available = config.num_hidden_layers
        num_layers = available if num_layers is None else int(num_layers)
        if not 1 <= num_layers <= available:
            raise ValueError(
                f"num_layers={num_layers} but the BERT checkpoint {name_or_path!r} has {available} layers"
            )
        config.num_hidden_layers = num_layers
        model = cls(config, r, vision_width, class_token=class_token, prop_attn=prop_attn)
        model.load_bert_weights(name_or_path)
        return model

    def load_bert_weights(self, name_or_path: str) -> None:
        """Copy the embedding LayerNorm and the first layers of a BERT checkpoint into this model."""
        from transformers import BertModel

        bert = BertModel.from_pretrained(name_or_path, add_pooling_layer=False)
        source = bert.state_dict()
        n_src = bert.config.num_hidden_layers
        if len(self.layer) > n_src:
            raise ValueError(f"TomeFormer has {len(self.layer)} layers but {name_or_path!r} has only {n_src}")
        wanted = {}
        for key in self.state_dict():
            if key.startswith("LayerNorm."):
                wanted[key] = source["embeddings." + key]
            elif key.startswith("layer."):
                wanted[key] = source["encoder." + key]
        missing = self.load_state_dict(wanted, strict=False).missing_keys
        fresh = sorted({k.split(".")[0] for k in missing})
        logging.info("TomeFormer: loaded %d tensors from %s; new: %s", len(wanted), name_or_path, fresh)
        if any(k.startswith(("layer.", "LayerNorm.")) for k in missing):
            raise RuntimeError(f"BERT checkpoint {name_or_path!r} lacks TomeFormer tensors: {missing}")
