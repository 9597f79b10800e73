"""Tiny random-weight models of the real architecture classes, built offline and deterministic.

Used by tests, benchmarks and the offline demo: the same adapter code paths run as with real
weights (same model classes, chat framing, special tokens, image processors), only smaller.
``tiny_model(kind, seed)`` returns a ready ``ModelAdapter``; ``dims`` overrides text dimensions
(the kv_core benchmark uses Qwen2-VL-2B's real per-layer sizes with fewer layers).
"""

from __future__ import annotations

import functools

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
    "<video>",
]

_CORPUS = [
    "You are a personal assistant. The user's own concepts are described below; use them to "
    "answer questions about the user's things.",
    "Concept name category caption attributes photo detail of my dog cat mug toy plush shoe",
    "Is this my dog? What is written on my mug? Where is my cat sitting? What colour is it?",
    "collar: black leather. ears: floppy brown. handle: chipped blue. logo: red star on the side.",
    "the quick brown fox jumps over the lazy dog 0123456789 , . ? ! : ; ' \" ( ) - _ / < >",
    "system user assistant yes no none of your concepts",
]

KINDS = ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "causal_lm", "gemma3")
#: ``gemma3``: the sliding window of its local layers, in tokens: shorter than the system prefix
#: alone, so that every test context reaches past it.
GEMMA3_SLIDING_WINDOW = 16


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with the ChatML / vision special tokens, trained locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>"},
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def _text_dims(vocab_size: int, dims: dict | None) -> dict:
    text = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        initializer_range=0.05,
        tie_word_embeddings=False,
    )
    text.update(dims or {})
    return text


def tiny_model(kind: str, seed: int = 0, dims: dict | None = None, dtype: torch.dtype = torch.float32):
    """A random-weight model of ``kind`` wrapped in its adapter (deterministic from ``seed``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; known: {', '.join(KINDS)}")
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    token = tokenizer.convert_tokens_to_ids
    text = _text_dims(vocab, dims)
    special_ids = dict(
        bos_token_id=token("<|endoftext|>"), eos_token_id=token("<|im_end|>"), pad_token_id=token("<|endoftext|>")
    )
    text.update(special_ids)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    torch.manual_seed(seed)
    if kind in ("qwen2_vl", "qwen2_5_vl"):
        # mrope_section splits head_dim/2 frequencies over (t, h, w) in the real model's
        # proportions (16, 24, 24 of 64).
        half = head_dim // 2
        temporal = half // 4
        height = (half - temporal) // 2
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": [temporal, height, half - temporal - height],
        }
        ids = dict(
            image_token_id=token("<|image_pad|>"),
            video_token_id=token("<|video_pad|>"),
            vision_start_token_id=token("<|vision_start|>"),
            vision_end_token_id=token("<|vision_end|>"),
        )
        if kind == "qwen2_vl":
            from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

            from personalkv.models.qwen2_vl import Qwen2VLAdapter as adapter_cls

            vision = dict(depth=1, embed_dim=32, hidden_size=text["hidden_size"], num_heads=2, mlp_ratio=2)
            config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids, **special_ids)
            model = Qwen2VLForConditionalGeneration(config)
        else:
            from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

            from personalkv.models.qwen2_vl import Qwen2_5_VLAdapter as adapter_cls

            vision = dict(
                depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                out_hidden_size=text["hidden_size"], window_size=56, fullatt_block_indexes=[1],
            )
            config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids, **special_ids)
            model = Qwen2_5_VLForConditionalGeneration(config)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        # A few merged patches per image keep image chunks small (real models use up to ~1280).
        image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    elif kind == "llava_onevision":
        from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        from personalkv.models.llava_onevision import LlavaOnevisionAdapter as adapter_cls

        text["model_type"] = "qwen2"
        vision = dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
        )
        pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
        config = LlavaOnevisionConfig(
            text_config=text, vision_config=vision, image_token_id=token("<image>"),
            video_token_id=token("<video>"), image_grid_pinpoints=pinpoints,
            vision_feature_select_strategy="full", vision_feature_layer=-1,
        )
        model = LlavaOnevisionForConditionalGeneration(config)
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints
        )
    elif kind == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        from personalkv.models.causal_lm import Gemma3Adapter as adapter_cls

        # Gemma 3's anatomy at toy size: local (sliding-window) and global layers with their
        # own RoPE bases, a query pre-scalar other than head_dim, tied embeddings, one KV head.
        text.update(num_hidden_layers=3, num_key_value_heads=1, head_dim=head_dim, tie_word_embeddings=True,
                    query_pre_attn_scalar=2 * head_dim, sliding_window=GEMMA3_SLIDING_WINDOW,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                     "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}})
        model = Gemma3ForCausalLM(Gemma3TextConfig(**text))
        image_processor = None
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        from personalkv.models.causal_lm import CausalLMAdapter as adapter_cls

        config = LlamaConfig(**text, rope_theta=10_000.0)
        model = LlamaForCausalLM(config)
        image_processor = None
    for special in ("bos_token_id", "eos_token_id", "pad_token_id"):
        for cfg in (model.config, model.config.get_text_config(decoder=True), model.generation_config):
            if hasattr(cfg, special):
                setattr(cfg, special, tokenizer.convert_tokens_to_ids("<|im_end|>" if special == "eos_token_id" else "<|endoftext|>"))
    model = model.to(dtype).eval()
    return adapter_cls(model, tokenizer, image_processor, name=f"tiny:{kind}", weights_id=f"tiny-seed-{seed}")
