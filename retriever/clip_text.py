"""CLIP's text tower on the tokens a text uses, not all 77: the same vectors, a third of the work.

open_clip pads every text to the context length (77 for CLIP), and ``encode_text`` runs the
transformer over all of it. A query like "What does E-417 mean on the pump P-100-A?" is ~23 tokens.
CLIP's text transformer is causal (each position attends to itself and the ones before it), and the
vector is read at the end-of-text token (``text_pool_type`` ``argmax``: the highest id): so nothing
after the last token a batch uses changes any row's vector, and the padding can be cut before the
forward pass. Measured on 2 cores (ViT-B-32, a 23-token question, batch 1): ONNX Runtime 42 → 15 ms,
torch 63 → 29 ms; largest difference of the normalised vectors ~1e-7 (float rounding).

``trimmable(model)`` says whether a model has that shape (causal mask, ``argmax`` pooling, open_clip's
own blocks); any other model keeps the full-length path. ``used_length`` is where to cut a batch;
``encode_text`` is the torch forward on the cut tokens; ``TrimmedTextTower`` is the same for the ONNX
export, with the attention written out so the traced graph keeps the token axis dynamic
(``nn.MultiheadAttention`` traces its sequence length into a Reshape).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

PAD_ID = 0  # what open_clip's tokenizers pad with


def trimmable(model: Any) -> bool:
    """Whether cutting the padding leaves ``model``'s text vectors unchanged (see the module doc)."""
    from open_clip.transformer import ResidualAttentionBlock

    transformer = getattr(model, "transformer", None)
    mask = getattr(model, "attn_mask", None)
    if transformer is None or mask is None or getattr(model, "text_pool_type", None) != "argmax":
        return False
    if not getattr(transformer, "batch_first", False) or getattr(model, "positional_embedding", None) is None:
        return False
    causal = torch.isneginf(mask).equal(torch.ones_like(mask, dtype=torch.bool).triu(1))
    blocks_ok = all(
        isinstance(r, ResidualAttentionBlock) and not hasattr(r, "ln_1_kv")
        and isinstance(r.attn, torch.nn.MultiheadAttention) and r.attn._qkv_same_embed_dim
        and r.attn.batch_first
        for r in transformer.resblocks
    )
    return bool(causal and blocks_ok)


def used_length(tokens: np.ndarray | torch.Tensor) -> int:
    """The columns a (N, context) token batch uses: up to its last non-padding token (at least 1)."""
    array = tokens.numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    used = np.flatnonzero((array != PAD_ID).any(axis=0))
    return int(used[-1]) + 1 if used.size else 1


def _project(model: Any, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    from open_clip.model import text_global_pool

    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type)
    projection = model.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
    return F.normalize(x, dim=-1)


def encode_text(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens, normalize=True)`` on the used columns only (``trimmable`` models)."""
    tokens = tokens[:, :used_length(tokens.cpu())]
    seq = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:seq].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:seq, :seq])
    return _project(model, x, tokens)


def _attention(attn: torch.nn.MultiheadAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``attn(x, x, x, attn_mask=mask)`` in plain ops whose shapes follow ``x`` when traced."""
    width = x.shape[-1]
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(x.shape[0], -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax((q @ k.transpose(-1, -2)) * (width // heads) ** -0.5 + mask, dim=-1)
    return attn.out_proj((weights @ v).transpose(1, 2).reshape(x.shape[0], -1, width))


class TrimmedTextTower(torch.nn.Module):
    """The text tower for the ONNX export: (N, used columns) tokens in, (N, dim) unit vectors out."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        seq = tokens.shape[1]
        x = m.token_embedding(tokens) + m.positional_embedding[:seq]
        mask = m.attn_mask[:seq, :seq].to(x.dtype)
        for r in m.transformer.resblocks:
            x = x + r.ls_1(_attention(r.attn, r.ln_1(x), mask))
            x = x + r.ls_2(r.mlp(r.ln_2(x)))
        return _project(m, x, tokens)


__all__ = ["TrimmedTextTower", "encode_text", "trimmable", "used_length"]
