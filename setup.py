"""dsi_jax: generative retrieval (Differentiable Search Index) in JAX."""

import setuptools

setuptools.setup(
  name="dsi_jax",
  version="0.1.0",
  description="Generative retrieval in JAX: a transformer that decodes the ids of relevant items.",
  # The SeqIO registrations live in the top-level tasks/ folder and install as dsi_jax.tasks.
  packages=[*setuptools.find_packages(include=["dsi_jax", "dsi_jax.*"]), "dsi_jax.tasks"],
  package_dir={"dsi_jax.tasks": "tasks"},
  package_data={"dsi_jax": ["page.html"]},
  python_requires=">=3.10",
  install_requires=[
    "jax>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "gin-config>=0.5,<0.6",
    "clu>=0.0.12",
    "tensorboard>=2.21,<2.22",
    "tensorflow>=2.21,<2.22",
    "tensorflow-datasets>=4.9.10,<4.10",
    "seqio>=0.0.20",
    "opencv-python-headless>=4.10",
    "scikit-learn>=1.5",
    "bm25s>=0.3.11,<0.4",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "numpy>=1.26",
    # The BERT text tower (dsi_jax.models.text) reads HF tokenizer.json and safetensors weights.
    "tokenizers>=0.21,<0.24",
    "safetensors>=0.4.3,<0.9",
    # The DINOv2 importer reads ONNX exports (initializers and node names only).
    "onnx>=1.17,<1.24",
  ],
  # torch and transformers are the parity reference of the text and DINOv2 towers;
  # onnxruntime that of the ONNX import.
  extras_require={
    "test": [
      "pytest>=8",
      "hypothesis>=6.100",
      "torch==2.13.0",
      "transformers==5.23.0",
      "onnxruntime>=1.20,<1.33",
    ]
  },
  entry_points={"console_scripts": ["dsi-jax=dsi_jax.cli:main"]},
)
