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

    pip install -e '.[bench]'
    python benchmarks/patching_vs_transformerlens.py            # full size (TransformerLens takes ~1.5 min)
    python benchmarks/patching_vs_transformerlens.py --small    # a 4-layer model, seconds
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


def build_hf(d, n_layers, d_model, n_heads, vocab, seed):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, vocab_size=vocab, n_positions=128)
    GPT2LMHeadModel(cfg).eval().save_pretrained(d)
    # a tiny byte-level BPE so that TransformerBridge finds a tokenizer offline
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["the quick brown fox"] * 4, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>").save_pretrained(d)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="4 layers x 256 wide, for a quick check")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--warm-runs", type=int, default=3, help="jinterp warm runs per round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (jinterp warm runs, one TransformerLens run)")
    ap.add_argument("--skip-tl", action="store_true", help="time jinterp only")
    ap.add_argument("--shared-prefix", type=int, default=None, help="IOI-like pairs: corrupted differs from clean at two positions >= K")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    n_layers, d_model, n_heads, vocab = (4, 256, 8, 50257) if a.small else (12, 768, 12, 50257)

    import jax
    import torch

    import jinterp
    from jinterp import metrics, patching

    d = tempfile.mkdtemp()
    build_hf(d, n_layers, d_model, n_heads, vocab, seed=0)
    model = jinterp.load(d)
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
    rows = []
    tl = tl_cache = None
    if not a.skip_tl:
        from transformer_lens import patching as tlp
        from transformer_lens.model_bridge import TransformerBridge

        tl = TransformerBridge.boot_transformers(d, device="cpu")
        a0, a1 = torch.as_tensor(answers[:, 0]), torch.as_tensor(answers[:, 1])
        tl_metric = lambda logits: (logits[torch.arange(len(a0)), -1, a0] - logits[torch.arange(len(a1)), -1, a1]).mean()
        with torch.no_grad():
            _, tl_cache = tl.run_with_cache(torch.as_tensor(clean))
            tl(torch.as_tensor(corrupted))  # warm up
    for name, fn, tl_name in sweeps:
        run = lambda: fn(model, corrupted, clean_cache, metric, progress=False)
        ours, first = timed(run)
        row = dict(sweep=name, cells=int(np.prod(ours.shape)), jinterp_first_s=round(first, 3))
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
        row.update(jinterp_warm_s=round(float(np.median(warms)), 3), jinterp_warm_min_s=round(min(warms), 3))
        if tl is not None:
            row.update(transformerlens_s=round(float(np.median(tls)), 3), speedup_warm=round(float(np.median(ratios)), 1),
                       speedup_warm_rounds=[round(r, 1) for r in ratios], speedup_first=round(float(np.median(tls)) / first, 1),
                       max_abs_diff=float(np.abs(np.asarray(ours.values) - theirs.numpy()).max()))
        rows.append(row)
        print(json.dumps(row), flush=True)
    info = dict(device=str(jax.devices()[0]), jax=jax.__version__, torch=torch.__version__,
                scenario="unrelated random clean/corrupted" if a.shared_prefix is None else f"IOI-like, shared prefix {a.shared_prefix}", shape=dict(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, vocab=vocab, batch=a.batch, seq=a.seq))
    print(json.dumps(info))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "info": info}, f, indent=1)


if __name__ == "__main__":
    main()
