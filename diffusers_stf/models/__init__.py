"""The package's networks: EDM's DDPM++/NCSN++ (:class:`SongUNet`) and ADM (:class:`DhariwalUNet`), diffusers'
``UNet2DModel`` with EDM's augmentation conditioning (:class:`AugmentConditionedUNet2DModel`), and the guidance models:
the Discriminator Guidance discriminator and the noise-conditional classifier, both on one noise-conditional encoder,
and DG's published discriminator (:class:`DGDiscriminator`) on guided-diffusion's ADM classifier
(:class:`EncoderUNetModel`)."""

from .adm_encoder import EncoderUNetModel
from .classifier import NoiseConditionalClassifier, NoiseConditionalClassifierOutput
from .dg_discriminator import DGDiscriminator
from .dhariwal_unet import DhariwalUNet
from .edm2_unet import EDM2UNet
from .discriminator import LOG_RATIO_CLIP, Discriminator, DiscriminatorOutput
from .noise_conditional_encoder import NoiseConditionalEncoder, TransformersFeatures, UNetEncoderFeatures
from .song_unet import SongUNet
from .unet_2d_augmented import AugmentConditionedUNet2DModel
