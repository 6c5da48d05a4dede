"""The README's first command runs: `syncbit demo` end to end (small shards to keep it quick)."""

import os
import subprocess
import sys


def test_demo_runs_end_to_end_and_cleans_up():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCBIT_")}
    r = subprocess.run([sys.executable, "-m", "syncbit", "demo", "--shard-mib", "4"], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "identical to the origin's: True" in out
    assert "node-a: " in out and "node-b: " in out and out.count("identical: True") == 2
    assert "demo finished" in out
    import re

    copies = float(re.search(r"\(([0-9.]+) copies of the dataset\)", out).group(1))
    assert copies < 1.6, f"the two peers took {copies} copies from the origin"
    with open("/proc/self/mountinfo") as f:
        mounts = f.read()
    assert "syncbit-demo-" not in mounts, "the demo left a mount behind"
