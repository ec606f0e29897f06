"""A tiny random Llama and a tokenizer trained on a few strings, built locally (never downloaded)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "Question: What is 12 + 30? Answer: 12 + 30 = 42.\nFinal answer: 42\n",
    "Think step by step. First add the numbers, then subtract.\nWait, let me check.\n",
    "Calculate 7 * 6. The answer is 42. Final answer: 42",
    "Alternatively, count the legs: 4 + 4 + 2 = 10 legs. Final answer: 10\n",
    "yes no Yes No true false 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 - + * / = .",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, seed: int = 0, eos_bias: float = 0.0) -> LlamaForCausalLM:
    """A 2-layer Llama with random weights; ``eos_bias`` raises the EOS logit so traces end at varied
    lengths (the bias goes in the output layer, which keeps the model an ordinary Llama)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaky next-token distributions: no near-ties in greedy decoding
        if eos_bias:
            model.lm_head.weight[tokenizer.eos_token_id] += eos_bias * model.model.norm.weight / 32
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny(path, chat_template: bool = True, seed: int = 0) -> str:
    tok = build_tokenizer(chat_template)
    model = build_model(tok, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# -- a reasoning model that thinks inside <think> ... </think> (tests/test_think.py) ----------------------
THINK_CORPUS = [
    "<think>\nFirst add 12 + 30 = 42. Wait, check.\n</think>\n\nFinal answer: \\boxed{42}\n",
    "<think>\nCount the legs: 4 + 4 + 2 = 10.\n</think>\n\nFinal answer: 10\n",
]
# like DeepSeek-R1 distills: the generation prompt opens the think block
THINK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)


def build_think_tokenizer(opens_think: bool = True) -> PreTrainedTokenizerFast:
    """:func:`build_tokenizer` with ``<think>`` and ``</think>`` as added tokens (not special: decoding
    with ``skip_special_tokens`` keeps them, as in Qwen3 and the R1 distills) and a chat template with
    think tags: the generation prompt opens the think block (``opens_think``, R1 distills) or leaves
    it to the model (Qwen3's default)."""
    from tokenizers import AddedToken

    tok = build_tokenizer(chat_template=False)
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=False)])
    tok.chat_template = THINK_CHAT_TEMPLATE if opens_think else CHAT_TEMPLATE
    return tok


def build_think_model(tokenizer, seed: int = 0, close_bias: float = 0.0, eos_bias: float = 0.0) -> LlamaForCausalLM:
    """:func:`build_model` for a think tokenizer; ``close_bias`` raises the ``</think>`` logit (as
    ``eos_bias`` raises EOS's) so that some traces close their think block mid-trace."""
    model = build_model(tokenizer, seed=seed, eos_bias=eos_bias)
    if close_bias:
        close = tokenizer.convert_tokens_to_ids("</think>")
        with torch.no_grad():
            model.lm_head.weight[close] += close_bias * model.model.norm.weight / 32
    return model


def save_tiny_think(path, seed: int = 0, close_bias: float = 0.0) -> str:
    tok = build_think_tokenizer()
    model = build_think_model(tok, seed=seed, close_bias=close_bias)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
