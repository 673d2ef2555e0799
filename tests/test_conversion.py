"""Published checkpoints: NVlabs EDM snapshots read by a restricted unpickler (checked on pickles of the stand-in
writer, tests/nvlabs_standin.py), their preconditioning and default sampling against EDM Table 1 and an independent
transcription of NVlabs' ``edm_sampler``; malicious and foreign pickles refused with nothing executed; DG's
discriminator against a transcription of DG's ``get_log_ratio`` (tests/adm_reference.py); the command line's folders
loaded by plain diffusers."""

import collections
import copy
import io
import math
import os
import pickle
import pickletools

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

import nvlabs_standin as standin
from diffusers_stf.models.dhariwal_unet import DhariwalUNet
from diffusers_stf.models.song_unet import SongUNet
from diffusers_stf.conversion import (
    NETWORK_CONVERTERS,
    NVlabsPickleError,
    load_nvlabs_edm,
    load_weights,
    read_nvlabs_pickle,
    register_network_converter,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------------------------------
# A tiny test network in the snapshot (NVlabs' networks are other helpers' work): a diffusers UNet2DModel, pickled as
# the persistent class "TinyUNet" with NVlabs' interface arguments (img_resolution, in/out_channels, label_dim).

UNET_KWARGS = dict(block_out_channels=[8, 16], layers_per_block=1, down_block_types=["DownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "UpBlock2D"], add_attention=False, norm_num_groups=4)


def tiny_network(seed, size=8, channels=1, out_channels=None, label_dim=0, **overrides):
    torch.manual_seed(seed)
    net = UNet2DModel(sample_size=size, in_channels=channels, out_channels=out_channels or channels,
                      num_class_embeds=label_dim or None, **{**UNET_KWARGS, **overrides})
    for p in net.parameters():  # no zero-initialised layer: every weight shows in the output
        p.data.add_(0.05 * torch.randn_like(p))
    return net


def network_record(net, **claimed):
    c = net.config
    kwargs = dict(img_resolution=c.sample_size, in_channels=c.in_channels, out_channels=c.out_channels,
                  label_dim=c.num_class_embeds or 0, **UNET_KWARGS)
    return standin.persistent_tree(net, "TinyUNet", {**kwargs, **claimed})


def convert_tiny_unet(record, source):
    kwargs = dict(record.init_kwargs)
    net = UNet2DModel(sample_size=kwargs.pop("img_resolution"), num_class_embeds=kwargs.pop("label_dim") or None,
                      **kwargs)
    return load_weights(net, record, source)


@pytest.fixture(scope="module", autouse=True)
def tiny_unet_converter():
    register_network_converter("TinyUNet", convert_tiny_unet)
    yield
    NETWORK_CONVERTERS.pop("TinyUNet")


# NVlabs' EDM networks, small, with the arguments a snapshot records (some left to NVlabs' defaults)
ARCHITECTURES = {
    "ddpmpp": (SongUNet, dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                              dropout=0.13, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                              decoder_type="standard", resample_filter=[1, 1])),
    "ncsnpp": (SongUNet, dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                              embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                              resample_filter=[1, 3, 3, 1])),
    "adm": (DhariwalUNet, dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])),
}
ARCHITECTURE_DEFAULTS = {SongUNet: dict(channel_mult_emb=4, label_dropout=0.0, dropout=0.1),
                         DhariwalUNet: dict(channel_mult_emb=4, label_dropout=0.0, dropout=0.1)}

# name -> (preconditioning class, its non-default constants, network, label_dim, augment_dim)
CASES = {
    "vp": ("VPPrecond", dict(beta_d=18.0, beta_min=0.2, M=500, epsilon_t=1e-3), "ddpmpp", 4, 9),
    "ve": ("VEPrecond", dict(sigma_min=0.05, sigma_max=50.0), "ncsnpp", 0, 0),
    "iddpm": ("iDDPMPrecond", dict(), "adm", 3, 0),
    "edm": ("EDMPrecond", dict(sigma_data=0.6), "adm", 0, 9),
    "edm-tiny": ("EDMPrecond", dict(sigma_data=0.6), "tiny", 3, 0),  # a network registered by the tests
}


def edm_network(arch, seed, size=8, channels=1, out_channels=None, label_dim=0, augment_dim=0):
    """(a random network of ``arch`` with every weight non-zero, the arguments its snapshot records)."""
    torch.manual_seed(seed)
    cls, kwargs = ARCHITECTURES[arch]
    out_channels = out_channels or channels
    net = cls(sample_size=size, in_channels=channels, out_channels=out_channels, num_class_embeds=label_dim or None,
              augment_dim=augment_dim, **{**ARCHITECTURE_DEFAULTS[cls], **kwargs})
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    recorded = dict(img_resolution=size, in_channels=channels, out_channels=out_channels, label_dim=label_dim,
                    augment_dim=augment_dim, **kwargs)
    return net, recorded


