"""ModelAdapter: the one place that knows how a Hugging Face model is driven.

Who calls what:
  * ``personalkv.kv.engine`` (encode evidence, answer questions) calls ``build_segment``,
    ``segment_positions``, ``embed``, ``run_decoder``, ``logits`` and ``system_prefix``;
  * ``personalkv.kv.placement`` / ``recompute`` read ``layer_inv_freq``, ``layer_rotary``,
    ``layer_mask``, ``num_layers`` and ``decoder_layers``;
  * tests and benchmarks call ``reference_forward`` (the model's own, unmodified forward) to
    check the placed path against it.
Subclasses implement the family-specific hot path: ``encode_image``, ``segment_positions``,
``image_placeholder`` and ``reference_forward``'s input assembly.

No per-request state lives on the adapter or the model: every request builds its own cache and
passes explicit positions and masks. We never call the VLM's top-level forward on the serving
path, because e.g. Qwen2-VL stores ``rope_deltas`` on the model object there, which would let
two concurrent requests corrupt each other's positions.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from PIL import Image

SYSTEM_PROMPT = (
    "You are a personal assistant. The user's own concepts are described below; use them to "
    "answer questions about the user's things."
)

#: The most elongated image a model is given: a longer one is padded (centred on a grey canvas,
#: nothing cropped or squeezed) to this aspect ratio. Qwen2-VL's processor refuses 200:1 and
#: more, and LLaVA-OneVision's anyres resize would round the short side of such a tile to 0
#: pixels; no photo needs more (a 360-degree panorama is about 8:1).
MAX_IMAGE_ASPECT = 20
#: The shortest side a model is given (Qwen2-VL merges 28x28-pixel patches): a thinner image is
#: upscaled, aspect kept, after the padding.
MIN_IMAGE_SIDE = 28
_PAD_GREY = (128, 128, 128)

# Rendered in the model's chat template as the user's turn, then split on: what comes before
# it is the system prefix, what follows it closes the question and opens the answer.
_USER_TURN = "PERSONALKVUSERTURN"
# A follow-up: rendered after an answer, what lies between the answer and the next user turn
# closes the assistant's turn and opens the user's.
_ANSWER, _NEXT_TURN = "PERSONALKVANSWER", "PERSONALKVNEXTTURN"
# Llama-3.x templates print today's date into the system turn unless given one; a fixed date
# keeps the prefix (and so every chunk's framing hash) stable from one day to the next.
_TEMPLATE_DATE = "26 Jul 2024"
_CHATML = ("<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
_CHATML_NEXT_TURN = "<|im_end|>\n<|im_start|>user\n"


@dataclass
class ImageInput:
    """An image run through the vision tower: ``embeds`` replace its placeholder tokens."""

    embeds: torch.Tensor  # (n_tokens, hidden) in the model dtype
    model_kwargs: dict[str, Any]  # what the model's own forward needs for this image
    grid: tuple[int, int, int] | None = None  # Qwen2-VL (t, h, w) patch grid

    @property
    def num_tokens(self) -> int:
        return int(self.embeds.shape[0])


@dataclass
class Segment:
    """A run of tokens (text and image placeholders) ready to embed."""

    token_ids: torch.Tensor  # (tokens,) int64
    images: list[ImageInput] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def image_embeds(self) -> torch.Tensor | None:
        if not self.images:
            return None
        return torch.cat([image.embeds for image in self.images], dim=0)


@dataclass
class PrefixCache:
    """KV of the fixed system prefix: computed once per adapter, never mutated."""

    text: str
    framing: str  # sha256 of ``text``; part of every chunk's hash
    keys: list[torch.Tensor]  # per layer (1, kv_heads, tokens, head_dim)
    values: list[torch.Tensor]
    extent: int  # next free position after the prefix

    @property
    def num_tokens(self) -> int:
        return int(self.keys[0].shape[-2])


class ModelAdapter(ABC):
    """Drives one loaded HF model. Thread-safe for concurrent requests (read-only state)."""

    kind: ClassVar[str]
    position_axes: ClassVar[int] = 1
    supports_images: ClassVar[bool] = True

    def __init__(
        self,
        model,
        tokenizer,
        image_processor=None,
        *,
        name: str = "",
        weights_id: str = "",
        max_image_pixels: int | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name or getattr(model.config, "_name_or_path", "") or self.kind
        self._weights_id = weights_id
        self.max_image_pixels = max_image_pixels
        self.chat_framing = self._chat_framing()
        self.next_turn_text = self._next_turn_text()
        self._prefix: PrefixCache | None = None
        self._prefix_lock = threading.Lock()
        self._fingerprint: str | None = None
        self._fingerprint_lock = threading.Lock()
        self.eos_token_ids = self._eos_ids()

    # --- model anatomy -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    @abstractmethod
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (embeddings, layers, norm, rotary_emb), without the LM head."""

    @property
    def decoder_layers(self) -> Sequence[torch.nn.Module]:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @functools.cached_property
    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies (fp32, CPU), read once: every placement rotates with them."""
        rotary = self.language_model.rotary_emb
        if getattr(rotary, "attention_scaling", 1.0) != 1.0:
            # Scaled RoPE variants multiply cos/sin by a constant; a delta rotation must not
            # apply it twice. None of the supported models uses one; refuse rather than be wrong.
            raise NotImplementedError("RoPE with attention scaling is not supported for chunk shifts")
        return rotary.inv_freq.detach().float().cpu()

    def layer_inv_freq(self, layer: int) -> torch.Tensor:
        """The RoPE inverse frequencies of decoder layer ``layer`` (Gemma 3 has two RoPE bases,
        one for its sliding-window layers and one for its global ones)."""
        return self.inv_freq

    def layer_rotary(self, hidden: torch.Tensor, positions: torch.Tensor, layer: int):
        """``(cos, sin)`` the decoder layer ``layer`` rotates with at our ``positions``."""
        return self.language_model.rotary_emb(hidden, self.lm_position_ids(positions))

    def decoder_mask(self, attention_mask: torch.Tensor | None, positions: torch.Tensor, cache):
        """Our 4-D additive mask (or None) as the decoder stack takes it, for queries at
        ``positions`` appended to ``cache``: as it is here; per layer type where layers differ
        (Gemma 3's sliding window)."""
        return attention_mask

    def layer_mask(self, decoder_mask, layer: int):
        """The part of ``decoder_mask(...)`` that decoder layer ``layer`` attends with."""
        return decoder_mask

    @property
    def text_config(self):
        return self.model.config.get_text_config(decoder=True)

    # --- identity ----------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 of architecture, config, weights identity and dtype.

        Weights identity: the caller-supplied id (for a checkpoint, the sha256 of its weight
        files' bytes: ``checkpoint.weights_digest``; never the hub commit, so a hub-id load and a
        local copy agree), plus a digest of every parameter's shape and a strided sample of its
        values, so that two in-memory models with the same config never share chunks.
        """
        with self._fingerprint_lock:  # concurrent first Asks compute it once, not each
            if self._fingerprint is None:
                self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(type(self.model).__name__.encode())
        config = self.model.config.to_dict()
        for volatile in ("_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype"):
            config.pop(volatile, None)
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        digest.update(self._weights_id.encode())
        with torch.no_grad():
            for pname, param in sorted(self.model.state_dict().items()):
                flat = param.detach().reshape(-1)
                step = max(1, flat.numel() // 4096)
                digest.update(pname.encode() + str(tuple(param.shape)).encode())
                digest.update(flat[::step][:4096].float().cpu().numpy().tobytes())
        digest.update(str(self.dtype).encode())
        return digest.hexdigest()

    # --- framing: the model's own chat template ----------------------------------------------
    def _render_chat(self, turns: Sequence[tuple[str, str]], accept) -> str | None:
        """The tokenizer's chat template rendered over our system prompt and ``turns`` (role,
        text), with the generation prompt; the first rendering ``accept(text)`` takes, or None
        (no template, or none accepted). Plain-string content first; multimodal templates may
        want a list of parts."""
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        for wrap in (lambda text: text, lambda text: [{"type": "text", "text": text}]):
            messages = [{"role": role, "content": wrap(text)}
                        for role, text in [("system", SYSTEM_PROMPT), *turns]]
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, date_string=_TEMPLATE_DATE
                )
            except Exception:  # a template that rejects this form: try the next one
                continue
            if isinstance(text, str) and accept(text):
                return text
        return None

    def _chat_framing(self) -> tuple[str, str]:
        """(text before the user's turn, text after it) from the tokenizer's chat template with
        our system prompt: ChatML for Qwen2(-VL) and SmolLM2, ``<|begin_of_text|>`` ... headers
        ... ``<|eot_id|>`` for Llama-3. Chunks and the question sit inside the user's turn.
        ChatML when the tokenizer has no usable template."""
        text = self._render_chat([("user", _USER_TURN)],
                                 lambda t: t.count(_USER_TURN) == 1 and SYSTEM_PROMPT in t)
        if text is not None:
            before, after = text.split(_USER_TURN)
            return before, after
        before, after = _CHATML
        return before.format(system=SYSTEM_PROMPT), after

    def _next_turn_text(self) -> str:
        """What follows an answer before the next question of a conversation (the template's
        end of the assistant's turn and start of the user's): ``<|im_end|>\n<|im_start|>user\n``
        in ChatML, ``<|eot_id|>`` and the user header for Llama-3."""
        between = lambda t: t.split(_ANSWER)[1].split(_NEXT_TURN)[0]  # noqa: E731
        text = self._render_chat(
            [("user", _USER_TURN), ("assistant", _ANSWER), ("user", _NEXT_TURN)],
            lambda t: t.count(_ANSWER) == 1 and t.count(_NEXT_TURN) == 1 and between(t).strip() != "")
        return _CHATML_NEXT_TURN if text is None else between(text)

    def system_prefix_text(self) -> str:
        return self.chat_framing[0]

    def question_parts(self, question: str, image: ImageInput | None = None) -> list:
        parts: list = []
        if image is not None:
            parts.append(image)
        parts.append(question + self.chat_framing[1])
        return parts

    def _eos_ids(self) -> list[int]:
        """Stop tokens: the generation config's eos ids (Llama-3-Instruct lists ``<|eot_id|>``
        there), the tokenizer's eos and the special token that ends the user's turn in the chat
        template (the model ends its own turn the same way)."""
        candidates: list = []
        generation_config = getattr(self.model, "generation_config", None)
        if generation_config is not None:
            candidates.append(generation_config.eos_token_id)
        candidates.append(self.tokenizer.eos_token_id)
        turn_end = self.tokenize(self.chat_framing[1])[:1]
        special = set(getattr(self.tokenizer, "all_special_ids", ())) | set(
            getattr(self.tokenizer, "added_tokens_decoder", {}))
        candidates += [t for t in turn_end if t in special]
        ids: list[int] = []
        for candidate in candidates:
            for token_id in candidate if isinstance(candidate, (list, tuple)) else [candidate]:
                if isinstance(token_id, int) and token_id not in ids:
                    ids.append(token_id)
        return ids

    def model_image(self, image: Image.Image) -> Image.Image:
        """The RGB image in a shape every image processor takes, so that any photo validation
        accepts (a 1x1 PNG, a 20000x1 strip) can be asked about: padded to at most
        ``MAX_IMAGE_ASPECT``, downscaled (aspect kept) to at most ``max_image_pixels`` pixels
        (the vision tower's cost and the chunk's token count grow with them), then upscaled to
        a short side of at least ``MIN_IMAGE_SIDE`` (which wins over a cap below 28x560)."""
        image = image.convert("RGB")
        width, height = image.size
        if max(width, height) > MAX_IMAGE_ASPECT * min(width, height):
            long = max(width, height)
            short = -(-long // MAX_IMAGE_ASPECT)  # ceil: the ratio is at most the limit
            canvas = Image.new("RGB", (long, short) if width >= height else (short, long), _PAD_GREY)
            canvas.paste(image, ((canvas.width - width) // 2, (canvas.height - height) // 2))
            image, (width, height) = canvas, canvas.size
        cap = self.max_image_pixels
        if cap and width * height > cap:
            scale = (cap / (width * height)) ** 0.5
            width, height = max(1, int(width * scale)), max(1, int(height * scale))
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        if min(width, height) < MIN_IMAGE_SIDE:
            scale = MIN_IMAGE_SIDE / min(width, height)
            size = (max(MIN_IMAGE_SIDE, round(width * scale)), max(MIN_IMAGE_SIDE, round(height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
        return image

    # --- segments ------------------------------------------------------------------------
    @abstractmethod
    def image_placeholder(self, image: ImageInput) -> tuple[list[int], list[int], list[int]]:
        """Token ids before the image's embeddings, the placeholder ids, the ids after it."""

    @abstractmethod
    def encode_image(self, image: Image.Image) -> ImageInput:
        """Run the image processor and the vision tower (and projector)."""

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def build_segment(self, parts: Sequence[str | ImageInput]) -> Segment:
        """Text parts are tokenized one by one (so a chunk's tokens never depend on what is
        placed next to it); images become their placeholder tokens."""
        ids: list[int] = []
        images: list[ImageInput] = []
        for part in parts:
            if isinstance(part, ImageInput):
                if not self.supports_images:
                    raise ValueError(f"{self.kind} is a text-only model; it cannot take images")
                before, placeholder, after = self.image_placeholder(part)
                ids += before + placeholder + after
                images.append(part)
            else:
                ids += self.tokenize(part)
        return Segment(token_ids=torch.tensor(ids, dtype=torch.long), images=images)

    @abstractmethod
    def segment_positions(self, segment: Segment, start: int) -> tuple[torch.Tensor, int]:
        """Positions ``(axes, tokens)`` of the segment placed at ``start``, and its extent."""

    def embed(self, token_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """``(1, tokens, hidden)`` input embeddings; image rows replace placeholder tokens."""
        ids = token_ids.to(self.device)[None]
        embeds = self.language_model.get_input_embeddings()(ids)
        if image_embeds is not None:
            mask = ids == self.image_token_id
            if int(mask.sum()) != image_embeds.shape[0]:
                raise ValueError(
                    f"{int(mask.sum())} image placeholder tokens but {image_embeds.shape[0]} image embeddings"
                )
            embeds = embeds.masked_scatter(mask[..., None], image_embeds.to(embeds.device, embeds.dtype))
        return embeds

    @property
    def image_token_id(self) -> int:
        return int(getattr(self.model.config, "image_token_id", -1))

    # --- decoder -------------------------------------------------------------------------
    def lm_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """Our ``(axes, tokens)`` positions in the shape the decoder stack expects."""
        return positions.to(self.device)[:, None, :] if self.position_axes == 3 else positions.to(self.device)

    def run_decoder(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the decoder stack with explicit positions (and optionally a 4-D additive mask);
        appends the new keys/values to ``cache``. Returns the final hidden states."""
        out = self.language_model(
            inputs_embeds=embeds,
            position_ids=self.lm_position_ids(positions),
            attention_mask=self.decoder_mask(attention_mask, positions, cache),
            cache=cache,
            use_cache=True,
        )
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()

    def decode_step(self, token_ids: torch.Tensor, positions: torch.Tensor, cache,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One generated token for each of ``B`` rows in one forward: ``token_ids`` and
        ``positions`` are ``(B,)`` (a text token's position is the same on every axis), ``cache``
        holds the rows' KV ``(B, kv_heads, tokens, head_dim)`` and ``attention_mask`` (4-D
        additive, ``(B, 1, 1, tokens + 1)``) hides each row's padding. Returns ``(B, vocab)``
        next-token logits. With ``B == 1`` and no mask this is the arithmetic of feeding one
        token through ``run_decoder``, so a batch of one answers exactly as the solo loop."""
        ids = token_ids.to(self.device)[:, None]
        position_ids = positions.to(self.device)[:, None]
        if self.position_axes == 3:
            position_ids = position_ids[None].expand(3, -1, -1)
        out = self.language_model(
            inputs_embeds=self.language_model.get_input_embeddings()(ids),
            position_ids=position_ids,
            attention_mask=self.decoder_mask(attention_mask, positions[:, None], cache),
            cache=cache,
            use_cache=True,
        )
        return self.logits(out.last_hidden_state[:, -1])

    # --- KV cache: the only place that touches transformers' cache classes ----------------
    def new_cache(self, kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None, *,
                  headroom: int = 0):
        """A request-owned cache, optionally holding ``kv`` per layer (adopted, not copied:
        the caller hands over tensors it will not touch again). ``headroom``: the cache grows
        in place into preallocated room for that many more tokens per row (doubling when it
        runs out) instead of concatenating on every token: what a decode batch uses, whose
        cache is rows x tokens wide."""
        cache = self._empty_cache()
        for i, (keys, values) in enumerate(kv or ()):
            if headroom:
                cache.layers[i] = _growing_layer(keys, values, headroom)
            else:
                layer = cache.layers[i]
                layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys, values
        return cache

    def _empty_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @staticmethod
    def cache_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(1, kv_heads, tokens, head_dim)`` of one layer."""
        return cache.layers[layer].keys, cache.layers[layer].values

    @staticmethod
    def cache_nbytes(cache) -> int:
        """Bytes of every layer's keys and values."""
        return sum(t.numel() * t.element_size() for layer in cache.layers
                   for t in (layer.keys, layer.values) if t is not None and hasattr(t, "numel"))

    @staticmethod
    def set_cache_kv(cache, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        cache.layers[layer].keys, cache.layers[layer].values = keys, values

    # --- system prefix -------------------------------------------------------------------
    def system_prefix(self) -> PrefixCache:
        """The prefix KV, computed once (thread-safe) and shared read-only by all requests."""
        if self._prefix is None:
            with self._prefix_lock:
                if self._prefix is None:
                    self._prefix = self._compute_prefix()
        return self._prefix

    def _compute_prefix(self) -> PrefixCache:
        text = self.system_prefix_text()
        segment = self.build_segment([text])
        positions, extent = self.segment_positions(segment, 0)
        cache = self.new_cache()
        with torch.inference_mode():
            self.run_decoder(self.embed(segment.token_ids, None), positions, cache)
        keys = [self.cache_kv(cache, i)[0] for i in range(self.num_layers)]
        values = [self.cache_kv(cache, i)[1] for i in range(self.num_layers)]
        return PrefixCache(
            text=text,
            framing=hashlib.sha256(text.encode()).hexdigest(),
            keys=keys,
            values=values,
            extent=extent,
        )

    # --- the model's own forward, for references ------------------------------------------
    def reference_inputs(self, segments: Sequence[Segment]) -> dict[str, Any]:
        """Inputs for the unmodified HF forward over the concatenated segments."""
        ids = torch.cat([s.token_ids for s in segments])[None].to(self.device)
        return {"input_ids": ids, **self.image_model_kwargs([i for s in segments for i in s.images])}

    def image_model_kwargs(self, images: list[ImageInput]) -> dict[str, Any]:
        return {}

    def reference_forward(self, segments: Sequence[Segment], logits_to_keep: int = 0) -> torch.Tensor:
        """Logits of the model's own forward (full prefill), ``(tokens_kept, vocab)``."""
        with torch.inference_mode():
            out = self.model(**self.reference_inputs(segments), logits_to_keep=logits_to_keep, use_cache=False)
        return out.logits[0].float()


def _growing_layer(keys: torch.Tensor, values: torch.Tensor, headroom: int):
    """A transformers cache layer whose keys and values are views into buffers with room to
    grow: appending a token writes one column instead of copying the whole layer."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def __init__(self):
            super().__init__()
            self._length = keys.shape[-2]
            self._k = keys.new_empty(*keys.shape[:-2], self._length + headroom, keys.shape[-1])
            self._v = values.new_empty(*values.shape[:-2], self._length + headroom, values.shape[-1])
            self._k[..., :self._length, :] = keys
            self._v[..., :self._length, :] = values
            self.lazy_initialization(keys, values)
            self._publish()

        def _publish(self):
            self.keys = self._k[..., :self._length, :]
            self.values = self._v[..., :self._length, :]

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[-2]
            if self._length + n > self._k.shape[-2]:
                room = max(2 * self._k.shape[-2], self._length + n)
                for name in ("_k", "_v"):
                    old = getattr(self, name)
                    grown = old.new_empty(*old.shape[:-2], room, old.shape[-1])
                    grown[..., :self._length, :] = old[..., :self._length, :]
                    setattr(self, name, grown)
            self._k[..., self._length:self._length + n, :] = key_states
            self._v[..., self._length:self._length + n, :] = value_states
            self._length += n
            self._publish()
            return self.keys, self.values

    return GrowingLayer()
