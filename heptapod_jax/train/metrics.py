"""Metric writers, progress with ETA, phase timers and an MFU estimate."""

import contextlib
import time

import jax
import jax.numpy as jnp
from absl import logging
from clu import metric_writers
from clu import periodic_actions

# Dense bf16 peak FLOP/s per device for accelerators we know; others are measured.
_PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12,
}


def device_peak_flops(device=None, matmul_size=1024, repeats=5):
  """(peak FLOP/s of one device, how it was obtained).

  Known accelerators come from a table; otherwise (CPU) a float32 matmul is
  timed once at start-up and its rate is taken as the peak.
  """
  device = device or jax.local_devices()[0]
  for name, peak in _PEAK_FLOPS.items():
    if device.device_kind.startswith(name):
      return peak, f"table ({device.device_kind})"
  x = jax.device_put(jnp.ones((matmul_size, matmul_size), jnp.float32), device)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    matmul(x).block_until_ready()
  seconds = (time.perf_counter() - start) / repeats
  return 2 * matmul_size ** 3 / seconds, f"measured {matmul_size}^3 matmul on {device.device_kind}"


def compiled_flops(compiled):
  """FLOPs of one call of a compiled (per-device, partitioned) program, or None."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


class PhaseTimer:
  """Accumulates wall time per phase (data, step, checkpoint) between reports."""

  def __init__(self):
    self.totals = {}

  @contextlib.contextmanager
  def phase(self, name):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

  def pop(self):
    totals, self.totals = self.totals, {}
    return {f"time/{name}_s": seconds for name, seconds in totals.items()}


class TrainReporter:
  """Writes scalars to TensorBoard (clu) and logs progress with an ETA."""

  def __init__(self, workdir, *, total_steps, log_every, examples_per_step,
               tokens_per_step, flops_per_step, peak_flops):
    is_chief = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(
        workdir, just_logging=not is_chief)
    self.progress = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=self.writer, every_steps=log_every)
    self.total_steps = total_steps
    self.log_every = log_every
    self.examples_per_step = examples_per_step
    self.tokens_per_step = tokens_per_step
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    self._last = None

  def step_done(self, step):
    self.progress(step, time.time())

  def report(self, step, metrics, phase_times):
    """metrics: host scalars averaged since the last report."""
    now = time.perf_counter()
    scalars = dict(metrics)
    if self._last is not None:
      last_step, last_time = self._last
      steps_per_second = (step - last_step) / max(now - last_time, 1e-9)
      scalars["perf/steps_per_second"] = steps_per_second
      scalars["perf/examples_per_second"] = steps_per_second * self.examples_per_step
      scalars["perf/tokens_per_second"] = steps_per_second * self.tokens_per_step
      if self.flops_per_step and self.peak_flops:
        scalars["perf/mfu"] = steps_per_second * self.flops_per_step / self.peak_flops
    self._last = (step, now)
    scalars.update(phase_times)
    self.writer.write_scalars(step, scalars)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items()))
    eta = ""
    if "perf/steps_per_second" in scalars:
      seconds = (self.total_steps - step) / max(scalars["perf/steps_per_second"], 1e-9)
      eta = f" ETA {int(seconds // 60)}m{int(seconds % 60):02d}s,"
    logging.info("[train] step %d/%d (%.0f%%),%s %s", step, self.total_steps,
                 100.0 * step / self.total_steps, eta, shown)
    return scalars

  def close(self):
    self.writer.flush()
    self.writer.close()
