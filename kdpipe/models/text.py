"""Transformer text models built with Hugging Face `transformers` from a config (random init), or
loaded with `from_pretrained` from a local folder (nothing is downloaded).

The factories follow kdpipe's model convention, `f(in_shape, num_classes, **kwargs)`: `in_shape`
is `[max_length]` from the data, and the input is a batch of token ids padded with `pad_id`.
Module paths are transformers' own (`encoder.layer.3`, `embeddings`), so hooks and layer maps
name them as for the image models.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from kdpipe.errors import ConfigError


def _pretrained_dir(path: str) -> str:
    p = Path(os.path.expanduser(str(path)))
    if not (p / "config.json").is_file():
        raise ConfigError(f"pretrained={path}: no config.json there; give a local folder written by "
                          f"save_pretrained (nothing is downloaded), or pretrained=null for random init")
    return str(p)


def _bert_classifier():
    """The class, built on first use so that importing kdpipe.models does not import transformers."""
    from transformers import BertModel

    class TextClassifier(BertModel):
        """A BERT encoder (`embeddings`, `encoder.layer.N`; no pooler), the mean of its last hidden
        states over the non-padding tokens, and a linear `classifier`."""

        def __init__(self, config, num_classes: int) -> None:
            super().__init__(config, add_pooling_layer=False)
            self.classifier = nn.Linear(config.hidden_size, num_classes)
            self.pad_id = int(config.pad_token_id or 0)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:  # noqa: D102 - ids -> class logits
            mask = (ids != self.pad_id).long()
            hidden = super().forward(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            return self.classifier(pooled)

    return TextClassifier


def transformer_classifier(in_shape: Sequence[int], num_classes: int, vocab_size: int = 4000,
                           layers: int = 4, width: int = 256, heads: int = 4, ffn: int | None = None,
                           dropout: float = 0.1, pad_id: int = 0, pretrained: str | None = None) -> nn.Module:
    """An encoder classifier: `layers` transformer blocks of `width` with `heads` attention heads and
    an MLP of `ffn` (default 4 x width), positions up to `in_shape[0]`; or the encoder saved in a
    local `pretrained` folder (its own sizes) with a new classifier."""
    from transformers import BertConfig, BertModel

    cls = _bert_classifier()
    if pretrained:
        encoder = BertModel.from_pretrained(_pretrained_dir(pretrained), add_pooling_layer=False)
        model = cls(encoder.config, num_classes)
        missing, unexpected = model.load_state_dict(encoder.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("classifier.") for k in missing), (missing, unexpected)
        return model
    if width % heads:
        raise ConfigError(f"model.width={width} is not a multiple of model.heads={heads}; "
                          f"each head gets width / heads dimensions")
    config = BertConfig(vocab_size=int(vocab_size), hidden_size=int(width), num_hidden_layers=int(layers),
                        num_attention_heads=int(heads), intermediate_size=int(ffn or 4 * width),
                        max_position_embeddings=int(in_shape[0]), hidden_dropout_prob=float(dropout),
                        attention_probs_dropout_prob=float(dropout), pad_token_id=int(pad_id),
                        type_vocab_size=1)
    return cls(config, num_classes)


def _gpt_lm():
    from transformers import GPT2LMHeadModel

    class CausalLM(GPT2LMHeadModel):
        """A GPT-2-style decoder (`transformer.h.N`, `lm_head`) whose forward takes token ids and
        returns next-token logits `(B, L, V)`; padding (`pad_id`) is masked from attention."""

        def forward(self, ids: torch.Tensor) -> torch.Tensor:  # noqa: D102
            mask = (ids != self.config.pad_token_id).long()
            return super().forward(input_ids=ids, attention_mask=mask, use_cache=False).logits

    return CausalLM


def causal_lm(in_shape: Sequence[int], num_classes: int, vocab_size: int | None = None, layers: int = 4,
              width: int = 256, heads: int = 4, ffn: int | None = None, dropout: float = 0.1,
              pad_id: int = 0, pretrained: str | None = None) -> nn.Module:
    """A causal language model over the data's vocabulary (`num_classes` = `vocab_size`): `layers`
    GPT-2 blocks of `width` with `heads` heads, context `in_shape[0]`; or a local `pretrained` folder."""
    from transformers import GPT2Config

    cls = _gpt_lm()
    if pretrained:
        return cls.from_pretrained(_pretrained_dir(pretrained))
    vocab = int(vocab_size or num_classes)
    if vocab != int(num_classes):
        raise ConfigError(f"model.vocab_size={vocab} but data.num_classes={num_classes}: a language model "
                          f"predicts one of the vocabulary's tokens; set both to data.vocab_size")
    if width % heads:
        raise ConfigError(f"model.width={width} is not a multiple of model.heads={heads}; "
                          f"each head gets width / heads dimensions")
    config = GPT2Config(vocab_size=vocab, n_positions=int(in_shape[0]), n_embd=int(width),
                        n_layer=int(layers), n_head=int(heads), n_inner=int(ffn) if ffn else None,
                        resid_pdrop=float(dropout), embd_pdrop=float(dropout), attn_pdrop=float(dropout),
                        pad_token_id=int(pad_id), bos_token_id=1, eos_token_id=2)
    return cls(config)
