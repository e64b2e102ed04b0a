"""One process of the multi-process training test (run by test_train.py).

  HEPTAPOD_COORDINATOR_ADDRESS=... HEPTAPOD_NUM_PROCESSES=2 HEPTAPOD_PROCESS_ID=i \
    python tests/multiprocess_worker.py SHARD_DIR OUTPUT_JSON
"""

import json
import sys

from heptapod_jax.parallel import distributed

distributed.maybe_initialize()

import jax  # noqa: E402

import train_setup  # noqa: E402


def main(shard_dir, output_path):
  losses = train_setup.losses_from_pipeline(shard_dir, steps=3)
  if jax.process_index() == 0:
    with open(output_path, "w") as f:
      json.dump({"losses": losses, "process_count": jax.process_count(),
                 "device_count": jax.device_count()}, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
