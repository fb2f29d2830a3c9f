"""anisodiff.fit (channel PCA, power spectrum) and anisodiff.datasets (the image sources of
`anisodiff fit`).

Ground truth is planted: Gaussian pixels with a known covariance (bounds from the sample size), noise
drawn with a known power law, and the procedural dataset's known colour axes and 1/f^2 spectrum.
"""
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import anisodiff as ad
from anisodiff import datasets
from anisodiff.fit import ChannelPCA, Spectrum, fit_channel_pca, fit_spectrum, fit_statistics

Z = 5.0  # standard errors allowed by the statistical bounds
PLANTED_EIGENVALUES = torch.tensor([4.0, 1.0, 0.25, 0.0625], dtype=torch.float64)
PLANTED_MEAN = torch.tensor([3.0, -2.0, 1.0, 5.0], dtype=torch.float64)


def planted_pixels(B=64, H=16, W=16, seed=0, mean=PLANTED_MEAN, eigenvalues=PLANTED_EIGENVALUES):
    """``[B, C, H, W]`` float64 with i.i.d. pixels ``N(mean, V diag(eigenvalues) V^T)``; returns
    ``(x, V)``."""
    g = torch.Generator().manual_seed(seed)
    C = eigenvalues.numel()
    V, _ = torch.linalg.qr(torch.randn(C, C, generator=g, dtype=torch.float64))
    z = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    x = mean[None, :, None, None] + torch.einsum("ck,bkhw->bchw", V * eigenvalues.sqrt(), z)
    return x, V


def exact_covariance(x: torch.Tensor) -> torch.Tensor:
    """Two-pass float64 population covariance of the pixels of ``x``."""
    pixels = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    centred = pixels - pixels.mean(dim=1, keepdim=True)
    return centred @ centred.T / pixels.shape[1]


def within_sampling_error(eigenvalues, axes, truth_values, truth_axes, n) -> bool:
    """Asymptotic sampling bounds of a Gaussian sample covariance of n vectors: sd(lambda_i) =
    lambda_i sqrt(2 / n); sin^2 of the angle of axis i ~ sum_j lambda_i lambda_j / (n (lambda_i -
    lambda_j)^2)."""
    if ((eigenvalues - truth_values).abs() > Z * truth_values * math.sqrt(2 / n)).any():
        return False
    for i in range(axes.shape[1]):
        others = [j for j in range(truth_values.numel()) if j != i]
        li = truth_values[i]
        spread = sum(float(li * truth_values[j] / (li - truth_values[j]) ** 2) for j in others)
        sin2 = 1 - float(axes[:, i] @ truth_axes[:, i]) ** 2
        if math.sqrt(max(sin2, 0.0)) > Z * math.sqrt(spread / n):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# channel PCA
# ---------------------------------------------------------------------------------------------
def test_pca_recovers_planted_axes_and_eigenvalues():
    x, V = planted_pixels()
    n = x.numel() // x.shape[1]
    pca = fit_channel_pca(x, k=2, progress=False)
    assert isinstance(pca, ChannelPCA) and pca.count == n
    assert pca.axes.shape == (4, 2) and pca.eigenvalues.shape == (4,)
    assert torch.allclose(pca.axes.T @ pca.axes, torch.eye(2, dtype=torch.float64), atol=1e-12)
    truth_axes = V * torch.sign(V[V.abs().argmax(dim=0), torch.arange(4)])
    assert within_sampling_error(pca.eigenvalues, pca.axes, PLANTED_EIGENVALUES, truth_axes, n)
    assert torch.allclose(pca.mean, PLANTED_MEAN, atol=Z * 2 / math.sqrt(n))

    # the check has teeth: the uncentred second moment E[x x^T] fails it
    pixels = x.transpose(0, 1).reshape(4, -1)
    values, vectors = torch.linalg.eigh(pixels @ pixels.T / n)
    assert not within_sampling_error(values.flip(0), vectors.flip(1)[:, :2], PLANTED_EIGENVALUES,
                                     truth_axes, n)


