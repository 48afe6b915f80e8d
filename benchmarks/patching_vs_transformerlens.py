"""Activation-patching sweeps in jinterp and in TransformerLens 4.x on identical weights, in one process.

A random GPT-2-small-shaped model (12 layers, d_model 768, 12 heads, vocab 50257) is saved in HF
format to a temp dir; jinterp loads that dir, and TransformerLens boots a TransformerBridge over
the same dir. Both run resid_pre ([layer, pos]) and head-out ([layer, head]) patching with a
logit-difference metric at the last position, on batch 8 x 16 tokens.

Prints, per sweep: jinterp's first call (with compilation) and warm time, TransformerLens's time,
their ratio, and the largest absolute difference between the two result arrays. Timings drift on
shared machines, so each round times jinterp (median of --warm-runs) and TransformerLens back to
back, and the speed-up is the median of the rounds' ratios.

Two input scenarios: by default clean and corrupted are unrelated random tokens (the worst case
for jinterp: nothing is shared, so every cell recomputes every position from its layer on).
--shared-prefix K makes them IOI-like: corrupted equals clean except at two positions >= K, as
when one name is swapped; the positions before K are then identical in both runs and no cell
recomputes them. TransformerLens's cost is the same in both.

Work: per sweep it also prints the matrix-product FLOPs jinterp performed and the minimum an exact
sweep needs (jinterp/engine/flops.py), jinterp's achieved FLOP rate, and the plain matmul rate of XLA
and of torch on this machine at the sweep's typical shape, with the CPU model, so ratios from
different machines can be compared. Peak resident memory is read after jinterp's phase and again
after TransformerLens's (same process: the second figure includes the first).

    pip install -e '.[bench]'
    python benchmarks/patching_vs_transformerlens.py                      # GPT-2-small shape (TL ~1.5 min)
    python benchmarks/patching_vs_transformerlens.py --shape gpt2-medium
    python benchmarks/patching_vs_transformerlens.py --shape llama-1b --batch 2 --seq 8 [--dtype bfloat16]
    python benchmarks/patching_vs_transformerlens.py --small              # a 4-layer model, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np


SHAPES = {  # family, n_layers, d_model, n_heads, n_kv_heads, d_mlp, vocab
    "small": ("gpt2", 4, 256, 8, 8, 1024, 50257),
    "gpt2-small": ("gpt2", 12, 768, 12, 12, 3072, 50257),
    "gpt2-medium": ("gpt2", 24, 1024, 16, 16, 4096, 50257),
    "llama-1b": ("llama", 16, 2048, 32, 8, 8192, 32000),  # 1.04B parameters (tied embeddings), 4.2 GB in fp32
}


def build_hf(d, shape, seed):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    fam, n_layers, d_model, n_heads, n_kv, d_mlp, vocab = SHAPES[shape]
    if fam == "gpt2":
        cfg = GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, vocab_size=vocab, n_positions=128)
        GPT2LMHeadModel(cfg).eval().save_pretrained(d)
    else:
        cfg = LlamaConfig(num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads,
                          num_key_value_heads=n_kv, intermediate_size=d_mlp, vocab_size=vocab,
                          max_position_embeddings=128, tie_word_embeddings=True)
        LlamaForCausalLM(cfg).eval().save_pretrained(d)
    # a tiny byte-level BPE so that TransformerBridge finds a tokenizer offline
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["the quick brown fox"] * 4, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>").save_pretrained(d)


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "").split()
                isa = [f for f in ("avx512f", "avx512_bf16", "amx_tile", "avx2") if f in flags]
                return line.split(":", 1)[1].strip() + f" ({', '.join(isa)}; {os.cpu_count()} cores)"
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def matmul_rates(rows, d_in, d_out, dtype, repeats=5):
    """GFLOP/s of plain [rows, d_in] x [d_in, d_out] matmuls in XLA and in torch (best of `repeats`)."""
    import jax
    import jax.numpy as jnp
    import torch

    flops = 2 * rows * d_in * d_out
    a = jnp.ones((rows, d_in), dtype)
    b = jnp.ones((d_in, d_out), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    xla = min(timed(lambda: f(a, b).block_until_ready())[1] for _ in range(repeats))
    tdt = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
    ta, tb = torch.ones(rows, d_in, dtype=tdt), torch.ones(d_in, d_out, dtype=tdt)
    ta @ tb
    tt = min(timed(lambda: ta @ tb)[1] for _ in range(repeats))
    return flops / xla / 1e9, flops / tt / 1e9


def nnsight_resid_pre(d, fam, clean, corrupted, answers, n_layers, dtype_name="float32"):
    """resid_pre patching written the nnsight way: one trace of the clean prompt saving every block's
    input, then one trace per (layer, position) that overwrites it and reads the logit difference."""
    import torch
    from nnsight import LanguageModel

    lm = LanguageModel(d, device_map="cpu", dispatch=True,
                       dtype=torch.bfloat16 if dtype_name == "bfloat16" else torch.float32)
    blocks = lambda: lm.transformer.h if fam == "gpt2" else lm.model.layers
    clean, corrupted = torch.as_tensor(clean), torch.as_tensor(corrupted)
    a0, a1 = torch.as_tensor(answers[:, 0]), torch.as_tensor(answers[:, 1])
    rows = torch.arange(len(a0))
    acts = []
    with torch.no_grad():
        with lm.trace(clean):
            for l in range(n_layers):
                acts.append(blocks()[l].input.save())
        out = np.zeros((n_layers, clean.shape[1]), np.float32)
        for l in range(n_layers):
            for p in range(clean.shape[1]):
                with lm.trace(corrupted):
                    blocks()[l].input[:, p] = acts[l][:, p]
                    logits = lm.lm_head.output.save()
                out[l, p] = float((logits[rows, -1, a0] - logits[rows, -1, a1]).float().mean())
    return out


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="4 layers x 256 wide, for a quick check")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-small")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--stairs", choices=("auto", "on", "off"), default="auto",
                    help="jinterp's staircase sweeps (sweep(stairs=...)); off: one program call per first layer")
    ap.add_argument("--pack", choices=("on", "off"), default="on",
                    help="staircases pack each cell's rows from its own first position (sweep(pack=...))")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--warm-runs", type=int, default=3, help="jinterp warm runs per round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (jinterp warm runs, one TransformerLens run)")
    ap.add_argument("--skip-tl", action="store_true", help="time jinterp only")
    ap.add_argument("--shared-prefix", type=int, default=None, help="IOI-like pairs: corrupted differs from clean at two positions >= K")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--nnsight", action="store_true", help="also time resid_pre written with nnsight (one trace per cell)")
    ap.add_argument("--sweeps", default="resid_pre,attn_head_out_all_pos", help="comma-separated sweeps to run")
    ap.add_argument("--model-dir", help="reuse (or create) the random checkpoint here instead of a temp dir")
    a = ap.parse_args()
    shape = "small" if a.small else a.shape
    fam, n_layers, d_model, n_heads, n_kv, d_mlp, vocab = SHAPES[shape]

    import jax
    import jax.numpy as jnp
    import torch

    import jinterp
    from jinterp import metrics, patching
    from jinterp.engine import flops

    d = a.model_dir or tempfile.mkdtemp()
    if not os.path.exists(os.path.join(d, "config.json")):
        build_hf(d, shape, seed=0)
    dtype = jnp.bfloat16 if a.dtype == "bfloat16" else jnp.float32
    stairs = {"auto": "auto", "on": True, "off": False}[a.stairs]
    model = jinterp.load(d, dtype=dtype)
    rs = np.random.RandomState(0)
    clean = rs.randint(0, vocab, (a.batch, a.seq)).astype(np.int64)
    corrupted = rs.randint(0, vocab, (a.batch, a.seq)).astype(np.int64)
    if a.shared_prefix is not None:
        k = a.shared_prefix
        corrupted = clean.copy()
        for p in (k, k + (a.seq - k) // 2):
            corrupted[:, p] = rs.randint(0, vocab, a.batch)
    answers = rs.randint(0, vocab, (a.batch, 2))
    metric = metrics.logit_diff(answers)
    _, clean_cache = model.run_with_cache(clean)

    sweeps = [("resid_pre", patching.resid_pre, "get_act_patch_resid_pre"),
              ("attn_head_out_all_pos", patching.attn_head_out_all_pos, "get_act_patch_attn_head_out_all_pos")]
    sweeps = [s for s in sweeps if s[0] in a.sweeps.split(",")]
    rows = []
    tl = tl_cache = None
    if not a.skip_tl:
        from transformer_lens import patching as tlp
        from transformer_lens.model_bridge import TransformerBridge

        # every jinterp sweep compiles and runs once before TransformerLens loads, so the peak resident
        # memory read here is jinterp's alone
        firsts = {}
        for name, fn, _ in sweeps:
            st = {}
            firsts[name] = (*timed(lambda: fn(model, corrupted, clean_cache, metric, progress=False,
                                              stairs=stairs, pack=a.pack == "on", stats=st)), st)
        rss_jinterp = peak_rss_gb()
        tl = TransformerBridge.boot_transformers(
            d, device="cpu", dtype=torch.bfloat16 if a.dtype == "bfloat16" else torch.float32)
        a0, a1 = torch.as_tensor(answers[:, 0]), torch.as_tensor(answers[:, 1])
        tl_metric = lambda logits: (logits[torch.arange(len(a0)), -1, a0] - logits[torch.arange(len(a1)), -1, a1]).mean()
        with torch.no_grad():
            _, tl_cache = tl.run_with_cache(torch.as_tensor(clean))
            tl(torch.as_tensor(corrupted))  # warm up
    for name, fn, tl_name in sweeps:
        st = {}
        run = lambda: fn(model, corrupted, clean_cache, metric, progress=False, stairs=stairs, pack=a.pack == "on", stats=st)
        ours, first, st = firsts[name] if tl is not None else (*timed(run), st)
        done, least = flops.performed_flops(model.cfg, st), flops.minimum_for(model.cfg, st)
        row = dict(sweep=name, cells=int(np.prod(ours.shape)), jinterp_first_s=round(first, 3),
                   staircase=st["stairs"],  # compiled programs: one per chunk shape (a start layer is traced otherwise)
                   programs=len({(c["s0"], tuple(c["starts"]) if st["stairs"] else c["starts"][0][1]) for c in st["chunks"]}),
                   gflop_performed=round(done / 1e9, 1), gflop_minimum=round(least / 1e9, 1),
                   performed_over_minimum=round(done / least, 3))
        warms, tls, ratios = [], [], []
        # this machine's speed drifts by tens of percent over minutes: each round times both back to back
        for _ in range(a.rounds):
            w = [timed(run)[1] for _ in range(a.warm_runs)]
            warms += w
            if tl is not None:
                with torch.no_grad():
                    theirs, t_tl = timed(lambda: getattr(tlp, tl_name)(tl, torch.as_tensor(corrupted), tl_cache, tl_metric))
                tls.append(t_tl)
                ratios.append(t_tl / float(np.median(w)))
        row.update(jinterp_warm_s=round(float(np.median(warms)), 3), jinterp_warm_min_s=round(min(warms), 3),
                   jinterp_gflops=round(done / min(warms) / 1e9, 1), jinterp_peak_rss_gb=round(rss_jinterp if tl is not None else peak_rss_gb(), 2))
        if tl is not None:
            row.update(transformerlens_s=round(float(np.median(tls)), 3), speedup_warm=round(float(np.median(ratios)), 1),
                       speedup_warm_rounds=[round(r, 1) for r in ratios], speedup_first=round(float(np.median(tls)) / first, 1),
                       max_abs_diff=float(np.abs(np.asarray(ours.values, np.float32) - theirs.float().numpy()).max()),
                       peak_rss_gb_after_tl=round(peak_rss_gb(), 2))
        if a.nnsight and name == "resid_pre":
            theirs, t_nn = timed(lambda: nnsight_resid_pre(d, fam, clean, corrupted, answers, n_layers, dtype_name=a.dtype))
            row.update(nnsight_s=round(t_nn, 3), speedup_vs_nnsight=round(t_nn / row["jinterp_warm_s"], 1),
                       nnsight_max_abs_diff=float(np.abs(np.asarray(ours.values, np.float32) - theirs).max()))
        rows.append(row)
        print(json.dumps(row), flush=True)
    # the sweep's typical matmul: the MLP input projection over the rows of all started cells
    rows_typ = int(a.batch * a.seq * max(1, rows[0]["cells"] // 2) // 2) if rows else a.batch * a.seq
    xla_rate, torch_rate = matmul_rates(rows_typ, d_model, d_mlp, dtype)
    for r in rows:
        r["jinterp_over_xla_matmul_rate"] = round(r["jinterp_gflops"] / xla_rate, 2)
    info = dict(device=str(jax.devices()[0]), cpu=cpu_model(), dtype=a.dtype, stairs=stairs, pack=a.pack,
                matmul_shape=[rows_typ, d_model, d_mlp], xla_matmul_gflops=round(xla_rate, 1),
                torch_matmul_gflops=round(torch_rate, 1), jax=jax.__version__, torch=torch.__version__,
                scenario="unrelated random clean/corrupted" if a.shared_prefix is None else f"IOI-like, shared prefix {a.shared_prefix}", shape=dict(
        name=shape, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv, d_mlp=d_mlp, vocab=vocab,
        batch=a.batch, seq=a.seq))
    print(json.dumps(rows))
    print(json.dumps(info))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "info": info}, f, indent=1)


if __name__ == "__main__":
    main()
