"""The command line: every mode parses; summary works; errors are one clear line."""

import json
import os
import subprocess
import sys

import pytest
from absl import flags
from absl.testing import flagsaver

from heptapod_jax import config_lib
from heptapod_jax import main as main_lib


def _run_main(argv):
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    return main_lib.main([argv[0]])


# What each mode says about a fresh workdir with an ImageNet micro config
# (raw images, no tokenizer, no checkpoint).
_EXPECTED_ERRORS = {
    "train": "data.dataset: the generator trains on token shards",
    "extract": "tokenizer.init_from: --mode=extract needs a tokenizer directory",
    "sample": "no checkpoint in",
    "eval": "no samples at",
}


@pytest.mark.parametrize("mode", config_lib.MODES)
def test_every_mode_parses(mode, tmp_path, repo_root, capsys):
  config = f"{repo_root}/configs/b256.py:variant=micro,runlocal"
  argv = ["main", f"--config={config}", f"--workdir={tmp_path}", f"--mode={mode}"]
  if mode == "summary":
    _run_main(argv)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["params"]["total"] == sum(
        summary["params"][k] for k in ("backbone", "head", "output"))
    assert "backbone.blocks" in capsys.readouterr().out
  else:
    with pytest.raises(SystemExit) as exit_info:
      _run_main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    expected = _EXPECTED_ERRORS.get(mode, f"--mode={mode} is not available yet")
    assert expected in error, error
    assert len(error.strip().splitlines()) == 1
  assert flags.FLAGS["mode"].parser.enum_values == list(config_lib.MODES)


def test_unknown_mode_is_rejected(repo_root):
  with flagsaver.flagsaver(), pytest.raises(flags.IllegalFlagValueError):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["main", f"--config={repo_root}/configs/b256.py", "--mode=bogus"])


def _cli(repo_root, *args):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "heptapod_jax.main", *args],
                        cwd=repo_root, env=env, capture_output=True, text=True,
                        timeout=300)


def test_bad_head_kind_is_one_line_naming_field_and_values(repo_root, tmp_path):
  result = _cli(repo_root, "--config=configs/b256.py", f"--workdir={tmp_path}",
                "--mode=summary", "--config.model.head.kind=bogus")
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [
      "heptapod_jax: error: invalid config: model.head.kind: invalid value "
      "'bogus'; allowed: global, local, ntp"]
  assert not (tmp_path / "summary.json").exists()


def test_summary_from_the_command_line(repo_root, tmp_path):
  result = _cli(repo_root, "--config=configs/b256.py:variant=L,tokenizer=vq16",
                f"--workdir={tmp_path}", "--mode=summary",
                "--config.model.head.kind=local")
  assert result.returncode == 0, result.stderr
  assert "Heptapod-L  tokenizer=vq16 (discrete)  grid=16x16  head=local" in result.stdout
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["head_kind"] == "local" and summary["variant"] == "L"
  assert 400e6 < summary["params"]["total"] < 600e6
