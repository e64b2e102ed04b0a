"""The README's first command, `:quick` variant, end to end in a fresh process.

Runs `python -m heptapod_jax.main --config=configs/fashion_mnist.py:quick` on
one CPU device (as a user would) and checks every artifact the pipeline
promises and every field of metrics.json. A second run of the same command
must resume: every stage finds its output and the generator does not retrain.
"""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

FASHION_FIELDS = {
    "num_samples", "frechet_distance", "precision", "recall", "classifier_score",
    "classifier_score_std", "class_accuracy", "train_vs_test_frechet_distance",
    "real_frechet_distance_at_num_samples", "frechet_distance_ratio",
    "classifier_test_accuracy", "classifier_path", "reconstruction_frechet_distance",
    "reconstruction_class_accuracy",
}
NLL_FIELDS = {"bits_per_token", "nats_per_token", "num_tokens", "split", "kind",
              "checkpoint_step"}


def _png_size(path):
  with open(path, "rb") as f:
    header = f.read(24)
  assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
  return struct.unpack(">II", header[16:24])  # width, height


def _run_quick(repo_root, workdir):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the real command sees this machine's one CPU device
  return subprocess.run(
      [sys.executable, "-m", "heptapod_jax.main",
       f"--config={repo_root}/configs/fashion_mnist.py:quick", f"--workdir={workdir}"],
      cwd=repo_root, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def quick_run(repo_root, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("quick")
  first = _run_quick(repo_root, workdir)
  assert first.returncode == 0, first.stderr[-4000:]
  return workdir, first


def test_every_artifact_exists(quick_run):
  workdir, _ = quick_run
  for relative in ("samples.png", "metrics.json", "summary.txt",
                   "samples/samples.npz", "samples/samples.json", "samples/grid.png",
                   "tokenizer_run/tokenizer/tokenizer.json",
                   "tokenizer_run/tokenizer_metrics.json",
                   "tokenizer_run/reconstructions.png",
                   "tokens/tokens.json", "classifier.npz"):
    assert (workdir / relative).is_file(), relative
  assert list((workdir / "tokens").glob("train-*")), "no train token shards"
  assert list((workdir / "tokens").glob("test-*")), "no test token shards"
  assert [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  events = list(workdir.rglob("events.out.tfevents.*"))
  assert any(p.parent == workdir for p in events), "no generator TensorBoard log"
  assert any(p.parent.name == "eval" for p in events), "no eval TensorBoard log"
  assert any("tokenizer_run" in str(p) for p in events), "no tokenizer TensorBoard log"


def test_samples_png_is_a_labelled_10x10_grid(quick_run):
  workdir, _ = quick_run
  width, height = _png_size(workdir / "samples.png")
  # 10 rows and 10 columns of 32-pixel samples (plus padding) and a label column.
  assert 10 * 32 < height < 10 * 40, (width, height)
  assert 10 * 32 + 40 < width < 10 * 40 + 120, (width, height)
  with np.load(workdir / "samples" / "samples.npz") as samples:
    images, labels = samples["arr_0"], samples["arr_1"]
  assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
  assert np.bincount(labels, minlength=10).min() >= 10  # 10 per class for the grid


def test_metrics_json_has_every_field(quick_run):
  workdir, _ = quick_run
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert FASHION_FIELDS <= set(metrics["fashion_mnist"]), (
      FASHION_FIELDS - set(metrics["fashion_mnist"]))
  assert NLL_FIELDS <= set(metrics["nll"]), NLL_FIELDS - set(metrics["nll"])
  assert "skipped" in metrics["inception"]  # no Inception weights on this machine
  fashion = metrics["fashion_mnist"]
  assert 0.0 <= fashion["class_accuracy"] <= 1.0
  assert 0.0 <= fashion["precision"] <= 1.0 and 0.0 <= fashion["recall"] <= 1.0
  assert fashion["frechet_distance"] > 0.0
  assert fashion["train_vs_test_frechet_distance"] > 0.0
  assert fashion["frechet_distance_ratio"] == pytest.approx(
      fashion["frechet_distance"] / fashion["train_vs_test_frechet_distance"])
  assert fashion["classifier_test_accuracy"] > 0.5
  # Trained, if briefly: below the 9 bits/token of a uniform guess over 512 codes.
  assert 0.0 < metrics["nll"]["bits_per_token"] < 9.0
  assert metrics["num_samples"] == fashion["num_samples"]


def test_summary_and_progress(quick_run):
  workdir, first = quick_run
  summary = (workdir / "summary.txt").read_text()
  for expected in ("class accuracy", "Fréchet distance", "test NLL", "wall time"):
    assert expected in summary
  assert "ETA" in first.stderr  # progress lines of the long stages


def test_second_run_resumes(quick_run, repo_root):
  workdir, _ = quick_run
  step_dirs = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  second = _run_quick(repo_root, workdir)
  assert second.returncode == 0, second.stderr[-4000:]
  assert "tokenizer: using" in second.stderr
  assert "Initialised a new train state" not in second.stderr
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == step_dirs
