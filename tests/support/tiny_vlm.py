"""Build a tiny, random-weights Qwen2-VL model folder that vLLM can serve on CPU.

The folder holds no weights at all: vLLM is started with ``--load-format dummy``
and fills the parameters with random values. What we write is everything vLLM and
transformers need to construct the model, the tokenizer and the multimodal
processor:

* ``config.json``                  -- Qwen2VLForConditionalGeneration, tiny dims
* ``generation_config.json``       -- token ids only (no sampling defaults)
* ``tokenizer.json``               -- 512-token byte-level BPE built here, deterministically
* ``tokenizer_config.json``        -- special tokens + Qwen2-VL chat template
* ``chat_template.json``           -- same template, for the processor
* ``preprocessor_config.json``     -- Qwen2VLImageProcessor, images capped at 56x56 px
* ``video_preprocessor_config.json``

Guarantees relied on by tests (checked in :func:`build_tiny_vlm`):

* "Yes", "No", " Yes", " No", "yes", "no", " yes", " no" are each ONE token
  (the re-ranker reads P(yes)/P(no) from top logprobs).
* Images are resized to at most 56x56 px (3136 pixels): a square image becomes
  exactly ``TOKENS_PER_IMAGE`` (4) ``<|image_pad|>`` tokens, other aspect ratios
  1-4 tokens (e.g. 200x100 px -> 28x56 px -> 2 tokens).

``build_tiny_ranker`` writes the same folder as a cross-encoder: ``JinaVLForRanking`` (vLLM's
jina-reranker-m0 architecture, Qwen2-VL based) with ``num_labels: 1``, served with ``--runner pooling``
(its ``/rerank`` answers sigmoid probabilities).

Only the ``tokenizers`` package and the standard library are needed. Usage::

    python tests/support/tiny_vlm.py [--ranker] DEST
"""

from __future__ import annotations

import itertools
import json
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

# ---------------------------------------------------------------------------
# Model geometry
# ---------------------------------------------------------------------------
TEXT_HIDDEN = 128
TEXT_LAYERS = 2
TEXT_HEADS = 2
TEXT_KV_HEADS = 2
TEXT_INTERMEDIATE = 256
VISION_EMBED = 64
VISION_DEPTH = 2
VISION_HEADS = 2
PATCH = 14
MERGE = 2
TEMPORAL_PATCH = 2
IMAGE_SIDE = 56  # images are resized to at most 56*56 pixels
MIN_PIXELS = IMAGE_SIDE * IMAGE_SIDE
MAX_PIXELS = IMAGE_SIDE * IMAGE_SIDE
TOKENS_PER_IMAGE = (IMAGE_SIDE // PATCH) ** 2 // (MERGE * MERGE)  # 4, for a square image
MAX_POSITIONS = 4096

VOCAB_SIZE = 512

# Qwen2-VL special tokens, in Qwen's order. They get the ids just below VOCAB_SIZE.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
BPE_SIZE = VOCAB_SIZE - len(SPECIAL_TOKENS)  # 498: 256 bytes + 242 merges
SPECIAL_IDS = {tok: BPE_SIZE + i for i, tok in enumerate(SPECIAL_TOKENS)}

# Words that must be single tokens (re-ranker reads their logprobs).
SINGLE_TOKEN_WORDS = ["Yes", "No", " Yes", " No", "yes", "no", " yes", " no"]

# Qwen2-VL's own chat template (transformers / Qwen/Qwen2-VL-*-Instruct), unchanged
# except for whitespace. It accepts string content or OpenAI-style content parts:
# {"type": "image"}, {"type": "image_url", ...}, {"type": "text", "text": ...}.
# continue_final_message works because the final message's text is rendered
# verbatim before "<|im_end|>", so the caller can cut the string after it.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Fixed training text for the BPE merges. Frequencies are explicit so the merge
# order is deterministic; the yes/no words get huge counts so they merge first.
_CORPUS_TEXT = """
You are a helpful assistant. Answer the question about the image.
Is this passage relevant to the query? Answer Yes or No. Answer: Yes. Answer: No.
yes no Yes No the a an of to in is it that this for on with as are was be by
what which who where when how why picture image page document figure table chart
question answer context relevant score rank the user system assistant
The quick brown fox jumps over the lazy dog. Describe the image in one sentence.
0 1 2 3 4 5 6 7 8 9 10 100 2024 2025 . , : ; ? ! ( ) [ ] { } " ' - _ / \\ * # @
"""
_WORD_BOOST = {w: 10_000 - i for i, w in enumerate(SINGLE_TOKEN_WORDS)}


def _require_tokenizers() -> ModuleType:
    try:
        import tokenizers
    except ImportError as exc:  # pragma: no cover - environment problem
        raise RuntimeError(
            "tests/support/tiny_vlm.py needs the 'tokenizers' package "
            "(pip install tokenizers; deploy/vllm/setup_cpu_venv.sh installs it "
            "in the vLLM venv -- run this module with .venv-vllm/bin/python)"
        ) from exc
    return tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte -> printable unicode char table (same as tokenizers' ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _train_bpe(word_freqs: Counter[str], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training; ties broken lexicographically, so fully deterministic."""
    words = {w: list(w) for w in word_freqs}
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for w, syms in words.items():
            f = word_freqs[w]
            for a, b in itertools.pairwise(syms):
                pairs[(a, b)] += f
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        joined = best[0] + best[1]
        for w, syms in words.items():
            i, out = 0, []
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == best[0] and syms[i + 1] == best[1]:
                    out.append(joined)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = out
    return merges


def _build_tokenizer_json() -> str:
    tk = _require_tokenizers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    b2u = _bytes_to_unicode()
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)

    freqs: Counter[str] = Counter()
    for line in _CORPUS_TEXT.strip().splitlines():
        for piece, _ in pre.pre_tokenize_str(line):
            freqs[piece] += 1
    for w, boost in _WORD_BOOST.items():
        for piece, _ in pre.pre_tokenize_str(w):
            freqs[piece] += boost

    alphabet = [b2u[b] for b in range(256)]
    merges = _train_bpe(freqs, BPE_SIZE - len(alphabet))
    vocab: dict[str, int] = {ch: i for i, ch in enumerate(alphabet)}
    for a, b in merges:
        tok = a + b
        if tok not in vocab:
            vocab[tok] = len(vocab)
    # pad with unused byte-pair tokens if training ran out of pairs (keeps ids dense)
    filler = 0
    while len(vocab) < BPE_SIZE:
        tok = f"\u0120<unused{filler}>"
        filler += 1
        if tok not in vocab:
            vocab[tok] = len(vocab)
    assert len(vocab) == BPE_SIZE, len(vocab)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(
        [tk.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    for t, i in SPECIAL_IDS.items():
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t), i)
    for w in SINGLE_TOKEN_WORDS:
        ids = tok.encode(w, add_special_tokens=False).ids
        if len(ids) != 1:
            raise AssertionError(f"{w!r} is not a single token: {ids}")
    assert tok.get_vocab_size() == VOCAB_SIZE
    return str(tok.to_str(pretty=True))


def _config() -> dict[str, Any]:
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "attention_dropout": 0.0,
        "bos_token_id": SPECIAL_IDS["<|endoftext|>"],
        "eos_token_id": SPECIAL_IDS["<|im_end|>"],
        "pad_token_id": SPECIAL_IDS["<|endoftext|>"],
        "vision_start_token_id": SPECIAL_IDS["<|vision_start|>"],
        "vision_end_token_id": SPECIAL_IDS["<|vision_end|>"],
        "vision_token_id": SPECIAL_IDS["<|vision_pad|>"],
        "image_token_id": SPECIAL_IDS["<|image_pad|>"],
        "video_token_id": SPECIAL_IDS["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": TEXT_HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": TEXT_INTERMEDIATE,
        "max_position_embeddings": MAX_POSITIONS,
        "max_window_layers": TEXT_LAYERS,
        "num_attention_heads": TEXT_HEADS,
        "num_hidden_layers": TEXT_LAYERS,
        "num_key_value_heads": TEXT_KV_HEADS,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        # head_dim 64 -> 32 rotary frequencies split over (t, h, w)
        "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": [8, 12, 12]},
        "sliding_window": MAX_POSITIONS,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
        "vision_config": {
            "depth": VISION_DEPTH,
            "embed_dim": VISION_EMBED,
            "mlp_ratio": 4,
            "num_heads": VISION_HEADS,
            "in_chans": 3,
            "in_channels": 3,
            "hidden_size": TEXT_HIDDEN,
            "hidden_act": "quick_gelu",
            "patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "spatial_patch_size": PATCH,
            "temporal_patch_size": TEMPORAL_PATCH,
        },
    }


