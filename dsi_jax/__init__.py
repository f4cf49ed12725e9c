"""dsi_jax: generative retrieval in JAX.

A query goes into a seq2seq transformer which decodes the id of the relevant item
token by token, constrained by a prefix trie of the valid ids held on device.
"""

__version__ = "0.1.0"
