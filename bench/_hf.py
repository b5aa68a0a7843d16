"""The Hugging Face baseline the benchmarks set alignd's policy engine against: `model.generate` sampling as the
policy role samples (the whole distribution at temperature 1, a fixed number of new tokens).

Imported by the bench scripts (`from _hf import ...`: bench/ is on sys.path when a script runs).
"""

from __future__ import annotations


def hf_sampling(new_tokens: int, pad_token_id: int) -> dict:
    """`model.generate` keywords: sampling at temperature 1 with no top-k or top-p cut, exactly `new_tokens` new
    tokens (no early end), with the KV cache."""
    return dict(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        use_cache=True,
        pad_token_id=pad_token_id,
    )
