"""What the package's schedulers share: one ``timesteps`` entry per network evaluation, the network read through a
:class:`~diffusers_stf.preconditioning.Preconditioning`, and the diffusers ``set_timesteps``/``step`` calls."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .input_checks import check_float_tensor, check_sigmas, check_step_count
from .step_index import StepIndexMixin


class PreconditionedScheduler(StepIndexMixin, SchedulerMixin, ConfigMixin):
    """Base of the package's schedulers. A subclass sets ``self.preconditioning`` and ``output_class`` and implements

    * ``_step(index, x, model_output, generator)``: the update of entry ``index`` of ``timesteps`` in float64,
      returned as a dict of the fields of ``output_class``, in order;
    * for the default ``set_timesteps``: ``_sigma_schedule(n)``, the noise levels of ``n`` sampler steps (float64,
      decreasing), and ``_set_schedule(levels, device)``, which builds ``timesteps`` and what ``_step`` reads.

    ``step`` does the bookkeeping every scheduler shares: where the loop is (:class:`StepIndexMixin`), the input
    checks, the float64 state, and the output in the dtype of ``sample``.
    """

    order = 1
    output_class: type = BaseOutput
    default_num_inference_steps: Optional[int] = None  # None: set_timesteps needs num_inference_steps or sigmas

    def __len__(self):
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The identity: the network receives the state unscaled."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        sigmas: Optional[Union[Sequence[float], torch.Tensor]] = None,
    ):
        """Build the noise levels and one timestep per network evaluation.

        Args:
            num_inference_steps: the number of sampler steps (noise levels); a python, numpy or 0-d torch integer.
            device: where ``timesteps`` live (``sigmas`` stay on the CPU).
            sigmas: explicit, strictly decreasing, positive, finite noise levels instead.
        """
        if sigmas is not None:
            levels = check_sigmas(sigmas)
        else:
            if num_inference_steps is None:
                num_inference_steps = self.default_num_inference_steps
            levels = self._sigma_schedule(check_step_count("num_inference_steps", num_inference_steps))
        self._set_schedule(levels, device)
        self._reset_step_index()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ) -> Union[BaseOutput, Tuple]:
        """The update of one entry of ``timesteps``: one network evaluation's worth of the sampler.

        Nothing here waits for the device: NaN in the result is for the caller to check once, after sampling.

        Args:
            model_output: the raw network output at ``scale_model_input(sample, timestep)`` and ``timestep``.
            timestep: the current entry of ``timesteps``; the first call finds its position there.
            sample: the current state (what the previous ``step`` returned, or the initial latents).
            generator: random generator for the sampler's noise.
            return_dict: return an ``output_class`` instance rather than a tuple.
        """
        index = self._entry_for_step(timestep, sample)
        check_float_tensor("model_output", model_output)
        if isinstance(generator, list) and len(generator) != sample.shape[0]:
            raise ValueError(f"generator is a list of {len(generator)} generators but sample has {sample.shape[0]} "
                             "images; pass one generator per image, or a single generator")
        fields = self._step(index, sample.to(torch.float64), model_output.to(torch.float64), generator)
        self._step_index += 1
        fields = {name: value.to(sample.dtype) for name, value in fields.items()}
        if not return_dict:
            return tuple(fields.values())
        return self.output_class(**fields)
