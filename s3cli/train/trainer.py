"""``s3 train``'s engine: network set-up, optimiser, schedule, AMP, DDP, checkpoints, logs.

Distributed training uses ``torchrun`` (``torch.distributed.run``): when ``WORLD_SIZE`` > 1 the
process group is initialised from torchrun's environment variables, with the NCCL backend on
CUDA and gloo on the CPU; the network is wrapped in DistributedDataParallel and the global batch
is divided among the processes. Only rank 0 writes files.

Every iteration re-seeds the random generators from ``(seed, rank, iteration)`` and the data of
an iteration is a pure function of the same numbers, so a run resumed from a checkpoint takes
exactly the steps an uninterrupted run takes. Checkpoints (``OUTPUT/checkpoint.pth``) hold
``{"weights", "optimizer", "scheduler", "scaler", "it", "rng", "model", "config"}``; they are
written atomically (temporary file, fsync, rename) and ``s3 segment --weights`` reads them as
they are.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from s3cli.errors import CheckpointError, InputError, OutputError
from s3cli.model.checkpoint import (
    check_state_dict,
    detect_model,
    read_checkpoint,
    widen_single_object,
)
from s3cli.model.network import VOSNetwork
from s3cli.model.registry import build_network
from s3cli.train.config import TrainConfig
from s3cli.train.data import (
    IterationSampler,
    SourceDataset,
    VOSTrainDataset,
    collate,
    scan_dataset,
)
from s3cli.train.losses import LossComputer
from s3cli.train.wrapper import TrainWrapper, add_drop_path, forward_batch, set_train_mode

__all__ = [
    "DistEnv",
    "init_distributed",
    "official_init_",
    "load_backbone_weights",
    "build_training_network",
    "parameter_groups",
    "atomic_save",
    "Trainer",
    "TrainResult",
    "run_training",
    "CHECKPOINT_NAME",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pth"
_EMBEDDING_SUFFIXES = ("summary_pos.weight", "query_init.weight", "query_emb.weight",
                       "obj_pe.weight")


# ---------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: rank, local rank, world size and device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available here (use --device cpu)")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if name in ("cpu", "mps"):
        return torch.device(name)
    raise InputError(f"--device {name}: choose auto, cpu, cuda or mps")


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world > 1:
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group(backend=backend)
        rank, world = dist.get_rank(), dist.get_world_size()
    elif dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistEnv(rank, local_rank, world, dev)


# ---------------------------------------------------------------------------------- network
@torch.no_grad()
def official_init_(net: VOSNetwork) -> VOSNetwork:
    """The initialisation the official code gives modules beyond PyTorch's defaults: orthogonal
    key projection (zero bias), Xavier-normal sensory GRU transforms, and for S3 the adapter's
    ViT-Adapter initialisation (truncated-normal linears, He-normal convolutions, unit norms,
    Deformable-DETR attention)."""
    from s3cli.model.sensory import SensoryDeepUpdater, SensoryUpdater

    nn.init.orthogonal_(net.key_proj.key_proj.weight)
    nn.init.zeros_(net.key_proj.key_proj.bias)
    for m in net.modules():
        if isinstance(m, (SensoryUpdater, SensoryDeepUpdater)):
            nn.init.xavier_normal_(m.transform.weight)
    if net.cfg.pixel_encoder.type == "vit_adapter":
        from s3cli.model.layers.deformable_attention import MSDeformAttn

        enc = net.pixel_encoder

        def init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                m.weight.normal_(0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        for part in (enc.up, enc.spm, enc.interactions):
            part.apply(init)
        for m in enc.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
    return net


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"{path}: no such weights file (check --backbone)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises many types
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({exc})") from exc
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "weights"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds no state_dict (not a weights file)")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in ("module.", "pretrained.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


@torch.no_grad()
def _load_vit(net: VOSNetwork, sd: dict[str, torch.Tensor], path: Path) -> str:
    vit = net.pixel_encoder.vit_module
    target = vit.state_dict()
    sd = {k: v for k, v in sd.items() if k in target}
    patch = sd.get("patch_embed.proj.weight")
    want = target["patch_embed.proj.weight"]
    if patch is not None and patch.shape[-2:] != want.shape[-2:]:
        # DINOv2 / Depth-Anything ViTs use 14x14 patches; S3 resizes them to 16x16 (official).
        sd["patch_embed.proj.weight"] = torch.nn.functional.interpolate(
            patch.float(), size=tuple(want.shape[-2:]), mode="bilinear", align_corners=True
        )
    missing = [k for k in target if k not in sd and k != "mask_token"]
    if missing:
        raise CheckpointError(
            f"{path}: not a ViT-B weights file for S3 ({len(missing)} ViT keys missing, e.g. "
            f"{missing[0]}; give DINOv2 / Depth-Anything ViT-B weights)"
        )
    shapes = [k for k in sd if sd[k].shape != target[k].shape]
    if shapes:
        k = shapes[0]
        raise CheckpointError(
            f"{path}: {k} is {tuple(sd[k].shape)}, S3's ViT needs {tuple(target[k].shape)} "
            "(give ViT-B weights)"
        )
    vit.load_state_dict({**target, **sd}, strict=True)
    return f"ViT from {path}"


@torch.no_grad()
def _load_resnet(module: nn.Module, sd: dict[str, torch.Tensor], rename: dict[str, str]
                 ) -> bool:
    """Load torchvision ResNet weights into ``module`` (renaming prefixes) when every entry of
    the module's trunk fits; a wider first conv keeps the extra input channels (orthogonal
    initialisation of the extra channels, as the official code)."""
    target = module.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        for src, dst in rename.items():
            if k.startswith(src):
                k = dst + k[len(src):]
                break
        if k in target:
            mapped[k] = v
    trunk = [k for k in target if k.split(".")[0] in ("conv1", "bn1", "res2", "layer1", "layer2",
                                                       "layer3")]
    if not trunk or any(k not in mapped for k in trunk if "num_batches_tracked" not in k):
        return False
    for k in trunk:
        if k not in mapped:
            continue
        v, t = mapped[k], target[k]
        if k == "conv1.weight" and v.shape[1] < t.shape[1] and v.shape[0] == t.shape[0]:
            pad = torch.empty(t.shape[0], t.shape[1] - v.shape[1], *t.shape[2:])
            nn.init.orthogonal_(pad)
            v = torch.cat([v, pad], dim=1)
            mapped[k] = v
        if v.shape != t.shape:
            return False
    module.load_state_dict({**target, **{k: mapped[k] for k in trunk if k in mapped}})
    return True


def load_backbone_weights(net: VOSNetwork, path: str | Path) -> str:
    """Initialise the image backbone from a weights file: ViT-B (DINOv2 / Depth-Anything
    layout, patch size 14 or 16) for S3; torchvision ImageNet ResNet for Cutie (the pixel
    encoder when the depth fits, and the mask encoder's ResNet-18 trunk from ResNet-18
    weights). Returns what was loaded."""
    path = Path(path)
    sd = _read_weights_file(path)
    if net.cfg.pixel_encoder.type == "vit_adapter":
        return _load_vit(net, sd, path)
    loaded = []
    if _load_resnet(net.pixel_encoder, sd, {"layer1.": "res2."}):
        loaded.append("pixel encoder")
    if _load_resnet(net.mask_encoder, sd, {}):
        loaded.append("mask encoder")
    if not loaded:
        raise CheckpointError(
            f"{path}: fits neither the {net.cfg.pixel_encoder.type} pixel encoder nor the "
            "ResNet-18 mask encoder (give torchvision ImageNet ResNet weights)"
        )
    return f"{' and '.join(loaded)} from {path}"


def build_training_network(cfg: TrainConfig, say: Callable[[str], None] = log.info
                           ) -> VOSNetwork:
    """The network of ``cfg.model``: official initialisation, then ``--backbone`` weights,
    then the ``--init`` checkpoint (strict, widened from single-object if needed)."""
    sd: dict[str, torch.Tensor] | None = None
    if cfg.init:
        path = Path(cfg.init)
        sd = read_checkpoint(path)
        model = detect_model(sd, path)
        if model != cfg.model:
            raise CheckpointError(f"{path}: is a {model} checkpoint, not {cfg.model} (--model)")
    net = build_network(cfg.model)
    official_init_(net)
    for path in cfg.backbone:
        say(f"backbone: {load_backbone_weights(net, path)}")
    if sd is not None:
        path = Path(str(cfg.init))
        sd = widen_single_object(sd, net.cfg.sensory_dim)
        expected = net.state_dict()
        check_state_dict(sd, expected, path, cfg.model)
        net.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)
        say(f"initialised from {path}")
    elif cfg.model == "s3-base" and not cfg.backbone:
        say("warning: S3's ViT is frozen and starts random: give --backbone ViT weights "
            "(or --init a checkpoint)")
    return net


def parameter_groups(net: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Backbone (``pixel_encoder.*``: lr x backbone_lr_ratio), embeddings (no weight decay) and
    the rest, as the official ``get_parameter_groups`` (which matches embeddings by name
    suffix, so ``summary_to_query_init.weight`` counts as one too)."""
    backbone, embed, other = [], [], []
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("pixel_encoder."):
            backbone.append(p)
        elif name.endswith(_EMBEDDING_SUFFIXES):
            embed.append(p)
        else:
            other.append(p)
    return [
        {"params": backbone, "lr": cfg.lr * cfg.backbone_lr_ratio,
         "weight_decay": cfg.weight_decay},
        {"params": embed, "lr": cfg.lr, "weight_decay": cfg.embed_weight_decay},
        {"params": other, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
    ]


# ---------------------------------------------------------------------------------- files
def atomic_save(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write the checkpoint ({exc.strerror})") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _rng_state() -> dict[str, Any]:
    state = np.random.get_state()
    py = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(state[1].astype(np.int64)), "pos": int(state[2]),
                  "has_gauss": int(state[3]), "cached_gaussian": float(state[4])},
        "python": [py[0], list(py[1]), py[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)


def _step_seed(seed: int, rank: int, it: int) -> int:
    return int(np.random.SeedSequence([seed, rank, it, 0x57E9]).generate_state(1)[0])


def _worker_init(_worker_id: int) -> None:
    """Loader processes decode and warp one sample at a time: one thread each."""
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def param_digest(net: nn.Module) -> str:
    """SHA-256 of all parameters' bytes (in state_dict order)."""
    h = hashlib.sha256()
    for _, p in net.named_parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class CsvLog:
    """Rows of logged values; on resume rows after the resumed iteration are dropped."""

    def __init__(self, path: Path, resume_it: int) -> None:
        self.path = path
        self.fields: list[str] | None = None
        rows: list[dict[str, str]] = []
        if path.is_file() and resume_it > 0:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or []) or None
                rows = [r for r in reader if int(r.get("it", "0") or 0) <= resume_it]
        if self.fields is not None:
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, self.fields)
                w.writeheader()
                w.writerows(rows)
        elif path.exists():
            path.unlink()

    def write(self, row: Mapping[str, float | int]) -> None:
        if self.fields is None:
            self.fields = list(row)
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, self.fields).writeheader()
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )


