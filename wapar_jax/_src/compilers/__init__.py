"""Compilers' rules as data: `CompilerRules` per compiler, and which compiler runs a profile."""

from __future__ import annotations

from wapar_jax._src.compilers.rules import CompilerRules, Scratch
from wapar_jax._src.compilers.xla_cpu import XLA_CPU
from wapar_jax._src.compilers.xla_gpu import XLA_GPU, XLA_TPU

REGISTRY = {rules.name: rules for rules in (XLA_GPU, XLA_TPU, XLA_CPU)}
# The compiler that runs a step on a profile's kind of device.
BY_PROFILE_KIND = {"gpu": XLA_GPU, "tpu": XLA_TPU, "cpu": XLA_CPU}


def for_profile(kind: str) -> CompilerRules:
  """The rules of the compiler that runs a profile's kind of device ("gpu", "tpu", "cpu")."""
  return BY_PROFILE_KIND[kind]


__all__ = [
  "BY_PROFILE_KIND",
  "REGISTRY",
  "CompilerRules",
  "Scratch",
  "XLA_CPU",
  "XLA_GPU",
  "XLA_TPU",
  "for_profile",
]
