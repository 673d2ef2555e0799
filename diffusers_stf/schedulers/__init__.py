"""diffusers-native schedulers, one per file."""

from .scheduling_edm_heun import EDMHeunScheduler, EDMSchedulerOutput
from .scheduling_edm_stochastic import EDMStochasticScheduler

# Score-based foundations (NCSN, score SDEs)
from .scheduling_annealed_langevin import AnnealedLangevinScheduler, AnnealedLangevinSchedulerOutput
from .scheduling_predictor_corrector import PredictorCorrectorScheduler, PredictorCorrectorSchedulerOutput