def make_case(name, seed=0, size=8, channels=1):
    kind, constants, arch, label_dim, augment_dim = CASES[name]
    out_channels = (2 if kind == "iDDPMPrecond" else 1) * channels
    if arch == "tiny":
        net = tiny_network(seed, size=size, channels=channels, out_channels=out_channels, label_dim=label_dim)
        record = network_record(net)
    else:
        net, kwargs = edm_network(arch, seed, size, channels, out_channels, label_dim, augment_dim)
        record = standin.persistent_tree(net, ARCHITECTURES[arch][0].__name__, kwargs)
    ema = standin.preconditioning(kind, record, size, channels, label_dim=label_dim,
                                  model_type=ARCHITECTURES[arch][0].__name__ if arch != "tiny" else "TinyUNet",
                                  **constants)
    return net, standin.edm_snapshot(ema)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (original network, snapshot path, converted pipeline)."""
    root = tmp_path_factory.mktemp("snapshots")
    out = {}
    for i, name in enumerate(CASES):
        net, snapshot = make_case(name, seed=i)
        path = root / f"{name}.pkl"
        standin.write(path, snapshot)
        out[name] = (net, path, load_nvlabs_edm(path))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The stand-in's bytes


def pickle_globals(data: bytes) -> set:
    """Every ``module.name`` a pickle refers to (GLOBAL, and STACK_GLOBAL with its strings read through the memo)."""
    found, strings, memo, last = set(), [], {}, None
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            last = arg
            strings.append(arg)
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            last = memo.get(arg)
            strings.append(last)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = last
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = last
        elif op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.add(f"{strings[-2]}.{strings[-1]}")
        if op.name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT", "SHORT_BINUNICODE", "BINUNICODE", "UNICODE",
                           "BINUNICODE8", "BINGET", "LONG_BINGET", "GET"):
            last = None
    return found


class NVlabsLikeNet(torch.nn.Module):
    """A module tree with NVlabs' shapes of state: a ModuleDict of blocks, a None parameter, a buffer."""

    def __init__(self):
        super().__init__()
        self.map_noise = torch.nn.Linear(4, 8)
        self.enc = torch.nn.ModuleDict({"8x8_conv": torch.nn.Conv2d(1, 8, 3), "8x8_block0": torch.nn.Conv2d(8, 8, 1)})
        self.enc["8x8_block0"].register_parameter("bias", None)
        self.register_buffer("freqs", torch.randn(4))


def test_standin_writes_the_globals_of_an_edm_snapshot_and_reads_back_exactly(tmp_path):
    net = NVlabsLikeNet()
    tree = standin.persistent_tree(net, "SongUNet", dict(img_resolution=8, dropout=np.float64(0.13)))
    data = standin.write(tmp_path / "s.pkl", standin.edm_snapshot(standin.preconditioning("VPPrecond", tree, 8, 1)))
    numpy_scalar = "numpy._core.multiarray.scalar" if np.__version__ >= "2" else "numpy.core.multiarray.scalar"
    assert pickle_globals(data) == {  # official-checkpoints.md, "Other globals in a snapshot"
        "torch_utils.persistence._reconstruct_persistent_obj", "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_tensor_v2", "torch.storage._load_from_bytes", "collections.OrderedDict",
        "torch.nn.modules.container.ModuleDict", "numpy.dtype", numpy_scalar}
    assert "torch_utils" not in __import__("sys").modules  # the stubs are gone after writing

    data = read_nvlabs_pickle(tmp_path / "s.pkl")
    assert list(data) == ["ema", "loss_fn", "augment_pipe", "dataset_kwargs"]
    ema = data["ema"]
    assert ema.class_name == "VPPrecond" and ema.persistent and ema.version == 6
    assert ema.module_src == standin.STANDIN_SOURCE and ema.attributes["beta_d"] == 19.9
    unet = ema.modules["model"]
    assert unet.class_name == "SongUNet" and unet.init_kwargs["dropout"] == 0.13
    assert type(unet.init_kwargs["dropout"]) is float  # a numpy scalar becomes a python number
    enc = unet.modules["enc"]
    assert enc.class_name == "torch.nn.modules.container.ModuleDict" and not enc.persistent
    assert list(enc.modules) == ["8x8_conv", "8x8_block0"] and enc.modules["8x8_block0"].parameters["bias"] is None
    ours = unet.state_dict()
    assert list(ours) == list(net.state_dict())
    assert all(torch.equal(ours[k], v) and ours[k].dtype == v.dtype for k, v in net.state_dict().items())
    assert data["augment_pipe"].init_kwargs["p"] == pytest.approx(0.12)


# ---------------------------------------------------------------------------------------------------------------------
# EDM: weights, Table 1, default sampling


def test_converted_networks_hold_the_pickled_weights_and_config(converted):
    for name, (net, _, pipe) in converted.items():
        ours = pipe.unet.state_dict()
        assert set(ours) == set(net.state_dict())
        assert all(torch.equal(ours[k], v) for k, v in net.state_dict().items()), name
        public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
        assert type(pipe.unet) is type(net) and public(pipe.unet.config) == public(net.config), name
        assert pipe.scheduler.config.preconditioning == CASES[name][0][:-len("Precond")].lower()