def test_pca_sign_convention_and_squeeze():
    x, _ = planted_pixels(B=8)
    for flip in (1.0, -1.0):  # negating the data flips the mean, never the axes' signs
        pca = fit_channel_pca(flip * x, k=3, progress=False)
        pivots = pca.axes.abs().argmax(dim=0)
        assert (pca.axes[pivots, torch.arange(3)] > 0).all()
        if flip == 1.0:
            first = pca.axes
    assert torch.allclose(pca.axes, first, atol=1e-12)
    squeeze = pca.squeeze(-0.4, variant="heisenberg", schedule="constant")
    assert isinstance(squeeze, ad.Squeeze) and squeeze.strength == (-0.4,) * 3
    assert torch.equal(squeeze.axes, pca.axes) and squeeze.variant == "heisenberg"


def test_streaming_equals_one_shot():
    x, _ = planted_pixels(B=40)
    sizes = [1, 7, 13, 19]
    batches = list(torch.split(x.float(), sizes))
    streamed = fit_channel_pca(batches, k=2, progress=False)
    one_shot = fit_channel_pca(x.float(), k=2, progress=False)
    truth = exact_covariance(x.float())
    for pca in (streamed, one_shot):
        assert torch.allclose(pca.covariance, truth, rtol=1e-12, atol=1e-14)
    assert torch.allclose(streamed.axes, one_shot.axes, atol=1e-12)
    assert torch.allclose(streamed.mean, one_shot.mean, rtol=1e-13)

    s_streamed = fit_spectrum(batches, progress=False)
    s_one_shot = fit_spectrum(x.float(), progress=False)
    assert torch.allclose(s_streamed.power, s_one_shot.power, rtol=1e-11)
    assert s_streamed.images == s_one_shot.images == 40


def test_float64_accumulation_with_a_large_mean():
    """Pixels around 500 with variances 1 .. 0.04: the official SDM code's single-pass float32
    E[x x^T] - mu mu^T loses the small eigenvalues; the fit matches the exact two-pass value."""
    mean = torch.tensor([500.0, 400.0, 450.0], dtype=torch.float64)
    x, _ = planted_pixels(B=256, H=32, W=32, mean=mean,
                          eigenvalues=torch.tensor([1.0, 0.25, 0.04], dtype=torch.float64))
    batches = list(x.float().split(32))
    truth = exact_covariance(x.float())

    def official_fp32(batches):
        total, outer, n = torch.zeros(3), torch.zeros(3, 3), 0
        for b in batches:
            pixels = b.permute(1, 0, 2, 3).reshape(3, -1)
            total += pixels.sum(dim=1)
            outer += pixels @ pixels.T
            n += pixels.shape[1]
        mu = total / n
        return (outer / n - torch.outer(mu, mu)).double()

    def rel_error(cov):
        return float((cov - truth).norm() / truth.norm())

    assert rel_error(official_fp32(batches)) > 0.05
    assert rel_error(fit_channel_pca(batches, progress=False).covariance) < 1e-12
    truth_values = torch.linalg.eigvalsh(truth).flip(0)
    assert torch.allclose(fit_channel_pca(batches, progress=False).eigenvalues, truth_values,
                          rtol=1e-10)


class _DictImages(torch.utils.data.Dataset):
    def __init__(self, x, key):
        self.x, self.key = x, key

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"label": i, self.key: self.x[i]}


@pytest.mark.parametrize("key", ["image", "img", "images", "pixel_values"])
def test_dataloader_with_dict_batches(key):
    x, _ = planted_pixels(B=12, H=8, W=8)
    loader = torch.utils.data.DataLoader(_DictImages(x, key), batch_size=5)
    assert torch.allclose(fit_channel_pca(loader, progress=False).covariance,
                          fit_channel_pca(x, progress=False).covariance, rtol=1e-12)


def test_dataloader_with_tuple_batches_and_numpy_batches():
    x, _ = planted_pixels(B=12, H=8, W=8)
    labels = torch.arange(12)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=5)
    reference_fit = fit_statistics(x, k=2, progress=False)
    for data in (loader, [b.numpy() for b in x.split(5)], (b for b in x.split(5))):
        pca, spectrum = fit_statistics(data, k=2, progress=False)
        assert torch.allclose(pca.axes, reference_fit[0].axes, atol=1e-12)
        assert torch.allclose(spectrum.power, reference_fit[1].power, rtol=1e-11)


