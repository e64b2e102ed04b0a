"""Sample-quality evaluation: metric code and the networks that make features.

- `metrics`: Fréchet distance, Inception Score, precision/recall, streaming
  feature statistics (numpy, float64).
- `inception`: the FID Inception-v3 (pytorch-fid / TF-FID architecture) in NNX,
  its weights, and `inception_metrics` (FID, IS, precision/recall; skipped with a
  message when no weights file is configured).
- `classifier`: the in-project Fashion-MNIST classifier and `fashion_metrics`.
- `reference`: reference statistics, computed from images or read from an ADM
  reference batch .npz.

`default_eval_config()` is the `eval` section these read.
"""

import ml_collections


def default_eval_config():
  """The `eval` config section (ml_collections.ConfigDict)."""
  config = ml_collections.ConfigDict()
  # FID Inception weights: pytorch-fid pt_inception-2015-12-05-6726825d.pth, or
  # an .npz with the same keys (inception.state_dict_to_npz). "" -> the
  # FID/IS/precision/recall metrics are skipped with a message.
  config.inception_weights = ""
  # "tf_graph": TF1 ResizeBilinear (no half-pixel centres) + (x - 128) / 128, as
  # the TF graph in the ADM evaluator; "pytorch_fid": F.interpolate bilinear
  # (align_corners=False) + x / 127.5 - 1.
  config.inception_preprocess = "tf_graph"
  # IS logits with fc.bias (torch-fidelity) or without (ADM evaluator: MatMul only).
  config.inception_logits_bias = False
  config.inception_batch_size = 100
  config.inception_score_splits = 10
  # ADM reference batch .npz (mu, sigma[, arr_0 images for precision/recall]).
  config.reference = ""
  config.precision_recall_neighbourhood = 3
  config.precision_recall_block_size = 10000
  # Fashion-MNIST classifier params (.npz from classifier.save_classifier);
  # made by classifier.train_classifier + save_classifier.
  config.classifier_path = ""
  config.classifier_train_steps = 1000
  config.classifier_seed = 0
  config.classifier_batch_size = 128
  config.classifier_learning_rate = 3e-3
  return config
