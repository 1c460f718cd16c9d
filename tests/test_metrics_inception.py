"""FID and IS parity: minisd's Inception, Frechet distance and Inception Score against pytorch-fid and
torch-fidelity.

The reference networks get random weights (every BatchNorm statistic and bias perturbed, so a dropped
key shows) saved as .pth files in the pt_inception layout, and minisd loads those files through
`load_inception`, the function that loads the real weights.
"""

import urllib.error
from unittest import mock

import numpy as np
import pytest
import pytorch_fid.inception as pfid_inception
import scipy.linalg
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from pytorch_fid.fid_score import (calculate_activation_statistics, calculate_frechet_distance,
                                   compute_statistics_of_path)
from torch_fidelity import calculate_metrics
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.metric_isc import isc_features_to_metric

import minisd.metrics.inception_weights as ckpt
from minisd.checkpoints.remap import CheckpointError
from minisd.metrics import (feature_stats, folder_features, folder_stats, frechet_distance, inception_score,
                            load_stats, save_stats)
from minisd.metrics.inception import prepare, resize_tf1_bilinear


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the output's scale (tests/reference.py's measure, without its heavy
    imports)."""
    return ((a.float() - b.float()).abs().max() / a.float().abs().max().clamp(min=1.0)).item()


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in the pt_inception layout (torchvision's Inception3 names, 1008 classes), random.

    Convs get He-normal weights so that the signal survives 94 layers; BatchNorm weights, biases and
    running statistics are all moved away from their defaults.
    """
    template = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                               init_weights=False)
    gen = torch.Generator().manual_seed(seed)
    state = template.state_dict()
    for key, v in state.items():
        if key.endswith("conv.weight"):
            v.normal_(0, (2 / v[0].numel()) ** 0.5, generator=gen)
        elif key.endswith("running_var"):
            v.copy_(1 + 0.5 * torch.rand(v.shape, generator=gen))
        elif v.ndim == 1 and v.is_floating_point():
            v.add_(0.1 * torch.randn(v.shape, generator=gen))
    return state


