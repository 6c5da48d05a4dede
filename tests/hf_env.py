"""huggingface_hub reads its settings once, at import; set them before it is imported.

No telemetry, and no User-Agent lookup (``/api/agent-harnesses``) sent to
huggingface.co from the test process: tests never reach the internet. Tests
that use the Hub look-alike also pass its URL explicitly.
"""

import os

os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9 (discard)