def test_progress_bar_when_the_length_is_known(capsys):
    x, _ = planted_pixels(B=6, H=8, W=8)
    fit_channel_pca(list(x.split(2)), progress=True)
    assert "channel PCA" in capsys.readouterr().err
    fit_channel_pca(list(x.split(2)), progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("data, error, message", [
    ([{"label": 1}], TypeError, "pixel_values"),
    (["not a tensor"], TypeError, "expected a [B, C, H, W] tensor"),
    ([torch.zeros(3, 8, 8)], ValueError, "add a batch dimension"),
    ([torch.zeros(2, 3, 4, 4, dtype=torch.complex64)], TypeError, "real numbers"),
    ([], ValueError, "no images"),
    ([torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, 4)], ValueError, "channels"),
    ([torch.full((2, 3, 4, 4), math.nan)], ValueError, "NaN"),
])
def test_bad_data_is_rejected(data, error, message):
    with pytest.raises(error, match=__import__("re").escape(message)):
        fit_channel_pca(data, progress=False)


def test_bad_arguments_are_rejected():
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="cannot fit 4 axes"):
        fit_channel_pca(x, k=4, progress=False)
    with pytest.raises(ValueError, match="k: must be >= 1"):
        fit_channel_pca(x, k=0, progress=False)
    with pytest.raises(ValueError, match="radius"):
        fit_spectrum(x, radius="pixels", progress=False)
    with pytest.raises(ValueError, match="one size"):
        fit_spectrum([torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 6)], progress=False)


# ---------------------------------------------------------------------------------------------
# power spectrum
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [-1.0, -0.5, 0.25])
def test_spectrum_recovers_the_power_law_of_shaped_noise(alpha):
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(alpha))
    noise = ad.shaped_noise((128, 3, 32, 32), spec, seed=7, backend="reference",
                            dtype=torch.float64)
    spectrum = fit_spectrum(noise.split(32), progress=False)
    assert isinstance(spectrum, Spectrum) and spectrum.images == 128
    assert abs(spectrum.alpha - alpha) < 0.02  # a fit off by 0.05 fails
    assert all(abs(a - alpha) < 0.02 for a in spectrum.channel_alpha)
    law = spectrum.power_law()
    assert law.alpha == spectrum.alpha and law.eps == pytest.approx(0.5 / 32)
    # the table reproduces the spectrum: noise drawn with it has the same slope
    table_noise = ad.shaped_noise((128, 3, 32, 32), ad.NoiseSpec(spectral=spectrum.table()),
                                  seed=8, backend="reference", dtype=torch.float64)
    assert abs(fit_spectrum(table_noise, progress=False).alpha - alpha) < 0.02


def test_spectrum_radial_profile_and_conventions():
    noise = ad.shaped_noise((64, 2, 16, 16), ad.NoiseSpec(), seed=3)  # white: P = 1 everywhere
    spectrum = fit_spectrum(noise, progress=False)
    assert spectrum.power.shape == (2, 16, 16) and spectrum.shape == (16, 16)
    assert spectrum.radial_power.shape == (2, spectrum.radii.numel())
    assert float(spectrum.power.mean()) == pytest.approx(1.0, abs=0.05)  # Parseval: pixel variance
    assert (spectrum.radial_power - 1).abs().max() < 0.5
    assert abs(spectrum.alpha) < 0.05
    assert spectrum.radii[0] == pytest.approx(math.sqrt(1 * math.sqrt(2)) / 16)  # geometric mean
    nyquist = fit_spectrum(noise, radius="nyquist1", progress=False)
    assert torch.allclose(nyquist.radii, 2 * spectrum.radii)
    assert nyquist.alpha == pytest.approx(spectrum.alpha, abs=1e-12)
    assert nyquist.power_law().eps == pytest.approx(2 * spectrum.power_law().eps)