def smooth_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Images in [0, 1] with structure at every scale: coarse colour blobs plus pixel noise."""
    gen = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 8, 8, generator=gen), size=(h, w), mode="bicubic")
    return (x + 0.3 * torch.rand(n, 3, h, w, generator=gen)).clamp(0, 1)


@pytest.fixture(scope="module")
def state():
    return random_inception_state()


@pytest.fixture(scope="module")
def weights(state, tmp_path_factory):
    """The same weights as the two reference files store them: pytorch-fid's, with BatchNorm's
    num_batches_tracked (a torchvision model's state dict), and torch-fidelity's converter output without
    it."""
    folder = tmp_path_factory.mktemp("weights")
    torch.save(state, folder / ckpt.FILENAMES[0])
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
               folder / ckpt.FILENAMES[1])
    return folder / ckpt.FILENAMES[0], folder / ckpt.FILENAMES[1]


@pytest.fixture(scope="module")
def pytorch_fid_net(state):
    """pytorch-fid's InceptionV3 (FID blocks, pool3 output) with the random weights instead of its
    download."""
    with mock.patch.object(pfid_inception, "load_state_dict_from_url", lambda *args, **kwargs: state):
        return pfid_inception.InceptionV3([3]).eval()


@pytest.fixture(scope="module")
def model(weights):
    return ckpt.load_inception(weights[0])


@pytest.mark.parametrize("n,size", [(2, (256, 256)), (1, (180, 240))])
@torch.no_grad()
def test_pool_and_logits_match_pytorch_fid(pytorch_fid_net, state, model, n, size):
    x = smooth_images(n, *size, seed=size[1])
    ref_pool = pytorch_fid_net(x)[0].flatten(1)  # [B, 2048, 1, 1] -> [B, 2048]
    ref_logits = ref_pool @ state["fc.weight"].T + state["fc.bias"]
    pool, logits = model(x)
    assert pool.shape == (n, 2048) and logits.shape == (n, 1008)
    if n > 1:  # the images are told apart, so the check has teeth
        assert (ref_pool[0] - ref_pool[1]).abs().max() > 1e-3
    assert rel_diff(ref_pool, pool) < 1e-4
    assert rel_diff(ref_logits, logits) < 1e-4


@torch.no_grad()
def test_pool_and_unbiased_logits_match_torch_fidelity(weights, model):
    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=str(weights[1]))
    images = (smooth_images(2, 200, 256, seed=3) * 255).round().to(torch.uint8)
    ref_pool, ref_logits = ref(images)
    fidelity_model = ckpt.load_inception(weights[1])  # torch-fidelity's file loads through the same rules
    pool, _ = fidelity_model(images, resize="torch-fidelity")
    assert rel_diff(ref_pool, pool) < 1e-4
    assert rel_diff(ref_logits, model.unbiased_logits(pool)) < 1e-4
    # float images in [0, 1] take the same path, quantised to 8 bits first
    assert torch.equal(prepare(images.float() / 255, "torch-fidelity"), prepare(images, "torch-fidelity"))


@pytest.mark.parametrize("size", [(256, 256), (64, 80), (512, 300), (299, 299)])
def test_tf1_resize_matches_torch_fidelity(size):
    x = torch.randint(0, 256, (2, 3, *size)).float()
    ref = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert torch.equal(resize_tf1_bilinear(x), ref)


# the last: N < D, singular
@pytest.mark.parametrize("seed,n,d", [(0, 300, 64), (1, 500, 64), (2, 200, 32), (3, 40, 64)])
def test_frechet_distance_matches_pytorch_fid(seed, n, d):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / d**0.5
    a = rng.normal(size=(n, d)) @ mix
    b = rng.normal(size=(n, d)) @ (mix + 0.1 * rng.normal(size=(d, d))) + 0.2
    (mu1, s1), (mu2, s2) = feature_stats(a), feature_stats(b)
    np.testing.assert_array_equal(mu1, np.mean(a, axis=0))
    np.testing.assert_array_equal(s1, np.cov(a, rowvar=False))
    with np.testing.suppress_warnings() as sup:
        sup.filter(Warning)
        ref = calculate_frechet_distance(mu1, s1, mu2, s2)
        ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours > 0
    assert abs(ours - ref) <= 1e-6 * abs(ref)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6 * abs(ref))


def test_frechet_distance_eps_offset_matches_pytorch_fid(monkeypatch):
    """When sqrtm of the product fails (non-finite), both add eps to the diagonals and retry.

    Recent scipy rarely returns non-finite values even for singular products, so the failure is forced.
    """
    rng = np.random.default_rng(4)
    (mu1, s1), (mu2,
                s2) = feature_stats(rng.normal(size=(20, 32))), feature_stats(rng.normal(size=(20, 32)) + 0.1)
    sqrtm = scipy.linalg.sqrtm

    def failing_on_raw_product(a, *args, **kwargs):
        result = sqrtm(a, *args, **kwargs)
        if np.array_equal(a, s1.dot(s2)):
            return (np.full_like(result[0], np.nan),
                    result[1]) if isinstance(result, tuple) else np.full_like(result, np.nan)
        return result

    monkeypatch.setattr(scipy.linalg, "sqrtm", failing_on_raw_product)
    with pytest.warns(UserWarning, match="adding 1e-06 to diagonal"):
        ours = frechet_distance(mu1, s1, mu2, s2)
    ref = calculate_frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(ours) and abs(ours - ref) <= 1e-6 * abs(ref)


@pytest.mark.parametrize("n,splits,shuffle", [(1000, 10, True), (103, 10, True), (57, 3, False)])
def test_inception_score_matches_torch_fidelity(n, splits, shuffle):
    logits = 3 * torch.randn(n, 1008, generator=torch.Generator().manual_seed(n))
    ref = isc_features_to_metric(logits, splits=splits, shuffle=shuffle, rng_seed=2020)
    mean, std = inception_score(logits, splits=splits, shuffle=shuffle, seed=2020)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-12)
    assert inception_score(logits.numpy(), splits=splits, shuffle=shuffle) == (mean, std)


def test_stats_files_interchange_with_pytorch_fid(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = feature_stats(rng.normal(size=(50, 16)))
    ours = save_stats(tmp_path / "ours.npz", mu, sigma, size=256)
    ref_mu, ref_sigma = compute_statistics_of_path(str(ours), None, 1, 16, "cpu")  # pytorch-fid reads ours
    np.testing.assert_array_equal(ref_mu, mu)
    np.testing.assert_array_equal(ref_sigma, sigma)
    np.savez_compressed(tmp_path / "theirs.npz", mu=mu, sigma=sigma)  # as pytorch-fid's --save-stats writes
    got_mu, got_sigma, meta = load_stats(tmp_path / "theirs.npz")
    np.testing.assert_array_equal(got_mu, mu)
    assert meta == {}
    assert load_stats(ours)[2] == {"size": 256}


def test_stats_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz.*--save-stats"):
        load_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", mu=np.zeros(4))
    with pytest.raises(ValueError, match="lacks sigma"):
        load_stats(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match=r"\.npz"):
        save_stats(tmp_path / "stats.txt", np.zeros(4), np.eye(4))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Three 64x48 images as a real folder has them: PNG and JPG, RGB and greyscale."""
    folder = tmp_path_factory.mktemp("images")
    pixels = (smooth_images(3, 48, 64, seed=7) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    Image.fromarray(pixels[0]).save(folder / "d.jpg", quality=95)
    Image.fromarray(pixels[1]).save(folder / "a.png")
    Image.fromarray(pixels[2]).convert("L").save(folder / "b.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.mark.slow
def test_folder_stats_and_is_match_references(image_folder, pytorch_fid_net, weights, model):
    found = folder_features(image_folder, model, batch_size=2, fid=True, isc=True, progress=False)
    assert [p.name for p in found.files] == ["a.png", "b.png", "d.jpg"] and found.size == (48, 64)

    ref_mu, ref_sigma = calculate_activation_statistics(found.files, pytorch_fid_net, batch_size=2,
                                                        device="cpu", num_workers=0)
    mu, sigma = feature_stats(found.pool)
    assert rel_diff(torch.from_numpy(ref_mu), torch.from_numpy(mu)) < 1e-4
    assert rel_diff(torch.from_numpy(ref_sigma), torch.from_numpy(sigma)) < 1e-4

    # torch-fidelity end to end, as `fidelity --isc` runs it (one split for three images)
    ref = calculate_metrics(input1=str(image_folder), isc=True, isc_splits=1, cuda=False, cache=False,
                            verbose=False, feature_extractor_weights_path=str(weights[1]), save_cpu_ram=True)
    mean, std = inception_score(found.logits, splits=1)
    # random weights give nearly flat class posteriors, so the score is 1 + a small KL: compare the KL part
    assert mean - 1 == pytest.approx(ref["inception_score_mean"] - 1, rel=1e-4) and mean - 1 > 1e-7


def test_folder_errors(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="no png/jpg/jpeg images"):
        folder_features(tmp_path, model, progress=False)
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    Image.new("RGB", (32, 40)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"b\.png is 40x32 .* 32x32"):
        folder_features(tmp_path, model, progress=False)
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*b\.png"):
        folder_features(tmp_path, model, progress=False)
    Image.new("RGB", (32, 32), "red").save(tmp_path / "b.png")
    mu, sigma, size = folder_stats(tmp_path, model, progress=False)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and size == (32, 32)


def test_strict_loading_names_keys(state):
    broken = {k: v for k, v in state.items() if k != "Mixed_6c.branch7x7dbl_4.bn.running_var"}
    broken["AuxLogits.fc.weight"] = torch.zeros(1)
    broken["fc.bias"] = torch.zeros(1000)
    with pytest.raises(CheckpointError) as err:
        ckpt.load_inception_state(ckpt.InceptionV3(), broken)
    for name in ("Mixed_6c.branch7x7dbl_4.bn.running_var", "AuxLogits.fc.weight", "fc.bias"):
        assert name in str(err.value)


def test_offline_download_names_url_and_place(tmp_path, monkeypatch):
    def offline(url, dest):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(ckpt, "_download", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ConnectionError) as err:
        ckpt.find_weights(cache=tmp_path / "metrics")
    message = str(err.value)
    assert ckpt.URL in message and str(tmp_path / "metrics" / ckpt.FILENAMES[0]) in message
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        ckpt.load_inception(tmp_path / "nowhere.pth")
