"""BK-SDM's knowledge distillation (Kim et al., arXiv 2305.15798, sec. 3.2), read off the table.

A student table (minisd/table.py) records which teacher blocks each of its blocks replaces, so:
- student init: every student block starts from the weights of the teacher block it replaces
  (BK-SDM's `--use_copy_weight_from_teacher`);
- feature KD: the student's stage outputs are matched to the teacher's at the same stages;
- the loss: lambda_sd * task loss + lambda_out * output KD + lambda_feat * sum of feature KD.
No key is listed by hand: tests/test_distill.py checks that what these functions derive equals
BK-SDM's published lists.
"""

import torch
import torch.nn.functional as F

from minisd.table import UNetTable
from minisd.unet import UNet


def init_map(student: UNetTable, teacher: UNetTable) -> dict[str, str]:
    """Student native-name prefix -> the teacher prefix whose weights it starts from.

    Stage s of a student is stage s of its teacher (removing the innermost stage, as tiny does,
    leaves the outer ones in place); within a stage, student block j is the teacher block with
    the teacher index the table lists at position j.
    """
    prefixes = {p: p for p in ("conv_in.", "time_embed.", "norm_out.", "conv_out.")}
    if student.mid:
        if not teacher.mid:
            raise ValueError(f"{student.name} has a mid block but its teacher {teacher.name} has none")
        prefixes["mid."] = "mid."
    for s, stage in enumerate(student.stages):
        t_stage = teacher.stages[s]
        for path, kept, t_kept in (("down", stage.down, t_stage.down), ("up", stage.up, t_stage.up)):
            for j, index in enumerate(kept):
                if index not in t_kept:
                    raise ValueError(f"{student.name} keeps {path} block {index} of stage {s}, "
                                     f"which the teacher {teacher.name} does not have")
                prefixes[f"{path}.{s}.blocks.{j}."] = f"{path}.{s}.blocks.{t_kept.index(index)}."
        if s < len(student.stages) - 1:
            prefixes[f"down.{s}.downsample."] = f"down.{s}.downsample."
        if s > 0:
            prefixes[f"up.{s}.upsample."] = f"up.{s}.upsample."
    return prefixes


@torch.no_grad()
def student_from_teacher(teacher: UNet, student_table: UNetTable) -> UNet:
    """A student U-Net initialised from the teacher's weights (strict: every tensor is copied)."""
    student = UNet(student_table).to(next(teacher.parameters()).device)
    prefixes = init_map(student_table, teacher.config)
    source = teacher.state_dict()
    weights = {}
    for key, target in student.state_dict().items():
        prefix = next(p for p in prefixes if key.startswith(p))
        t_key = prefixes[prefix] + key[len(prefix):]
        if source[t_key].shape != target.shape:
            raise ValueError(f"student {key} {tuple(target.shape)} cannot start from teacher {t_key} "
                             f"{tuple(source[t_key].shape)}")
        weights[key] = source[t_key]
    student.load_state_dict(weights, strict=True)
    return student


def feature_pairs(student: UNetTable, teacher: UNetTable) -> list[tuple[str, str]]:
    """(teacher tap, student tap) pairs for feature KD; tap names as UNet.forward's `taps`.

    Every student stage's down output and up output is matched to the teacher's at the same stage.
    One exception follows from the table: where removing the innermost stage took a stage's
    downsampler away (tiny's last stage), its output no longer has the teacher's resolution, so
    the stage's last SpatialTransformer projection is matched instead, before any downsampling.
    """
    pairs = []
    for s, stage in enumerate(student.stages):
        same_end = (s < len(student.stages) - 1) == (s < len(teacher.stages) - 1)
        if same_end:
            pairs.append((f"down.{s}", f"down.{s}"))
        elif stage.attention and stage.down:
            last_teacher = len(teacher.stages[s].down) - 1
            pairs.append((f"down.{s}.blocks.{last_teacher}.attn.proj_out",
                          f"down.{s}.blocks.{len(stage.down) - 1}.attn.proj_out"))
    pairs += [(f"up.{s}", f"up.{s}") for s in reversed(range(len(student.stages)))]  # in execution order
    return pairs


def kd_losses(student_out: torch.Tensor, target: torch.Tensor, teacher_out: torch.Tensor,
              student_feats: dict[str, torch.Tensor], teacher_feats: dict[str, torch.Tensor],
              pairs: list[tuple[str, str]], weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """BK-SDM's three terms, each a mean squared error computed in fp32 (BK-SDM eq. 3-5).

    sd:   the ordinary denoising loss against the target (noise, or velocity for v-prediction), each
          sample's error scaled by weights [B] if given (train.py --snr-gamma; BK-SDM uses none);
    out:  output-level KD against the teacher's prediction;
    feat: feature-level KD, the sum over the pairs of each pair's MSE.
    Without a teacher (teacher_out None: plain training) out and feat are 0.
    """
    mse = lambda a, b: F.mse_loss(a.float(), b.float())  # noqa: E731
    zero = student_out.new_zeros((), dtype=torch.float32)
    feat = sum(mse(student_feats[s], teacher_feats[t]) for t, s in pairs) if pairs else zero
    out = mse(student_out, teacher_out) if teacher_out is not None else zero
    if weights is None:
        sd = mse(student_out, target)
    else:  # per-sample mean over [C, H, W], then the weighted mean over the batch
        sd = (weights.float() * (student_out.float() - target.float()).pow(2).flatten(1).mean(1)).mean()
    return {"sd": sd, "out": out, "feat": feat}


def total_loss(losses: dict[str, torch.Tensor], lambda_sd: float = 1.0, lambda_out: float = 1.0,
               lambda_feat: float = 1.0) -> torch.Tensor:
    """BK-SDM's weighted sum; all weights 1.0 in the paper (scores were insensitive to lambda_feat)."""
    return lambda_sd * losses["sd"] + lambda_out * losses["out"] + lambda_feat * losses["feat"]
