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
