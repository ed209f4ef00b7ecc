"""Prefix-shared packed batches (training/packing.py) against the padded layout and the models' own logits.

Tiny random Llama, Qwen2 and Gemma-2 decoders built in code, fp32 on CPU. Qwen2 and Gemma-2 get a sliding
window shorter than the sequences (so it binds) on some of their layers; Gemma-2 also gets attention and
final-logit soft-capping small enough to bind. Rows come from ``training.data.tokenize_row`` with ragged K,
different prompt lengths (some left-truncated) and responses truncated to fit ``max_length``.

Tolerance: the two layouts run the same arithmetic except for the order of fp32 sums (attention over a
different number of masked keys, the prompt's gradient summed over K responses at once instead of K copies),
so log-likelihoods, losses and every parameter gradient agree to 1e-5 relative (max |a - b| / max |b|).
"""

import copy
import re
import types

import pytest
import torch

pytest.importorskip("transformers")

from mppo_kernels import fused_packed_likelihood  # noqa: E402
from mppo_kernels.losses import LOSSES  # noqa: E402
from training import data as D  # noqa: E402
from training import embedded, packing  # noqa: E402
from training.modeling import PreferenceModel, decoder_of, packed_hidden  # noqa: E402

RTOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return embedded.build_char_tokenizer()


def tiny(arch: str, vocab: int, attn: str | None = None, seed: int = 0):
    """A 2-layer random causal LM of ``arch`` (llama, qwen2, gemma2)."""
    import transformers as T

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    if arch == "llama":
        config, cls = T.LlamaConfig(**common, tie_word_embeddings=False), T.LlamaForCausalLM
    elif arch == "qwen2":
        config = T.Qwen2Config(**common, use_sliding_window=True, sliding_window=4, max_window_layers=1)
        cls = T.Qwen2ForCausalLM
    else:
        config = T.Gemma2Config(**common, head_dim=8, sliding_window=4, attn_logit_softcapping=1.0,
                                final_logit_softcapping=2.0)
        cls = T.Gemma2ForCausalLM
    if attn:
        config._attn_implementation = attn
    torch.manual_seed(seed)
    return cls(config).eval()


def make_rows(tok, seed=0, ks=(2, 4, 1, 3), max_length=16, max_prompt_length=8):
    """Tokenized rows with ``ks`` responses each, prompts of 2..11 characters (cut to ``max_prompt_length``)
    and responses of 1..14 characters + EOS, truncated to fit ``max_length``."""
    g = torch.Generator().manual_seed(seed)
    chars = embedded.CHARS[:36]

    def text(lo, hi):
        return "".join(chars[i] for i in torch.randint(0, len(chars), (int(torch.randint(lo, hi, (1,), generator=g)),),
                                                       generator=g))

    rows, truncated = [], 0
    for b, k in enumerate(ks):
        raw = {"prompt": text(2, 12), "responses": [text(1, 15) for _ in range(k)],
               "scores": torch.randperm(11, generator=g)[:k].tolist()}
        out = D.tokenize_row(raw, tok, fmt="responses", max_length=max_length, max_prompt_length=max_prompt_length,
                             min_responses=1, skip_ties=False, min_kept_fraction=0.0)
        assert not out["skip"] and len(out["response_ids"]) == k, out
        truncated += out["truncated"]
        rows.append(out)
    assert truncated > 0  # the rows exercise truncation
    return rows


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    both = ~(a.isnan() & b.isnan())
    return ((a - b)[both].abs().max() / b[both].abs().max().clamp_min(1e-30)).item()


def test_layout_of_two_groups():
    """Token by token: one row per group at the default budget, both groups in one row when it fits."""
    rows = [{"prompt_ids": [5, 6, 7], "response_ids": [[8, 9], [10, 11, 12]], "scores": [1.0, 0.0]},
            {"prompt_ids": [13], "response_ids": [[14]], "scores": [2.0]}]
    out = packing.pack_rows(rows, pad_id=0)
    p = out["packed"]
    assert p["input_ids"].tolist() == [[5, 6, 7, 8, 10, 11], [13, 0, 0, 0, 0, 0]]  # last tokens never input
    assert p["position_ids"][0].tolist() == [0, 1, 2, 3, 3, 4]  # each response restarts after the prompt
    assert p["branch_ids"][0].tolist() == [-1, -1, -1, 0, 1, 1]
    assert p["group_ids"].tolist() == [[0] * 6, [1, -1, -1, -1, -1, -1]]
    assert p["rows"].tolist() == [2, 3, 2, 4, 5, 6]  # response k's first token from the prompt's last row
    assert p["targets"].tolist() == [8, 9, 10, 11, 12, 14]
    assert p["seq_ids"].tolist() == [0, 0, 1, 1, 1, 2]  # b * K + k, K = 2
    assert out["response_mask"].tolist() == [[True, True], [True, False]]
    assert out["scores"].tolist() == [[1.0, 0.0], [2.0, 0.0]]
    one = packing.pack_rows(rows, pad_id=0, max_tokens=7)["packed"]
    assert one["input_ids"].tolist() == [[5, 6, 7, 8, 10, 11, 13]] and one["rows"][-1].item() == 6
    allowed = packing._mask("sdpa", p, torch.float32, None)[0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 0], [1, 1, 1, 0, 1, 1]]


