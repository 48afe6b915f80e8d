"""Work accounting (jinterp/engine/flops.py) against XLA's own FLOP count of the compiled programs."""

import jax
import numpy as np
import pytest

import jinterp
from jinterp import arch, metrics, patching
from jinterp.engine import flops, stairs
from tests import hf_zoo


def xla_flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_counts_agree_with_xla(tmp_path):
    m = jinterp.load(hf_zoo.save(hf_zoo.build("gpt2"), tmp_path / "m"))
    cfg = m.cfg
    toks = np.random.RandomState(0).randint(0, hf_zoo.V, (3, 8))
    # one forward: XLA counts a scanned layer once, so compare one layer's worth
    full = xla_flops(lambda p, t: arch.forward(p, t, None, cfg=cfg)[0], m.params, toks)
    expect = flops.forward_flops(cfg.replace(n_layers=1), 3, 8)
    assert expect <= full <= 1.25 * expect  # XLA also counts norms, softmax and other elementwise work

    # a staircase sweep: its programs have no loops, so XLA's count covers every block it runs
    corr = np.random.RandomState(1).randint(0, hf_zoo.V, (3, 8))
    _, cache = m.run_with_cache(toks)
    metric = metrics.logit_diff(np.random.RandomState(2).randint(0, hf_zoo.V, (3, 2)))
    for fn in (patching.resid_pre, patching.attn_head_out_by_pos):
        st = {}
        packed = fn(m, corr, cache, metric, progress=False, stairs=True, stats=st).values
        performed = flops.performed_flops(cfg, st) - flops.forward_flops(cfg, 3, 8)  # less the base run
        assert performed <= sum(st["xla_flops"]) <= 1.25 * performed
        # at 8 positions the default bucket cost merges all positions into one bucket; packed, each cell's
        # projections and MLP still run only from its own first position: the slack is attention
        assert 1.0 <= flops.performed_flops(cfg, st) / flops.minimum_for(cfg, st) <= 1.15
        st = {}
        unpacked = fn(m, corr, cache, metric, progress=False, stairs=True, stats=st, pack=False).values  # every row from s0
        np.testing.assert_allclose(packed, unpacked, atol=2e-5)
        performed = flops.performed_flops(cfg, st) - flops.forward_flops(cfg, 3, 8)
        assert performed <= sum(st["xla_flops"]) <= 1.25 * performed
        assert flops.performed_flops(cfg, st) / flops.minimum_for(cfg, st) > 1.2
        # one program call per first layer (scanned blocks: XLA counts a loop body once, so no cross-check):
        # at least the minimum, at most every cell re-running every layer at every position
        st = {}
        np.testing.assert_allclose(fn(m, corr, cache, metric, progress=False, stairs=False, stats=st).values, packed,
                                   atol=2e-5)
        n_cells = sum(n for ch in st["chunks"] for _, n in ch["starts"])
        assert 1 <= flops.performed_flops(cfg, st) / flops.minimum_for(cfg, st)
        assert flops.performed_flops(cfg, st) <= (n_cells + 1) * flops.forward_flops(cfg, 3, 8)


@pytest.mark.slow  # eight programs, one per bucket
def test_bucket_per_position_is_exact_in_layers_and_positions(tmp_path, monkeypatch):
    """A bucket per first position: the slack is attention over all keys instead of causal ones, and
    the last block's unread rows."""
    m = jinterp.load(hf_zoo.save(hf_zoo.build("gpt2"), tmp_path / "m"))
    cfg = m.cfg
    toks, corr = (np.random.RandomState(s).randint(0, hf_zoo.V, (3, 8)) for s in (0, 1))
    _, cache = m.run_with_cache(toks)
    metric = metrics.logit_diff(np.random.RandomState(2).randint(0, hf_zoo.V, (3, 2)))
    monkeypatch.setattr(stairs, "BUCKET_ROWS", 0)
    st = {}
    patching.resid_pre(m, corr, cache, metric, progress=False, stairs=True, stats=st)
    assert len({ch["s0"] for ch in st["chunks"]}) == 8
    assert 1.0 <= flops.performed_flops(cfg, st) / flops.minimum_for(cfg, st) <= 1.15


def test_minimum_by_hand():
    """One cell at the last layer and last position, metric reading that position and 2 token ids:
    its minimum is one row through one block plus 2 logits, on top of the base forward."""
    cfg = jinterp.Config(family="gpt2", n_layers=2, d_model=8, n_heads=2, n_kv_heads=2, d_head=4, d_mlp=32,
                         d_vocab=11, n_ctx=16, norm="layernorm", positional="learned", act="gelu_new")
    P = 5
    base = flops.forward_flops(cfg, 1, P)
    # by hand: Q, O 2*8*8 each; K, V 2*8*8 each; MLP 2*2*8*32; scores+mix over 5 keys 2*2*2*4*5; logits 2*8*2
    by_hand = 2 * 8 * 8 * 2 + 2 * 8 * 8 * 2 + 2 * 2 * 8 * 32 + 2 * 2 * 2 * 4 * 5 + 2 * 8 * 2
    got = flops.minimum_flops(cfg, 1, P, [1], [4], positions=(4,), n_vocab=2)
    assert got - base == by_hand
