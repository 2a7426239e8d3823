"""Plain-PyTorch implementations of every kernel: the CPU path and the test oracle.

Each function here has the same name and contract as the Triton launcher it mirrors; the kernels must
match it exactly where they only move values, and within a per-dtype tolerance where they compute.
"""
from __future__ import annotations

import torch
