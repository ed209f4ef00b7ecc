"""Tiny models built in code for the generation and augmentation tests (nothing downloaded): the embedded
character tokenizer (optionally with a chat template), random tiny Llamas, a reward model with a scalar head,
and a *scripted* Llama whose next token is a fixed function of the current one, so its generations are known
in advance."""

import torch

from training import embedded

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def char_tokenizer(chat: bool = False):
    tok = embedded.build_char_tokenizer()
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def scripted_llama(tok, successor: dict, hidden_size: int = 64):
    """A one-layer ``LlamaForCausalLM`` that continues token ``t`` with ``successor[t]`` (characters, or
    ``"<eos>"``; unlisted tokens continue with EOS), with probability 1 - 1e-30 even when sampling at
    temperature 1. Attention and MLP outputs are zeroed, so the last hidden state is the current token's
    embedding (one-hot), and the head maps it to the successor's logit."""
    assert hidden_size >= len(tok)
    model = embedded.build_tiny_llama(tok, hidden_size=hidden_size, num_layers=1, num_heads=4)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(len(tok), hidden_size))
        head = torch.zeros(len(tok), hidden_size)
        ids = tok.convert_tokens_to_ids
        for t in range(len(tok)):
            head[tok.eos_token_id, t] = 10.0
        for a, b in successor.items():
            head[:, ids(a)] = 0.0
            head[ids(b), ids(a)] = 10.0  # x RMSNorm's sqrt(hidden) = 80 against 0 for every other token
        model.lm_head.weight.copy_(head)
    return model


def chain(text: str, then: str = "<eos>") -> dict:
    """The successor map that writes ``text`` after its first character, then ``then``."""
    out = {a: b for a, b in zip(text, text[1:])}
    out[text[-1]] = then
    return out


def reward_model(tok, seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, num_labels=1,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)


def save(model, tok, path) -> str:
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)