def table1(name, sigma):
    """(c_skip, c_out, c_in, c_noise) of EDM Table 1 with the constants of CASES[name], written out; and round_sigma."""
    kind, constants = CASES[name][:2]
    one = torch.ones_like(sigma)
    if kind == "EDMPrecond":
        sd = constants["sigma_data"]
        return sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt(), 1 / (sigma**2 + sd**2).sqrt(), \
            sigma.log() / 4, sigma
    if kind == "VPPrecond":
        bd, bm, M = constants["beta_d"], constants["beta_min"], constants["M"]
        t = ((bm**2 + 2 * bd * (1 + sigma**2).log()).sqrt() - bm) / bd
        return one, -sigma, 1 / (1 + sigma**2).sqrt(), (M - 1) * t, sigma
    if kind == "VEPrecond":
        return one, sigma, one, (sigma / 2).log(), sigma
    # the network's own levels u_0 > … > u_{M−1}: the pickled buffer (eq. 99 run in float32, as NVlabs stores it)
    M, C1, C2 = constants.get("M", 1000), constants.get("C_1", 0.001), constants.get("C_2", 0.008)
    u = standin.iddpm_levels(M, C1, C2).double()[:-1]
    assert torch.allclose(u, iddpm_u(M, C1, C2)[:-1], rtol=5e-3)
    j = (sigma[:, None] - u[None]).abs().argmin(dim=1)
    return one, -sigma, 1 / (1 + sigma**2).sqrt(), (M - 1 - j).double(), u[j]


def iddpm_u(M, C1, C2):
    """EDM eq. 99 in float64: u_M = 0, u_{j−1} = √((u_j² + 1)/max(ᾱ(j−1)/ᾱ(j), C1) − 1),
    ᾱ(j) = sin²(π/2 · j/(M(C2 + 1)))."""
    alpha_bar = lambda j: math.sin(math.pi / 2 * j / (M * (C2 + 1))) ** 2  # noqa: E731
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), C1) - 1)
    return torch.tensor(u, dtype=torch.float64)


def test_converted_preconditioning_is_edm_table1(converted):
    sigma = torch.tensor([0.003, 0.02, 0.3, 1.0, 4.0, 35.0, 79.0], dtype=torch.float64)
    for name, (_, _, pipe) in converted.items():
        p = pipe.scheduler.preconditioning
        expected = table1(name, sigma)
        rounded = p.round_sigma(sigma)
        assert torch.allclose(rounded, expected[4], rtol=1e-12), name
        got = p.scalings(rounded)
        for k, (a, b) in enumerate(zip(got, table1(name, rounded)[:4])):
            assert torch.allclose(a.double(), b, rtol=1e-9, atol=1e-12), (name, ("c_skip", "c_out", "c_in", "c_noise")[k])


def net_range(name):
    """(σ_min, σ_max) of the pickled network, from the constants of CASES (NVlabs computes VP's in float32)."""
    kind, c = CASES[name][:2]
    if kind == "EDMPrecond":
        return 0.0, math.inf
    if kind == "VPPrecond":
        return standin.vp_sigma(c["beta_d"], c["beta_min"], c["epsilon_t"]), standin.vp_sigma(c["beta_d"], c["beta_min"], 1)
    if kind == "VEPrecond":
        return c["sigma_min"], c["sigma_max"]
    u = iddpm_u(1000, 0.001, 0.008)
    return float(u[999]), float(u[0])


def edm_sampler_reference(name, net, latents, labels=None, num_steps=18):
    """NVlabs generate.py's edm_sampler (S_churn = 0) in float64, around the float64 network with Table 1:
    σ clamped to the network's range, the ρ = 7 schedule, round_sigma, Heun with a final Euler step."""
    net_min, net_max = net_range(name)
    sigma_min, sigma_max, rho = max(0.002, net_min), min(80.0, net_max), 7.0
    round_sigma = lambda s: table1(name, s.reshape(-1))[4].reshape(s.shape)  # noqa: E731
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([round_sigma(t), torch.zeros(1, dtype=torch.float64)])
    f64 = copy.deepcopy(net).double().eval()

    def denoise(x, sigma):
        c_skip, c_out, c_in, c_noise, _ = table1(name, sigma.reshape(1))
        # the network's noise label is float32, in NVlabs (σ is cast to float32) as in a diffusers loop
        noise_label = c_noise.float().expand(x.shape[0])
        with torch.no_grad():
            F = f64(c_in * x, noise_label, class_labels=labels).sample[:, : x.shape[1]]  # NVlabs: one-hot labels
        return c_skip * x + c_out * F

    x = latents.double() * t[0]
    for k in range(num_steps):
        t_cur, t_next = t[k], t[k + 1]
        d = (x - denoise(x, t_cur)) / t_cur
        x_next = x + (t_next - t_cur) * d
        if k < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


