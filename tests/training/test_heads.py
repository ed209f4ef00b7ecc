"""Every causal LM family gets its own likelihood on the training path (training/heads.py, modeling.py).

Tiny random models of each family, built in code (2 layers, hidden 32, the embedded character vocabulary),
fp32 on CPU, in eval mode so both paths run the same dropout-free arithmetic. Weights are initialized with
std 0.2, which makes the logits O(1): soft-capping at 1 and scales of 1/4 then change every likelihood by
far more than the tolerance (``test_family_matches_own_logits`` checks that they do).

Tolerance: the training path (decoder, LM-head weight, fused op) and the model's own ``forward(...).logits``
(log-softmax, gather) differ only in the order of fp32 sums (seen: ~5e-7 nats per token), so per-sequence
log-likelihoods, the loss and every trained parameter's gradient agree to 1e-5 relative (max |a - b| /
max |b| per tensor).
"""

import os
import subprocess
import sys

import pytest
import torch

T = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from mppo_kernels.losses import preference_loss  # noqa: E402
from tests.training.tiny_models import save  # noqa: E402
from training import data as D  # noqa: E402
from training import embedded, heads, packing  # noqa: E402
from training.modeling import PreferenceModel, decoder_of  # noqa: E402
from training.options import UsageError  # noqa: E402

RTOL = 1e-5
LOSS = "list_mle"  # mean reduction, no reference, every response of a group in the loss


@pytest.fixture(scope="module")
def tok():
    return embedded.build_char_tokenizer()


def _config(cls_name: str, vocab: int, **extra):
    kwargs = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  initializer_range=0.2)
    if cls_name == "MiniCPM3Config":
        kwargs["num_key_value_heads"] = 4  # its latent attention has no grouped keys
    return getattr(T, cls_name)(**{**kwargs, **extra})


# family -> (config class, model class, config overrides, (logit_scale, softcap) the op must be given)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, (None, None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, (None, None)),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}, (None, None)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 1.0}, (None, 1.0)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 1.0},
                    (None, 1.0)),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}, (0.25, None)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}, (0.25, None)),  # divides
    "hyperclovax": ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", {"logits_scaling": 0.25},  # multiplies
                    (0.25, None)),
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM",
                  {"lm_head_multiplier": 0.25, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8,
                   "mamba_d_state": 8, "mamba_n_groups": 1, "mamba_chunk_size": 16}, (0.25, None)),
    "minicpm3": ("MiniCPM3Config", "MiniCPM3ForCausalLM",  # hidden / (32 / 8) before a bias-free head
                 {"dim_model_base": 8, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 4,
                  "qk_rope_head_dim": 4, "v_head_dim": 8}, (0.25, None)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"tie_word_embeddings": True}, (None, None)),
    "phi": ("PhiConfig", "PhiForCausalLM", {}, (None, None)),  # its LM head has a bias
    "gpt2": None,  # tied embeddings, no head bias (GPT2Config has its own argument names)
}


def build(family: str, vocab: int, seed: int = 0, cls=None):
    """A tiny random ``family`` model in eval mode (skipped where this transformers lacks the family)."""
    if family == "gpt2":
        config = T.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model_cls = T.GPT2LMHeadModel
    else:
        cfg_name, cls_name, extra, _ = FAMILIES[family]
        if not hasattr(T, cls_name):
            pytest.skip(f"transformers {T.__version__} has no {cls_name}")
        config, model_cls = _config(cfg_name, vocab, **extra), getattr(T, cls_name)
    torch.manual_seed(seed)
    return (cls or model_cls)(config).eval()


