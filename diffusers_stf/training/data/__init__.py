"""Training data, one module per job: where the images come from (:mod:`.config`, :mod:`.load`), how files become
stored pixels (:mod:`.decode`, and :mod:`.arrow` for sets larger than the memory), how the stored pixels are served
(:mod:`.images`), and which images and random streams each step uses (:mod:`.schedule`). The embedded digits live
below every layer, in :mod:`diffusers_stf.digits`, because evaluation reads them too.

Everything downstream sees images as float tensors in [−1, 1], shape (C, H, W).
"""

from .arrow import ArrowImages, arrow_cache_path, decoded_bytes_estimate, prepare_arrow_images, survey_images
from .config import DataConfig
from .fingerprint import DATASET_FINGERPRINTS, folder_fingerprint
from .decode import GREY_MODES, HIGH_BIT_MODES, MAX_IN_MEMORY_BYTES, decode_images
from .images import FULL_SCALE, ImageData
from .labels import num_classes, read_labels, require_labels
from .load import image_column, load_image_dataset, load_training_images
from .schedule import BatchSchedule, derived_seed
