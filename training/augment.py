"""Scored multi-response data from prompts, in the ``responses`` JSONL schema train.py reads: the recipe of the
Multi-DPO paper (arXiv 2412.07812) and of ``princeton-nlp/llama3-ultrafeedback-armorm`` (5 on-policy samples
per prompt, scored by a reward model): (1) optionally write new prompts from few-shot seed prompts with a
generation model, (2) sample K responses per prompt from the policy, (3) score every response.

    # the embedded task, no downloads: the policy of a finished run samples, the task's verifier scores
    python training/augment.py --policy runs/default/final --output runs/onpolicy.jsonl
    # a seed dataset (any of the four schemas), a hub policy and reward model
    python training/augment.py --seed-dataset HuggingFaceH4/ultrafeedback_binarized --seed-split train_prefs \\
        --policy meta-llama/Meta-Llama-3-8B-Instruct --reward-model Skywork/Skywork-Reward-Llama-3.1-8B-v0.2 \\
        --dtype bfloat16 --num-samples 5 --temperature 0.8 --max-new-tokens 1024 --output data/armorm-like.jsonl

Without --policy the embedded initial model samples (train.py's model before training); without
--reward-model / --scorer the embedded task's verifier scores (correct characters). Next to the output it
writes ``<output>.provenance.json`` (settings, models, counts, versions, commit). A restarted run skips the
prompts already written (a torn last line from a crash is cut off first); rows are whole lines, flushed one
at a time. Dropped and counted: empty and duplicate prompts, empty, duplicate and unscorable responses.
Sampling uses transformers' batched ``generate``, or vLLM when it is installed and a GPU is there
(``--engine``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: `training.*`

from training import data as D  # noqa: E402
from training import embedded  # noqa: E402
from training.augment_output import Output  # noqa: E402
from training.generation import Sampling, batch_seed, encode_prompts, sample_batches  # noqa: E402
from training.options import UsageError  # noqa: E402
from training.prompts import (deduplicate, prompt_key, read_prompt_list, read_seed_dataset,  # noqa: E402
                              write_new_prompts)
from training.scoring import FunctionScorer, RewardModelScorer, ScorerError, VerifierScorer  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="augment.py", description="Sample K responses per prompt from a policy, score "
                                "them, write the responses JSONL schema train.py reads.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", required=True, help="JSONL file to write (appended to when resuming)")
    p.add_argument("--overwrite", action="store_true", help="replace --output (and its provenance) instead of resuming")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("prompts (default: the embedded task's training prompts)")
    g.add_argument("--seed-dataset", help="hub id or local file in any schema train.py reads; its prompts are used")
    g.add_argument("--seed-format", choices=D.FORMATS, help="schema of --seed-dataset (detected by default)")
    g.add_argument("--seed-split", help="split of a hub --seed-dataset (default train)")
    g.add_argument("--prompts", help=".txt (one prompt per line) or .jsonl (strings, or objects with 'prompt')")
    g.add_argument("--max-prompts", type=int, help="use only the first N seed prompts (after deduplication); "
                   "--new-prompts come on top")
    g.add_argument("--new-prompts", type=int, default=0, help="write N new prompts from few-shot seed prompts first")
    g.add_argument("--prompt-model", help="model writing new prompts (default: --policy)")
    g.add_argument("--few-shot", type=int, default=4, help="seed prompts shown per new prompt")
    g.add_argument("--prompt-temperature", type=float, default=1.0, help="0: greedy")
    g.add_argument("--prompt-max-new-tokens", type=int, default=128)
    g = p.add_argument_group("policy and sampling")
    g.add_argument("--policy", help="hub id or directory of an AutoModelForCausalLM, e.g. a run's final/ "
                   "(default: the embedded initial model)")
    g.add_argument("--tokenizer", help="tokenizer id/path (default: --policy's)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    g.add_argument("--engine", default="auto", choices=["auto", "transformers", "vllm"],
                   help="auto: vLLM when importable, on a GPU, for a --policy; else transformers")
    g.add_argument("--num-samples", type=int, default=4, help="K responses sampled per prompt")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--max-new-tokens", type=int, help="default: the embedded answer's length + 1, else 512")
    g.add_argument("--max-prompt-length", type=int, default=1024, help="prompt tokens (left-truncated)")
    g.add_argument("--batch-size", type=int, default=64, help="prompts per generate call")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (batch j is sampled with seed (seed, j))")
    g = p.add_argument_group("scoring (default: the embedded task's verifier)")
    g.add_argument("--reward-model", help="hub id or directory of an AutoModelForSequenceClassification, num_labels=1")
    g.add_argument("--reward-batch-size", type=int, default=16)
    g.add_argument("--reward-max-length", type=int, help="longer conversations are unscorable (default: the "
                   "model's max_position_embeddings)")
    g.add_argument("--scorer", help="module:function called as function(prompt, response) -> float or None")
    g = p.add_argument_group("embedded task (train.py's options of the same names)")
    g.add_argument("--task", default="reverse", choices=embedded.TASKS)
    g.add_argument("--task-length", type=int, default=6)
    g.add_argument("--num-responses", type=int, default=4, help="K of the task's generated data (with --train-size, "
                   "--eval-size and --task-seed it fixes which prompts are the training prompts)")
    g.add_argument("--train-size", type=int, default=4096)
    g.add_argument("--eval-size", type=int, default=512, help="held-out prompts, never sampled")
    g.add_argument("--task-seed", type=int, default=0, help="train.py's --seed: task data and initial model")
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--num-heads", type=int, default=4)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, low in (("num_samples", 1), ("batch_size", 1), ("max_prompts", 1), ("new_prompts", 0), ("few_shot", 1),
                      ("max_new_tokens", 1), ("max_prompt_length", 1), ("reward_batch_size", 1), ("top_k", 0),
                      ("prompt_max_new_tokens", 1), ("reward_max_length", 2), ("task_length", 1), ("train_size", 1),
                      ("eval_size", 1), ("num_responses", 1), ("hidden_size", 1), ("num_layers", 1), ("num_heads", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if not args.temperature > 0 or not args.prompt_temperature >= 0:
        parser.error("--temperature must be > 0 (sampling) and --prompt-temperature >= 0 (0: greedy)")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed_dataset and args.prompts:
        parser.error("give --seed-dataset or --prompts, not both")
    if args.reward_model and args.scorer:
        parser.error("give --reward-model or --scorer, not both")
    external = args.seed_dataset or args.prompts
    if external and not args.policy:
        parser.error("--seed-dataset / --prompts need --policy (the embedded model knows only its own task)")
    if external and not (args.reward_model or args.scorer):
        parser.error("--seed-dataset / --prompts need --reward-model or --scorer (the embedded verifier scores only "
                     "the embedded task's prompts)")
    if args.tokenizer and not args.policy:
        parser.error("--tokenizer needs --policy")
    if args.new_prompts and not (args.policy or args.prompt_model):
        parser.error("--new-prompts needs --prompt-model or --policy (a model that can write prompts)")
    if not args.policy and args.hidden_size % args.num_heads:
        parser.error(f"--hidden-size {args.hidden_size} must be a multiple of --num-heads {args.num_heads}")
    for name in ("policy", "tokenizer", "prompt_model", "reward_model", "seed_dataset", "prompts"):
        value = getattr(args, name)
        if value and (D.looks_like_path(value) or name == "prompts") and not os.path.exists(os.path.expanduser(value)):
            parser.error(f"--{name.replace('_', '-')} {value}: no such file or directory")
    if args.policy and os.path.isdir(args.policy) and not os.path.exists(os.path.join(args.policy, "config.json")):
        hint = os.path.join(args.policy, "final")
        parser.error(f"--policy {args.policy}: no config.json in it" + (
            f"; a train.py run saves its model in {hint}" if os.path.isdir(hint) else ""))
    if args.max_new_tokens is None:
        args.max_new_tokens = 512 if external else embedded.answer_length(args.task, args.task_length) + 1
    if args.engine == "vllm" and not args.policy:
        parser.error("--engine vllm needs --policy (vLLM loads the model by name)")
    if args.engine == "auto":
        import importlib.util

        import torch

        vllm = args.policy and torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
        args.engine = "vllm" if vllm else "transformers"
    return args


def run_settings(args) -> dict:
    """Everything that decides the rows: a restarted run continues a file only when these are equal."""
    keys = ["seed_dataset", "seed_format", "seed_split", "prompts", "max_prompts", "new_prompts", "prompt_model",
            "few_shot", "prompt_temperature", "prompt_max_new_tokens", "policy", "tokenizer", "dtype", "engine",
            "num_samples", "temperature", "top_p", "top_k", "max_new_tokens", "max_prompt_length", "batch_size",
            "seed", "reward_model", "reward_max_length", "scorer"]
    if not (args.seed_dataset or args.prompts):
        keys += ["task", "task_length", "num_responses", "train_size", "eval_size", "task_seed"]
    if not args.policy:
        keys += ["hidden_size", "num_layers", "num_heads", "task_seed"]
    return {k: getattr(args, k) for k in dict.fromkeys(keys)}


def cli(argv=None) -> None:
    try:
        main(argv)
    except (UsageError, D.DataError, ScorerError) as e:
        print(f"augment.py: error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> dict:
    """Write the rows as the options say; returns the counts (a Counter). Problems with options, data, models or
    the output file raise ``UsageError`` / ``DataError`` / ``ScorerError`` (``cli`` prints them as one line)."""
    import datasets
    import transformers
    from tqdm.auto import tqdm

    args = parse_args(argv)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    out = Output(args.output, run_settings(args), overwrite=args.overwrite, log=print)
    counts = Counter()
    prompts = source_prompts(args, counts)
    policy, tokenizer = load_causal_lm(args.policy, args, "policy", weights=args.engine == "transformers")
    if args.new_prompts:
        prompts += new_prompts(args, out, prompts, (policy, tokenizer), counts)
    prompts, ids = encodable(prompts, tokenizer, args.max_prompt_length, counts)
    scorer = make_scorer(args)
    out.start(models={"policy": args.policy or embedded_model_name(args), "engine": args.engine,
                      "prompt_model": (args.prompt_model or args.policy) if args.new_prompts else None,
                      **scorer.describe()})
    counts["prompts_already_written"] = sum(prompt_key(p) in out.done for p in prompts)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, num_samples=args.num_samples, do_sample=True,
                        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    bar = tqdm(total=len(prompts), initial=counts["prompts_already_written"], desc="prompts", dynamic_ncols=True,
               disable=args.no_progress)
    todo = lambda i: prompt_key(prompts[i]) not in out.done  # noqa: E731
    batches = (vllm_batches(args, ids, sampling) if args.engine == "vllm" else
               sample_batches(policy, tokenizer, ids, sampling, batch_size=args.batch_size, seed=args.seed,
                              skip=lambda start, stop: not any(todo(i) for i in range(start, stop))))
    for start, texts, finished in batches:
        mine = [i for i in range(start, start + len(texts)) if todo(i)]
        for row in score_rows([prompts[i] for i in mine], [texts[i - start] for i in mine],
                              [finished[i - start] for i in mine], scorer, counts):
            if row is not None:
                out.append(row)
        bar.update(len(mine))
    bar.close()
    counts["rows_written"] = len(out.done) - counts["prompts_already_written"]
    out.finish(counts)
    drops = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if ":" in k)
    print(f"augment: {counts['rows_written']} rows written to {args.output} ({counts['prompts_already_written']} "
          f"already there), {counts['responses']} responses ({counts['unfinished_responses']} cut at "
          f"--max-new-tokens); dropped: {drops or 'none'}; provenance in {out.provenance_path}")
    return counts


def embedded_model_name(args) -> str:
    return (f"embedded initial model (hidden {args.hidden_size}, {args.num_layers} layers, {args.num_heads} heads, "
            f"seed {args.task_seed})")


def source_prompts(args, counts: Counter) -> list:
    """The seed prompts, deduplicated: --seed-dataset's, --prompts', or the embedded task's training prompts
    (never its held-out ones), the first --max-prompts of them."""
    if args.seed_dataset:
        prompts = read_seed_dataset(args.seed_dataset, args.seed_format, args.seed_split)
    elif args.prompts:
        prompts = read_prompt_list(args.prompts)
    else:
        train_rows, _ = embedded.make_task_splits(args.train_size, args.eval_size, task=args.task,
                                                  length=args.task_length, k=args.num_responses, seed=args.task_seed)
        prompts = [r["prompt"] for r in train_rows]
    counts["prompts_read"] = len(prompts)
    prompts = deduplicate(prompts, counts)
    return prompts[: args.max_prompts] if args.max_prompts else prompts


def load_causal_lm(name, args, option: str, *, weights: bool = True):
    """``(model, tokenizer)`` of --policy / --prompt-model: ``from_pretrained`` on a hub id or directory, or the
    embedded initial model when ``name`` is None; ``weights=False`` loads the tokenizer only (vLLM)."""
    import torch

    if name is None:
        tok = embedded.build_char_tokenizer()
        model = embedded.build_tiny_llama(tok, hidden_size=args.hidden_size, num_layers=args.num_layers,
                                          num_heads=args.num_heads, seed=args.task_seed,
                                          max_positions=max(64, min(1024, 4 * args.task_length + 8)))
        return model, tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.modeling import _from_pretrained

    tok_name = args.tokenizer if option == "policy" and args.tokenizer else name
    tok = _from_pretrained(AutoTokenizer, "tokenizer" if tok_name != name else option, tok_name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not weights:
        return None, tok
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else "auto"
    model = _from_pretrained(AutoModelForCausalLM, option, name, dtype=dtype)
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), tok


def new_prompts(args, out: Output, seeds: list, policy, counts: Counter) -> list:
    """--new-prompts prompts written from few-shot seed prompts, or those a previous run of this output wrote."""
    saved = out.load_new_prompts()
    if saved is not None:
        print(f"new prompts: {len(saved)} read back from {out.new_prompts_path}")
        return saved
    model, tok = policy if args.prompt_model is None and policy[0] is not None else \
        load_causal_lm(args.prompt_model or args.policy, args, "prompt-model")
    greedy = args.prompt_temperature == 0
    sampling = Sampling(max_new_tokens=args.prompt_max_new_tokens, do_sample=not greedy,
                        temperature=args.prompt_temperature if not greedy else 1.0)
    new = write_new_prompts(model, tok, seeds, args.new_prompts, counts, few_shot=args.few_shot, sampling=sampling,
                            seed=args.seed, batch_size=args.batch_size)
    print(f"new prompts: {len(new)} of {args.new_prompts} written (dropped: empty {counts['new_prompt:empty']}, "
          f"duplicate {counts['new_prompt:duplicate']})")
    out.save_new_prompts(new)
    return new


def encodable(prompts: list, tokenizer, max_prompt_length: int, counts: Counter):
    """``(prompts, ids)`` without the prompts the policy cannot read (the chat template rejects them, or they
    hold characters its tokenizer does not know), counted; ids as the trainer encodes them."""
    unk = D.unknown_token_id(tokenizer)
    kept, ids = [], []
    for p in prompts:
        try:
            x = encode_prompts(tokenizer, [p], max_prompt_length)[0]
        except D.DataError:
            counts["prompt:rejected_by_chat_template"] += 1
            continue
        if unk is not None and unk in x:
            counts["prompt:unknown_tokens"] += 1
            continue
        kept.append(p)
        ids.append(x)
    return kept, ids


def make_scorer(args):
    if args.reward_model:
        return RewardModelScorer(args.reward_model, dtype=args.dtype, batch_size=args.reward_batch_size,
                                 max_length=args.reward_max_length)
    if args.scorer:
        return FunctionScorer(args.scorer)
    return VerifierScorer(args.task, args.task_length)


def score_rows(prompts: list, texts: list, finished: list, scorer, counts: Counter) -> list:
    """One row ``{prompt, responses, scores}`` per prompt (None when nothing is left): its samples without empty
    ones and repeats, scored in one call for the whole batch, unscorable ones dropped; all counted."""
    kept = []
    for samples, fins in zip(texts, finished):
        seen, mine = set(), []
        for text, fin in zip(samples, fins):
            if not text.strip():
                counts["response:empty"] += 1
            elif text in seen:
                counts["response:duplicate"] += 1
            else:
                seen.add(text)
                mine.append((text, fin))
        kept.append(mine)
    scores = iter(scorer([(p, t) for p, mine in zip(prompts, kept) for t, _ in mine]))
    rows = []
    for prompt, mine in zip(prompts, kept):
        row = {"prompt": prompt, "responses": [], "scores": []}
        for text, fin in mine:
            score = next(scores)
            if score is None:
                counts["response:unscorable"] += 1
                continue
            row["responses"].append(text)
            row["scores"].append(score)
            counts["responses"] += 1
            counts["unfinished_responses"] += not fin
        if not row["responses"]:
            counts["row:no_responses_left"] += 1
        rows.append(row if row["responses"] else None)
    return rows


def vllm_batches(args, ids: list, sampling: Sampling):
    """``(start, texts, finished)`` per batch from vLLM, batch ``j`` seeded with ``(seed, j)`` like the
    transformers path (the samples differ between the two engines). Every batch is generated, also on resume."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.policy, tokenizer=args.tokenizer or args.policy, dtype=args.dtype, seed=args.seed)
    for j, start in enumerate(range(0, len(ids), args.batch_size)):
        params = SamplingParams(n=sampling.num_samples, temperature=sampling.temperature, top_p=sampling.top_p,
                                top_k=sampling.top_k or -1, max_tokens=sampling.max_new_tokens,
                                seed=batch_seed(args.seed, j))
        outs = llm.generate([{"prompt_token_ids": x} for x in ids[start : start + args.batch_size]], params,
                            use_tqdm=False)
        yield (start, [[c.text for c in o.outputs] for o in outs],
               [[c.finish_reason == "stop" for c in o.outputs] for o in outs])


if __name__ == "__main__":
    cli()