@pytest.mark.parametrize("row, message", [
    ({"prompt_ids": [], "response_ids": [[4]], "scores": [1.0]}, "batch row 1: empty prompt_ids"),
    ({"prompt_ids": [4], "response_ids": [[4], []], "scores": [1.0, 2.0]}, "batch row 1: response_ids[1] is empty"),
    ({"prompt_ids": [4], "response_ids": [[4]], "scores": [1.0, 2.0]}, "batch row 1: 2 scores for 1 response_ids"),
])
def test_bad_rows_name_the_row(row, message):
    good = {"prompt_ids": [4], "response_ids": [[5]], "scores": [1.0]}
    with pytest.raises(D.DataError, match=re.escape(message)):
        packing.pack_rows([good, row], pad_id=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_packed_equals_each_sequence_alone(tok, arch):
    """Packed log-likelihoods equal each response run alone after its prompt through the model's own
    forward and ``.logits`` (sliding windows, soft-capping and all), whatever the row budget."""
    model = tiny(arch, len(tok))
    rows = make_rows(tok)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    expected = torch.full((len(rows), 4), float("nan"))
    with torch.no_grad():
        for b, r in enumerate(rows):
            for k, resp in enumerate(r["response_ids"]):
                ids = torch.tensor([r["prompt_ids"] + resp])
                logp = model(input_ids=ids).logits[0, len(r["prompt_ids"]) - 1 : -1].float().log_softmax(-1)
                expected[b, k] = logp.gather(-1, torch.tensor(resp)[:, None]).mean()
        for budget in (None, 1000):
            batch = packing.pack_rows(rows, pad_id=tok.pad_token_id, max_tokens=budget)
            p, mask = batch["packed"], batch["response_mask"]
            got = fused_packed_likelihood(packed_hidden(model, p), model.get_output_embeddings().weight, p["rows"],
                                          p["targets"], p["seq_ids"], mask.numel(), sequence_mask=mask.reshape(-1),
                                          softcap=softcap).view(mask.shape)
            assert torch.equal(got.isnan(), expected.isnan())
            assert rel_err(got, expected) < RTOL, (budget, got, expected)


def _both_layouts(pm, rows, tok, mode, seed=0):
    """``(padded output, packed output, padded grads, packed grads)`` of ``pm`` in ``mode``."""
    outs, grads = [], []
    for batch in (D.collate(rows, pad_id=tok.pad_token_id), packing.pack_rows(rows, pad_id=tok.pad_token_id)):
        pm.zero_grad(set_to_none=True)
        torch.manual_seed(seed)  # pair_single draws its negatives from the global RNG
        out = pm(**batch, mode=mode)
        if mode == "train":
            out[0].backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None})
    return outs[0], outs[1], grads[0], grads[1]


@pytest.mark.parametrize("arch, attn", [("llama", None), ("llama", "eager"), ("qwen2", None), ("gemma2", None)])
def test_layouts_agree_logps_loss_and_gradients(tok, arch, attn):
    """Train and eval outputs and every parameter gradient of the PreferenceModel, packed vs padded."""
    pm = PreferenceModel(tiny(arch, len(tok), attn), "pair_mnm")
    rows = make_rows(tok, seed=1, ks=(2, 4, 2, 3))
    (loss_a, metrics_a), (loss_b, metrics_b), grads_a, grads_b = _both_layouts(pm, rows, tok, "train")
    assert rel_err(loss_b, loss_a) < RTOL
    for key in metrics_a:
        assert rel_err(metrics_b[key], metrics_a[key]) < RTOL, key
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(pm.parameters()))
    for name in grads_a:
        assert rel_err(grads_b[name], grads_a[name]) < RTOL, name
    with torch.no_grad():
        (eloss_a, logps_a), (eloss_b, logps_b), _, _ = _both_layouts(pm, rows, tok, "eval")
    assert rel_err(eloss_b, eloss_a) < RTOL and rel_err(logps_b, logps_a) < RTOL
    assert torch.equal(logps_a.isnan(), logps_b.isnan())


