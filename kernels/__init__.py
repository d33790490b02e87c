"""Attention kernels for APB's ``[passing | anchor | local]`` mask, and their plain torch reference."""

from apb.kernels.reference import apb_attention_ref, apb_mask

__all__ = ["apb_attention_ref", "apb_mask"]