def test_default_sampling_is_nvlabs_edm_sampler_with_the_network_sigma_range(converted):
    for name, (net, _, pipe) in converted.items():
        pipe = copy.deepcopy(pipe)
        pipe.unet.double()
        pipe.set_progress_bar_config(disable=True)
        latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
        label_dim = CASES[name][3]
        labels = torch.tensor([0, 2]) if label_dim else None
        ours = pipe(batch_size=2, latents=latents, class_labels=labels, output_type="latent").images
        one_hot = torch.eye(label_dim, dtype=torch.float64)[labels] if label_dim and CASES[name][2] != "tiny" else labels
        reference = edm_sampler_reference(name, net, latents, one_hot)
        assert ours.dtype == torch.float64 and ours.abs().max() > 1  # unclamped
        assert torch.allclose(ours, reference, rtol=1e-9, atol=1e-9), (name, (ours - reference).abs().max())
        sigmas = pipe.scheduler.sigmas
        net_min, net_max = net_range(name)
        assert float(sigmas[0]) == pytest.approx(float(table1(name, torch.tensor([min(80.0, net_max)],
                                                                                  dtype=torch.float64))[4]), rel=1e-9)
        assert float(sigmas[-2]) == pytest.approx(float(table1(name, torch.tensor([max(0.002, net_min)],
                                                                                   dtype=torch.float64))[4]), rel=1e-6)


def test_non_default_constants_carry_over(tmp_path):
    """A VE network's σ range and iDDPM's C_2 reach the scheduler: sampling clamps to [0.01, 50] and snaps σ to the
    levels of EDM eq. 99 with C_2 = 0.01 (the pickled float32 levels), written out here."""
    net = tiny_network(0)
    path = tmp_path / "ve.pkl"
    standin.write(path, standin.edm_snapshot(standin.preconditioning("VEPrecond", network_record(net), 8, 1,
                                                                     sigma_min=0.01, sigma_max=50.0)))
    scheduler = load_nvlabs_edm(path).scheduler
    assert (scheduler.preconditioning.sigma_min, scheduler.preconditioning.sigma_max) == (0.01, 50.0)
    assert scheduler.sigma_range == (0.01, 50.0)
    path = tmp_path / "iddpm.pkl"
    record = network_record(tiny_network(0, out_channels=2))
    standin.write(path, standin.edm_snapshot(standin.preconditioning("iDDPMPrecond", record, 8, 1, C_2=0.01)))
    scheduler = load_nvlabs_edm(path).scheduler
    assert scheduler.config.iddpm_c2 == 0.01
    levels = standin.iddpm_levels(1000, 0.001, 0.01).double()[:-1]
    assert not torch.allclose(levels, standin.iddpm_levels(1000, 0.001, 0.008).double()[:-1], rtol=1e-2)
    sigma = torch.tensor([0.01, 0.5, 7.0], dtype=torch.float64)
    nearest = levels[(sigma[:, None] - levels[None]).abs().argmin(dim=1)]
    assert torch.equal(scheduler.preconditioning.round_sigma(sigma), nearest)


# ---------------------------------------------------------------------------------------------------------------------
# Refusals: malicious pickles execute nothing; foreign, truncated and mismatched files are named


class Reduce:
    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def test_module_src_is_never_executed(tmp_path):
    marker, control = tmp_path / "pwned", tmp_path / "control"
    payload = f"open({str(marker)!r}, 'w').write('pwned')\n"
    net = tiny_network(1)
    tree = standin.persistent_tree(net, "TinyUNet", network_record(net).meta["state"]["_init_kwargs"], module_src=payload)
    ema = standin.preconditioning("EDMPrecond", tree, 8, 1)
    ema.meta["module_src"] = payload
    standin.write(tmp_path / "s.pkl", standin.edm_snapshot(ema))
    exec(payload.replace(str(marker), str(control)), {})  # the payload is live: run, it writes its file
    assert control.exists()
    pipe = load_nvlabs_edm(tmp_path / "s.pkl")  # an otherwise valid snapshot converts ...
    assert not marker.exists()  # ... without running its source
    assert read_nvlabs_pickle(tmp_path / "s.pkl")["ema"].module_src == payload
    assert torch.equal(pipe.unet.conv_in.weight, net.conv_in.weight)


