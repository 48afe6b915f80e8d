"""Attribution-graph construction: jinterp (`saes.attribute`) against circuit-tracer 0.5 on the same weights.

    .venv/bin/python benchmarks/graph_vs_circuit_tracer.py [--ct-python /work/venv-ct/bin/python]
        [--lengths 8 32 128 512] [--batches 1 2 4] [--skip-ct-above 512]

circuit-tracer 0.5 pins transformers <= 4.57, so it runs in a side venv (`/work/venv-ct`, installed
--no-deps, borrowing torch / transformers / TransformerLens from the SAELens venv: see
reference/dictionaries.md section 0 and tests/fixtures/graphs/make_graph_json_fixture.py). Its
ReplacementModel (TransformerLens backend) is built offline: a HookedTransformerConfig from the HF
config, the HF weights through TransformerLens's GPT-2 converter (no LN folding, as circuit-tracer
loads), the local tokenizer, and the per-layer transcoder files.

Both read the same transcoder files at `mlp.hook_in` (the MLP's input, after ln2's weight and bias:
circuit-tracer's ReplacementMLP hook and jinterp's site of that name). Until jinterp's
`ln2.hook_normalized` took TransformerLens's meaning (before the affine), this benchmark folded the
LN affine into circuit-tracer's encoders; that workaround is gone (not rerun since: the table in
BUILD_NOTES predates the change).

Every measurement is a fresh subprocess (peak RSS = that process's VmHWM; "base" = RSS after
imports and loading, before the first attribution). jinterp runs with JINTERP_COMPILE_CACHE=0: its
first call includes compiling (2 programs), the second (same shapes) is warm. circuit-tracer's first
call is also reported separately from the second. Batches: jinterp attributes N prompts in one call;
circuit-tracer (one prompt per call) loops over them. Edges: the largest |A_jinterp - A_ct| over
the first prompt's graph, with its largest |A| for scale (node order is circuit-tracer's in both).

Models: `induction-2l` with its trained transcoders (prompt: a repeated random sequence, <= 64
tokens); for the length sweep, a random-weight GPT-2 of the same width (2 layers, d 64, 2 heads,
vocabulary 121) with 512 positions and random transcoders (d_tc 256, unit encoder rows, b_enc -2:
about 2% of features fire per token), saved to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    """Peak RSS of this process in MB: VmHWM (reset at exec; ru_maxrss would start at the forking parent's RSS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------- workers


def worker_jinterp(a) -> dict:
    os.environ["JINTERP_COMPILE_CACHE"] = "0"
    sys.path.insert(0, str(ROOT))
    import jinterp
    from jinterp import saes

    model = jinterp.load(a.model)
    tc = saes.load(a.tc)
    toks = np.load(a.tokens)
    base = _rss_mb()
    times = []
    for _ in range(2):
        t = time.perf_counter()
        graphs = saes.attribute(model, tc, toks)
        times.append(time.perf_counter() - t)
    g = graphs[0]
    np.savez(a.out, adjacency=g.adjacency, active=g.active_features, logits=g.logit_tokens)
    return dict(first=times[0], warm=times[1], base_mb=base, peak_mb=_rss_mb(), n_nodes=int(g.n_nodes),
                n_features=int(g.n_features))


def worker_ct(a) -> dict:
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_ENABLE_HF_TRANSFER = False  # gone from huggingface_hub 2.x; circuit-tracer imports it
    import torch
    from circuit_tracer.attribution.attribute import attribute
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.set_grad_enabled(True)
    hf = GPT2LMHeadModel.from_pretrained(a.model).eval()
    c = hf.config
    cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
                                  d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions,
                                  act_fn="gelu_new", normalization_type="LN", default_prepend_bos=False, device="cpu",
                                  dtype=torch.float32)
    tok = PreTrainedTokenizerFast.from_pretrained(a.model)
    tc = load_transcoder_set({l: f"{a.tc}/layer_{l}.safetensors" for l in range(c.n_layer)}, scan="bench",
                             feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out",
                             device=torch.device("cpu"), lazy_encoder=False, lazy_decoder=False)
    model = TransformerLensReplacementModel(cfg, tokenizer=tok)  # weights first, then the replacement wrapping
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False)
    model._configure_replacement_model(tc)
    toks = torch.as_tensor(np.load(a.tokens), dtype=torch.long)
    base = _rss_mb()
    t = time.perf_counter()
    g = attribute(toks[0], model)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for row in toks:
        attribute(row, model)
    warm = time.perf_counter() - t
    np.savez(a.out, adjacency=g.adjacency_matrix.numpy(), active=g.active_features.numpy(), logits=np.asarray(
        [int(x.vocab_idx) for x in g.logit_targets]))
    return dict(first=first, warm=warm, base_mb=base, peak_mb=_rss_mb(), n_nodes=int(g.adjacency_matrix.shape[0]),
                n_features=int(len(g.selected_features)))


# ------------------------------------------------------------------------------------------- setup