def make_rows(vocab: int, ks=(3, 2, 4), seed: int = 0) -> list[dict]:
    """Tokenized rows (``prompt_ids``, ``response_ids[K]``, ``scores[K]``): ragged K, random ids >= 3."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [{"prompt_ids": ids(2, 9), "response_ids": [ids(1, 8) for _ in range(k)],
             "scores": [float(s) for s in torch.randperm(k, generator=g)]} for k in ks]


def layouts(model, tok, rows):
    """``{name: batch}``: the padded batch, and the packed one where the model's attention takes its mask."""
    ds = datasets.Dataset.from_list(rows)
    out = {"padded": D.make_batch(ds, range(len(rows)), tok, "cpu")}
    if packing.unsupported_reason(decoder_of(model), max_length=64) is None:
        out["packed"] = packing.make_packed_batch(ds, range(len(rows)), tok, "cpu")
    return out


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_rel_close(a, b, what):
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    assert err <= RTOL, f"{what}: relative difference {err:.3g}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_own_logits(tok, family):
    """The training path's per-sequence log-likelihoods (``mode="eval"``), its loss (``mode="train"``) and
    the gradient of that loss w.r.t. every trained parameter equal those of the model's own logits, in both
    batch layouts; the transform read from the config is the family's, and it changes the likelihood."""
    model = build(family, len(tok))
    pm = PreferenceModel(model, LOSS)
    expected = FAMILIES[family][3] if FAMILIES[family] else (None, None)
    assert tuple(pm.head_transform) == expected
    rows = make_rows(len(tok))
    padded = D.make_batch(datasets.Dataset.from_list(rows), range(len(rows)), tok, "cpu")
    real = padded["response_mask"]

    model.zero_grad()
    own, _ = heads.own_logps(model, padded, pm.ignore_index)  # [B, K], NaN at padding
    own_loss = preference_loss(LOSS, own, padded["scores"], response_mask=real)
    own_loss.backward()
    own_grads = grads(model)
    for name, batch in layouts(model, tok, rows).items():
        model.zero_grad()
        _, logps = pm(**batch, mode="eval")
        assert torch.isnan(logps[~real]).all()
        assert_rel_close(logps[real].detach(), own[real].detach(), f"{family} {name} log-likelihoods")
        loss, _ = pm(**batch, mode="train")
        assert_rel_close(loss.detach(), own_loss.detach(), f"{family} {name} loss")
        loss.backward()
        for n, g in grads(model).items():
            assert_rel_close(g, own_grads[n], f"{family} {name} gradient of {n}")
    if expected != (None, None):  # the transform matters at these sizes: the plain head would be far off
        plain = PreferenceModel(model, LOSS)
        plain.head_transform = heads.HeadTransform()
        with torch.no_grad():
            plain_logps = plain.policy_logps(padded["input_ids"], padded["attention_mask"], padded["labels"], real)
        off = (plain_logps - own)[real]
        assert off.abs().max() > 1e-2


@pytest.mark.parametrize("family", ["gpt2", "phi"])
def test_head_bias_and_tying(tok, family):
    """What the families above cover: GPT-2's head is tied to the input embedding and has no bias (as in
    Hugging Face's GPT2LMHeadModel); Phi's head has its own weight and a bias."""
    model = build(family, len(tok))
    head = model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    assert (tied, head.bias is None) == ((True, True) if family == "gpt2" else (False, False))


def test_reference_model_pass_uses_its_own_transform(tok):
    """DPO's reference pass (a frozen copy) goes through the reference model's transform: its log-likelihoods
    (sum reduction) equal those of the copy's own logits, in both layouts."""
    model = build("gemma2", len(tok))
    pm = PreferenceModel(model, "dpo")
    assert pm.ref_model is not None and pm.ref_head_transform == (None, 1.0)
    with torch.no_grad():  # the policy moves; the reference must not follow it
        model.get_output_embeddings().weight.mul_(2.0)
    rows = make_rows(len(tok), seed=1)
    batches = layouts(model, tok, rows)
    padded = batches["padded"]
    real = padded["response_mask"]
    with torch.no_grad():
        own_mean, _ = heads.own_logps(pm.ref_model, padded, pm.ignore_index)
    own_sum = own_mean * (padded["labels"] != pm.ignore_index).sum(-1)
    for name, batch in batches.items():
        ref = pm(**batch, mode="ref")
        assert_rel_close(ref[real], own_sum[real], f"reference log-likelihoods, {name}")


def test_probe_passes_and_restores_the_model(tok):
    """The probe agrees to fp32 rounding on a bf16 model, which it runs in fp32 and gives back unchanged:
    same dtypes, same values, same train/eval flags."""
    model = build("gemma2", len(tok)).to(torch.bfloat16).train()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    pm = PreferenceModel(model, LOSS)
    res = heads.parity_probe(pm, datasets.Dataset.from_list(make_rows(len(tok))), tok)
    assert res["model"] == "Gemma2ForCausalLM" and res["rows"] == 4  # 2 prompts x at most 2 responses
    assert res["max_abs_diff"] < 1e-5 and "final_logit_softcapping" in res["transform"]
    assert model.training and all(m.training for m in model.modules())
    for n, p in model.state_dict().items():
        assert p.dtype == before[n].dtype and torch.equal(p, before[n]), n


