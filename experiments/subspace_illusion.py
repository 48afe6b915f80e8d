"""Is This the Subspace You Are Looking For? The interpretability illusion of subspace patching (Makelov, Lange, Nanda 2024).

The question: when a 1-d subspace patch (DAS) changes a model's answer, is the subspace where the
model keeps the variable? The paper (arXiv 2311.17030; methods.md section 5) shows it need not
be. On GPT-2 small's IOI task, DAS for the "position of S" variable at layer 8's residual (END)
finds a direction that works for the right reason (IA 0.75, FLDD 141%), while DAS at MLP 8's
hidden activations finds one with an effect (FLDD 47%) although patching the whole MLP does
nothing (-8%). That direction is the sum of a *disconnected* part (in the kernel of W_out: it
separates the classes but cannot reach the output) and a *dormant* part (in W_out's row space:
causal, but the same on every input); patched together, the disconnected part's difference is
carried into the dormant direction. Alone, the nullspace part does nothing.

Steps, on the bundled ioi-4l by default (GPT-2 small given its directory: layer 8 as in the paper):

1. Pairs. IOI prompts (experiments/data/ioi.py) of one token length so END is shared, base order
   ABB (IO first) or BAB, source the same names and words with either order. Label: the base's
   S if the source's order differs (the S-position variable is then flipped), else the base's IO.
   Train on base {ABB, BAB} x source {ABB, BAB} from the first half of the templates and names;
   test on flipped pairs from the other half (the paper's split).
2. DAS, k = 1, at `hook_resid_post` of every layer (one compiled fit, `jinterp.train.das`) and at
   `mlp.hook_post` of layer l* (8 for GPT-2 small, L-2 otherwise), END position, Adam lr 0.01
   decaying to 0.001, batch 20 (the paper's settings), 300 steps (60 in quick mode).
3. At l*: patch, on the test pairs, the whole activation, the DAS directions, the MLP direction's
   row-space and null-space parts (Q = QR(W_out[l*]), v_row = Q Q^T v, v_null = v - v_row), the
   gradient direction (mean over training bases of d LD / d resid at END) and the mean difference
   (ABB minus BAB bases at END). Each as a 1-d subspace patch (`das.patched_logits`).
4. Metrics: interchange accuracy IA = mean [argmax patched logits == label]; FLDD = 100 (1 -
   LD_patched / LD_clean) with LD = logit(base IO) - logit(base S), means over pairs.

Read the claims table first, then `patches.csv` (the paper's table beside ours), `ia_by_layer.png`.
If the model does not carry the S-position variable at END, the full residual patch has IA ~0 at
every layer and the report says so; a direction found there is then an illusion by construction.
The toy 3-d illusion (methods.md section 5) is a unit test: tests/test_das.py::test_toy_illusion.

    jinterp experiment subspace-illusion --out out/si [--model DIR] [--quick]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.data import ioi as data
from jinterp import edits as E
from jinterp.train import das

NAME = "subspace-illusion"
TITLE = "Is This the Subspace You Are Looking For? An Interpretability Illusion for Subspace Activation Patching (Makelov, Lange, Nanda 2024)"
ORGANISM = "ioi-4l"

# the paper's Table 1 (GPT-2 small, IOI, layer 8): patch -> (IA, FLDD %)
PAPER = {
    "full resid": (0.548, 123.6), "DAS resid": (0.748, 140.7), "gradient direction (resid)": (0.431, 109.5),
    "mean difference (resid)": (0.523, 119.3), "full MLP": (0.0, -8.0), "DAS MLP": (0.042, 46.7),
    "DAS MLP rowspace part": (0.002, 13.5), "DAS MLP nullspace part": (0.003, 0.0),
}
PAPER_NORMS = (0.753, 0.657)  # |v_row|, |v_null| of the MLP direction


def _is_gpt2_small(cfg) -> bool:
    return cfg.family == "gpt2" and (cfg.n_layers, cfg.d_model, cfg.d_vocab) == (12, 768, 50257)


def generators(tokenizer):
    """Train and test generators over disjoint halves of the names, and the template ids of the
    most common prompt length, split in half (train, test)."""
    names = [n for n in data.NAMES if len(tokenizer(" " + n, add_special_tokens=False)["input_ids"]) == 1]
    half = len(names) // 2
    g_train = data.IOIGenerator(tokenizer, names=names[:half])
    g_test = data.IOIGenerator(tokenizer, names=names[half:])
    lens = g_train.template_lengths
    tids = np.flatnonzero(lens == np.bincount(lens).argmax())
    if len(tids) < 2:
        raise ValueError("subspace-illusion needs at least two IOI templates of one token length for this tokenizer")
    k = (len(tids) + 1) // 2
    return g_train, g_test, tids[:k], tids[k:]


def pairs(g, tids, combos, n_per: int, seed: int):
    """(base, source, label, IO, S, base is ABB) for n_per pairs of each (base order, source order)."""
    out = []
    for c, (bo, so) in enumerate(combos):
        rng_seed = seed * 1000 + c
        b = g.sample(np.random.default_rng(rng_seed), n_per, templates=tids, order=bo)
        s = g.sample(np.random.default_rng(rng_seed), n_per, templates=tids, order=so)
        assert (b.names == s.names).all() and (b.template == s.template).all()
        io, sub = b.answers[:, 0], b.answers[:, 1]
        out.append((b.tokens, s.tokens, sub if bo != so else io, io, sub, np.full(n_per, bo == "ABBA")))
    return [np.concatenate(x) for x in zip(*out)]


def _ld(logits, io, s):
    return np.take_along_axis(logits, io[:, None], -1)[:, 0] - np.take_along_axis(logits, s[:, None], -1)[:, 0]


def gradient_direction(model, tokens, io, s, layer: int, pos: int) -> np.ndarray:
    """Mean over prompts of d (logit IO - logit S) / d resid_post[layer] at pos."""
    def ld(v):
        logits = model(tokens, edits=[E.steer("hook_resid_post", v, layers=layer, pos=pos)], logits_at=[pos])[:, 0]
        return (jnp.take_along_axis(logits, io[:, None], -1) - jnp.take_along_axis(logits, s[:, None], -1)).mean()

    return np.asarray(jax.grad(ld)(jnp.zeros((model.cfg.d_model,), jnp.float32)))


def run(model, report, *, batch: int | None = None, seed: int = 0, quick: bool = False) -> None:
    cfg = model.cfg
    if model.tokenizer is None:
        raise ValueError("subspace-illusion needs a model with a tokenizer (the prompts are built from words)")
    L = cfg.n_layers
    layer = 8 if _is_gpt2_small(cfg) else max(0, L - 2)
    g_train, g_test, t_train, t_test = generators(model.tokenizer)
    n_train = batch or (32 if quick else 50)
    n_test = 2 * n_train if quick else 250
    steps = 60 if quick else 300
    tr = pairs(g_train, t_train, [("ABBA", "ABBA"), ("ABBA", "BABA"), ("BABA", "ABBA"), ("BABA", "BABA")], n_train, seed)
    te = pairs(g_test, t_test, [("ABBA", "BABA"), ("BABA", "ABBA")], n_test // 2, seed + 1)
    base, src, lab, io, s, _ = te
    P = base.shape[1]
    end = P - 1
    clean = np.asarray(model(base, logits_at=[end]))[:, 0]
    ld_clean = float(_ld(clean, io, s).mean())
    report.number("layer", layer)
    report.number("n_train_pairs", len(tr[0]))
    report.number("n_test_pairs", len(base))
    report.number("clean_logit_diff", ld_clean)
    report.number("clean_accuracy", float((clean.argmax(-1) == io).mean()))
    report.section("Pairs", (
        f"{len(tr[0])} training pairs (templates {list(map(int, t_train))}, first half of the names) and {len(base)} "
        f"flipped test pairs (templates {list(map(int, t_test))}, other names), {P} tokens each; patches at END "
        f"(position {end}). Clean test LD = {ld_clean:.2f}, accuracy {float((clean.argmax(-1) == io).mean()):.1%}."))

    # ---------------------------------------------------------------- DAS
    kw = dict(pos=end, k=1, steps=steps, lr=0.01, batch_size=20, eval_data=(base, src, lab), seed=seed, progress=False)
    f_resid = das.fit(model, tr[0], tr[1], tr[2], site="hook_resid_post", layers=None, **kw)
    f_mlp = das.fit(model, tr[0], tr[1], tr[2], site="mlp.hook_post", layers=layer, **kw)
    report.table("ia_by_layer", f_resid.table(), caption="DAS (k=1) at every layer's residual, END; held-out IA")
    report.figure("ia_by_layer", _ia_plot(f_resid, layer), caption="held-out interchange accuracy by layer")

    # ---------------------------------------------------------------- directions at layer l*
    unit = lambda v: (v / np.linalg.norm(v))[:, None].astype(np.float32)
    v_resid = f_resid.subspace(f_resid.cell(layer))[:, 0]
    v_mlp = f_mlp.subspace(0)[:, 0]
    W_out = np.asarray(model.W_out[layer], np.float64)  # [d_mlp, d]
    Q, _ = np.linalg.qr(W_out)
    v_row = Q @ (Q.T @ v_mlp)
    v_null = v_mlp - v_row
    null_leak = float(np.linalg.norm(v_null @ W_out) / max(np.linalg.norm(v_null), 1e-12))
    tb, ts, tl, tio, tsub, abb = tr
    grad = gradient_direction(model, tb, tio, tsub, layer, end)
    _, cache = model.run_with_cache(tb, names=[f"blocks.{layer}.hook_resid_post"])
    h = np.asarray(cache[f"blocks.{layer}.hook_resid_post"])[:, end]
    mean_diff = h[abb].mean(0) - h[~abb].mean(0)

    resid_dirs = {"DAS resid": unit(v_resid), "gradient direction (resid)": unit(grad), "mean difference (resid)": unit(mean_diff)}
    mlp_dirs = {"DAS MLP": unit(v_mlp), "DAS MLP rowspace part": unit(v_row), "DAS MLP nullspace part": unit(v_null)}
    logits = {}
    for site, dirs, full in (("hook_resid_post", resid_dirs, "full resid"), ("mlp.hook_post", mlp_dirs, "full MLP")):
        got = das.patched_logits(model, base, src, np.stack(list(dirs.values())), site=site, layers=[layer] * len(dirs),
                                 pos=[end] * len(dirs))
        logits.update(zip(dirs, got))
        logits[full] = das.patched_logits(model, base, src, None, site=site, layers=[layer], pos=[end])[0]
    rows, ours = [], {}
    for name in PAPER:
        lg = logits[name]
        ia = float((lg.argmax(-1) == lab).mean())
        fldd = 100 * (1 - float(_ld(lg, io, s).mean()) / ld_clean)
        ours[name] = (ia, fldd)
        rows.append(dict(patch=name, IA=ia, FLDD=fldd, paper_IA=PAPER[name][0], paper_FLDD=PAPER[name][1]))
    report.table("patches", rows, caption=f"layer {layer}, END, held-out flipped pairs: ours beside the paper's Table 1 (GPT-2 small, layer 8)")
    norms = (float(np.linalg.norm(v_row)), float(np.linalg.norm(v_null)))
    report.number("mlp_direction_rowspace_norm", norms[0])
    report.number("mlp_direction_nullspace_norm", norms[1])
    report.number("nullspace_part_through_W_out", null_leak)
    report.number("das_train_acc", {"resid": float(f_resid.train_acc[f_resid.cell(layer)]), "mlp": float(f_mlp.train_acc[0])})

    # ---------------------------------------------------------------- claims
    full_resid_ia = ours["full resid"][0]
    no_variable = f_resid.full_acc.max() < 0.1
    why = (f"; the full residual patch reaches IA {f_resid.full_acc.max():.2f} at best over layers: this model does not carry "
           "the S-position variable at END, so no direction there can be faithful") if no_variable else ""
    report.claim("DAS finds a residual direction carrying the S-position variable", f"IA {PAPER['DAS resid'][0]}, FLDD {PAPER['DAS resid'][1]}%",
                 f"IA {ours['DAS resid'][0]:.3f}, FLDD {ours['DAS resid'][1]:.1f}%", ours["DAS resid"][0] >= 0.5,
                 "holds if held-out IA >= 0.5" + why)
    report.claim("patching the whole MLP does nothing", f"FLDD {PAPER['full MLP'][1]}%, IA {PAPER['full MLP'][0]}",
                 f"FLDD {ours['full MLP'][1]:.1f}%, IA {ours['full MLP'][0]:.3f}", abs(ours["full MLP"][1]) < 15,
                 "holds if |FLDD| < 15%")
    gap = ours["DAS MLP"][1] - ours["full MLP"][1]
    report.claim("the MLP direction has an effect the whole MLP does not (the illusion)",
                 f"{PAPER['DAS MLP'][1] - PAPER['full MLP'][1]:.1f} FLDD points", f"{gap:.1f} FLDD points", gap >= 20,
                 "DAS MLP minus full MLP FLDD; holds at 20 points or more")
    row_f, null_f, v_f = ours["DAS MLP rowspace part"][1], ours["DAS MLP nullspace part"][1], ours["DAS MLP"][1]
    report.claim("the effect needs both parts: the nullspace part alone does nothing, the rowspace part alone less",
                 f"null {PAPER['DAS MLP nullspace part'][1]}%, row {PAPER['DAS MLP rowspace part'][1]}% vs {PAPER['DAS MLP'][1]}%",
                 f"null {null_f:.1f}%, row {row_f:.1f}% vs {v_f:.1f}%", abs(null_f) < 5 and row_f < v_f / 2 and v_f >= 10,
                 f"holds if |null| < 5%, row < half of the whole direction's FLDD, and that is >= 10%; "
                 f"|v_row| = {norms[0]:.3f}, |v_null| = {norms[1]:.3f} (paper {PAPER_NORMS[0]}, {PAPER_NORMS[1]})")
    report.claim("the full residual patch flips the variable", f"IA {PAPER['full resid'][0]}", f"IA {full_resid_ia:.3f}",
                 full_resid_ia >= 0.3, "holds if IA >= 0.3" + why)
    report.figure("fldd", _bars(ours), caption="FLDD and IA of each patch: ours beside the paper's")
    report.arrays("subspace_illusion", v_resid=v_resid, v_mlp=v_mlp, v_row=v_row, v_null=v_null, gradient=grad,
                  mean_difference=mean_diff, resid_ia_by_layer=f_resid.test_acc, resid_full_ia_by_layer=f_resid.full_acc,
                  resid_loss=f_resid.loss, mlp_loss=f_mlp.loss)


def _ia_plot(f, layer):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(f.layers, f.test_acc, "o-", label="DAS k=1")
    ax.plot(f.layers, f.full_acc, "s--", label="full residual patch")
    ax.axvline(layer, color="grey", lw=0.5)
    ax.set_xlabel("layer (hook_resid_post, END)")
    ax.set_ylabel("held-out IA")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    return fig


def _bars(ours):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(PAPER)
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, i, lab in ((axes[0], 1, "FLDD %"), (axes[1], 0, "IA")):
        ax.bar(x - 0.2, [PAPER[n][i] for n in names], 0.4, label="paper (GPT-2 small)")
        ax.bar(x + 0.2, [ours[n][i] for n in names], 0.4, label="ours")
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(lab)
    axes[0].legend(fontsize=7)
    return fig
