"""What a real checkpoint needs, checked offline with tiny models: framing and stop tokens from
the model's own chat template (a Llama-3-style one here), a weights fingerprint by file content,
and the image resolution cap."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from PIL import Image

from personalkv.kv.engine import GenerationOptions, answer, encode
from personalkv.kv.evidence import profile_evidence
from personalkv.models import load_adapter
from personalkv.models.base import SYSTEM_PROMPT
from personalkv.models.causal_lm import CausalLMAdapter
from personalkv.models.tiny import tiny_model, tiny_tokenizer

# The shape of Meta-Llama-3.x-Instruct's template: BOS from the template, header tokens,
# <|eot_id|> closing each turn, and a date printed into the system turn unless one is given.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}"
    "{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['role'] == 'system' %}{{- 'Today Date: ' + date_string + '\n\n' }}{%- endif %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LOGIT_TOL = 1e-5  # fp32, tiny random weights, as in the KV core tests

# Slow tier (`make test-fast` skips it): the subject is model loading from checkpoints.
pytestmark = pytest.mark.slow


def llama3_adapter() -> CausalLMAdapter:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = copy.deepcopy(tiny_tokenizer())
    tokenizer.add_tokens(LLAMA3_SPECIALS, special_tokens=True)
    tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
    tokenizer.chat_template = LLAMA3_TEMPLATE
    torch.manual_seed(0)
    ids = tokenizer.convert_tokens_to_ids
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05,
        bos_token_id=ids("<|begin_of_text|>"), eos_token_id=ids("<|end_of_text|>"),
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = ids("<|end_of_text|>")  # <|eot_id|> must come from the template
    return CausalLMAdapter(model, tokenizer, name="tiny-llama3")


def test_llama3_template_gives_its_own_framing_bos_and_eot_stop():
    adapter = llama3_adapter()
    ids = adapter.tokenizer.convert_tokens_to_ids
    prefix = adapter.system_prefix_text()
    assert prefix == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday Date: 26 Jul 2024\n\n"
        f"{SYSTEM_PROMPT}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
    )
    assert "<|im_start|>" not in prefix
    prefix_ids = adapter.build_segment([prefix]).token_ids.tolist()
    assert prefix_ids[0] == ids("<|begin_of_text|>") and prefix_ids.count(ids("<|begin_of_text|>")) == 1
    question = adapter.question_parts("Is this my dog?")[-1]
    assert question == "Is this my dog?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert ids("<|eot_id|>") in adapter.eos_token_ids and ids("<|end_of_text|>") in adapter.eos_token_ids

    # The placed text is exactly the template's rendering of one user message holding the chunk
    # and the question ...
    profile = "Rex is my dog. He has a black leather collar.\n"
    rendered = adapter.tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": profile + "Is this my dog?"}],
        tokenize=False, add_generation_prompt=True, date_string="26 Jul 2024",
    )
    assert prefix + profile + question == rendered
    # ... and the placed chunk answers exactly like the model's own forward over those tokens.
    chunk = encode(adapter, profile_evidence(profile), user_id="alice", concept_id="rex")
    placed = answer(adapter, [chunk], "Is this my dog?", options=GenerationOptions(max_new_tokens=0))
    segments = [adapter.build_segment([prefix]), adapter.build_segment([profile]),
                adapter.build_segment([question])]
    full = adapter.reference_forward(segments, logits_to_keep=1)[-1]
    assert (placed.first_logits - full).abs().max().item() <= LOGIT_TOL


def test_chatml_template_keeps_the_chatml_framing():
    adapter = tiny_model("causal_lm")
    assert adapter.system_prefix_text() == f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
    assert adapter.question_parts("Q?")[-1] == "Q?<|im_end|>\n<|im_start|>assistant\n"
    assert adapter.tokenizer.convert_tokens_to_ids("<|im_end|>") in adapter.eos_token_ids


@pytest.fixture
def digest_cache(tmp_path):
    """Model settings with a private cache folder for the weight digests (the caller passes
    them to load_adapter, as the service's composition root does)."""
    from personalkv.config import ModelSettings

    return ModelSettings(cache_dir=str(tmp_path / "cache"))


def test_fingerprint_identifies_weights_by_file_content(tmp_path, digest_cache):
    original = tiny_model("causal_lm", seed=5)
    first = tmp_path / "hub-snapshot"
    original.model.save_pretrained(first)
    original.tokenizer.save_pretrained(first)
    copy_dir = tmp_path / "local-copy"
    shutil.copytree(first, copy_dir)

    a, b = load_adapter(str(first), settings=digest_cache), load_adapter(str(copy_dir), settings=digest_cache)
    assert a.fingerprint() == b.fingerprint()  # a copy elsewhere: same weights, same chunks
    assert a._weights_id.startswith("sha256:")
    assert (digest_cache.cache_path() / "weight-digests.json").is_file()  # memoised for the next start

    # One element of one tensor changes, at an index the strided value sample skips: only the
    # file content tells the two apart.
    state = b.model.state_dict()
    name = max(state, key=lambda n: state[n].numel())
    with torch.no_grad():
        state[name].view(-1)[1] += 0.5
    b.model.save_pretrained(copy_dir)
    changed = load_adapter(str(copy_dir), settings=digest_cache)
    assert changed.fingerprint() != a.fingerprint()


def test_images_are_capped_to_the_configured_pixels():
    adapter = tiny_model("qwen2_vl")
    big = Image.new("RGB", (4000, 3000), (10, 20, 30))
    previous = adapter.max_image_pixels
    try:
        adapter.max_image_pixels = 112 * 112
        capped = adapter.model_image(big)
        assert capped.size[0] * capped.size[1] <= 112 * 112
        assert abs(capped.size[0] / capped.size[1] - 4 / 3) < 0.02
        assert adapter.model_image(Image.new("RGB", (50, 40))).size == (50, 40)  # small: untouched
        # The vision tower sees the capped image: same token count as the image pre-shrunk.
        assert adapter.encode_image(big).num_tokens == adapter.encode_image(capped).num_tokens
    finally:
        adapter.max_image_pixels = previous
