"""launch/ablate.py: run configs, equal-compute step counts and the results table."""

import importlib.util

import pytest


@pytest.fixture(scope="module")
def ablate(repo_root):
  spec = importlib.util.spec_from_file_location("ablate", repo_root / "launch" / "ablate.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_run_configs_apply_overrides_seed_and_scale(ablate):
  config = ablate.run_config("ntp", 2, num_steps=77, tokenizer_steps=300)
  assert config.model.head.kind == "ntp"
  assert config.seed == 2 and config.sample.seed == 2
  assert config.train.num_steps == 77 and config.train.checkpoint_every == 77
  assert config.pipeline.tokenizer.train.num_steps == 300
  for dotted, value in ablate.SCALE.items():
    section, field = dotted.split(".")
    assert config[section][field] == value
  kl = ablate.run_config("global_kl", 0)
  assert kl.tokenizer.name == "kl_small" and kl.tokenizer.kind == "continuous"
  assert ablate.run_config("global_density1", 0).model.head.density == 1
  # The reference run is the embedded default's generator.
  from configs import fashion_mnist
  default = fashion_mnist.get_config()
  assert ablate.run_config("global", 0).model.to_dict() == default.model.to_dict()


def test_step_flops_orders_the_heads(ablate):
  ntp = ablate.step_flops(ablate.run_config("ntp", 0))
  global_head = ablate.step_flops(ablate.run_config("global", 0))
  denser = ablate.step_flops(ablate.run_config("global_density16", 0))
  assert 0 < ntp < global_head < denser


def test_table_mean_and_std(ablate):
  rows = [{"run": "ntp", "seed": seed, "train_steps": 10, "step_flops": 2e9,
           "frechet_distance": fd, "class_accuracy": 0.5, "nll_bits_per_token": 6.0,
           "nll_kind": "exact cross-entropy", "train_wall_s": 30.0}
          for seed, fd in ((0, 1.0), (1, 2.0), (2, 3.0))]
  table = ablate.table(rows)
  line = next(line for line in table.splitlines() if line.startswith("| ntp"))
  assert "| 0,1,2 | 10 | 2.0 | 2.00 ± 1.00 | 0.500 ± 0.000 | 6.000 ± 0.000 | 30 ± 0 |" in line
