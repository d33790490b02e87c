"""Attention kernels for APB's ``[passing | anchor | local]`` mask, and their plain torch reference."""

if __name__ == "apb.kernels":
    from apb.kernels.dispatch import apb_attention, decode_attention
    from apb.kernels.merge import merge_partials, merge_partials_ref
    from apb.kernels.reference import apb_attention_ref, apb_mask, decode_attention_ref
    from apb.kernels.triton_apb import HAS_TRITON, apb_attention_triton
    from apb.kernels.triton_decode import decode_attention_split

    __all__ = [
        "HAS_TRITON",
        "apb_attention",
        "apb_attention_ref",
        "apb_attention_triton",
        "apb_mask",
        "decode_attention",
        "decode_attention_split",
        "decode_attention_ref",
        "merge_partials",
        "merge_partials_ref",
    ]
else:
    # Imported as a top-level `kernels`: the checkout's root is on sys.path (`python -m pytest`, `python -c`
    # run from the repo) and transformers probes for Hugging Face's kernel-hub package by that name, importing
    # it when it finds no installed version. Importing apb from here, half-way through transformers' own
    # import, would be circular; defining nothing makes the probe see an unversioned package and move on.
    __all__ = []
