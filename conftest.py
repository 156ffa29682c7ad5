"""Repository-wide pytest setup: offline Hugging Face, headless matplotlib.

These are set before any test imports transformers or matplotlib, so no test
can wait on the network or try to open a window.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