def _processor_common() -> dict[str, Any]:
    return {
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        "patch_size": PATCH,
        "temporal_patch_size": TEMPORAL_PATCH,
        "merge_size": MERGE,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "rescale_factor": 0.00392156862745098,
        "resample": 3,
    }


def _tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": MAX_POSITIONS,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t, i in SPECIAL_IDS.items()
        },
        "chat_template": CHAT_TEMPLATE,
    }


def build_tiny_vlm(dest: Path) -> Path:
    """Write the tiny Qwen2-VL model folder to ``dest`` (created if needed).

    Deterministic: the same files byte for byte on every call. Returns ``dest``.
    Raises RuntimeError if the ``tokenizers`` package is missing.
    """
    dest = Path(dest)
    tokenizer_json = _build_tokenizer_json()
    dest.mkdir(parents=True, exist_ok=True)

    def dump(name: str, obj: dict[str, Any]) -> None:
        (dest / name).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    dump("config.json", _config())
    dump(
        "generation_config.json",
        {
            "bos_token_id": SPECIAL_IDS["<|endoftext|>"],
            "eos_token_id": [SPECIAL_IDS["<|im_end|>"], SPECIAL_IDS["<|endoftext|>"]],
            "pad_token_id": SPECIAL_IDS["<|endoftext|>"],
        },
    )
    (dest / "tokenizer.json").write_text(tokenizer_json + "\n")
    dump("tokenizer_config.json", _tokenizer_config())
    dump("chat_template.json", {"chat_template": CHAT_TEMPLATE})
    dump(
        "preprocessor_config.json",
        {
            **_processor_common(),
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2VLProcessor",
        },
    )
    dump(
        "video_preprocessor_config.json",
        {
            **_processor_common(),
            "video_processor_type": "Qwen2VLVideoProcessor",
            "processor_class": "Qwen2VLProcessor",
        },
    )
    return dest


RANKER_ARCHITECTURE = "JinaVLForRanking"  # vLLM registry: jina_vl.JinaVLForSequenceClassification


def build_tiny_ranker(dest: Path) -> Path:
    """The tiny Qwen2-VL folder as a one-label cross-encoder (``JinaVLForRanking``); returns ``dest``."""
    dest = build_tiny_vlm(dest)
    config = json.loads((dest / "config.json").read_text())
    config["architectures"] = [RANKER_ARCHITECTURE]
    config["num_labels"] = 1
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ranker = "--ranker" in argv
    argv = [a for a in argv if a != "--ranker"]
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python tests/support/tiny_vlm.py [--ranker] DEST", file=sys.stderr)
        return 2
    out = (build_tiny_ranker if ranker else build_tiny_vlm)(Path(argv[0]))
    print(f"tiny {'ranker' if ranker else 'Qwen2-VL model'} written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
