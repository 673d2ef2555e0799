"""Network preconditioning (Karras et al. 2022, EDM eq. 7 and Table 1): the one home of "network output ↔ D(x; σ)".

* :mod:`.base`: :class:`Preconditioning` (c_skip, c_out, c_in, c_noise) and :class:`Denoiser`;
* :mod:`.edm_table`: EDM Table 1 (``edm``, ``vp``, ``ve``, ``iddpm``) and diffusers' DDPM networks of every
  ``prediction_type``;
* :mod:`.score`: NCSN and score-SDE networks (score = (D − x)/σ²);
* :mod:`.factory`: :func:`make_preconditioning`, by name from config entries;
* :mod:`.for_scheduler`: :func:`preconditioning_for` and :class:`EvaluationFrame`, any scheduler's model output and
  state in EDM coordinates.
"""

from .base import Denoiser, Preconditioning, TensorOrFloat, as_sigma, check_choice
from .edm_table import (
    EDM_PREDICTION_TYPES,
    VP_PREDICTION_TYPES,
    DDPMPreconditioning,
    DiscreteTimePreconditioning,
    EDMPreconditioning,
    IDDPMPreconditioning,
    VEPreconditioning,
    VPFormPreconditioning,
    VPPreconditioning,
)
from .factory import PRECONDITIONINGS, SCORE_PRECONDITIONINGS, make_preconditioning
from .for_scheduler import EvaluationFrame, evaluation_point, preconditioning_for
from .score import (
    NCSN_TIMESTEP_TYPES,
    SCORE_PREDICTION_TYPES,
    SCORE_SDE_TIMESTEP_TYPES,
    NCSNPreconditioning,
    ScorePreconditioning,
    ScoreSDEPreconditioning,
)
