"""A reusable test mixin for the diffusers scheduler contract (what diffusers' own ``SchedulerCommonTest`` checks).

Subclass it with ``scheduler_class`` and ``get_scheduler_config()``; optionally ``num_inference_steps``,
``sample_shape`` and ``compatible_classes``. The model stand-in is ``dummy_model(sample, t) = sample·t/(t+1)``,
as in diffusers' tests.
"""

from __future__ import annotations

import tempfile

import torch


class SchedulerContractTests:
    scheduler_class = None
    num_inference_steps = 10
    sample_shape = (4, 3, 8, 8)
    compatible_classes = ()

    def get_scheduler_config(self, **overrides) -> dict:
        """The scheduler's config dict (subclasses define it)."""
        return dict(overrides)

    # fixtures ---------------------------------------------------------------------------------------------------
    def make(self, **overrides):
        return self.scheduler_class(**self.get_scheduler_config(**overrides))

    @staticmethod
    def dummy_model(sample, t):
        return sample * t / (t + 1)

    def dummy_sample(self, scheduler):
        g = torch.Generator().manual_seed(0)
        return torch.randn(self.sample_shape, generator=g) * scheduler.init_noise_sigma

    def run_loop(self, scheduler, seed=0, return_dict=True):
        scheduler.set_timesteps(self.num_inference_steps)
        sample = self.dummy_sample(scheduler)
        g = torch.Generator().manual_seed(seed)
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(sample, t)
            out = self.dummy_model(x_in, t)
            res = scheduler.step(out, t, sample, generator=g, return_dict=return_dict)
            sample = res.prev_sample if return_dict else res[0]
        return sample

    # the contract -----------------------------------------------------------------------------------------------
    def test_public_api(self):
        s = self.make()
        for name in ("init_noise_sigma", "scale_model_input", "step", "set_timesteps", "add_noise", "order", "timesteps"):
            assert hasattr(s, name), name
        s.set_timesteps(self.num_inference_steps)
        assert isinstance(s.init_noise_sigma, float) and s.init_noise_sigma > 0
        assert s.timesteps.ndim == 1 and len(s.timesteps) >= self.num_inference_steps

    def test_config_save_load_round_trip(self):
        s = self.make()
        with tempfile.TemporaryDirectory() as tmp:
            s.save_config(tmp)
            loaded = self.scheduler_class.from_pretrained(tmp)
        strip = lambda c: {k: v for k, v in c.items() if k != "_use_default_values"}  # noqa: E731
        assert strip(loaded.config) == strip(s.config)
        assert torch.equal(self.run_loop(s), self.run_loop(loaded))

    def test_from_config_round_trip(self):
        s = self.make()
        again = self.scheduler_class.from_config(s.config)
        assert torch.equal(self.run_loop(s), self.run_loop(again))

    def test_step_shape_and_dtype(self):
        s = self.make()
        s.set_timesteps(self.num_inference_steps)
        sample = self.dummy_sample(s)
        t = s.timesteps[0]
        out = s.step(self.dummy_model(s.scale_model_input(sample, t), t), t, sample).prev_sample
        assert out.shape == sample.shape and out.dtype == sample.dtype

    def test_outputs_equivalence_dict_tuple(self):
        a = self.run_loop(self.make(), return_dict=True)
        b = self.run_loop(self.make(), return_dict=False)
        assert torch.equal(a, b)

    def test_timesteps_on_device_sigmas_on_cpu(self):
        s = self.make()
        s.set_timesteps(self.num_inference_steps, device="cpu")
        assert s.timesteps.device.type == "cpu"
        if hasattr(s, "sigmas"):
            assert s.sigmas.device.type == "cpu"

    def test_set_timesteps_resets_state(self):
        s = self.make()
        first = self.run_loop(s)
        assert torch.equal(first, self.run_loop(s))  # run_loop calls set_timesteps again

    def test_add_noise_shapes(self):
        s = self.make()
        s.set_timesteps(self.num_inference_steps)
        x = torch.zeros(self.sample_shape)
        noise = torch.ones(self.sample_shape)
        noisy = s.add_noise(x, noise, s.timesteps[: self.sample_shape[0]])
        assert noisy.shape == x.shape and torch.isfinite(noisy).all()

    def test_begin_index(self):
        s = self.make()
        s.set_timesteps(self.num_inference_steps)
        s.set_begin_index(0)
        assert s.begin_index == 0
        sample = self.dummy_sample(s)
        t = s.timesteps[0]
        s.step(self.dummy_model(s.scale_model_input(sample, t), t), t, sample)
        assert s.step_index == 1

    def step_boundaries(self, scheduler) -> list:
        """Entries of ``timesteps`` where a sampler step starts (img2img starts at one): every ``order``-th entry
        after the first, thinned to the first, middle and last. Override when a step has another number of entries."""
        ks = list(range(scheduler.order, len(scheduler.timesteps), scheduler.order))
        return sorted({ks[0], ks[len(ks) // 2], ks[-1]}) if ks else []

    def run_loop_from(self, scheduler, k, set_begin_index, seed=0):
        """The diffusers loop over ``timesteps[k:]`` (as img2img pipelines run it), optionally after
        ``set_begin_index(k)``."""
        scheduler.set_timesteps(self.num_inference_steps)
        sample = self.dummy_sample(scheduler)
        if set_begin_index:
            scheduler.set_begin_index(k)
        g = torch.Generator().manual_seed(seed)
        for t in scheduler.timesteps[k:]:
            out = self.dummy_model(scheduler.scale_model_input(sample, t), t)
            sample = scheduler.step(out, t, sample, generator=g).prev_sample
        return sample

    def test_loop_from_step_boundary_equals_begin_index(self):
        """diffusers' img2img convention: a loop over ``timesteps[k:]`` from a step boundary k
        resolves its first timestep to entry k, so it equals the same loop after ``set_begin_index(k)``."""
        probe = self.make()
        probe.set_timesteps(self.num_inference_steps)
        boundaries = self.step_boundaries(probe)
        assert boundaries, "the schedule has no step boundary after the first entry"
        for k in boundaries:
            implicit, explicit = self.make(), self.make()
            a = self.run_loop_from(implicit, k, set_begin_index=False)
            b = self.run_loop_from(explicit, k, set_begin_index=True)
            n = len(explicit.timesteps)
            assert explicit.step_index == n and implicit.step_index == n, (k, implicit.step_index, n)
            assert torch.equal(a, b), k

    def test_compatibles(self):
        import diffusers

        s = self.make()
        for name in self.compatible_classes:
            other_cls = getattr(diffusers, name)
            assert name in [c.__name__ for c in s.compatibles]
            other = other_cls.from_config(s.config)
            back = self.scheduler_class.from_config(other.config)
            # the keys both classes share carry the same meaning, so they survive the round trip unchanged
            shared = set(other.config) & set(s.config) - {"_use_default_values", "_class_name", "_diffusers_version"}
            assert shared, "no shared config keys"
            for key in shared:
                assert back.config[key] == s.config[key], key
