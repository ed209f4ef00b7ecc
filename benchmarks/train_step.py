"""One full fine-tuning training step (forward, backward, AdamW) of a preference loss on random-init models
of real architectures, in four layouts, at the same batch::

    python -m benchmarks.train_step                      # CUDA: Llama-3.2-1B, Qwen2.5-0.5B; K = 2, 4, 8; bf16
    python -m benchmarks.train_step --max-k              # + the largest K that fits at 2048 tokens per response
    python -m benchmarks.train_step --device cpu --tiny  # smoke: the same configs shrunk, fp32, seconds

Methods (all compute the same loss, ``--loss``, on the same rows; ``lr = 0`` so the optimizer does its full
work but the weights stay put, and every method's loss must agree: recorded as ``loss``):

  a_logits       the model's own path: ``model(...).logits`` of the padded ``[B·K, T]`` rows, fp32
                 log-softmax, per-response mean of the target tokens (what plain training code does).
  b_padded       training/modeling.py's padded layout: decoder on ``[B·K, T]`` rows, the fused op on the
                 hidden states (no logits buffer).
  c_packed       prefix-shared packed batches (training/packing.py): each prompt once, no padding between
                 responses, the op's packed form; flex_attention block masks on CUDA, sdpa masks on CPU.
  c_packed_sdpa  (CUDA) the same with sdpa and the dense 4-D mask.
  d_liger        (K = 2) the padded decoder, then Liger's fused linear cross-entropy (per-token NLL, every
                 position) through ``benchmarks.providers``; "missing"/"unsupported" rows say why not.

Data: B prompts (``--prompts``) with K responses each, lengths like UltraFeedback's (log-normal, prompt mean
150 tokens, responses mean 450, clipped to ``max_length`` 2048; ``LENGTHS`` has the parameters), random ids.
Throughput counts *unique* tokens (each prompt once, plus every response token), the same numerator for every
method. Peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps (total, and above the weights,
gradients and optimizer state held before the step); CUDA only.

Results: ``benchmarks/results/<device>/train_step/`` (``--out`` to change): results.json (stamp: device,
date, versions, commit, dirty flag), results.md (tables, the issue's targets at Llama-3.2-1B K = 4) and
train_step.png, all written by this script.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # `python benchmarks/train_step.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.stamp import REPO_ROOT, describe, device_slug, run_stamp
from mppo_kernels.losses import LOSSES, preference_loss
from training import data as D
from training import packing
from training.modeling import PreferenceModel, head_of, last_hidden

OOM = (torch.OutOfMemoryError,)
GIB = 1 << 30
METHODS = ("a_logits", "b_padded", "c_packed", "c_packed_sdpa", "d_liger")

# Published config.json values of the two models (random init: the architecture, not the weights, sets speed).
CONFIGS = {
    "llama-3.2-1b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001)),
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643)),
}
# --tiny: the same classes and shape ratios at toy width, for checking the pipeline on a CPU.
TINY = {"llama-3.2-1b": dict(vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=1, head_dim=32, bos_token_id=1, eos_token_id=2),
        "qwen2.5-0.5b": dict(vocab_size=4096, hidden_size=112, intermediate_size=608, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=1)}
# Log-normal token lengths (mean, sigma, clip): UltraFeedback-like prompts ~150 and responses ~450 tokens,
# both with a long right tail; --tiny divides the means and the clip by 12.
LENGTHS = {"prompt": (150.0, 0.9, 512), "response": (450.0, 0.6, 2048), "max_length": 2048}


def lognormal_lengths(n: int, mean: float, sigma: float, lo: int, hi: int, g: torch.Generator) -> list[int]:
    mu = math.log(mean) - sigma**2 / 2  # so that the mean is `mean`
    x = torch.exp(mu + sigma * torch.randn(n, generator=g, dtype=torch.float64))
    return x.round().clamp(lo, hi).long().tolist()


def make_rows(B: int, K: int, vocab: int, seed: int, tiny: bool, *, prompt_len=None, response_len=None) -> list[dict]:
    """B tokenized rows (``training.data`` schema) of K responses, lengths drawn as ``LENGTHS`` says (or fixed)."""
    g = torch.Generator().manual_seed(seed)
    scale = 12 if tiny else 1
    (pm, ps, pclip), (rm, rs, rclip), max_len = LENGTHS["prompt"], LENGTHS["response"], LENGTHS["max_length"] // scale
    rows = []
    for b in range(B):
        P = prompt_len or lognormal_lengths(1, pm / scale, ps, 2, pclip // scale, g)[0]
        lens = [response_len] * K if response_len else lognormal_lengths(K, rm / scale, rs, 2, max(2, max_len - P), g)
        ids = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
        rows.append({"prompt_ids": ids(P), "response_ids": [ids(n) for n in lens],
                     "scores": torch.randperm(10 * K, generator=g)[:K].double().div(K).tolist()})
    return rows


def build_model(name: str, tiny: bool, dtype, device):
    import transformers

    cls_name, values = CONFIGS[name]
    config = getattr(transformers, cls_name)(**{**values, **(TINY[name] if tiny else {})})
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.train()


def _to(x, device):
    return {k: _to(v, device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def step_functions(model, rows, loss: str, device, K: int):
    """``{method: (loss_fn, decoder tokens, attention) or (None, (status, why), None)}`` for one batch."""
    pm = PreferenceModel(model, loss)
    padded = _to(D.collate(rows, pad_id=0), device)
    packed = _to(packing.pack_rows(rows, pad_id=0), device)
    mask, scores = padded["response_mask"], padded["scores"]
    padded_tokens = int(mask.sum()) * padded["input_ids"].shape[-1]
    packed_tokens = packed["packed"]["input_ids"].numel()

    def logits_path():
        ids, am, labels = (padded[k][mask] for k in ("input_ids", "attention_mask", "labels"))
        logp = model(input_ids=ids, attention_mask=am, use_cache=False).logits.float().log_softmax(-1)
        valid = labels != D.IGNORE_INDEX
        token = logp.gather(-1, labels.clamp(0)[..., None])[..., 0] * valid
        logps = torch.zeros(mask.shape, device=device).masked_scatter(mask, token.sum(-1) / valid.sum(-1))
        return preference_loss(loss, logps, scores, response_mask=mask)

    def with_attention(kind, fn):
        def run():
            if model.config._attn_implementation != kind:
                model.set_attn_implementation(kind)
            return fn()
        return run

    fns = {"a_logits": (with_attention("sdpa", logits_path), padded_tokens, "sdpa"),
           "b_padded": (with_attention("sdpa", lambda: pm(**padded, mode="train")[0]), padded_tokens, "sdpa")}
    flex = torch.device(device).type == "cuda"
    fns["c_packed"] = (with_attention("flex_attention" if flex else "sdpa", lambda: pm(**packed, mode="train")[0]),
                       packed_tokens, "flex_attention" if flex else "sdpa")
    if flex:
        fns["c_packed_sdpa"] = (with_attention("sdpa", lambda: pm(**packed, mode="train")[0]), packed_tokens, "sdpa")
    if K == 2:
        fns["d_liger"] = liger_path(model, padded, loss, device, padded_tokens)
    return fns


def liger_path(model, padded, loss: str, device, tokens: int):
    from benchmarks.providers import likelihood_providers

    provider = likelihood_providers()["liger_flce"]
    if provider.missing:
        return None, ("missing", provider.missing), None
    if provider.cuda_only and torch.device(device).type != "cuda":
        return None, ("unsupported", provider.cuda_only), None

    def run():
        if model.config._attn_implementation != "sdpa":
            model.set_attn_implementation("sdpa")
        hidden = last_hidden(model, padded["input_ids"], padded["attention_mask"], padded["response_mask"])
        weight, _ = head_of(model)
        logps = provider.fn(hidden, weight, padded["labels"])  # [B, K] mean over targets
        return preference_loss(loss, logps, padded["scores"], response_mask=padded["response_mask"])

    return run, tokens, "sdpa"


def _free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn, model, device, warmup: int, steps: int) -> dict:
    """Median step time over ``steps`` after ``warmup`` (compilation, allocator), the first loss, peak memory."""
    cuda = torch.device(device).type == "cuda"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)

    def step():
        value = fn()
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return value.detach()

    try:
        first = float(step())
        for _ in range(max(0, warmup - 1)):
            step()
        _sync(device)
        held = torch.cuda.memory_allocated() if cuda else None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        peak = torch.cuda.max_memory_allocated() if cuda else None
        out = {"status": "ok", "loss": first, "step_ms": statistics.median(times), "ms_samples": times,
               "peak_gib": peak / GIB if cuda else None, "peak_above_state_gib": (peak - held) / GIB if cuda else None}
    except OOM as e:
        out = {"status": "oom", "note": str(e).splitlines()[0][:200]}
    finally:
        opt.zero_grad(set_to_none=True)
        del opt
        _free(device)
    return out


def unique_tokens(rows) -> int:
    return sum(len(r["prompt_ids"]) + sum(len(x) for x in r["response_ids"]) for r in rows)


def throughput_rows(args, model_name, model) -> list[dict]:
    out = []
    for K in args.K:
        rows = make_rows(args.prompts, K, model.config.vocab_size, args.seed + K, args.tiny)
        n_unique = unique_tokens(rows)
        for method, (fn, tokens, attn) in step_functions(model, rows, args.loss, args.device, K).items():
            if method not in args.methods:
                continue
            base = {"model": model_name, "K": K, "prompts": args.prompts, "method": method, "attention": attn,
                    "unique_tokens": n_unique}
            if fn is None:
                out.append({**base, "status": tokens[0], "note": tokens[1]})
            else:
                res = measure(fn, model, args.device, args.warmup, args.steps)
                if res["status"] == "ok":
                    res["tokens_per_s"] = n_unique / (res["step_ms"] / 1e3)
                out.append({**base, "decoder_tokens": tokens, **res})
            print(f"{model_name} K={K} {method}: {_brief(out[-1])}", flush=True)
    return out


def _brief(r) -> str:
    if r["status"] != "ok":
        return f"{r['status']} ({r.get('note', '')})"
    mem = f", peak {r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else ""
    return f"{r['step_ms']:.1f} ms, {r['tokens_per_s']:.0f} unique tokens/s{mem}, loss {r['loss']:.6f}"


def largest_k(args, model_name, model, method: str, cap: int) -> dict:
    """The largest K (one prompt of 150 tokens, K responses of 2048) whose training step fits: doubling, then
    bisection between the last K that fit and the first that did not."""
    trials = {}

    def fits(K):
        rows = make_rows(1, K, model.config.vocab_size, args.seed, False, prompt_len=150, response_len=2048)
        fn = step_functions(model, rows, args.loss, args.device, K)[method][0]
        trials[K] = measure(fn, model, args.device, warmup=1, steps=1)["status"]
        print(f"{model_name} {method} K={K} at 2048 tokens/response: {trials[K]}", flush=True)
        return trials[K] == "ok"

    lo, hi = 0, None
    K = 1
    while K <= cap:
        if not fits(K):
            hi = K
            break
        lo, K = K, K * 2
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"model": model_name, "method": method, "largest_K": lo, "capped": hi is None, "cap": cap,
            "trials": {str(k): v for k, v in sorted(trials.items())}}


# ------------------------------------------------------------------------------------------------ report
def ratios(rows, model: str, K: int) -> dict:
    get = {r["method"]: r for r in rows if r["model"] == model and r["K"] == K and r["status"] == "ok"}
    out = {}
    if "c_packed" in get:
        c = get["c_packed"]
        for ref in ("a_logits", "b_padded"):
            if ref in get:
                out[f"throughput_c_over_{ref[0]}"] = c["tokens_per_s"] / get[ref]["tokens_per_s"]
        if "a_logits" in get and c.get("peak_gib") is not None:
            out["peak_c_over_a"] = c["peak_gib"] / get["a_logits"]["peak_gib"]
    return out


def markdown(result: dict) -> str:
    s, cfg = result["stamp"], result["config"]
    lines = [f"# Training-step benchmark ({s['device']})", "",
             f"{s['date_utc']}; torch {s['torch']}, transformers {cfg['transformers']}; {describe(s)}.",
             f"Command: `{cfg['command']}`. {cfg['prompts']} prompts per step, loss `{cfg['loss']}`, {cfg['dtype']}, "
             f"{cfg['steps']} timed steps after {cfg['warmup']} warm-up (median).", ""]
    if s["device_type"] != "cuda":
        lines += ["CPU smoke run: checks the pipeline, not a measurement; the targets apply to the GPU run.", ""]
    lines += ["| model | K | method | attention | status | step ms | unique tokens/s | decoder tokens | peak GiB "
              "| peak above state GiB | loss |", "|" + "---|" * 11]
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['K']} | {r['method']} | {r.get('attention') or ''} | {r['status']}"
                     f"{' (' + r['note'] + ')' if r.get('note') and r['status'] != 'ok' else ''} | "
                     f"{fmt(r.get('step_ms'), '.1f')} | {fmt(r.get('tokens_per_s'), '.0f')} | "
                     f"{r.get('decoder_tokens', '')} | {fmt(r.get('peak_gib'), '.2f')} | "
                     f"{fmt(r.get('peak_above_state_gib'), '.2f')} | {fmt(r.get('loss'), '.6f')} |")
    t = result["targets"]
    lines += ["", "Targets (Llama-3.2-1B config, K = 4): packed ≥ 1.6× padded and ≥ 2.5× logits throughput, peak "
              "≤ 50 % of logits:", ""]
    for key, goal, better in (("throughput_c_over_b", 1.6, "ge"), ("throughput_c_over_a", 2.5, "ge"),
                              ("peak_c_over_a", 0.5, "le")):
        v = t.get(key)
        met = None if v is None else (v >= goal if better == "ge" else v <= goal)
        verdict = ("not measured" if met is None else "CPU smoke, not judged" if s["device_type"] != "cuda"
                   else "met" if met else "NOT met")
        shown, sign = "n/a" if v is None else f"{v:.2f}", "≥" if better == "ge" else "≤"
        lines.append(f"- {key}: {shown} (goal {sign} {goal}; {verdict})")
    if result.get("largest_k"):
        lines += ["", "Largest K that fits (one prompt of 150 tokens, responses of 2048 tokens):", "",
                  "| model | method | largest K | trials |", "|---|---|---|---|"]
        for r in result["largest_k"]:
            cap = f" (cap {r['cap']} reached)" if r["capped"] else ""
            lines.append(f"| {r['model']} | {r['method']} | {r['largest_K']}{cap} | "
                         f"{', '.join(f'{k}: {v}' for k, v in r['trials'].items())} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for j, model in enumerate(models):
        for method in METHODS:
            ok = [r for r in result["rows"] if r["model"] == model and r["method"] == method and r["status"] == "ok"]
            if ok:
                axes[0][j].plot([r["K"] for r in ok], [r["tokens_per_s"] for r in ok], "o-", label=method)
                if ok[0].get("peak_gib") is not None:
                    axes[1][j].plot([r["K"] for r in ok], [r["peak_gib"] for r in ok], "o-", label=method)
        axes[0][j].set(title=f"{model}: unique tokens / s", xlabel="K")
        axes[1][j].set(title=f"{model}: peak memory (GiB, CUDA only)", xlabel="K")
        for ax in axes[:, j]:
            if ax.lines:
                ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.suptitle(f"training step, {result['stamp']['device']}, {result['config']['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="toy-width configs and 1/12 lengths (CPU smoke test)")
    p.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--K", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (default: 4, --tiny 2)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--loss", default="pair_mnm", choices=[n for n, s in LOSSES.items() if not s.needs_reference])
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="weights (default: bf16 on CUDA, else fp32)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 5, --tiny 2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (flex_attention compiles in the first)")
    p.add_argument("--max-k", action="store_true", help="also search the largest K at 2048 tokens per response "
                   "for a_logits, b_padded, c_packed (CUDA only)")
    p.add_argument("--max-k-cap", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: benchmarks/results/<device>/train_step")
    args = p.parse_args(argv)
    args.prompts = args.prompts or (2 if args.tiny else 4)
    args.steps = args.steps or (2 if args.tiny else 5)
    args.dtype = args.dtype or ("bf16" if torch.device(args.device).type == "cuda" else "fp32")
    for name in ("prompts", "steps", "warmup", "max_k_cap"):  # warmup >= 1: the loss comes from an untimed step
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(k < 1 for k in args.K):
        p.error(f"--K values must be >= 1, got {args.K}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu --tiny for the smoke run)")
    if args.max_k and torch.device(args.device).type != "cuda":
        p.error("--max-k measures GPU memory: it needs --device cuda")
    return args


def main(argv=None) -> dict:
    import transformers

    args = parse_args(argv)
    out_dir = args.out or os.path.join(REPO_ROOT, "benchmarks", "results", device_slug(args.device), "train_step")
    config = {**{k: v for k, v in vars(args).items()}, "lengths": LENGTHS, "transformers": transformers.__version__,
              "command": "python -m benchmarks.train_step " + " ".join(sys.argv[1:] if argv is None else argv)}
    result = {"stamp": run_stamp(args.device), "config": config, "rows": [], "largest_k": []}
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    for name in args.models:
        model = build_model(name, args.tiny, dtype, args.device)
        result["rows"] += throughput_rows(args, name, model)
        if args.max_k:
            for method in ("a_logits", "b_padded", "c_packed"):
                result["largest_k"].append(largest_k(args, name, model, method, args.max_k_cap))
        del model
        _free(args.device)
    result["targets"] = ratios(result["rows"], "llama-3.2-1b", 4)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(result))
    plot(result, os.path.join(out_dir, "train_step.png"))
    print(f"wrote {out_dir}/results.json, results.md, train_step.png")
    return result


if __name__ == "__main__":
    main()
