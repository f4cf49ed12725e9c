import os

# Tests run on the CPU with small models; keep XLA from grabbing every thread twice over.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
