"""One process of a multi-process run, started by test_train_multiprocess.py the way a user starts
`xlsr-jax train` on each host of a cluster JAX cannot detect (`--set mesh.coordinator_address=...`).

Two fake CPU devices per process. With $XLSR_TEST_RECORD set, it also appends the example indices of every
training batch this process loads (one JSON list per batch, in loading order) to that file: observation
only, the run is the CLI's.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 " + os.environ["XLSR_JAX_TEST_XLA_FLAGS"]


def _record_loaded_rows(path: str) -> None:
    from xlsr_jax.data.loader import BatchLoader

    load_batch = BatchLoader.load_batch

    def recording(self, bucket, indices, step=None):
        batch = load_batch(self, bucket, indices, step)
        if self.shuffle:  # a training loader (evaluation batches are not shuffled)
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(batch["index"].tolist()) + "\n")
        return batch

    BatchLoader.load_batch = recording


if __name__ == "__main__":
    if os.environ.get("XLSR_TEST_RECORD"):
        _record_loaded_rows(os.environ["XLSR_TEST_RECORD"])
    from xlsr_jax.cli import main

    sys.exit(main(sys.argv[1:]))