def test_foreign_globals_and_persistent_ids_are_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "pwned"
    net = tiny_network(2)
    good = standin.edm_snapshot(standin.preconditioning("EDMPrecond", network_record(net), 8, 1))
    attacks = {
        "os.system": Reduce(os.system, f"touch {marker}"),
        "builtins.exec": Reduce(exec, f"open({str(marker)!r}, 'w').write('x')"),
        "an unknown global": Reduce(collections.Counter, "abc"),
    }
    for label, attack in attacks.items():
        path = tmp_path / "attack.pkl"
        standin.write(path, {**good, "dataset_kwargs": attack})  # even in an entry the reader ignores
        with pytest.raises(NVlabsPickleError, match="refused. Nothing from the file was imported or executed") as err:
            load_nvlabs_edm(path)
        global_name = {"os.system": os.system.__module__ + ".system", "builtins.exec": "builtins.exec",
                       "an unknown global": "collections.Counter"}[label]
        assert repr(global_name) in str(err.value), label
        assert not marker.exists(), label

    class PersistentIds(pickle.Pickler):
        def persistent_id(self, obj):
            return "storage-0" if isinstance(obj, standin.Persistent) and obj.meta["class_name"] == "EDMLoss" else None

    buffer = io.BytesIO()
    with standin.nvlabs_globals():
        PersistentIds(buffer).dump(good)
    (tmp_path / "pid.pkl").write_bytes(buffer.getvalue())
    with pytest.raises(NVlabsPickleError, match="persistent id"):
        load_nvlabs_edm(tmp_path / "pid.pkl")


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_the_stand_ins_cannot_be_rebuilt_or_read_out_of_bounds(tmp_path):
    builds = {  # BUILD on an allowed callable, and on a stand-in class (which must stay unchanged)
        "callable": b"\x80\x04ctorch.storage\n_load_from_bytes\n}b.",
        "class": b"\x80\x04cnumpy\ndtype\nN}X\x05\x00\x00\x00numpyNs\x86b.",
    }
    for label, data in builds.items():
        (tmp_path / "b.pkl").write_bytes(data)
        with pytest.raises(NVlabsPickleError):
            read_nvlabs_pickle(tmp_path / "b.pkl")
    from diffusers_stf.conversion.unpickler import _NumpyDType

    assert callable(_NumpyDType.__dict__["numpy"])  # the class was not changed
    beyond = Reduce(torch._utils._rebuild_tensor_v2, torch.zeros(2).storage(), 0, (1000,), (1,), False,
                    collections.OrderedDict())
    (tmp_path / "t.pkl").write_bytes(pickle.dumps(beyond))
    with pytest.raises(NVlabsPickleError, match="beyond its storage"):
        read_nvlabs_pickle(tmp_path / "t.pkl")


def test_truncated_and_foreign_snapshots_are_named(tmp_path):
    net = tiny_network(3)
    snapshot = standin.edm_snapshot(standin.preconditioning("EDMPrecond", network_record(net), 8, 1))
    data = standin.write(tmp_path / "s.pkl", snapshot)
    for cut in (0, 100, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.pkl").write_bytes(data[:cut])
        with pytest.raises(NVlabsPickleError, match="truncated or not a pickle"):
            load_nvlabs_edm(tmp_path / "cut.pkl")
    standin.write(tmp_path / "stylegan.pkl", standin.stylegan_snapshot(tiny_network(4)))
    with pytest.raises(NVlabsPickleError, match=r"StyleGAN-family snapshot \(top-level keys \['G', 'D', 'G_ema'"):
        load_nvlabs_edm(tmp_path / "stylegan.pkl")
    edm2_net = tiny_network(5)  # an EDM2-layout snapshot of a network no converter knows
    standin.write(tmp_path / "edm2.pkl", standin.edm2_snapshot(copy.deepcopy(edm2_net), dict(
        img_resolution=8, img_channels=1, label_dim=0), network_class="OtherUNet"))
    with pytest.raises(NVlabsPickleError, match=r"edm2.pkl: no converter for the network 'OtherUNet'"):
        load_nvlabs_edm(tmp_path / "edm2.pkl")
    edm2 = read_nvlabs_pickle(tmp_path / "edm2.pkl")  # the reader itself reads EDM2's float16 weights
    weights = edm2["ema"].modules["unet"].state_dict()
    assert all(weights[k].dtype == torch.float16 and torch.equal(weights[k], v.half())
               for k, v in edm2_net.state_dict().items())


def test_weights_that_do_not_match_the_architecture_name_the_first_keys(tmp_path):
    net = tiny_network(6)
    tree = network_record(net)
    state = tree.meta["state"]
    conv_in = state["_modules"]["conv_in"].meta["state"]["_parameters"]
    del conv_in["weight"]
    state["_parameters"]["extra_scale"] = torch.nn.Parameter(torch.ones(3))
    standin.write(tmp_path / "keys.pkl", standin.edm_snapshot(standin.preconditioning("EDMPrecond", tree, 8, 1)))
    with pytest.raises(ValueError, match=r"missing in the file \(1\): conv_in.weight; unexpected in the file \(1\): "
                                         r"extra_scale"):
        load_nvlabs_edm(tmp_path / "keys.pkl")
    wider = network_record(net, block_out_channels=[8, 24])  # arguments that do not fit the weights
    standin.write(tmp_path / "shapes.pkl", standin.edm_snapshot(standin.preconditioning("EDMPrecond", wider, 8, 1)))
    with pytest.raises(ValueError, match=r"shape mismatches \(\d+\): down_blocks"):
        load_nvlabs_edm(tmp_path / "shapes.pkl")


# ---------------------------------------------------------------------------------------------------------------------
# DG's discriminator: guided-diffusion's EncoderUNetModel and DG's get_log_ratio


def tiny_encoder(**overrides):
    """A small ADM encoder: two levels (8 and 4 px), attention at both, two heads of 16 channels."""
    return dict(dict(sample_size=8, in_channels=3, model_channels=32, out_channels=5, num_res_blocks=1,
                     attention_resolutions=[8, 4], channel_mult=[1, 2], num_head_channels=16,
                     use_scale_shift_norm=True, num_class_embeds=None, time_scale=999.0), **overrides)


def tiny_head(num_class_embeds=None):
    return tiny_encoder(sample_size=4, in_channels=64, out_channels=1, num_res_blocks=2, attention_resolutions=[4],
                        channel_mult=[1], num_class_embeds=num_class_embeds)


def loaded(model, params):
    model.load_state_dict(params, strict=True)  # guided-diffusion's names, every one
    return model


@pytest.mark.parametrize("cfg", [tiny_encoder(), tiny_encoder(use_scale_shift_norm=False, time_scale=1.0),
                                 tiny_head(num_class_embeds=7)], ids=["classifier", "additive_emb", "cond_head"])
def test_adm_encoder_is_guided_diffusions_encoder_unet(cfg):
    from adm_reference import encoder_forward, init_params

    from diffusers_stf.models.adm_encoder import EncoderUNetModel

    params = init_params(cfg, seed=1)
    model = loaded(EncoderUNetModel(**cfg).double(), params)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], generator=g, dtype=torch.float64)
    t = torch.tensor([0.01, 0.4, 1.0], dtype=torch.float64)
    labels = torch.tensor([0, 6, 3]) if cfg["num_class_embeds"] else None
    with torch.no_grad():
        logits = model(x, t, labels).logits
        features = model.features(x, t, labels)
    assert torch.allclose(logits, encoder_forward(params, cfg, x, t, labels), rtol=1e-10, atol=1e-12)
    assert torch.allclose(features, encoder_forward(params, cfg, x, t, labels, features=True), rtol=1e-10, atol=1e-12)