class OffsetLlama(T.LlamaForCausalLM):
    """A post-head transform no logit scale or soft-cap expresses: a fixed offset per vocabulary entry."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits + torch.linspace(0.0, 1.0, out.logits.shape[-1])
        return out


class HalfLlama(T.LlamaForCausalLM):
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


@pytest.mark.parametrize("case, message", [
    ("offset", "unsupported: its logits are not c·tanh(s·z / c) of its LM head's output z"),
    ("half", "unsupported: its forward multiplies the head's logits by 0.5"),
    ("unused field", "does not apply the transform its config names"),
])
def test_probe_refuses_what_it_cannot_reproduce(tok, case, message):
    """One line naming the model class, the size of the disagreement and what is unsupported."""
    if case == "unused field":  # Llama's forward never reads final_logit_softcapping
        config = _config("LlamaConfig", len(tok), final_logit_softcapping=1.0)
        torch.manual_seed(0)
        model, name = T.LlamaForCausalLM(config).eval(), "LlamaForCausalLM"
    else:
        cls = OffsetLlama if case == "offset" else HalfLlama
        model, name = build("llama", len(tok), cls=cls), cls.__name__
    pm = PreferenceModel(model, LOSS)
    with pytest.raises(UsageError) as e:
        heads.parity_probe(pm, datasets.Dataset.from_list(make_rows(len(tok))), tok)
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"parity probe: {name}'s own forward(...).logits")
    assert "differs by up to " in text and message in text, text


def test_heads_the_op_cannot_read_are_refused(tok):
    """A head module with its own forward (here a LoRA adapter on the LM head) is refused when the training
    module is built, whether or not the probe runs."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build("llama", len(tok)), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(UsageError, match="LoRA on the LM head is not supported"):
        PreferenceModel(model, LOSS)


def test_bad_config_value_is_named(tok):
    model = build("cohere", len(tok))
    model.config.logit_scale = -1.0
    with pytest.raises(UsageError, match=r"CohereForCausalLM: config.logit_scale = -1.0 is not a positive"):
        heads.head_transform(model)


# ------------------------------------------------------------------------------------------------ end to end
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--train-size", "64", "--eval-size", "16", "--per-device-batch-size", "8", "--max-steps", "2",
        "--eval-every", "0", "--no-progress", "--no-save-model", "--generation-eval", "none", "--report-to", "none"]


def _train(args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, os.path.join(ROOT, "training", "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_train_refuses_a_model_whose_head_it_cannot_reproduce(tmp_path, tok):
    """train.py on a saved model whose config names a soft-cap its code never applies stops before training
    with the probe's line (exit status 2, no traceback); --skip-parity-probe lets it train, saying so."""
    config = _config("LlamaConfig", len(tok), final_logit_softcapping=1.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    path = save(T.LlamaForCausalLM(config), tok, tmp_path / "model")
    proc = _train(["--model", path, "--output-dir", str(tmp_path / "run"), *TINY])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: parity probe: LlamaForCausalLM's own forward(...).logits"), last
    assert "held-out likelihood-top accuracy" not in proc.stdout + proc.stderr  # stopped before training
    proc = _train(["--model", path, "--output-dir", str(tmp_path / "run2"), "--skip-parity-probe", *TINY])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parity probe: skipped (--skip-parity-probe)" in proc.stdout + proc.stderr


def test_train_embedded_default_passes_the_probe(tmp_path):
    """The embedded default (tiny Llama, packed batches) passes the probe, says so, and trains."""
    proc = _train(["--hidden-size", "32", "--num-layers", "1", "--output-dir", str(tmp_path / "run"), *TINY])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "parity probe: LlamaForCausalLM's own logits and the training path agree on 4 training rows" in out, out
    assert "held-out likelihood-top accuracy: before" in out


@pytest.mark.slow
def test_two_processes_stop_together(tmp_path, tok):
    """Two processes (gloo on CPU): the main one probes, and both stop with its line, neither waiting on
    the other (the run would hang until the timeout if one went on)."""
    config = _config("LlamaConfig", len(tok), final_logit_softcapping=1.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    path = save(T.LlamaForCausalLM(config), tok, tmp_path / "model")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           os.path.join(ROOT, "training", "train.py"), "--model", path, "--output-dir", str(tmp_path / "run"), *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    # Each rank reaches the refusal and prints it (the launcher then stops whichever is still tearing down, so
    # the exit codes race); the two lines may interleave with other output, so the message is counted.
    message = "train.py: error: parity probe: LlamaForCausalLM's own forward(...).logits and the training path"
    assert proc.stderr.count(message) == 2, proc.stderr[-4000:]
