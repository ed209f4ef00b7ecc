"""Prefix-shared packed batches: each prompt encoded once, its K responses after it, no padding between them.

Layout. A *group* is one prompt followed by its K responses, ``[p0 p1 p2 | a0 a1 | b0 b1 b2]``; a decoder row
holds whole groups back to back up to a token budget (first fit, longest group first), and the rows are
right-padded to the longest one. A response's last token predicts nothing, so it is left out of the input
(the padded layout runs it and ignores its label): a response of R tokens takes R - 1 positions.

Attention and positions. A token sees the earlier tokens of its own group that are prompt tokens or tokens of
its own response (and itself); position ids restart after the prompt for every response (``P, P + 1, ...``).
So every response is computed exactly as if it were alone after its prompt, as in the padded layout, with the
prompt run once instead of K times. A sliding window (Gemma-2, Qwen2 with ``use_sliding_window``) is measured
in positions, transformers' own rule ``kv > q - window`` on the unpacked sequence.

Targets. Per target token, the op's packed form (``mppo_kernels.fused_packed_likelihood``) takes the flat
hidden row it is predicted from (response k's first token: the prompt's last row, shared by all K), its id
and its sequence ``b·K + k`` (``K`` the most responses of the batch; ragged groups leave sequences empty,
False in ``response_mask``).

Masks go through transformers' own attention interfaces, chosen by ``config._attn_implementation``: a
``BlockMask`` for ``flex_attention``, a boolean ``[R, 1, L, L]`` mask (True: attend) for ``sdpa``, an additive
float mask for ``eager``. ``masking_utils.create_causal_mask`` passes a 4-D mask (tensor or BlockMask) through
as it is, and decoders with several layer types (sliding and full attention) take a dict ``{layer type:
mask}``, as ``generate`` passes them. Flash attention cannot express the mask: ``unsupported_reason`` says
so, and training falls back to the padded layout.
"""

from __future__ import annotations

import inspect

import torch

from training.data import DataError, batch_rows

MASK_KINDS = ("flex_attention", "sdpa", "eager")
_PAD = -1  # group / branch id of padding positions, and branch id of prompt positions


def pack_rows(rows: list[dict], *, pad_id: int, max_tokens: int | None = None) -> dict:
    """Pack tokenized rows (``prompt_ids``, ``response_ids[K_b]``, ``scores[K_b]``, optional ``ref_logps``) into
    decoder rows of at most ``max(max_tokens, longest group)`` tokens (a longer group gets a row of its own).

    Returns ``{"packed": {...}, "scores": [B, K] float64, "response_mask": [B, K] bool}`` (and ``ref_logps``
    ``[B, K]`` float32 when every row has them), ``K`` the most responses of a row; ``packed`` holds
    ``input_ids``, ``position_ids``, ``group_ids`` (the row b of the batch, -1 at padding) and ``branch_ids``
    (k for response k, -1 at the prompt and padding), each ``[R, L]``, and ``rows``, ``targets``,
    ``seq_ids`` ``[n]`` (n = all response tokens) for the op, ``rows`` indexing the ``R·L`` flat positions.
    """
    if not rows:
        raise DataError("pack_rows: no rows to pack")
    groups = [_group(b, r) for b, r in enumerate(rows)]
    K = max(len(r["response_ids"]) for r in rows)
    budget = max([max_tokens or 0] + [len(g[0]) for g in groups])
    bins: list[list[int]] = []
    room: list[int] = []
    for b in sorted(range(len(groups)), key=lambda b: -len(groups[b][0])):  # stable: ties keep the batch order
        n = len(groups[b][0])
        i = next((i for i, free in enumerate(room) if free >= n), None)
        if i is None:
            i = len(bins)
            bins.append([])
            room.append(budget)
        bins[i].append(b)
        room[i] -= n
    R, L = len(bins), max(budget - free for free in room)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    group_ids = torch.full((R, L), _PAD, dtype=torch.long)
    branch_ids = torch.full((R, L), _PAD, dtype=torch.long)
    src, tgt, seq = [], [], []
    for r, members in enumerate(bins):
        start = 0
        for b in sorted(members):  # batch order inside a row
            ids, pos, branch, (g_src, g_tgt, g_k) = groups[b]
            n = len(ids)
            input_ids[r, start:start + n] = torch.tensor(ids)
            position_ids[r, start:start + n] = torch.tensor(pos)
            group_ids[r, start:start + n] = b
            branch_ids[r, start:start + n] = torch.tensor(branch)
            offset = r * L + start
            src += [offset + i for i in g_src]
            tgt += g_tgt
            seq += [b * K + k for k in g_k]
            start += n
    scores = torch.zeros((len(rows), K), dtype=torch.float64)
    response_mask = torch.zeros((len(rows), K), dtype=torch.bool)
    for b, r in enumerate(rows):
        k = len(r["response_ids"])
        scores[b, :k] = torch.tensor(r["scores"], dtype=torch.float64)
        response_mask[b, :k] = True
    packed = {"input_ids": input_ids, "position_ids": position_ids, "group_ids": group_ids, "branch_ids": branch_ids,
              "rows": torch.tensor(src, dtype=torch.long), "targets": torch.tensor(tgt, dtype=torch.long),
              "seq_ids": torch.tensor(seq, dtype=torch.long)}
    batch = {"packed": packed, "scores": scores, "response_mask": response_mask}
    if all("ref_logps" in r for r in rows):
        ref = torch.zeros((len(rows), K), dtype=torch.float32)
        for b, r in enumerate(rows):
            k = len(r["response_ids"])
            ref[b, :k] = torch.tensor(list(r["ref_logps"])[:k], dtype=torch.float32)
        batch["ref_logps"] = ref
    return batch


