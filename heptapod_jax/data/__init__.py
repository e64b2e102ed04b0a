"""Input pipelines (Grain): Fashion-MNIST IDX, image folders, TFDS ImageNet, cached tokens.

Entry points: `default_data_config()` (the `config.data` section) and
`make_dataset(...)` (this process's deterministic, checkpointable batches).
"""

from heptapod_jax.data.cached_tokens import CachedTokenSource
from heptapod_jax.data.cached_tokens import TokenShardWriter
from heptapod_jax.data.cached_tokens import token_shard_path
from heptapod_jax.data.corrupt_images import CorruptImageError
from heptapod_jax.data.corrupt_images import skipped_image_count
from heptapod_jax.data.corrupt_images import skipped_images
from heptapod_jax.data.fashion_mnist import FashionMnistSource
from heptapod_jax.data.image_folder import ImageFolderSource
from heptapod_jax.data.imagenet import ImageNetSource
from heptapod_jax.data.imagenet import prepare_imagenet
from heptapod_jax.data.pipeline import DATASETS
from heptapod_jax.data.pipeline import default_data_config
from heptapod_jax.data.pipeline import eval_split
from heptapod_jax.data.pipeline import make_dataset
from heptapod_jax.data.pipeline import make_source
from heptapod_jax.data.pipeline import num_batches
from heptapod_jax.data.pipeline import validate_data_config
from heptapod_jax.data.preprocess import center_crop_arr