@pytest.fixture(scope="module")
def loss_model(tok):
    return tiny("llama", len(tok), seed=3)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_agrees(tok, loss_model, loss):
    """Every loss, with its reference model (a frozen copy) run in the same layout as the policy."""
    pm = PreferenceModel(copy.deepcopy(loss_model), loss)
    rows = make_rows(tok, seed=2, ks=(2, 3, 2) if LOSSES[loss].min_responses > 1 else (2, 1, 3))
    (loss_a, _), (loss_b, _), grads_a, grads_b = _both_layouts(pm, rows, tok, "train")
    assert rel_err(loss_b, loss_a) < RTOL
    for name in grads_a:
        assert rel_err(grads_b[name], grads_a[name]) < RTOL, name
    if LOSSES[loss].needs_reference:
        with torch.no_grad():
            ref_a = pm(**D.collate(rows, pad_id=tok.pad_token_id), mode="ref")
            ref_b = pm(**packing.pack_rows(rows, pad_id=tok.pad_token_id), mode="ref")
        assert rel_err(ref_b, ref_a) < RTOL


def test_flex_block_mask_matches_dense_mask(tok):
    """The BlockMask's mask_mod allows exactly what the dense mask allows (sliding window included)."""
    from torch.nn.attention.flex_attention import create_mask

    p = packing.pack_rows(make_rows(tok), pad_id=tok.pad_token_id, max_tokens=40)["packed"]
    R, L = p["input_ids"].shape
    for window in (None, 4):
        block = packing._mask("flex_attention", p, torch.float32, window)
        dense = packing._mask("sdpa", p, torch.float32, window)
        assert torch.equal(create_mask(block.mask_mod, R, 1, L, L), dense)


@pytest.mark.slow
def test_flex_attention_forward_equals_sdpa(tok):
    """The flex_attention path end to end (forward only: flex has no CPU backward; compiles, ~20 s)."""
    model = tiny("qwen2", len(tok))
    p = packing.pack_rows(make_rows(tok), pad_id=tok.pad_token_id, max_tokens=40)["packed"]
    with torch.no_grad():
        expected = packed_hidden(model, p).flatten(0, 1)[p["rows"]]
        model.set_attn_implementation("flex_attention")
        got = packed_hidden(model, p).flatten(0, 1)[p["rows"]]
    assert rel_err(got, expected) < RTOL


def test_unsupported_models_are_named(tok):
    """Decoders whose attention cannot take the mask get one line saying why."""
    import transformers as T

    dec = decoder_of(tiny("llama", len(tok)))
    assert packing.unsupported_reason(dec, max_length=16) is None
    dec.config._attn_implementation = "flash_attention_2"
    assert "'flash_attention_2' takes no custom mask" in packing.unsupported_reason(dec)
    dec.config._attn_implementation = "flex_attention"
    assert "no backward on CPU" in packing.unsupported_reason(dec, device="cpu")
    dec.config._attn_implementation = "sdpa"
    dec.config.layer_types = ["chunked_attention", "full_attention"]
    assert "['chunked_attention']" in packing.unsupported_reason(dec)
    config = T.MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    mistral = T.MistralModel(config)  # one mask for every layer, its window built inside: not replaceable
    assert "sliding window (8)" in packing.unsupported_reason(mistral, max_length=16)
    assert packing.unsupported_reason(mistral, max_length=8) is None  # the window never binds


def test_choose_layout_falls_back_with_one_line(tok):
    from training.train import choose_layout

    lines = []
    acc = types.SimpleNamespace(device=torch.device("cpu"), print=lines.append)
    args = types.SimpleNamespace(packing="prefix", max_length=16, attn_implementation=None, pack_max_tokens=None)
    model = tiny("llama", len(tok))
    assert choose_layout(args, model, acc).func is packing.make_packed_batch
    model.config._attn_implementation = "flash_attention_2"
    assert choose_layout(args, model, acc) is D.make_batch
    assert lines == ["packing: prefix-shared packed batches (sdpa masks)",
                     "packing: the padded layout instead of --packing prefix (attention implementation "
                     "'flash_attention_2' takes no custom mask; packing needs one of flex_attention, sdpa, eager "
                     "(--attn-implementation))"]
    args.packing = "none"
    assert choose_layout(args, model, acc) is D.make_batch and len(lines) == 2
