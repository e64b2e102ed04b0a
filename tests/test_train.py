"""Training: exact resume, mesh equivalence, resharding restore, checkpoint fallback."""

import os
import signal

import grain
import jax
import numpy as np
import pytest

from conftest import micro_config
from heptapod_jax.parallel import sharding
from heptapod_jax.train import checkpoint as checkpoint_lib
from heptapod_jax.train import generator
from heptapod_jax.train import optim
from heptapod_jax.train import step as step_lib
from heptapod_jax.train import trainer

NUM_EXAMPLES = 64


def _config(**mesh):
  config = micro_config()
  config.data.batch_size = 8
  config.train.num_steps = 6
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  config.train.keep_checkpoints = 5
  config.optim.warmup_steps = 2
  config.optim.learning_rate = 1e-2
  config.optim.ema_decay = 0.9
  for name, size in mesh.items():
    config.mesh[name] = size
  return config


class _Recorder(grain.transforms.Map):
  """Records the labels of each batch the trainer draws (to compare order)."""

  def __init__(self, log):
    self.log = log

  def map(self, batch):
    self.log.append(batch["label"].tolist())
    return batch


def _token_dataset(config, seed=0, log=None, sigterm_at=None):
  rng = np.random.default_rng(123)
  examples = [{"tokens": rng.integers(0, config.tokenizer.codebook_size, (4, 4)).astype(np.int32),
               "label": np.int32(i % 10)} for i in range(NUM_EXAMPLES)]
  ds = (grain.MapDataset.source(examples).shuffle(seed=seed).repeat(None)
        .batch(config.data.batch_size, drop_remainder=True))
  if log is not None:
    ds = ds.map(_Recorder(log))
  if sigterm_at is not None:
    ds = ds.map(_SigtermAt(sigterm_at, log))
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


class _SigtermAt(grain.transforms.Map):
  """Sends SIGTERM to this process while batch number `count` is drawn."""

  def __init__(self, count, log):
    self.count, self.log = count, log

  def map(self, batch):
    if len(self.log) == self.count:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, _host(a), _host(b))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  config = _config()
  log = []
  result = trainer.train(generator.GeneratorTask(config), config,
                         str(tmp_path_factory.mktemp("full")), _token_dataset(config, log=log))
  return result, log


def test_resume_after_sigterm_is_bitwise_exact(uninterrupted, tmp_path):
  full, full_log = uninterrupted
  assert full["reason"] == "finished" and full["step"] == 6
  config = _config()
  log = []
  first = trainer.train(generator.GeneratorTask(config), config, str(tmp_path),
                        _token_dataset(config, log=log, sigterm_at=3))
  assert first["reason"] == "preempted" and first["step"] == 3
  assert sorted(os.listdir(tmp_path / "checkpoints"))[-1] == "3"
  second = trainer.train(generator.GeneratorTask(config), config, str(tmp_path),
                         _token_dataset(config, log=log))
  assert second["reason"] == "finished" and second["step"] == 6
  assert log == full_log  # same batches in the same order
  for key in ("params", "ema", "opt_state", "step"):
    _assert_trees_equal(second["state"][key], full["state"][key])
  # The EMA lags the parameters; training moved them.
  params, ema = _host(full["state"]["params"]), _host(full["state"]["ema"])
  assert any(np.abs(p - e).max() > 0 for p, e in zip(jax.tree.leaves(params), jax.tree.leaves(ema)))


def _losses(config, devices, steps=3):
  config.train.num_steps = steps
  mesh = sharding.make_mesh(config, devices=devices)
  functions = step_lib.build(generator.GeneratorTask(config), config, mesh, steps)
  iterator = _token_dataset(config)
  losses = []
  with jax.set_mesh(mesh):
    state = functions.init()
    for _ in range(steps):
      state, metrics = functions.step(state, sharding.put_local_batch(next(iterator), mesh))
      losses.append(float(metrics["loss"]))
  return losses, state, functions


def test_loss_on_2x2x2_mesh_matches_one_device():
  one, _, _ = _losses(_config(data=1), jax.devices()[:1])
  eight, state, functions = _losses(_config(data=2, fsdp=2, tensor=2), jax.devices())
  np.testing.assert_allclose(eight, one, atol=1e-5, rtol=0)
  assert one[-1] < one[0]
  # Parameters are really sharded over fsdp and tensor.
  specs = {leaf.sharding.spec for leaf in jax.tree.leaves(state["params"])}
  assert any("fsdp" in spec for spec in specs) and any("tensor" in spec for spec in specs)


def test_gradient_accumulation_matches_one_big_batch():
  config = _config(data=2, fsdp=1, tensor=1)
  config.model.head.density = None  # deterministic target sets per timestep
  config.model.head.timesteps_per_image = None
  devices = jax.devices()[:2]
  single, _, _ = _losses(config, devices, steps=2)
  config.train.grad_accum_steps = 2
  accumulated, _, _ = _losses(config, devices, steps=2)
  # Per-micro-batch means average to the full-batch mean when every example
  # contributes the same number of targets (all timesteps, all positions).
  np.testing.assert_allclose(accumulated, single, rtol=2e-5)