def tiny_dg(num_class_embeds=None, seed=3, dtype=torch.float64):
    from adm_reference import init_params

    from diffusers_stf.models.dg_discriminator import DGDiscriminator

    classifier, head = tiny_encoder(), tiny_head(num_class_embeds)
    params = init_params(classifier, seed), init_params(head, seed + 1)
    disc = DGDiscriminator(sample_size=8, in_channels=3, num_class_embeds=num_class_embeds,
                           classifier_config=classifier, head_config=head).to(dtype)
    loaded(disc.classifier, params[0]), loaded(disc.head, params[1])
    return disc, (params[0], classifier), (params[1], head)


@pytest.mark.parametrize("num_class_embeds", [None, 10])
def test_dg_log_ratio_and_gradient_are_dgs_get_log_ratio(num_class_embeds):
    from adm_reference import dg_log_ratio_and_gradient

    disc, classifier, head = tiny_dg(num_class_embeds)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) * 3
    sigma = torch.tensor([0.01, 0.5, 3.0, 40.0], dtype=torch.float64)
    labels = torch.tensor([1, 9, 0, 4]) if num_class_embeds else None
    one_hot = torch.eye(10, dtype=torch.float64)[labels] if num_class_embeds else None  # DG passes one-hot rows
    for scale in (1.0, 1e4):  # as trained, and saturated: d clipped to [1e-5, 1 − 1e-5]
        with torch.no_grad():
            disc.head.out[2].c_proj.weight.mul_(scale)
        head[0]["out.2.c_proj.weight"] = disc.head.out[2].c_proj.weight.detach().clone()
        x_ = x.clone().requires_grad_(True)
        ours = disc.log_ratio(x_, sigma, labels)
        (grad,) = torch.autograd.grad(ours.sum(), x_)
        ref, ref_grad = dg_log_ratio_and_gradient(classifier, head, x, sigma, one_hot)
        assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-9), (scale, ours, ref)
        assert torch.allclose(grad, ref_grad, rtol=1e-8, atol=1e-10), scale
    assert (ref.abs() > 11.5).all() and (ref_grad == 0).all()  # the clipped case has zero gradient, as in DG


def test_dg_discriminator_guides_the_pipeline_with_dgs_gradient():
    """The guided pipeline's correction is σ²·∇ₓ log(d/(1 − d)) with DG's gradient (its −σ²·mean_vp·∇_{x_vp})."""
    from adm_reference import dg_log_ratio_and_gradient

    from diffusers_stf import DiscriminatorGuidedPipeline, EDMHeunScheduler
    from diffusers_stf.guidance.discriminator import discriminator_correction

    disc, classifier, head = tiny_dg(dtype=torch.float32)
    pipe = DiscriminatorGuidedPipeline(tiny_network(7, channels=3), EDMHeunScheduler(preconditioning="vp"), disc)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    correction, log_ratio = discriminator_correction(pipe.discriminator, x, 2.5)
    params = lambda p: {k: v.double() for k, v in p.items()}  # noqa: E731
    ref, ref_grad = dg_log_ratio_and_gradient((params(classifier[0]), classifier[1]), (params(head[0]), head[1]),
                                              x, torch.full((2,), 2.5, dtype=torch.float64))
    assert torch.allclose(log_ratio.double(), ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(correction, 2.5**2 * ref_grad, rtol=1e-3, atol=1e-6)
    # In the pipeline: one Euler step from σ_0 = 80 to 0 returns D_guided(x_0; σ_0) = D + w·σ_0²·∇ₓ log r (DG eq. 9),
    # so guided − unguided is w·σ_0² times DG's gradient at x_0 = 80·latents (τ(80) = 0.93: inside DG's window).
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    guided = pipe(batch_size=2, num_inference_steps=1, latents=latents, output_type="latent").images
    plain = pipe(batch_size=2, num_inference_steps=1, latents=latents, output_type="latent", dg_weight_1st_order=0).images
    _, grad_x0 = dg_log_ratio_and_gradient((params(classifier[0]), classifier[1]), (params(head[0]), head[1]),
                                           latents.double() * 80, torch.full((2,), 80.0, dtype=torch.float64))
    expected = 2.0 * 80.0**2 * grad_x0  # dg_weight_1st_order defaults to DG's 2
    assert expected.abs().amax() > 0.1  # the discriminator is not saturated: the correction is there
    assert torch.allclose(guided - plain, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().amax()))


