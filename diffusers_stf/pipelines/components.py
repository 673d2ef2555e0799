"""The package's classes that a saved pipeline's components may be: a model or scheduler class added to the package
is one import line here.

``RemoteCodeMixin.from_pretrained`` loads a folder through this module (the pipelines' ``component_library``): it
names the module as the components' library, and diffusers takes ``getattr(module, Class)`` and chooses the load
method by the diffusers base classes it finds on the same module, hence ``ModelMixin`` and ``SchedulerMixin`` here.
"""

from diffusers import ModelMixin, SchedulerMixin  # noqa: F401  (looked up here by diffusers: see the docstring)

from ..models import (  # noqa: F401
    AugmentConditionedUNet2DModel,
    DGDiscriminator,
    DhariwalUNet,
    Discriminator,
    EDM2UNet,
    EncoderUNetModel,
    NoiseConditionalClassifier,
    SongUNet,
)
from ..schedulers import (  # noqa: F401
    AnnealedLangevinScheduler,
    EDMHeunScheduler,
    EDMStochasticScheduler,
    PredictorCorrectorScheduler,
)
