"""Offline evaluation: Fréchet distance, KID, improved precision/recall and class statistics over pluggable feature
extractors (the shipped digits classifier, FID's Inception-v3 from a local file, any transformers backbone); reference
statistics in NVlabs' / pytorch-fid's .npz format; seeded, resumable sampling of saved pipelines and streaming,
resumable evaluation of a pipeline without writing images."""

from .classification import class_statistics
from .estimation_gap import EstimationGapOutput, estimation_gap, plot_estimation_gaps
from .evaluator import (
    compute_features,
    default_cache_dir,
    evaluate_images,
    fd_undefined_reason,
    reference_images,
    reference_statistics,
    score_features,
)
from .feature_extractors import (
    DIGITS_CLASSIFIER_PATH,
    DigitsClassifier,
    DigitsFeatureExtractor,
    FeatureExtractor,
    InceptionFeatureExtractor,
    TransformersFeatureExtractor,
    download_inception_weights,
    load_feature_extractor,
)
from .frechet import feature_statistics, frechet_distance, frechet_distance_from_features
from .images import (
    image_grid,
    load_images,
    match_channels,
    quantize,
    save_image_grid,
    save_png,
    save_side_by_side,
    to_uint8,
)
from .inception import INCEPTION_FID_WEIGHTS_URL, FIDInceptionV3
from .kid import kernel_inception_distance, kid_subsets, kid_summary, polynomial_kernel, unbiased_mmd2
from .precision_recall import knn_radii, manifold_membership, precision_recall
from .reference_stats import load_reference_stats, read_reference_stats, save_reference_stats
from .sampling import (
    class_labels_for_seeds,
    count_calls,
    generate_batch,
    generate_images,
    load_guide_unet,
    load_pipeline,
    make_scheduler,
    network_parametrisation,
    pipeline_num_classes,
    pipeline_with_guide,
    pipeline_with_scheduler,
)
from .streaming import FeatureAccumulator, evaluate_pipeline, stream_features