def test_spectrum_dc_bin_is_the_variance_of_the_image_means():
    """A constant offset changes nothing; per-image offsets c_i only the DC bin, by H W var(c)."""
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(-0.5, eps=0.05))
    x = ad.shaped_noise((50, 3, 16, 16), spec, seed=5).double()
    base = fit_spectrum(x, progress=False)
    shifted = fit_spectrum(x + 100.0, progress=False)
    assert torch.allclose(shifted.power, base.power, rtol=1e-9, atol=1e-9)
    offsets = torch.linspace(-1, 1, 50, dtype=torch.float64)
    moved = fit_spectrum(x + offsets[:, None, None, None], progress=False)
    means = x.mean(dim=(2, 3)) + offsets[:, None]
    expected_dc = 16 * 16 * means.var(dim=0, correction=0)
    assert torch.allclose(moved.power[:, 0, 0], expected_dc, rtol=1e-10)
    assert torch.allclose(moved.power[:, 1:, :], base.power[:, 1:, :], rtol=1e-9, atol=1e-12)
    assert torch.allclose(moved.power[:, 0, 1:], base.power[:, 0, 1:], rtol=1e-9, atol=1e-12)


def test_table_is_symmetric_and_radial_table_is_isotropic():
    x = ad.shaped_noise((32, 3, 12, 16), ad.NoiseSpec(spectral=ad.PowerLaw(-0.7, eps=0.05)), seed=2)
    spectrum = fit_spectrum(x, progress=False)
    table = spectrum.table()
    assert table.shape == (12, 16)
    assert torch.allclose(table.weights ** 2, spectrum.power.mean(dim=0), rtol=0.3)
    radial = spectrum.table(radial=True).weights
    ring = torch.round(ad.reference.radius(12, 16) * 12).long()
    for k in range(1, int(ring.max()) + 1):
        values = radial[ring == k]
        assert torch.allclose(values, values[0].expand_as(values))
    assert radial[0, 0] == table.weights[0, 0]


def test_alpha_is_nan_without_power_and_power_law_refuses():
    spectrum = fit_spectrum(torch.ones(4, 3, 8, 8), progress=False)
    assert math.isnan(spectrum.alpha)
    with pytest.raises(ValueError, match="alpha could not be fitted"):
        spectrum.power_law()


