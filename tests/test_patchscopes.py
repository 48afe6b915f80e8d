"""Patchscopes (jinterp.patchscopes) on the kg-6l organism: the one-sweep grid against a loop of
model.generate with one patch edit per (source layer, target layer) pair, the identity check
(a target patched with its own state generates what it generates unpatched), the identity prompt,
the result's helpers and the errors at the boundary."""

import numpy as np
import pytest

import jinterp
from jinterp import edits as E
from jinterp import patchscopes as PS
from jinterp.model import InputError, Model

LAYERS = [0, 2, 5]  # one (source, target) layer list for both sweeps: one compiled sweep program
N_NEW = 3


@pytest.fixture(scope="module")
def model():
    return jinterp.load("kg-6l")


@pytest.fixture(scope="module")
def target(model):
    return PS.identity_prompt(model, ["kema", "nudi"], "figa", arrow="=", sep=" ,")


@pytest.fixture(scope="module")
def source(model):
    # other identity prompts, of the target's length (one compiled cache run serves every test)
    return model.to_tokens(["soni = soni , gule = gule , pudu =", "bafo = bafo , zaki = zaki , nosu ="])


@pytest.fixture(scope="module")
def grid(model, source, target):
    tokens, _ = target
    # the last source position into the target's last position (its next-token row): many pairs
    # change the generation there, so the comparison below is not against the unpatched output only
    return PS.patchscope(model, source, tokens, source_pos=-1, target_pos=-1, source_layers=LAYERS,
                         target_layers=LAYERS, max_new_tokens=N_NEW)


def test_identity_prompt(model, target):
    tokens, p = target
    words = ["kema", "=", "kema", ",", "nudi", "=", "nudi", ",", "figa", "="]
    assert model.to_str_tokens(tokens[0]) == ["<|endoftext|>"] + words  # the organism's own identity lines
    assert tokens.shape == (1, 11) and p == 9 and model.to_str_tokens(tokens[0])[p] == "figa"
    with pytest.raises(InputError, match=r"not in this model's vocabulary"):
        PS.identity_prompt(model)  # "cat", "1135", "hello", "?", "->", ";" are not organism words
    with pytest.raises(InputError, match="tokenizer"):
        PS.identity_prompt(Model(model.config, model.params, None))


def test_grid_matches_one_patch_at_a_time(model, source, target, grid):
    tokens, _ = target
    B = source.shape[0]
    assert grid.tokens.shape == (len(LAYERS), len(LAYERS), B, N_NEW)
    assert grid.source_labels == tuple(map(str, LAYERS)) and grid.target_layers == tuple(LAYERS)
    _, cache = model.run_with_cache(source, names=[f"blocks.{l}.hook_resid_post" for l in LAYERS])
    rows = np.repeat(tokens, B, 0)
    P = rows.shape[1]
    changed = 0
    for a, b in [(0, 0), (1, 0), (2, 1), (0, 2), (2, 2)]:
        i, j = LAYERS[a], LAYERS[b]
        value = np.zeros((B, P, model.cfg.d_model), np.float32)  # a full-sequence value, zero except at the patch
        value[:, P - 1] = np.asarray(cache[f"blocks.{i}.hook_resid_post"])[:, -1]
        want = np.asarray(model.generate(rows, N_NEW, edits=[E.patch("hook_resid_post", value, layers=j, pos=P - 1)]))[:, P:]
        np.testing.assert_array_equal(grid.tokens[a, b], want, err_msg=f"source layer {i}, target layer {j}")
        changed += int((want != grid.baseline).any())
    assert changed >= 2  # the patch took in some of the checked pairs
    # the final layer's state at the last position fixes the next token: the source's own prediction
    np.testing.assert_array_equal(grid.first_token[2, 2], np.asarray(model.generate(source, 1))[:, -1])
    np.testing.assert_array_equal(grid.baseline, np.asarray(model.generate(rows, N_NEW))[:, P:])
    assert grid.texts[0, 0, 0] == model.tokenizer.decode(grid.tokens[0, 0, 0].tolist())


def test_own_state_reproduces_the_target(model, target):
    tokens, p = target
    rows = np.repeat(tokens, 2, 0)  # the same batch and target shapes as `grid`: its compiled sweep serves
    unpatched = np.asarray(model.generate(rows, N_NEW))[:, rows.shape[1]:]
    for pos in (p, -1):
        ps = PS.patchscope(model, rows, tokens, source_pos=pos, target_pos=pos, source_layers=LAYERS,
                           target_layers=LAYERS, max_new_tokens=N_NEW)
        for k in range(len(LAYERS)):
            np.testing.assert_array_equal(ps.tokens[k, k], unpatched, err_msg=f"layer {LAYERS[k]}, position {pos}")
    assert ps.changed.any()  # off the diagonal, other layers' states do change the last position's output


def test_helpers(model, grid, tmp_path):
    first = grid.first_token
    assert first.shape == (len(LAYERS), len(LAYERS), 2)
    np.testing.assert_array_equal(first, grid.tokens[..., 0])
    t = int(first[1, 0, 0])
    hit = grid.hit(t, k=1)
    assert hit.axes == ("source_layer", "target_layer")
    np.testing.assert_allclose(hit.values, (first == t).mean(-1))
    per_example = grid.hits([[t], [t, int(first[1, 0, 1])]], k=1)
    assert per_example[1, 0].all()
    word = model.tokenizer.decode([t])
    np.testing.assert_array_equal(grid.hits(word), (grid.tokens == t).any(-1))
    df = grid.to_frame()
    assert len(df) == grid.tokens[..., 0].size
    assert list(df.loc[0, "tokens"]) == grid.tokens[0, 0, 0].tolist() and df.loc[0, "text"] == grid.texts[0, 0, 0]
    assert grid.plot(tmp_path / "hit.png", targets=t).stat().st_size > 0
    with pytest.raises(InputError, match="one per example"):
        grid.hits([t, t, t])
    with pytest.raises(InputError, match="k must be"):
        grid.hits(t, k=N_NEW + 1)


def test_errors(model, source, target):
    tokens, p = target
    call = lambda **kw: PS.patchscope(model, **{"source_tokens": source, "target_tokens": tokens, "target_pos": p, **kw})
    with pytest.raises(InputError, match="source_pos 11 .* out of range"):
        call(source_pos=11)
    with pytest.raises(InputError, match="target_pos -12 .* out of range"):
        call(target_pos=-12)
    with pytest.raises(InputError, match="target_pos: one position for all or one per example"):
        call(target_pos=[1, 2, 3])
    with pytest.raises(InputError, match=r"source_layers \[6\] out of range"):
        call(source_layers=[0, 6])
    with pytest.raises(InputError, match=r"target_layers \[-7\] out of range"):
        call(target_layers=-7)
    with pytest.raises(InputError, match="batch 3"):
        call(target_tokens=np.repeat(tokens, 3, 0))
    with pytest.raises(InputError, match="residual-shaped"):
        call(site="attn.hook_z")
    with pytest.raises(InputError, match="padding"):
        call(source_mask=np.array([[1] * 11, [1] * 9 + [0] * 2], bool))
    with pytest.raises(InputError, match="max_new_tokens"):
        call(max_new_tokens=0)
    with pytest.raises(InputError, match="states must be"):
        PS.patchscope_states(model, np.zeros((2, 2, 7), np.float32), tokens, target_pos=p)
