"""diffusers-native schedulers, one per file."""

from . import edm_sampling  # the EDM sampler core (Algorithm 2 line by line), shared by the EDM schedulers and DG
from .step_index import StepIndexMixin
from .scheduling_base import PreconditionedScheduler
from .scheduling_edm_heun import EDMHeunScheduler, EDMSchedulerOutput
from .scheduling_edm_stochastic import EDMStochasticScheduler

# Score-based foundations (NCSN, score SDEs)
from .scheduling_annealed_langevin import AnnealedLangevinScheduler, AnnealedLangevinSchedulerOutput
from .scheduling_predictor_corrector import PredictorCorrectorScheduler, PredictorCorrectorSchedulerOutput