# ---------------------------------------------------------------------------------------------
# torch.distributed: 2 processes, gloo, CPU
# ---------------------------------------------------------------------------------------------
def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str, shards) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {name: fit_statistics(shard[rank], k=2, progress=False)
                   for name, shard in shards.items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_agree_with_the_full_data_fit(tmp_path):
    x, _ = planted_pixels(B=24, H=8, W=8)
    shards = {"split": [list(x[:10].split(4)), list(x[10:].split(5))],
              "one_rank_empty": [list(x.split(6)), []]}
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path), shards),
             nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    full_pca, full_spectrum = fit_statistics(x, k=2, progress=False)
    for name in shards:
        (pca0, spec0), (pca1, spec1) = ranks[0][name], ranks[1][name]
        assert torch.equal(pca0.axes, pca1.axes) and torch.equal(pca0.covariance, pca1.covariance)
        assert torch.equal(spec0.power, spec1.power) and spec0.alpha == spec1.alpha
        assert pca0.count == full_pca.count and spec0.images == full_spectrum.images == 24
        assert torch.allclose(pca0.axes, full_pca.axes, atol=1e-12)
        assert torch.allclose(pca0.covariance, full_pca.covariance, rtol=1e-12)
        assert torch.allclose(spec0.power, full_spectrum.power, rtol=1e-11)
        assert torch.equal(spec0.band_cross, spec1.band_cross)
        assert torch.allclose(spec0.band_cross, full_spectrum.band_cross, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def procedural_fit():
    images = datasets.ProceduralImages(512, size=32, seed=0)
    loader = torch.utils.data.DataLoader(images, batch_size=128)
    return fit_statistics(loader, k=1, progress=False)


def test_procedural_dataset_has_natural_image_statistics(procedural_fit):
    pca, spectrum = procedural_fit
    assert abs(spectrum.alpha - (-1.0)) < 0.03  # power ~ r^-2
    assert all(abs(a + 1.0) < 0.05 for a in spectrum.channel_alpha)
    planted = -datasets.PROCEDURAL_AXES[:, 0]  # sign convention: largest component positive
    assert float(pca.axes[:, 0] @ planted) > 0.999
    assert torch.allclose(pca.eigenvalues, datasets.PROCEDURAL_VARIANCES, rtol=0.1)
    assert torch.allclose(pca.mean, datasets.PROCEDURAL_MEAN, atol=0.05)


def test_procedural_dataset_is_deterministic_and_batch_independent():
    a = datasets.ProceduralImages(20, size=16, seed=4)
    b = datasets.ProceduralImages(20, size=16, seed=4)
    batch = a.__getitems__([3, 11, 7])
    assert torch.equal(batch[1], b[11]) and torch.equal(batch[0], a[3])
    assert not torch.equal(a[3], datasets.ProceduralImages(20, size=16, seed=5)[3])
    assert a[0].shape == (3, 16, 16) and a[0].dtype == torch.float32
    with pytest.raises(IndexError):
        a[20]


def _write_pngs(folder, sizes, mode="RGB"):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")


def test_image_folder_reads_maps_and_resizes(tmp_path):
    _write_pngs(tmp_path / "rgb" / "sub", [(12, 10)] * 3)
    folder = datasets.ImageFolder(tmp_path / "rgb")
    assert len(folder) == 3 and folder[0].shape == (3, 10, 12)
    assert -1.0 <= float(folder[0].min()) and float(folder[0].max()) <= 1.0
    from PIL import Image
    raw = np.asarray(Image.open(folder.files[0]), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(folder[0], torch.from_numpy(raw).permute(2, 0, 1))

    _write_pngs(tmp_path / "grey", [(8, 8)] * 2, mode="L")
    assert datasets.ImageFolder(tmp_path / "grey")[1].shape == (1, 8, 8)

    _write_pngs(tmp_path / "mixed", [(12, 10), (20, 16)])
    with pytest.raises(datasets.DataError, match="differ in size"):
        datasets.ImageFolder(tmp_path / "mixed")
    resized = datasets.ImageFolder(tmp_path / "mixed", size=8)
    assert resized[0].shape == resized[1].shape == (3, 8, 8)


def test_array_images_layouts(tmp_path):
    rng = np.random.default_rng(1)
    uint8 = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    np.save(tmp_path / "u8.npy", uint8)
    images = datasets.ArrayImages(tmp_path / "u8.npy")
    assert len(images) == 5 and images[2].shape == (3, 6, 7)
    assert torch.allclose(images[2], torch.from_numpy(uint8[2]).permute(2, 0, 1) / 127.5 - 1)

    floats = rng.standard_normal((4, 2, 5, 5)).astype(np.float32)
    np.savez(tmp_path / "f.npz", images=floats, labels=np.arange(4))
    assert torch.equal(datasets.ArrayImages(tmp_path / "f.npz")[1], torch.from_numpy(floats[1]))

    bad = [("rank3.npy", uint8[0], "4-D array"),
           ("nhwc_float.npy", rng.standard_normal((2, 8, 8, 3)), "channels-last"),
           ("wide.npy", rng.integers(0, 255, (2, 4, 4, 5), dtype=np.uint8), "C <= 4"),
           ("ints.npy", np.zeros((2, 3, 4, 4), dtype=np.int32), "dtype"),
           ("none.npy", np.zeros((0, 3, 4, 4), dtype=np.float32), "no images")]
    for name, array, message in bad:
        np.save(tmp_path / name, array)
        with pytest.raises(datasets.DataError, match=message):
            datasets.ArrayImages(tmp_path / name)
    np.savez(tmp_path / "two.npz", a=floats, b=floats)
    with pytest.raises(datasets.DataError, match="2 arrays"):
        datasets.ArrayImages(tmp_path / "two.npz")


def test_open_images_resolves_sources(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((10, 4, 4, 3), dtype=np.uint8))
    assert len(datasets.open_images(str(tmp_path / "x.npy"), limit=3)) == 3
    assert len(datasets.open_images("procedural", limit=7, size=8)) == 7
    assert datasets.open_images("procedural", limit=1)[0].shape == (3, 32, 32)
    with pytest.raises(datasets.DataError, match="not a built-in dataset"):
        datasets.open_images(str(tmp_path / "missing"))
    with pytest.raises(datasets.DataError, match="used as stored"):
        datasets.open_images(str(tmp_path / "x.npy"), size=8)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(datasets.DataError, match="unsupported file"):
        datasets.open_images(str(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(datasets.DataError, match="no image files"):
        datasets.open_images(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------
# cached latents: .npy / .npz / .pt / .safetensors, files and folders, any C, 5-D video
# ---------------------------------------------------------------------------------------------
def planted_latents(N=12, C=4, H=8, W=8, seed=0, frames=None):
    """Latent-like data: correlated channels with a large mean, a spectral tilt."""
    x, _ = planted_pixels(B=N * (frames or 1), H=H, W=W, seed=seed,
                          mean=torch.linspace(-1, 2, C, dtype=torch.float64),
                          eigenvalues=torch.logspace(0, -1, C, dtype=torch.float64))
    x = ad.reference.filter_planes(x, (ad.reference.radius(H, W) + 0.1) ** -0.5)
    if frames:
        x = x.reshape(N, frames, C, H, W).transpose(1, 2).contiguous()
    return x.float()


def _save_latents(path, x, key="latents", **extra):
    import safetensors.torch

    suffix = path.suffix
    if suffix == ".npy":
        np.save(path, x.numpy())
    elif suffix == ".npz":
        np.savez_compressed(path, **{key: x.numpy()}, **{k: np.asarray(v) for k, v in extra.items()})
    elif suffix == ".pt":
        torch.save({key: x, **extra}, path)
    else:
        safetensors.torch.save_file({key: x.contiguous(), **extra}, str(path))


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt", ".safetensors"])
def test_latent_files_fit_as_the_tensor(tmp_path, suffix):
    x = planted_latents(C=16)
    path = tmp_path / f"latents{suffix}"
    extra = {} if suffix == ".npy" else {"original_size": torch.tensor([64, 64])}
    _save_latents(path, x, **extra)
    expected = fit_statistics(x, k=3, progress=False)
    for data in (path, str(path)):
        pca, spectrum = fit_statistics(data, k=3, progress=False, batch_size=5)
        assert torch.allclose(pca.covariance, expected[0].covariance, rtol=1e-12, atol=1e-15)
        assert torch.allclose(spectrum.power, expected[1].power, rtol=1e-11, atol=1e-15)
        assert pca.axes.shape == (16, 3) and spectrum.images == 12 and spectrum.frames == 0
    latents = datasets.open_images(str(path))
    assert isinstance(latents, datasets.LatentFiles) and len(latents) == 12
    assert [b.shape[0] for b in latents.batches(5)] == [5, 5, 2] and len(latents.batches(5)) == 3
    assert torch.equal(latents[7], x[7]) and latents.sample_shape == (16, 8, 8)


def test_a_folder_of_single_latents_and_half_precision(tmp_path):
    """kohya-style caches: one [C, H, W] latent per .npz (with other entries), and fp16 / bf16
    .pt / .safetensors batches, mixed in one folder."""
    x = planted_latents(N=10)
    for i in range(4):
        _save_latents(tmp_path / f"a{i:02d}.npz", x[i], original_size=np.array([64, 64]))
    _save_latents(tmp_path / "b.pt", x[4:7].half())
    (tmp_path / "sub").mkdir()
    _save_latents(tmp_path / "sub" / "c.safetensors", x[7:].bfloat16())
    stored = torch.cat([x[:4], x[4:7].half().float(), x[7:].bfloat16().float()])
    pca, spectrum = fit_statistics(tmp_path, progress=False, batch_size=3)
    expected_pca, expected_spectrum = fit_statistics(stored, progress=False)
    assert torch.allclose(pca.covariance, expected_pca.covariance, rtol=1e-12)
    assert torch.allclose(spectrum.power, expected_spectrum.power, rtol=1e-11)
    assert spectrum.images == 10


def test_video_latents_give_per_frame_statistics(tmp_path):
    video = planted_latents(N=6, C=16, frames=5)  # [N, C, F, H, W]
    frames = video.transpose(1, 2).reshape(30, 16, 8, 8)
    pca, spectrum = fit_statistics(video.split(4), k=2, progress=False)
    expected_pca, expected_spectrum = fit_statistics(frames, k=2, progress=False)
    assert torch.allclose(pca.covariance, expected_pca.covariance, rtol=1e-12)
    assert torch.allclose(spectrum.power, expected_spectrum.power, rtol=1e-11)
    assert spectrum.frames == 5 and spectrum.images == 30 and pca.count == 30 * 64
    _save_latents(tmp_path / "video.safetensors", video)
    from_file = fit_statistics(tmp_path / "video.safetensors", progress=False, batch_size=4)[1]
    assert torch.allclose(from_file.power, expected_spectrum.power, rtol=1e-11)
    assert datasets.LatentFiles(tmp_path / "video.safetensors")[2].shape == (16, 5, 8, 8)
    with pytest.raises(ValueError, match="frames"):
        fit_statistics([video[:2], frames[:2]], progress=False)


def test_torch_load_is_weights_only(tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    _save_latents(tmp_path / "x.pt", planted_latents(N=3))
    fit_statistics(tmp_path / "x.pt", progress=False)
    assert calls and all(c.get("weights_only") is True for c in calls)
    assert any(c.get("mmap") for c in calls)
    monkeypatch.setattr(torch, "load", real_load)
    # a pickle that is not tensors is refused, and never run
    torch.save({"latents": planted_latents(N=2), "evil": _DictImages([], "x")}, tmp_path / "p.pt")
    with pytest.raises(datasets.DataError, match="not a readable pt file"):
        datasets.LatentFiles(tmp_path / "p.pt")


def test_latents_progress_bar(tmp_path, capsys, monkeypatch):
    _save_latents(tmp_path / "x.npy", planted_latents(N=9))
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)  # the plain fallback
    fit_statistics(tmp_path / "x.npy", progress=True, batch_size=4)
    err = capsys.readouterr().err
    assert "fitting: 3/3" in err


def test_bad_latent_files_are_named(tmp_path):
    x = planted_latents(N=4)
    nan = x.clone()
    nan[2, 1, 3, 3] = math.nan
    cases = {
        "empty.pt": None,
        "rank2.npy": np.zeros((4, 8), dtype=np.float32),
        "rank6.safetensors": torch.zeros(1, 2, 3, 4, 5, 6),
        "ints.pt": torch.zeros(2, 4, 8, 8, dtype=torch.int32),
        "bool.safetensors": torch.zeros(2, 4, 8, 8, dtype=torch.bool),
        "none.npy": np.zeros((0, 4, 8, 8), dtype=np.float32),
        "nhwc.pt": torch.zeros(2, 16, 16, 4),
        "nan.safetensors": nan,
    }
    messages = {"empty.pt": "the file is empty", "rank2.npy": "got shape [4, 8]",
                "rank6.safetensors": "[N, C, F, H, W]", "ints.pt": "floating point",
                "bool.safetensors": "floating point", "none.npy": "holds no latents",
                "nhwc.pt": "channels-last", "nan.safetensors": "latent 2 of the file contains NaN"}
    for name, value in cases.items():
        path = tmp_path / name
        if value is None:
            path.write_bytes(b"")
        elif isinstance(value, np.ndarray):
            np.save(path, value)
        else:
            _save_latents(path, value)
        with pytest.raises(datasets.DataError, match=__import__("re").escape(messages[name])) as info:
            fit_statistics(path, progress=False)
        assert str(path) in str(info.value)
    (tmp_path / "mixed").mkdir()
    _save_latents(tmp_path / "mixed" / "a.pt", x)
    _save_latents(tmp_path / "mixed" / "b.pt", x[:, :3])
    with pytest.raises(datasets.DataError, match="latents of one shape"):
        datasets.LatentFiles(tmp_path / "mixed")
    torch.save({"mu": x, "logvar": x}, tmp_path / "two.pt")
    with pytest.raises(datasets.DataError, match="pass key="):
        datasets.LatentFiles(tmp_path / "two.pt")
    assert len(datasets.LatentFiles(tmp_path / "two.pt", key="mu")) == 4
    with pytest.raises(datasets.DataError, match="no entry 'z'"):
        datasets.LatentFiles(tmp_path / "two.pt", key="z")
    with pytest.raises(ValueError, match="key: applies only"):
        fit_statistics(x, key="mu", progress=False)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(datasets.DataError, match="no latent files"):
        datasets.LatentFiles(tmp_path / "nothing")


def test_sd_vae_latent_recipe(tmp_path):
    """The README's recipe: a random-weight tiny AutoencoderKL encodes procedural images into a
    latent cache (scaled by the VAE's scaling_factor, as diffusers' training scripts do); the fit of
    the cache equals the fit of the latents, and `anisodiff fit` writes a 4-channel spec."""
    diffusers = pytest.importorskip("diffusers")
    import safetensors.torch

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    images = torch.stack(datasets.ProceduralImages(16, size=32, seed=0).__getitems__(range(16)))
    (tmp_path / "cache").mkdir()
    with torch.no_grad():
        for i, chunk in enumerate(images.split(8)):
            z = vae.encode(chunk).latent_dist.sample() * vae.config.scaling_factor
            safetensors.torch.save_file({"latents": z.contiguous()}, str(tmp_path / "cache" / f"{i}.safetensors"))
    cache = torch.cat([safetensors.torch.load_file(str(tmp_path / "cache" / f"{i}.safetensors"))
                       ["latents"] for i in range(2)])
    assert cache.shape == (16, 4, 16, 16)
    pca, spectrum = fit_statistics(tmp_path / "cache", k=1, progress=False)
    expected_pca, expected_spectrum = fit_statistics(cache, k=1, progress=False)
    assert torch.allclose(pca.covariance, expected_pca.covariance, rtol=1e-12)
    assert torch.allclose(spectrum.power, expected_spectrum.power, rtol=1e-11)
    from anisodiff import cli

    out, report = tmp_path / "spec.json", tmp_path / "stats.json"
    assert cli.main(["fit", str(tmp_path / "cache"), "-o", str(out), "--report", str(report)]) == 0
    assert ad.NoiseSpec.load(out).squeeze.channels == 4
    import json
    stats = json.loads(report.read_text())
    assert stats["shape"] == [4, 16, 16]
    assert stats["channels"]["std"] == pytest.approx(expected_pca.std.tolist(), rel=1e-9)


def test_a_large_folder_shows_header_progress(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(datasets.LatentFiles, "HEADER_PROGRESS", 4)
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)  # the plain fallback
    x = planted_latents(N=6)
    for i in range(6):
        np.save(tmp_path / f"{i}.npy", x[i].numpy())
    latents = datasets.LatentFiles(tmp_path)
    assert len(latents) == 6 and torch.equal(latents[5], x[5])
    assert "reading latent headers: 6/6" in capsys.readouterr().err


def test_band_cross_spectra_sum_to_the_power_and_the_covariance():
    from anisodiff import bands

    x = planted_latents(N=20, C=5, H=6, W=7)
    pca, spectrum = fit_statistics(x.split(6), progress=False)
    cross = spectrum.band_cross
    ring = bands.ring_index(6, 7)
    assert cross.shape == (int(ring.max()) + 1, 5, 5)
    assert torch.allclose(cross.diagonal(dim1=1, dim2=2).sum(1),
                          bands.ring_sums(spectrum.power.sum(0), ring), rtol=1e-11)
    assert torch.allclose(cross.sum(0) / 42, pca.covariance, rtol=1e-10)  # Parseval
    assert torch.allclose(cross, cross.transpose(1, 2), atol=1e-12)
    wide = fit_spectrum(torch.randn(2, 17, 4, 4), progress=False)
    assert wide.band_cross is None  # more channels than CROSS_SPECTRUM_CHANNELS
