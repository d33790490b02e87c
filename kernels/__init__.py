"""Attention kernels for APB's ``[passing | anchor | local]`` mask, and their plain torch reference."""

from apb.kernels.dispatch import apb_attention
from apb.kernels.reference import apb_attention_ref, apb_mask
from apb.kernels.triton_apb import HAS_TRITON, apb_attention_triton

__all__ = ["HAS_TRITON", "apb_attention", "apb_attention_ref", "apb_attention_triton", "apb_mask"]