def dg_encoder(image_size, depth, channel_mult, in_channels=3, out_channels=1000, condition=False):
    """DG classifier_lib's load_classifier / load_discriminator through guided-diffusion's create_classifier:
    width 128, attention at "32,16,8", heads of 64 channels, scale-shift norm, residual downsampling, attention
    pooling; DG's copy multiplies the time by 999 and embeds 1000 classes when conditional."""
    return dict(sample_size=image_size, in_channels=in_channels, model_channels=128, out_channels=out_channels,
                num_res_blocks=depth, attention_resolutions=[32, 16, 8], channel_mult=list(channel_mult),
                num_head_channels=64, use_scale_shift_norm=True, num_class_embeds=1000 if condition else None,
                time_scale=999.0)


@pytest.fixture(scope="module")
def dg_files(tmp_path_factory):
    """DG's files at their real architecture, with random weights from the reference layout (float32); and files
    of a 16 px setup."""
    from adm_reference import init_params

    root = tmp_path_factory.mktemp("dg")
    configs = {"32x32_classifier.pt": dg_encoder(32, 4, (1, 2, 4)),
               "discriminator_60.pt": dg_encoder(8, 2, (1,), in_channels=512, out_channels=1),
               "discriminator_250.pt": dg_encoder(8, 2, (1,), in_channels=512, out_channels=1, condition=True),
               "16x16_classifier.pt": dg_encoder(16, 2, (1, 2)),
               "discriminator_16px.pt": dg_encoder(8, 2, (1,), in_channels=256, out_channels=1)}
    out = {}
    for seed, (name, cfg) in enumerate(configs.items()):
        params = init_params(cfg, seed, dtype=torch.float32)
        torch.save(params, root / name)
        out[name] = (root / name, params, cfg)
    return out


def test_dg_files_load_into_dgs_architecture(dg_files):
    from adm_reference import dg_log_ratio_and_gradient

    from diffusers_stf.conversion import load_dg_discriminator

    classifier = dg_files["32x32_classifier.pt"]
    for head_name, conditional in (("discriminator_60.pt", False), ("discriminator_250.pt", True)):
        head = dg_files[head_name]
        disc = load_dg_discriminator(classifier[0], head[0], img_resolution=32, conditional=conditional)
        assert disc.config.num_class_embeds == (1000 if conditional else None)
        for part, (_, params, _) in ((disc.classifier, classifier), (disc.head, head)):
            assert all(torch.equal(part.state_dict()[k], v) for k, v in params.items())
    # the full-size forward (heads of 64 channels, time ×999) against DG's, for the conditional head, in float32
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    sigma, labels = torch.tensor([1.7]), torch.tensor([3])
    ref, _ = dg_log_ratio_and_gradient(classifier[1:], head[1:], x, sigma, labels, gradient=False)
    with torch.no_grad():
        ours = disc.log_ratio(x, sigma, labels)
    assert torch.allclose(ours, ref.float(), rtol=1e-4, atol=1e-4), (ours, ref)


