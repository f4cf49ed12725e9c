"""Experiments: one module per family, each a frozen config dataclass and a run function.

- `fashion_mnist`: ViT-DSI (clustered / random ids, zero-shot / fine-tuned) against BoVW and
  pixel kNN on a Fashion-MNIST corpus: `dsi-jax demo` and the gin experiments.
- `flickr`: CLIP-DSI against the dual encoder and caption prototypes on Flickr8k / 30k.
- `squad`: text DSI on SQuAD v1.1 against BM25 and the MiniLM dual encoder.

Each trains through `dsi_jax.train`, measures every method with `dsi_jax.evaluation` and writes
`results.json` with `dsi_jax.results.write_report`. gin binds these functions only in
`dsi_jax.cli`.
"""