def random_model(out: Path, n_positions: int = 512, d_tc: int = 256, seed: int = 0) -> tuple[Path, Path]:
    """A random GPT-2 shaped like induction-2l with more positions, and random transcoders for it."""
    import shutil

    import torch
    from safetensors.numpy import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    org = ROOT / "models" / "induction-2l"
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_inner=256, vocab_size=121, n_positions=n_positions,
                     activation_function="gelu_new", bos_token_id=0, eos_token_id=0, pad_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(org / f, out / f)
    tcd = out / "transcoders"
    tcd.mkdir()
    rng = np.random.default_rng(seed)
    for l in range(2):
        enc = rng.normal(size=(d_tc, 64)).astype(np.float32)
        enc /= np.linalg.norm(enc, axis=1, keepdims=True)
        save_file(dict(W_enc=enc, b_enc=np.full(d_tc, -2.0, np.float32), W_dec=(rng.normal(size=(d_tc, 64)) * 0.05).astype(np.float32),
                       b_dec=np.zeros(64, np.float32)), str(tcd / f"layer_{l}.safetensors"))
    (tcd / "config.yaml").write_text("model_name: random-gpt2\nmodel_kind: transcoder_set\n"
                                     "feature_input_hook: mlp.hook_in\nfeature_output_hook: hook_mlp_out\n")
    return out, tcd


def repeated_prompts(n: int, length: int, seed: int) -> np.ndarray:
    """[n, length]: BOS then a random segment of words (ids >= 2) repeated to the length."""
    rng = np.random.default_rng(seed)
    seg = max(2, min(20, (length - 1) // 2))
    rows = [np.resize(rng.integers(2, 121, seg), length - 1) for _ in range(n)]
    return np.concatenate([np.zeros((n, 1), np.int64), np.stack(rows)], 1)


def run_worker(python: str, kind: str, model: Path, tc: Path, toks: np.ndarray, tmp: Path, timeout: int) -> dict:
    tf, of = tmp / f"toks-{kind}.npy", tmp / f"out-{kind}.npz"
    np.save(tf, toks)
    cmd = [python, __file__, "--worker", kind, "--model", str(model), "--tc", str(tc), "--tokens", str(tf), "--out", str(of)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout} s")
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        return dict(error=(p.stderr.strip().splitlines() or ["?"])[-1][:200])
    r = json.loads(lines[-1][7:])
    r["graph"] = dict(np.load(of))
    return r


def compare(j: dict, c: dict) -> str:
    if "error" in j or "error" in c:
        return "-"
    if not np.array_equal(j["graph"]["active"], c["graph"]["active"]) or j["graph"]["adjacency"].shape != c["graph"]["adjacency"].shape:
        return "different nodes"
    d = np.abs(j["graph"]["adjacency"] - c["graph"]["adjacency"]).max()
    return f"{d:.1e} (max |A| {np.abs(c['graph']['adjacency']).max():.2g})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=["jinterp", "ct"])
    ap.add_argument("--model")
    ap.add_argument("--tc")
    ap.add_argument("--tokens")
    ap.add_argument("--out")
    ap.add_argument("--ct-python", default="/work/venv-ct/bin/python")
    ap.add_argument("--lengths", type=int, nargs="*", default=[8, 32, 128, 512])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--timeout", type=int, default=1800)
    a = ap.parse_args()
    if a.worker:
        r = (worker_jinterp if a.worker == "jinterp" else worker_ct)(a)
        print("RESULT " + json.dumps(r), flush=True)
        return
    print(f"load: {os.getloadavg()[0]:.1f} (1-min average) on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        org = ROOT / "models" / "induction-2l"
        org_tc = org / "dictionaries" / "transcoders"
        rnd, rnd_tc = random_model(tmp / "random")
        cases = [("induction-2l (trained transcoders)", org, org_tc, org_tc, 1, 33)]
        cases += [("random GPT-2, random transcoders", rnd, rnd_tc, rnd_tc, 1, P) for P in a.lengths]
        cases += [("random GPT-2, random transcoders", rnd, rnd_tc, rnd_tc, N, 32) for N in a.batches if N > 1]
        head = ("| model | prompts x tokens | nodes | jinterp first / warm (s) | circuit-tracer first / all (s) | "
                "ratio (ct all / jinterp warm) | peak RSS MB jinterp / ct (base) | largest edge difference |")
        print(head + "\n|" + "---|" * 8, flush=True)
        for name, mdir, tcj, tcc, N, P in cases:
            toks = repeated_prompts(N, P, seed=P + N)
            j = run_worker(sys.executable, "jinterp", mdir, tcj, toks, tmp, a.timeout)
            c = run_worker(a.ct_python, "ct", mdir, tcc, toks, tmp, a.timeout)
            f = lambda r, k: f"{r[k]:.2f}" if k in r else r.get("error", "?")  # noqa: E731
            ratio = f"{c['warm'] / j['warm']:.1f}" if "warm" in c and "warm" in j else "-"
            mem = lambda r: f"{r['peak_mb']:.0f} ({r['base_mb']:.0f})" if "peak_mb" in r else "-"  # noqa: E731
            print(f"| {name} | {N} x {P} | {j.get('n_nodes', '-')} | {f(j, 'first')} / {f(j, 'warm')} | "
                  f"{f(c, 'first')} / {f(c, 'warm')} | {ratio} | {mem(j)} / {mem(c)} | {compare(j, c)} |", flush=True)
    print(f"load at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