def test_dg_files_that_do_not_fit_are_refused(dg_files, tmp_path):
    from diffusers_stf.conversion import load_dg_discriminator

    c32, c16 = dg_files["32x32_classifier.pt"][0], dg_files["16x16_classifier.pt"][0]
    d60, d16 = dg_files["discriminator_60.pt"][0], dg_files["discriminator_16px.pt"][0]
    with pytest.raises(ValueError, match=r"img_resolution must be one of \(32,\)"):
        load_dg_discriminator(c32, d60, img_resolution=64)
    with pytest.raises(ValueError, match="16x16_classifier.pt is the 16 px ADM classifier, but img_resolution=32"):
        load_dg_discriminator(c16, d60)
    with pytest.raises(ValueError, match="judges 256x8x8 features, but the classifier at img_resolution=32 gives "
                                         "512x8x8: the head belongs to another image size"):
        load_dg_discriminator(c32, d16)
    with pytest.raises(ValueError, match="discriminator_60.pt is unconditional, but conditional=True"):
        load_dg_discriminator(c32, d60, conditional=True)
    state = dict(torch.load(d60, weights_only=True))
    del state["input_blocks.1.0.emb_layers.1.weight"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"missing.pt does not match DG's architecture: missing in the file \(1\): "
                                         r"input_blocks.1.0.emb_layers.1.weight"):
        load_dg_discriminator(c32, tmp_path / "missing.pt")
    marker = tmp_path / "pwned"
    torch.save({"x": Reduce(os.system, f"touch {marker}")}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a torch state dict readable with weights_only=True"):
        load_dg_discriminator(c32, tmp_path / "evil.pt")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# The command line: folders with model cards that plain diffusers loads and samples


def sample_latents(pipe, labels=None, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=2 if labels is None else len(labels), num_inference_steps=3,
                generator=torch.Generator().manual_seed(7), output_type="latent", class_labels=labels,
                **kwargs).images.contiguous()


def test_command_line_folders_load_with_plain_diffusers_and_sample_the_same(tmp_path, dg_files, converted):
    import json

    from safetensors.torch import load_file
    from test_hub import run_blocked

    from diffusers_stf import DiscriminatorGuidedPipeline
    from diffusers_stf.conversion.cli import main
    from diffusers_stf.models.dg_discriminator import DGDiscriminator

    vp32 = tmp_path / "vp32.pkl"  # a DDPM++ network of DG's image size
    net32, kwargs = edm_network("ddpmpp", 11, size=32, channels=3)
    record = standin.persistent_tree(net32, "SongUNet", kwargs)
    standin.write(vp32, standin.edm_snapshot(standin.preconditioning("VPPrecond", record, 32, 3, model_type="SongUNet")))
    classifier, head = dg_files["32x32_classifier.pt"][0], dg_files["discriminator_60.pt"][0]
    argv = {"vp": ["edm", str(converted["vp"][1]), str(tmp_path / "vp")],  # SongUNet, class-conditional
            "edm": ["edm", str(converted["edm"][1]), str(tmp_path / "edm")],  # DhariwalUNet
            "vp32": ["edm", str(vp32), str(tmp_path / "vp32")],
            "dg": ["dg", "--classifier", str(classifier), "--discriminator", str(head), "--score_model",
                   str(tmp_path / "vp32"), str(tmp_path / "dg")]}
    pipes = {name: main(args) for name, args in argv.items()}
    with pytest.raises(SystemExit, match="exists and is not an empty folder"):
        main(argv["edm"])  # nothing is overwritten

    for name, args in argv.items():
        card = (tmp_path / name / "README.md").read_text()
        assert f"python -m diffusers_stf.convert {' '.join(args)}" in card, name
        assert "CC BY-NC-SA 4.0" in card and "license:" in card
    assert "states no licence" in (tmp_path / "dg" / "README.md").read_text()

    calls = {"vp": {"labels": [0, 3]}, "edm": {}, "vp32": {}, "dg": {"dg_weight_1st_order": 2.0}}
    ours = {}
    for name, kwargs in calls.items():
        labels = torch.tensor(kwargs["labels"]) if "labels" in kwargs else None
        extra = {k: v for k, v in kwargs.items() if k != "labels"}
        ours[name] = sample_latents(pipes[name], labels, **extra)
    assert not torch.equal(ours["vp32"], ours["dg"])  # the guidance acts
    folders = {name: str(tmp_path / name) for name in calls}
    out_file = tmp_path / "plain.safetensors"
    result = run_blocked(tmp_path, f"""
        import json
        import torch
        from diffusers import DiffusionPipeline
        from safetensors.torch import save_file
        out, types = {{}}, {{}}
        calls = json.loads({json.dumps(json.dumps(calls))})
        for name, folder in json.loads({json.dumps(json.dumps(folders))}).items():
            pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
            pipe.set_progress_bar_config(disable=True)
            kwargs = dict(calls[name])
            labels = torch.tensor(kwargs.pop("labels")) if "labels" in kwargs else None
            out[name] = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(7),
                             output_type="latent", class_labels=labels, **kwargs).images.contiguous()
            types[name] = {{k: type(v).__name__ for k, v in pipe.components.items()}}
        save_file(out, {str(out_file)!r})
        print(json.dumps(types))
    """, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    types = json.loads(result.stdout.strip().splitlines()[-1])
    assert {k: types["dg"][k] for k in ("unet", "scheduler", "discriminator")} == {
        "unet": "SongUNet", "scheduler": "EDMHeunScheduler", "discriminator": "DGDiscriminator"}
    assert types["vp"]["unet"] == "SongUNet" and types["edm"]["unet"] == "DhariwalUNet"
    plain = load_file(out_file)
    for name in calls:
        assert torch.equal(plain[name], ours[name]), name
    package = DiscriminatorGuidedPipeline.from_pretrained(tmp_path / "dg")  # the package's own classes
    assert type(package.discriminator) is DGDiscriminator
    assert torch.equal(sample_latents(package, dg_weight_1st_order=2.0), ours["dg"])


def test_a_module_tree_that_contains_itself_is_refused(tmp_path):
    net = tiny_network(12)
    tree = network_record(net)
    blocks = torch.nn.ModuleDict()  # built before its state (NEWOBJ, then BUILD), so its state can hold it
    blocks.__dict__["_modules"]["again"] = blocks
    tree.meta["state"]["_modules"]["enc"] = blocks
    standin.write(tmp_path / "loop.pkl", standin.edm_snapshot(standin.preconditioning("EDMPrecond", tree, 8, 1)))
    with pytest.raises(NVlabsPickleError, match="contains itself at 'enc.again'"):
        load_nvlabs_edm(tmp_path / "loop.pkl")
