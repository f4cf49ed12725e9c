import atexit
import os
import shutil
import tempfile

# Tests run on the CPU with small models; keep XLA from grabbing every thread twice over.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Prepared tfds datasets and saved corpora go to one scratch folder per test session, never to
# the user's data dir; each dataset is prepared at most once per session.
if "DSI_JAX_DATA_DIR" not in os.environ:
  _data_dir = tempfile.mkdtemp(prefix="dsi_jax_test_data_")
  os.environ["DSI_JAX_DATA_DIR"] = _data_dir
  atexit.register(shutil.rmtree, _data_dir, ignore_errors=True)

# The project's real data beside the repository (Flickr8k-1k, SQuAD dev), when present.
SHARED_DATA = os.environ.get("DSI_JAX_SHARED_DATA") or os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"
)
if os.path.isdir(os.path.join(SHARED_DATA, "flickr8k_1k")):
  os.environ.setdefault("DSI_JAX_FLICKR8K_DIR", os.path.join(SHARED_DATA, "flickr8k_1k"))
if os.path.isfile(os.path.join(SHARED_DATA, "squad_v1.1_dev.json")):
  os.environ.setdefault("DSI_JAX_SQUAD_FILE", os.path.join(SHARED_DATA, "squad_v1.1_dev.json"))