def _group(b: int, row: dict):
    """``(ids, positions, branches, (sources, targets, k))`` of one prompt group, sources local to it."""
    prompt = list(row["prompt_ids"])
    responses = [list(r) for r in row["response_ids"]]
    if not prompt:
        raise DataError(f"batch row {b}: empty prompt_ids (a response's first token is predicted from the prompt's "
                        "last position)")
    if not responses:
        raise DataError(f"batch row {b}: no response_ids")
    if len(row["scores"]) != len(responses):
        raise DataError(f"batch row {b}: {len(row['scores'])} scores for {len(responses)} response_ids")
    P = len(prompt)
    ids, pos, branch = list(prompt), list(range(P)), [_PAD] * P
    src, tgt, ks = [], [], []
    for k, resp in enumerate(responses):
        if not resp:
            raise DataError(f"batch row {b}: response_ids[{k}] is empty")
        first = len(ids)
        src += [P - 1] + [first + j for j in range(len(resp) - 1)]  # token j from position j - 1
        tgt += resp
        ks += [k] * len(resp)
        ids += resp[:-1]
        pos += range(P, P + len(resp) - 1)
        branch += [k] * (len(resp) - 1)
    return ids, pos, branch, (src, tgt, ks)


def make_packed_batch(ds, indices, tokenizer, device, *, max_tokens: int | None = None) -> dict:
    """Rows ``indices`` of a tokenized dataset, packed (``pack_rows``) and on ``device``; the packed
    counterpart of ``training.data.make_batch``."""
    batch = pack_rows(batch_rows(ds, indices), pad_id=tokenizer.pad_token_id, max_tokens=max_tokens)
    return _to(batch, device)


def _to(x, device):
    return {k: _to(v, device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


# ------------------------------------------------------------------------------------------------ masks
def unsupported_reason(decoder, *, max_length: int | None = None, device=None) -> str | None:
    """None when ``decoder`` (a transformers base model) can train on packed batches of sequences up to
    ``max_length`` tokens on ``device``, else why not, in one line."""
    config = decoder.config
    kind = getattr(config, "_attn_implementation", None)
    if kind not in MASK_KINDS:
        return (f"attention implementation {kind!r} takes no custom mask; packing needs one of "
                f"{', '.join(MASK_KINDS)} (--attn-implementation)")
    if kind == "flex_attention" and device is not None and torch.device(device).type == "cpu":
        return "flex_attention has no backward on CPU; use --attn-implementation sdpa or eager"
    if "position_ids" not in inspect.signature(decoder.forward).parameters:
        return f"{type(decoder).__name__}.forward takes no position_ids"
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not types <= {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(types - {'full_attention', 'sliding_attention'})} have no packed mask here"
    if _takes_mask_dict(decoder):
        return None
    window = getattr(config, "sliding_window", None)
    if "sliding_attention" in types or (window and (max_length is None or window < max_length)):
        return (f"{type(decoder).__name__} applies its sliding window ({window}) from one mask it builds itself, "
                "which a packed mask would replace")
    return None


def _takes_mask_dict(decoder) -> bool:
    # Decoders with several layer types build one mask per type unless handed the dict already (as generate
    # does); transformers has no flag for it, only this line in their forward.
    try:
        source = inspect.getsource(type(decoder).forward)
    except (OSError, TypeError):
        return False
    return "isinstance(causal_mask_mapping := attention_mask, dict)" in source


def attention_mask(decoder, packed: dict, dtype: torch.dtype):
    """The mask argument of ``decoder(...)`` for ``packed``: one mask, or ``{layer type: mask}`` for decoders
    that take a dict (sliding layers get the window); ``dtype`` is the float dtype of an eager mask."""
    config = decoder.config
    kind = config._attn_implementation
    window = getattr(config, "sliding_window", None)
    if not _takes_mask_dict(decoder):
        return _mask(kind, packed, dtype, None)
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    return {t: _mask(kind, packed, dtype, window if t == "sliding_attention" else None) for t in types}


def _allowed(group_q, branch_q, pos_q, group_kv, branch_kv, pos_kv, q_idx, kv_idx, window):
    ok = (group_q == group_kv) & (kv_idx <= q_idx) & ((branch_kv == _PAD) | (branch_kv == branch_q))
    return ok & (pos_q - pos_kv < window) if window else ok


def _mask(kind: str, packed: dict, dtype, window):
    group, branch, pos = packed["group_ids"], packed["branch_ids"], packed["position_ids"]
    R, L = group.shape
    if kind == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, kv):
            return _allowed(group[b, q], branch[b, q], pos[b, q], group[b, kv], branch[b, kv], pos[b, kv], q, kv,
                            window)

        # Uncompiled, create_block_mask evaluates the dense [R, L, L] mask first; compiled it never holds it.
        return create_block_mask(mask_mod, R, None, L, L, device=group.device, _compile=group.device.type == "cuda")
    idx = torch.arange(L, device=group.device)
    ok = _allowed(group[:, :, None], branch[:, :, None], pos[:, :, None], group[:, None, :], branch[:, None, :],
                  pos[:, None, :], idx[:, None], idx[None, :], window)[:, None]  # [R, 1, L, L]
    if kind == "sdpa":
        return ok
    return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, torch.finfo(dtype).min)
