"""DAS (k = 1) at every layer's residual stream, last position: jinterp (all layers in one compiled
fit) against pyvene 0.1.8 (one IntervenableModel per layer, looped), on the same HF GPT-2 weights.

Task (IOI role swap, the pair design of tests/test_das.py): base = an ABBA IOI prompt of one
template length (16 tokens, so END is the last position for every pair); source = the same prompt
with the IO and S names swapped everywhere; label = the base's S token (what the base would say if
"which name is repeated" took the source's value). At each layer l the 1-d subspace B of
hook_resid_post[l] (= pyvene's "block_output" of layer l) at END is interchanged,
h' = h_b + ((h_s - h_b) B) B^T, and trained with the cross-entropy of the patched logits at END
against the label: Adam, lr decaying linearly to lr/10 over `steps` (optax.linear_schedule vs
torch LinearLR, the same schedule), the same minibatches in the same order (the indices are
precomputed from jinterp's own sampler), the same starting basis per layer (jinterp's init, made
orthonormal, assigned into pyvene's orthogonal parametrisation), and the same held-out pairs.
The two differ only in how B is parametrised (jinterp: QR retraction of an unconstrained W [d, k];
pyvene: torch's orthogonal parametrisation), so accuracies agree closely but not bit for bit.

Each library runs in its own venv, in four phases that share a directory OUT:

    # main venv (jinterp): data, pairs, batch order, initial bases, model path
    .venv/bin/python benchmarks/das_vs_pyvene.py make-data /tmp/das_bench          # ioi-4l
    .venv/bin/python benchmarks/das_vs_pyvene.py jinterp /tmp/das_bench
    # pyvene venv (torch 2.13.0 + pyvene 0.1.8 + transformers 5.24):
    python3 -m venv /work/venv-pyvene
    /work/venv-pyvene/bin/pip install torch==2.13.0 pyvene==0.1.8 transformers numpy
    /work/venv-pyvene/bin/python benchmarks/das_vs_pyvene.py pyvene /tmp/das_bench
    .venv/bin/python benchmarks/das_vs_pyvene.py report /tmp/das_bench

Run jinterp before pyvene: the pyvene phase reads jinterp's full-patch logits and learned bases for
the two sanity checks below (skipped, with everything else intact, when they are missing).

make-data options: --model DIR (any HF GPT-2 directory whose tokenizer has the IOI names as single
tokens, e.g. GPT-2 small), --random-gpt2-small (a random GPT-2-small-shaped model, 12 x 768,
vocab 50257, saved with ioi-4l's tokenizer: valid timing at realistic width, meaningless
accuracies), --n-train, --n-test, --steps, --lr, --batch-size, --seed. The other phases read
everything from OUT/setup.json. --threads N (pyvene / jinterp phases) caps torch's threads
(jinterp/XLA uses the whole machine; on a shared machine prefer equal caps via taskset).

What is timed: the whole fit including held-out evaluation. jinterp: `das.fit(...)` for all
layers (its first call includes compilation; a second, warm call is timed too; fit also computes
train accuracy, the full-patch accuracy and the base accuracy). pyvene: for every layer, build the
IntervenableModel, train, and compute train and held-out interchange accuracy.
Sanity checks (not timed): (1) a full interchange at block_output[l] in pyvene gives the same
logits at END as jinterp's das.patched_logits(..., bases=None, site="hook_resid_post", layers=[l])
on a few pairs; (2) pyvene evaluating jinterp's learned bases reproduces jinterp's test accuracy.

`report` prints both wall times, the ratio, per-layer held-out interchange accuracies of both,
and the largest difference.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
N_SANITY = 8  # pairs for the no-training logit comparison


# ----------------------------------------------------------------------------------------------
# phase 1: data (main venv)


def role_swap_pairs(tokenizer, n, seed):
    sys.path.insert(0, str(REPO))
    from experiments.data import ioi as data

    g = data.IOIGenerator(tokenizer)
    b = g.sample(np.random.default_rng(seed), n, templates=np.where(g.template_lengths == 16)[0], order="ABBA")
    src, label = data.role_swap(b)
    assert (b.end == b.tokens.shape[1] - 1).all()
    return b.tokens.astype(np.int64), src.astype(np.int64), label.astype(np.int64)


def make_random_gpt2_small(d, seed):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=128,
                     attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    GPT2LMHeadModel(cfg).eval().save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # ioi-4l's word-level tokenizer: ids < 95
        shutil.copy(REPO / "models" / "ioi-4l" / f, Path(d) / f)


def make_data(a):
    import jax

    import jinterp

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.random_gpt2_small:
        model_dir = out / "random-gpt2-small"
        if not (model_dir / "model.safetensors").exists():
            make_random_gpt2_small(model_dir, a.seed)
    else:
        model_dir = Path(a.model) if a.model else REPO / "models" / "ioi-4l"
    model_dir = model_dir.resolve()
    model = jinterp.load(str(model_dir))
    tok = model.tokenizer
    if a.random_gpt2_small:  # tokens from ioi-4l's tokenizer (the random model has none of its own)
        tok = jinterp.load("ioi-4l").tokenizer
    bt, st, lab = role_swap_pairs(tok, a.n_train + a.n_test, a.seed)
    n = a.n_train
    np.savez(out / "data.npz", train_base=bt[:n], train_src=st[:n], train_lab=lab[:n],
             test_base=bt[n:], test_src=st[n:], test_lab=lab[n:])

    # the minibatch order das.fit draws (with eval_data given, its rng draws only these)
    rng = np.random.default_rng(a.seed)
    bs = min(a.batch_size, n)
    order, at, batches = rng.permutation(n), 0, []
    for _ in range(a.steps):
        if at + bs > n:
            order, at = rng.permutation(n), 0
        batches.append(order[at: at + bs])
        at += bs
    np.save(out / "batches.npy", np.stack(batches))

    # das.fit's starting W per layer (key folded with layer, then position), made orthonormal
    cfg = model.config
    P = bt.shape[1]
    key = jax.random.PRNGKey(a.seed)
    W = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, l), P - 1), (cfg.d_model, 1)))
                  for l in range(cfg.n_layers)])
    from jinterp.train import das

    Q0 = np.asarray(jax.vmap(das.orthonormal)(W))
    np.save(out / "init_basis.npy", Q0)

    setup = dict(model_dir=str(model_dir), random=bool(a.random_gpt2_small), n_layers=cfg.n_layers,
                 d_model=cfg.d_model, n_train=n, n_test=a.n_test, seq_len=int(P), steps=a.steps, lr=a.lr,
                 batch_size=bs, seed=a.seed)
    (out / "setup.json").write_text(json.dumps(setup, indent=1))
    print(json.dumps(setup, indent=1))


def load_setup(out):
    out = Path(out)
    setup = json.loads((out / "setup.json").read_text())
    d = dict(np.load(out / "data.npz"))
    return setup, d


# ----------------------------------------------------------------------------------------------
# phase 2: jinterp (main venv)


def run_jinterp(a):
    import jax

    import jinterp
    from jinterp.train import das

    out = Path(a.out)
    setup, d = load_setup(out)
    model = jinterp.load(setup["model_dir"], tokenizer=False)
    L, P = setup["n_layers"], setup["seq_len"]

    # sanity: full interchange at hook_resid_post[l], last position, no training
    sb, ss = d["test_base"][:N_SANITY], d["test_src"][:N_SANITY]
    full = np.stack([das.patched_logits(model, sb, ss, None, site="hook_resid_post", layers=[l], pos=[P - 1])[0]
                     for l in range(L)])  # [L, N, V]
    np.save(out / "jinterp_full_logits.npy", full)

    kw = dict(site="hook_resid_post", layers=None, pos=-1, k=1, steps=setup["steps"], lr=setup["lr"],
              batch_size=setup["batch_size"], seed=setup["seed"], progress=False,
              eval_data=(d["test_base"], d["test_src"], d["test_lab"]))
    times, cpu, fit = [], [], None
    for _ in range(a.runs):
        t, c = time.perf_counter(), time.process_time()
        fit = das.fit(model, d["train_base"], d["train_src"], d["train_lab"], **kw)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        print(f"jinterp das.fit over {L} layers: {times[-1]:.2f} s wall, {cpu[-1]:.2f} s CPU", flush=True)
    np.save(out / "jinterp_basis.npy", fit.basis)
    res = dict(times=times, cpu_times=cpu, test_acc=fit.test_acc.tolist(), train_acc=fit.train_acc.tolist(),
               full_acc=fit.full_acc.tolist(), base_acc=fit.base_acc, final_loss=fit.loss[-1].tolist(),
               backend=jax.default_backend(), devices=[str(x) for x in jax.devices()])
    (out / "jinterp.json").write_text(json.dumps(res, indent=1))
    print(fit.table().to_string())


# ----------------------------------------------------------------------------------------------
# phase 3: pyvene (pyvene venv)


def run_pyvene(a):
    import pyvene as pv
    import torch
    import transformers
    from transformers import GPT2LMHeadModel

    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    setup, d = load_setup(out)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(setup["seed"])
    model = GPT2LMHeadModel.from_pretrained(setup["model_dir"], torch_dtype=torch.float32, attn_implementation="eager")
    model = model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    L, P = setup["n_layers"], setup["seq_len"]
    T = lambda x: torch.as_tensor(x, device=dev)
    batches = np.load(out / "batches.npy")
    init = np.load(out / "init_basis.npy")  # [L, d, 1]
    sync = (lambda: torch.cuda.synchronize()) if dev == "cuda" else (lambda: None)

    def intervenable(layer, kind):
        if kind == "das":
            rep = pv.RepresentationConfig(layer=layer, component="block_output", unit="pos", max_number_of_units=1,
                                          low_rank_dimension=1)
            cfg = pv.IntervenableConfig(representations=[rep], intervention_types=pv.LowRankRotatedSpaceIntervention)
        else:
            rep = pv.RepresentationConfig(layer=layer, component="block_output", unit="pos", max_number_of_units=1)
            cfg = pv.IntervenableConfig(representations=[rep], intervention_types=pv.VanillaIntervention)
        im = pv.IntervenableModel(cfg, model)
        im.set_device(dev)
        im.disable_model_gradients()
        return im

    def patched(im, base, src):
        n = base.shape[0]
        loc = [[[P - 1]] * n]
        _, cf = im({"input_ids": base}, [{"input_ids": src}], {"sources->base": (loc, loc)})
        return cf.logits[:, -1]

    def accuracy(im, base, src, lab, bs=256):
        hits = 0
        with torch.no_grad():
            for s in range(0, len(base), bs):
                lg = patched(im, T(base[s: s + bs]), T(src[s: s + bs]))
                hits += (lg.argmax(-1) == T(lab[s: s + bs])).sum().item()
        return hits / len(base)

    def only(im):
        (iv,) = im.interventions.values()
        return iv[0] if isinstance(iv, (tuple, list)) else iv

    # sanity: full interchange at block_output[l] vs jinterp's patched_logits(bases=None)
    sanity = None
    jf = out / "jinterp_full_logits.npy"
    if jf.exists():
        ref = np.load(jf)
        diffs = []
        with torch.no_grad():
            for l in range(L):
                lg = patched(intervenable(l, "full"), T(d["test_base"][:N_SANITY]), T(d["test_src"][:N_SANITY]))
                diffs.append(float(np.abs(lg.cpu().numpy() - ref[l]).max()))
        sanity = dict(full_patch_max_abs_logit_diff=diffs, logit_scale=float(np.abs(ref).max()))
        print("sanity: full interchange, max |pyvene - jinterp| logit per layer:", diffs, flush=True)

    def fit_layer(l):
        im = intervenable(l, "das")
        iv = only(im)
        with torch.no_grad():
            try:  # same start as jinterp: assign through the orthogonal parametrisation
                iv.rotate_layer.weight = T(init[l]).float()
                same_init = bool(torch.allclose(iv.rotate_layer.weight, T(init[l]).float(), atol=1e-5))
            except Exception as e:  # noqa: BLE001
                print(f"layer {l}: could not set the initial basis ({e}); pyvene's own init", flush=True)
                same_init = False
        params = [p for p in iv.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=setup["lr"])
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=setup["steps"])
        losses = []
        for idx in batches:
            lg = patched(im, T(d["train_base"][idx]), T(d["train_src"][idx]))
            loss = torch.nn.functional.cross_entropy(lg.float(), T(d["train_lab"][idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        train_acc = accuracy(im, d["train_base"], d["train_src"], d["train_lab"])
        test_acc = accuracy(im, d["test_base"], d["test_src"], d["test_lab"])
        return im, iv, dict(train_acc=train_acc, test_acc=test_acc, final_loss=losses[-1], same_init=same_init)

    per_layer, layer_times = [], []
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    ims = []
    for l in range(L):
        t = time.perf_counter()
        im, iv, r = fit_layer(l)
        sync()
        layer_times.append(time.perf_counter() - t)
        per_layer.append(r)
        ims.append((im, iv))
        print(f"pyvene layer {l}: {layer_times[-1]:.2f} s  {r}", flush=True)
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0

    # cross-check (untimed): pyvene evaluating jinterp's learned bases
    cross = None
    jb = out / "jinterp_basis.npy"
    if jb.exists():
        basis = np.load(jb)
        cross = []
        for l, (im, iv) in enumerate(ims):
            with torch.no_grad():
                iv.rotate_layer.weight = T(basis[l]).float()
            cross.append(accuracy(im, d["test_base"], d["test_src"], d["test_lab"]))
        print("pyvene test accuracy with jinterp's bases:", cross, flush=True)

    res = dict(time=total, cpu_time=total_cpu, layer_times=layer_times, test_acc=[r["test_acc"] for r in per_layer],
               train_acc=[r["train_acc"] for r in per_layer], final_loss=[r["final_loss"] for r in per_layer],
               same_init=[r["same_init"] for r in per_layer], sanity=sanity, test_acc_of_jinterp_bases=cross,
               device=dev, torch=torch.__version__, pyvene=importlib.metadata.version("pyvene"),
               transformers=transformers.__version__, threads=torch.get_num_threads())
    (out / "pyvene.json").write_text(json.dumps(res, indent=1))


# ----------------------------------------------------------------------------------------------
# phase 4: report


def report(a):
    out = Path(a.out)
    setup = json.loads((out / "setup.json").read_text())
    j = json.loads((out / "jinterp.json").read_text())
    p = json.loads((out / "pyvene.json").read_text())
    L = setup["n_layers"]
    print(f"model {setup['model_dir']}{' (random weights: accuracies meaningless)' if setup['random'] else ''}: "
          f"{L} layers, d_model {setup['d_model']}; {setup['n_train']} train / {setup['n_test']} held-out pairs "
          f"of {setup['seq_len']} tokens; k=1 at hook_resid_post / block_output, last position; "
          f"{setup['steps']} steps, lr {setup['lr']}, batch {setup['batch_size']}")
    jc = j.get("cpu_times", [float("nan")] * len(j["times"]))
    print(f"jinterp ({j['backend']}): first call {j['times'][0]:.2f} s wall / {jc[0]:.2f} s CPU (incl. compile)"
          + (f", warm {j['times'][-1]:.2f} s wall / {jc[-1]:.2f} s CPU" if len(j["times"]) > 1 else ""))
    pc = p.get("cpu_time", float("nan"))
    print(f"pyvene {p['pyvene']} (torch {p['torch']}, {p['device']}, {p['threads']} threads): {p['time']:.2f} s wall / "
          f"{pc:.2f} s CPU ({L} layers looped; per layer " + ", ".join(f"{t:.1f}" for t in p["layer_times"]) + " s)")
    warm = len(j["times"]) > 1
    print(f"ratio pyvene / jinterp, wall: {p['time'] / j['times'][0]:.1f}x (jinterp first call)"
          + (f", {p['time'] / j['times'][-1]:.1f}x (jinterp warm)" if warm else ""))
    print(f"ratio pyvene / jinterp, CPU:  {pc / jc[0]:.1f}x (jinterp first call)"
          + (f", {pc / jc[-1]:.1f}x (jinterp warm)" if warm else ""))
    ja, pa = np.asarray(j["test_acc"]), np.asarray(p["test_acc"])
    print("held-out interchange accuracy (IIA) per layer:")
    print("  layer  jinterp  pyvene  jinterp-basis-in-pyvene")
    cross = p.get("test_acc_of_jinterp_bases")
    for l in range(L):
        c = f"{cross[l]:.3f}" if cross else "-"
        print(f"  {l:5d}  {ja[l]:.3f}    {pa[l]:.3f}   {c}")
    print(f"largest |IIA difference| jinterp vs pyvene: {np.abs(ja - pa).max():.3f} (layer {int(np.abs(ja - pa).argmax())})")
    if cross:
        print(f"largest |difference| evaluating the same (jinterp) bases in both: {np.abs(ja - np.asarray(cross)).max():.3f}")
    print(f"full-patch accuracy (jinterp) {np.round(j['full_acc'], 3).tolist()}, base accuracy {j['base_acc']:.3f}")
    if p.get("sanity"):
        s = p["sanity"]
        print(f"sanity: full interchange at block_output[l] vs jinterp hook_resid_post[l]: max |logit diff| "
              f"{max(s['full_patch_max_abs_logit_diff']):.2e} (logit scale {s['logit_scale']:.1f})")
    print(f"same initial basis in pyvene as jinterp: {all(p['same_init'])}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["make-data", "jinterp", "pyvene", "report"])
    ap.add_argument("out")
    ap.add_argument("--model", help="an HF GPT-2 directory (default: models/ioi-4l)")
    ap.add_argument("--random-gpt2-small", action="store_true")
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-test", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=int, default=2, help="jinterp fits timed (the first includes compilation)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the pyvene phase (0: torch's default)")
    a = ap.parse_args()
    {"make-data": make_data, "jinterp": run_jinterp, "pyvene": run_pyvene, "report": report}[a.phase](a)


if __name__ == "__main__":
    main()
