"""Setup for the training tests: the repo root on sys.path (``import training``), and Hugging Face caches
in a temporary directory with the hub switched off, so tests neither touch ~/.cache nor the network."""

import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Before `datasets` is first imported: it reads these once.
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="mppo-test-hf-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
