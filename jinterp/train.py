"""optax training loops: the bundled models.

`train_induction_model` trains a 2-layer GPT-2-architecture model on sequences of random words
repeated twice ([BOS, w1..wn, w1..wn]); the second half is predictable only by looking back for
the previous occurrence of the current word and copying what followed it, the job induction heads
(a previous-token head in layer 0 feeding, by K-composition, an induction head in layer 1) do.
The result is written in HF format (config.json, model.safetensors, tokenizer.json) so that both
jinterp and HF transformers load it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jinterp.arch import decoder
from jinterp.config import Config

# A small word vocabulary so that tokens read as text.
WORDS = (
    "apple river stone cloud music garden window yellow orange silver paper bottle engine forest mountain "
    "ocean pencil rabbit tiger violin winter summer spring autumn bridge castle dragon eagle feather guitar "
    "hammer island jacket kettle lemon marble needle pepper quartz rocket saddle tunnel umbrella valley wagon "
    "zebra anchor basket candle desert ember falcon glacier harbor iron jungle kernel ladder meadow nickel "
    "oyster parrot quiver raven shadow thunder velvet walnut canyon lantern copper dolphin emerald fossil "
    "granite helmet igloo jasmine koala lizard magnet nectar olive pebble quilt ribbon salmon tomato unicorn "
    "vapor whistle yogurt zephyr acorn blossom cactus daisy echo fable goblet harp ivory jewel kite lotus "
    "mango nutmeg orbit prism quail reef sapphire tulip urchin vortex willow yarn zinc amber"
).split()

BOS = "<|endoftext|>"
UNK = "<unk>"


def induction_config(d_model: int = 64, n_heads: int = 2) -> Config:
    return Config(
        family="gpt2", n_layers=2, d_model=d_model, n_heads=n_heads, n_kv_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=4 * d_model,
        d_vocab=2 + len(WORDS), n_ctx=64, norm="layernorm", norm_eps=1e-5, positional="learned",
        act="gelu_new", tied_embeddings=True,
    )


def induction_batch(
    rng: np.random.Generator, batch: int, seg_len: int, vocab: int, min_len: int | None = None, max_prefix: int = 0,
    n_tokens: int | None = None,
) -> np.ndarray:
    """Repeated random words, [batch, n_tokens] (default 1 + max_prefix + 2 * seg_len).

    Each row: BOS (id 0), r random words, then a segment of s random words (ids >= 2) repeated
    until the row ends. With the defaults (evaluation) r = 0 and s = seg_len, so a row is
    [BOS, w1..wn, w1..wn]. Training draws s in [min_len, seg_len] and r in [0, max_prefix] per
    row, so where the earlier copy sits is not fixed: the model has to find it by content (the
    induction mechanism), not by position.
    """
    n = n_tokens or 1 + max_prefix + 2 * seg_len
    out = rng.integers(2, vocab, size=(batch, n), dtype=np.int32)
    out[:, 0] = 0
    lens = np.full(batch, seg_len) if min_len is None else rng.integers(min_len, seg_len + 1, size=batch)
    starts = 1 + rng.integers(0, max_prefix + 1, size=batch)
    for row, s, a in zip(out, lens, starts):
        row[a + s :] = np.resize(row[a : a + s], n - a - s)
    return out


def init_gpt2(cfg: Config, key) -> dict:
    """GPT-2 initialisation (normal 0.02, LayerNorm 1/0, biases 0); the unembedding is tied to W_E."""
    L, D, H, dh, F, V = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    ks = iter(jax.random.split(key, 8))
    n = lambda *s: 0.02 * jax.random.normal(next(ks), s, jnp.float32)
    z = lambda *s: jnp.zeros(s, jnp.float32)
    ln = lambda: {"w": jnp.ones((L, D)), "b": z(L, D)}
    return {
        "embed": {"W_E": n(V, D)},
        "pos_embed": {"W_pos": n(cfg.n_ctx, D)},
        "blocks": {
            "ln1": ln(),
            "ln2": ln(),
            "attn": {
                "W_Q": n(L, H, D, dh), "W_K": n(L, H, D, dh), "W_V": n(L, H, D, dh), "W_O": n(L, H, dh, D),
                "b_Q": z(L, H, dh), "b_K": z(L, H, dh), "b_V": z(L, H, dh), "b_O": z(L, D),
            },
            "mlp": {"W_in": n(L, D, F), "b_in": z(L, F), "W_out": n(L, F, D), "b_out": z(L, D)},
        },
        "ln_final": {"w": jnp.ones((D,)), "b": z(D)},
    }


def tie(params: dict) -> dict:
    W_E = params["embed"]["W_E"]
    return {**params, "unembed": {"W_U": W_E.T, "b_U": jnp.zeros((W_E.shape[0],), W_E.dtype)}}


def token_losses(params, cfg: Config, tokens):
    """Per-token next-token cross-entropy [batch, pos - 1] and correctness of the argmax."""
    logits, _ = decoder.forward(tie(params), tokens, None, (), cfg=cfg)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    target = tokens[:, 1:]
    nll = -jnp.take_along_axis(logp, target[..., None], -1)[..., 0]
    return nll, logp.argmax(-1) == target


def evaluate_induction(params, cfg: Config, seg_len: int, n: int = 512, seed: int = 1234) -> dict:
    toks = jnp.asarray(induction_batch(np.random.default_rng(seed), n, seg_len, cfg.d_vocab))
    nll, correct = jax.jit(token_losses, static_argnames="cfg")(params, cfg, toks)
    # predictions of token t+1 from position t: the repeated half is targets seg_len+1 .. 2*seg_len
    first, rep = slice(0, seg_len), slice(seg_len + 1, 2 * seg_len)
    return {
        "loss_all": float(nll.mean()),
        "loss_first_half": float(nll[:, first].mean()),
        "loss_repeated_half": float(nll[:, rep].mean()),
        "accuracy_repeated_half": float(correct[:, rep].mean()),
        "uniform_loss": float(np.log(cfg.d_vocab - 2)),
    }


def train_induction_model(
    out_dir, *, seed: int = 0, steps: int = 3000, batch: int = 64, seg_len: int = 20, min_len: int = 4, max_prefix: int = 8,
    lr: float = 1e-3, d_model: int = 64, n_heads: int = 2, log_every: int = 250, progress: bool = True,
) -> dict:
    """Train the bundled induction model and write it to out_dir in HF format. Returns its card metrics."""
    cfg = induction_config(d_model, n_heads)
    params = init_gpt2(cfg, jax.random.PRNGKey(seed))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=steps // 20, decay_steps=steps, end_value=lr / 20)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    state = opt.init(params)

    @jax.jit
    def step(params, state, toks):
        loss, grads = jax.value_and_grad(lambda p: token_losses(p, cfg, toks)[0].mean())(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(seed)
    t0 = time.time()
    history = []
    it = range(steps)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="training induction-2l", unit="step")
    for s in it:
        params, state, loss = step(params, state, jnp.asarray(induction_batch(rng, batch, seg_len, cfg.d_vocab, min_len, max_prefix)))
        if (s + 1) % log_every == 0 or s == 0:
            history.append((s + 1, float(loss)))
            if progress:
                it.set_postfix(loss=f"{float(loss):.3f}")
    seconds = time.time() - t0
    metrics = evaluate_induction(params, cfg, seg_len)
    recipe = dict(seed=seed, steps=steps, batch=batch, seg_len=f"{min_len}..{seg_len}", prefix=f"0..{max_prefix}", lr=lr,
                  d_model=d_model, n_heads=n_heads, optimizer="adamw(wd=0.01), clip 1.0, warmup 5% + cosine to lr/20")
    save_gpt2_hf(tie(params), cfg, out_dir)
    card = {"metrics": metrics, "recipe": recipe, "train_seconds": round(seconds, 1), "loss_history": history}
    (Path(out_dir) / "training.json").write_text(json.dumps(card, indent=1))
    return card


def word_tokenizer():
    """A word-level tokenizer over WORDS (id 0 = BOS/EOS/pad, 1 = unk)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {BOS: 0, UNK: 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=BOS, unk_token=UNK, clean_up_tokenization_spaces=False
    )


def save_gpt2_hf(params: dict, cfg: Config, out_dir) -> None:
    """Write a GPT-2-family model as config.json + model.safetensors + tokenizer files."""
    from safetensors.numpy import save_file
    from transformers import GPT2Config

    from jinterp.arch.families import gpt2

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    GPT2Config(
        vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
        n_inner=cfg.d_mlp, activation_function=cfg.act, layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        tie_word_embeddings=cfg.tied_embeddings, architectures=["GPT2LMHeadModel"],
    ).save_pretrained(str(out))
    tensors = gpt2.to_hf(jax.tree.map(np.asarray, params), cfg)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    word_tokenizer().save_pretrained(str(out))
