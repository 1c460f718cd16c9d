"""U-Net single-file (LDM) layout: minisd's table-derived key names must be the ones diffusers'
own converter reads, for SD and every BK-SDM variant of both families."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from reference import perturb_, rel_diff
from test_unet import BK_CHANGES, reduced_config

from minisd.checkpoints.diffusers import load_unet
from minisd.checkpoints.ldm import UNET_PREFIX, detect_unet, unet_from_ldm, unet_to_ldm
from minisd.table import TEACHERS, VARIANTS, variant
from minisd.unet import UNet


@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize("name", list(BK_CHANGES))
def test_ldm_keys_read_by_diffusers_converter(family, name, tmp_path):
    cfg = reduced_config(family, name)
    torch.manual_seed(0)
    ref = perturb_(UNet2DConditionModel(**cfg)).eval()
    ref.save_pretrained(tmp_path)
    mine = load_unet(tmp_path)
    ldm_sd = unet_to_ldm(mine)
    assert all(k.startswith(UNET_PREFIX) for k in ldm_sd)

    # diffusers' converter, fed minisd's single-file keys, must give back diffusers' own weights
    converted = convert_ldm_unet_checkpoint(dict(ldm_sd), dict(ref.config))
    expected = ref.state_dict()
    assert set(converted) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(converted[key].reshape(tensor.shape), tensor), key

    # and minisd reads the single-file keys back to the same model
    again = unet_from_ldm(ldm_sd, mine.config).eval()
    x, context = torch.randn(1, 4, 16, 16), torch.randn(1, 77, cfg["cross_attention_dim"])
    with torch.no_grad():
        assert rel_diff(ref(x, 250, context).sample, again(x, 250, context)) <= 1e-4


@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_detects_family_and_variant(family, name):
    table = variant(TEACHERS[family], name)
    with torch.device("meta"):
        sd = unet_to_ldm(UNet(table))
    found = detect_unet({k[len(UNET_PREFIX):]: v for k, v in sd.items()})
    assert found == table


def test_unknown_unet_is_refused():
    with torch.device("meta"):
        sd = unet_to_ldm(UNet(variant(TEACHERS["v1"], "small")))
    sd = {k[len(UNET_PREFIX):]: v for k, v in sd.items()}
    sd.pop("output_blocks.1.0.in_layers.2.weight")
    with pytest.raises(ValueError, match="not an SD-v1 U-Net nor a BK-SDM student"):
        detect_unet(sd)