def test_checkpoint_restores_on_another_mesh(uninterrupted, tmp_path):
  config = _config(data=8)
  mesh = sharding.make_mesh(config)
  functions = step_lib.build(generator.GeneratorTask(config), config, mesh, 6)
  with jax.set_mesh(mesh):
    state = functions.init()
  saver = checkpoint_lib.Checkpointer(tmp_path, save_every=1, keep=2, async_save=False)
  saver.save(1, state)
  saver.close()
  other = _config(data=2, fsdp=4)
  other_mesh = sharding.make_mesh(other)
  other_functions = step_lib.build(generator.GeneratorTask(other), other, other_mesh, 6)
  restored, step = checkpoint_lib.Checkpointer(tmp_path, save_every=1, keep=2).restore(
      other_functions.abstract_state)
  assert step == 1
  _assert_trees_equal(restored, state)
  kernel = restored["params"]["backbone"]["blocks"][0]["mlp"]["up"]["kernel"]
  assert kernel.sharding.mesh.shape == {"data": 2, "fsdp": 4, "tensor": 1}
  assert kernel.sharding.spec[0] == "fsdp"


def test_truncated_latest_checkpoint_falls_back(tmp_path, caplog):
  config = _config(data=8)
  mesh = sharding.make_mesh(config)
  functions = step_lib.build(generator.GeneratorTask(config), config, mesh, 6)
  with jax.set_mesh(mesh):
    state = functions.init()
  saver = checkpoint_lib.Checkpointer(tmp_path, save_every=1, keep=3, async_save=False)
  saver.save(1, state)
  saver.save(2, jax.tree.map(lambda x: x + 1, state))
  saver.close()
  # Truncate every data file of the latest step.
  for root, _, files in os.walk(tmp_path / "2"):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 0:
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
  restored, step = checkpoint_lib.Checkpointer(tmp_path, save_every=1, keep=3).restore(
      functions.abstract_state)
  assert step == 1
  _assert_trees_equal(restored, state)
  assert "falling back" in caplog.text


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
  config = _config()
  config.optim.learning_rate = 1e30  # explodes after the first update
  config.optim.warmup_steps = 0
  config.optim.grad_clip_norm = 0.0
  with pytest.raises(trainer.NonFiniteError, match=r"at step \d"):
    trainer.train(generator.GeneratorTask(config), config, str(tmp_path),
                  _token_dataset(config))
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert all(s < 6 for s in steps)


def test_weight_decay_mask_and_schedule():
  params = {"block": {"kernel": np.ones((2, 2)), "bias": np.ones(2)},
            "norm": {"scale": np.ones(2)}, "embed": {"embedding": np.ones((3, 2))}}
  mask = optim.decay_mask(params)
  assert mask == {"block": {"kernel": True, "bias": False}, "norm": {"scale": False},
                  "embed": {"embedding": False}}
  config = optim.default_optim_config()
  config.warmup_steps, config.learning_rate = 10, 1.0
  schedule = optim.learning_rate_schedule(config, 110)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(60), schedule(110)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  config.schedule = "constant"
  assert float(optim.learning_rate_schedule(config, 110)(100)) == 1.0


def test_two_processes_match_one_process(tmp_path, repo_root):
  import json
  import subprocess
  import sys

  import portpicker
  import train_setup

  train_setup.write_token_shards(tmp_path / "tokens")
  single = train_setup.losses_from_pipeline(tmp_path / "tokens", steps=3)
  port = portpicker.pick_unused_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             HEPTAPOD_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
             HEPTAPOD_NUM_PROCESSES="2",
             PYTHONPATH=f"{repo_root}/tests:{repo_root}")
  output = tmp_path / "losses.json"
  workers = [subprocess.Popen(
      [sys.executable, str(repo_root / "tests" / "multiprocess_worker.py"),
       str(tmp_path / "tokens"), str(output)],
      env=dict(env, HEPTAPOD_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  for worker in workers:
    out, _ = worker.communicate(timeout=600)
    assert worker.returncode == 0, out[-3000:]
  result = json.loads(output.read_text())
  assert result["process_count"] == 2 and result["device_count"] == 8
  np.testing.assert_allclose(result["losses"], single, atol=1e-5, rtol=0)


def test_ema_decay_warms_up():
  decays = [float(optim.ema_decay_at(0.999, step)) for step in (0, 10, 990, 10**6)]
  np.testing.assert_allclose(decays[:3], [0.1, 0.55, 0.991], rtol=1e-6)
  assert decays[3] == pytest.approx(0.999)


def test_sample_grid_and_nll_reach_tensorboard(tmp_path):
  import glob

  import tensorflow as tf
  import train_setup
  from flax import nnx
  from heptapod_jax import data as data_lib
  from heptapod_jax.models import tokenizers
  from heptapod_jax.tools import convert_tokenizer

  train_setup.write_token_shards(tmp_path / "tokens")
  tokenizer = tokenizers.build_tokenizer("vq_small", rngs=nnx.Rngs(0))
  convert_tokenizer.write_tokenizer_dir(
      tmp_path / "tokenizer", "vq_small", nnx.to_pure_dict(nnx.state(tokenizer, nnx.Param)))
  config = train_setup.pipeline_config(tmp_path / "tokens")
  config.data.eval_split = "train"
  config.tokenizer.init_from = str(tmp_path / "tokenizer")
  config.train.num_steps = 2
  config.train.sample_every = 2
  config.train.sample_grid_per_class = 2
  config.train.eval_every = 2
  config.eval.nll_max_batches = 1
  iterator = iter(data_lib.make_dataset(config.data, split="train", seed=0,
                                        process_index=0, process_count=1))
  trainer.train(generator.GeneratorTask(config), config, str(tmp_path / "run"), iterator)
  tags = {}
  for path in glob.glob(str(tmp_path / "run" / "events.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        tags[value.tag] = value
  assert "eval/bits_per_token" in tags
  assert "samples" in tags
  image = tf.io.decode_image(tags["samples"].tensor.string_val[2]).numpy()
  # 10 classes x 2 samples of 16x16 images with 2-pixel padding.
  assert image.shape == (10 * 18 + 2, 2 * 18 + 2, 3)