# ---------------------------------------------------------------------------------- trainer
@dataclass
class TrainResult:
    iteration: int
    output: Path
    checkpoint: Path | None
    last_losses: dict[str, float]
    param_digests: list[str]
    seconds: float


ProgressFn = Callable[[int, int, Mapping[str, float]], None]


class Trainer:
    """Owns the network, optimiser, schedule and scaler of one training process."""

    def __init__(self, cfg: TrainConfig, env: DistEnv | None = None, *,
                 say: Callable[[str], None] = log.info) -> None:
        self.cfg = cfg.validate()
        self.env = env or DistEnv(device=_pick_device(cfg.device, 0))
        self.say = say if self.env.is_main else (lambda _m: None)
        if cfg.batch_size % self.env.world_size:
            raise InputError(
                f"--batch-size {cfg.batch_size}: must be divisible by the {self.env.world_size} "
                "processes"
            )
        self.local_batch = cfg.batch_size // self.env.world_size
        device = self.env.device
        self.output = Path(cfg.output)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed crop sizes (official setting)

        # Identical initial weights on every rank (DDP also broadcasts them from rank 0).
        torch.manual_seed(cfg.seed)
        net = build_training_network(cfg, self.say)
        self.drop_path_hooks = (
            add_drop_path(net, cfg.drop_path) if net.cfg.pixel_encoder.type == "vit_adapter"
            else []
        )
        net.to(device)
        if self.env.distributed and device.type == "cuda" and cfg.model == "s3-base":
            # the adapter's batch norms are synchronised across GPUs, as the official model
            net.pixel_encoder = nn.SyncBatchNorm.convert_sync_batchnorm(net.pixel_encoder)
        self.net = net
        self.use_amp = cfg.amp and device.type == "cuda"
        amp_dtype = getattr(torch, cfg.amp_dtype) if self.use_amp else None
        self.wrapper = TrainWrapper(net, mem_frames=cfg.mem_frames,
                                    deep_update_prob=cfg.deep_update_prob, amp_dtype=amp_dtype)
        set_train_mode(net)
        self.model: nn.Module = self.wrapper
        if self.env.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.wrapper,
                device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False,
                # with 2 frames the decoder's sensory update of the last frame is unused
                find_unused_parameters=cfg.seq_length < 3,
            )
        self.optimizer = torch.optim.AdamW(
            parameter_groups(net, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
            eps=1e-6 if self.use_amp else 1e-8,
        )
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, cfg.lr_milestones(), cfg.lr_gamma
        )
        self.scaler = (
            torch.amp.GradScaler("cuda", init_scale=8192)
            if self.use_amp and cfg.amp_dtype == "float16" else None
        )
        self.loss = LossComputer(cfg.points, cfg.oversample_ratio, cfg.importance_ratio,
                                 cfg.sensory_aux_weight, cfg.query_aux_weight)
        self.iteration = 0

    # ------------------------------------------------------------------ data
    def scan_data(self) -> list[SourceDataset]:
        sources = [scan_dataset(d, seq_length=self.cfg.seq_length,
                                davis_repeat=self.cfg.davis_repeat) for d in self.cfg.data]
        for s in sources:
            self.say(s.describe())
        return sources

    def make_dataset(self, sources: list[SourceDataset] | None = None) -> VOSTrainDataset:
        cfg = self.cfg
        return VOSTrainDataset(
            sources if sources is not None else self.scan_data(),
            seq_length=cfg.seq_length, crop_size=cfg.crop_size, num_objects=cfg.num_objects,
            merge_prob=cfg.merge_prob, seed=cfg.seed, rank=self.env.rank,
            local_batch=self.local_batch, world_size=self.env.world_size,
            max_skip_at=cfg.max_skip_at,
        )

    def make_loader(self, dataset: VOSTrainDataset, start: int, stop: int) -> DataLoader:
        workers = self.cfg.workers
        return DataLoader(
            dataset,
            batch_size=self.local_batch,
            sampler=IterationSampler(start, stop, self.local_batch),  # type: ignore[arg-type]
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.env.device.type == "cuda",
            prefetch_factor=2 if workers else None,
            persistent_workers=False,
            worker_init_fn=_worker_init if workers else None,
        )

    # ------------------------------------------------------------------ steps
    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        dev = self.env.device
        return {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in batch.items()}

    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        batch = self._to_device(batch)
        out = forward_batch(self.model, batch)
        num = [int(n) for n in batch["num_objects"].tolist()]
        return self.loss(out, batch["cls_gt"], num)

    def train_step(self, batch: Mapping[str, Any], it: int | None = None) -> dict[str, float]:
        """One optimisation step on ``batch`` as iteration ``it`` (0-based; default: the next
        one). Returns the loss terms, ``grad_norm`` and ``lr`` as floats."""
        it = self.iteration if it is None else it
        torch.manual_seed(_step_seed(self.cfg.seed, self.env.rank, it))
        set_train_mode(self.net)
        lr = self.scheduler.get_last_lr()[-1]
        losses = self.compute_losses(batch)
        total = losses["total_loss"]
        if not torch.isfinite(total):
            raise FloatingPointError(f"iteration {it + 1}: the loss is {total.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        params = [p for p in self.net.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
            grad_norm = nn.utils.clip_grad_norm_(params, self.cfg.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            total.backward()
            grad_norm = nn.utils.clip_grad_norm_(params, self.cfg.clip_grad_norm)
            self.optimizer.step()
        self.scheduler.step()
        self.iteration = it + 1
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["grad_norm"] = float(grad_norm)
        out["lr"] = lr
        return out

    @torch.no_grad()
    def evaluate_loss(self, batch: Mapping[str, Any], seed: int = 0) -> float:
        """The total loss of ``batch`` with fixed randomness (point samples, memory choice) and
        no update: for comparing weights before and after training."""
        torch.manual_seed(seed)
        set_train_mode(self.net)
        return float(self.compute_losses(batch)["total_loss"])

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.output / CHECKPOINT_NAME

    def state(self) -> dict[str, Any]:
        return {
            "weights": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "it": self.iteration,
            "rng": _rng_state(),
            "model": self.cfg.model,
            "config": self.cfg.to_dict(),
            "format": "s3cli-train-1",
        }

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes ``checkpoint.pth`` (resumable) and ``weights_<it>.pth``."""
        if not self.env.is_main:
            return None
        state = self.state()
        atomic_save(state, self.checkpoint_path)
        atomic_save({"weights": state["weights"], "it": self.iteration, "model": self.cfg.model},
                    self.output / f"weights_{self.iteration:06d}.pth")
        return self.checkpoint_path

    def load_checkpoint(self, path: Path) -> int:
        try:
            state = torch.load(path, map_location=self.env.device, weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{path}: not a readable training checkpoint ({type(exc).__name__}; delete it or "
                "use --no-resume)"
            ) from exc
        if not isinstance(state, dict) or "optimizer" not in state or "it" not in state:
            raise CheckpointError(
                f"{path}: not a training checkpoint (no optimizer state; use --init to start from "
                "weights, or --no-resume)"
            )
        if state.get("model") != self.cfg.model:
            raise CheckpointError(
                f"{path}: belongs to a {state.get('model')} run, not {self.cfg.model} (use the "
                "same --model or another --output)"
            )
        self.net.load_state_dict(state["weights"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("rng"):
            _set_rng_state(state["rng"])
        self.iteration = int(state["it"])
        return self.iteration

    # ------------------------------------------------------------------ loop
    def _reduce(self, sums: dict[str, float], count: int) -> dict[str, float]:
        keys = sorted(sums)
        values = torch.tensor([sums[k] / max(count, 1) for k in keys], dtype=torch.float64)
        if self.env.distributed:
            t = values.to(self.env.device)
            dist.all_reduce(t)
            values = t.cpu() / self.env.world_size
        return dict(zip(keys, values.tolist(), strict=True))

    def fit(self, *, progress: ProgressFn | None = None,
            sources: list[SourceDataset] | None = None) -> TrainResult:
        """Train from the current iteration to ``stop_at`` / the total, logging and saving."""
        cfg, env = self.cfg, self.env
        total = cfg.total_iterations
        stop = min(total, cfg.stop_at) if cfg.stop_at else total
        start = self.iteration
        if env.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
        csv_log = CsvLog(self.output / "log.csv", start) if env.is_main else None
        tb = self._tensorboard() if env.is_main else None
        dataset = self.make_dataset(sources)
        loader = self.make_loader(dataset, start, stop)
        t0 = time.perf_counter()
        t_log = t0
        sums: dict[str, float] = {}
        count = 0
        last: dict[str, float] = {}
        try:
            batches: Iterator[Mapping[str, Any]] = iter(loader)
            for it in range(start, stop):
                batch = next(batches)
                values = self.train_step(batch, it)
                lr = values.pop("lr")
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                done = it + 1
                if done % cfg.log_every == 0 or done == stop:
                    last = self._reduce(sums, count)
                    now = time.perf_counter()
                    row: dict[str, float | int] = {
                        "it": done, "lr": lr, "max_skip": cfg.max_skip_at(it),
                        **{k: last[k] for k in sorted(last)},
                        "sec_per_it": (now - t_log) / count,
                        "elapsed_s": now - t0,
                    }
                    if csv_log is not None:
                        csv_log.write(row)
                    if tb is not None:
                        for k, v in row.items():
                            if k != "it":
                                tb.add_scalar(f"train/{k}", v, done)
                    sums, count, t_log = {}, 0, now
                if progress is not None and env.is_main:
                    progress(done, stop, {"loss": values["total_loss"], "lr": lr, **last})
                if done % cfg.save_every == 0 and done != stop:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            if self.iteration > start:
                self.save_checkpoint()
            raise
        finally:
            if tb is not None:
                tb.close()
        if stop > start:
            ckpt = self.save_checkpoint()
        else:
            ckpt = self.checkpoint_path if self.checkpoint_path.is_file() else None
        digests = self.gather_digests()
        if env.is_main:
            same = len(set(digests)) == 1
            (self.output / "ranks.json").write_text(json.dumps(
                {"iteration": self.iteration, "world_size": env.world_size,
                 "param_sha256": digests, "identical": same}, indent=1))
            if not same:
                self.say("warning: the processes' parameters differ (see ranks.json)")
        return TrainResult(self.iteration, self.output, ckpt, last, digests,
                           time.perf_counter() - t0)

    def gather_digests(self) -> list[str]:
        mine = param_digest(self.net)
        if not self.env.distributed:
            return [mine]
        out: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(out, mine)
        return [str(d) for d in out]

    def _tensorboard(self) -> Any:
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed
            return None
        return SummaryWriter(str(self.output / "tensorboard"))


def run_training(cfg: TrainConfig, *, resume: bool = True, progress: ProgressFn | None = None,
                 say: Callable[[str], None] = log.info) -> TrainResult:
    """Set up the process (group), scan the data, resume if a checkpoint exists, train."""
    cfg.validate()
    env = init_distributed(cfg.device)
    try:
        # Scan first: a wrong dataset layout is reported before the network is built.
        sources = [scan_dataset(d, seq_length=cfg.seq_length, davis_repeat=cfg.davis_repeat)
                   for d in cfg.data]
        trainer = Trainer(cfg, env, say=say)
        for s in sources:
            trainer.say(s.describe())
        ckpt = trainer.checkpoint_path
        if ckpt.is_file():
            if not resume:
                trainer.say(f"--no-resume: starting over; {ckpt} will be overwritten")
            else:
                it = trainer.load_checkpoint(ckpt)
                trainer.say(f"resumed from {ckpt} at iteration {it}")
        if trainer.iteration >= cfg.total_iterations:
            trainer.say(f"already trained for {trainer.iteration} iterations: nothing to do")
        trainer.say(
            f"training {cfg.model} for {cfg.total_iterations} iterations on "
            f"{env.world_size} process(es), batch {cfg.batch_size} ({trainer.local_batch} per "
            f"process), {cfg.seq_length} frames, crops {cfg.crop_size}, device {env.device}"
            + (", AMP" if trainer.use_amp else "")
        )
        return trainer.fit(progress=progress, sources=sources)
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()
