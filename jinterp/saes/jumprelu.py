"""JumpReLU with straight-through gradients for its threshold (Rajamanoharan et al. 2024): the
activation `jump` and the step `heaviside` (for the L0 penalty), each with a rectangle-kernel
pseudo-derivative of bandwidth eps with respect to the threshold."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jump(pre, theta, eps):
    """JumpReLU pre * H(pre - theta); gradient to pre through the identity where it fires, to theta
    by the straight-through estimate -(theta/eps) rect((pre - theta)/eps)."""
    return pre * (pre > theta)


def _jump_fwd(pre, theta, eps):
    return jump(pre, theta, eps), (pre, theta)


def _jump_bwd(eps, res, g):
    pre, theta = res
    rect = (jnp.abs((pre - theta) / eps) < 0.5).astype(pre.dtype)
    return g * (pre > theta), g * (-(theta / eps) * rect)


jump.defvjp(_jump_fwd, _jump_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside(pre, theta, eps):
    """Heaviside H(pre - theta); no gradient to pre, -(1/eps) rect((pre - theta)/eps) to theta."""
    return (pre > theta).astype(pre.dtype)


def _step_fwd(pre, theta, eps):
    return heaviside(pre, theta, eps), (pre, theta)


def _step_bwd(eps, res, g):
    pre, theta = res
    rect = (jnp.abs((pre - theta) / eps) < 0.5).astype(pre.dtype)
    return jnp.zeros_like(pre), g * (-(1.0 / eps) * rect)


heaviside.defvjp(_step_fwd, _step_bwd)
