"""``LiteTracker``: training-free video object segmentation by feature matching.

The frozen EfficientNet-Lite0 trunk (:class:`~s3cli.lite.model.LiteModel`) gives every frame a
key on the stride-8 grid: by default the wide expansion features of the blocks that follow the
stride-8 and stride-16 outputs, centred on the first frame's means, each unit-normalised, the
stride-16 part upsampled, projected onto the first frame's principal directions and normalised,
then beside the stride-4 features pooled to stride 8 (centred, normalised, weighted) and the
cell's mean colour (centred on the first frame's, weighted), normalised again.
Labels (background + objects) travel from memory frames to the current frame by matching
inside spatial windows (:mod:`s3cli.lite.propagation`): by default each label scores the mean
of a cell's best affinities among that label's memory cells (class-balanced, so that an object
small in the annotated frame is not outvoted by background when it grows). Memory holds the
annotated frames (permanent, matched in a wider window), the last ``num_recent`` frames kept
every ``mem_every`` and the last frame; it is bounded however long the video. Annotated frames
are also searched in windows moved by how far the objects have travelled since, and a ridge
classifier fitted on the annotated frames (test-time adaptation,
:mod:`s3cli.lite.adaptation`) corrects the propagated labels where matching is unsure. What a
frame shows is refined on the stride-4 grid at the objects' edges, from the backbone's stride-4
features and the frame's colours (:mod:`s3cli.lite.refinement`); memory keeps the stride-8
labels.

The public API is the main engine's ``Tracker``: ``step(image, mask=None, objects=None,
end=False)`` returns (1 + N, H, W) float32 probabilities at the input size, ``object_ids``,
``delete_objects``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from s3cli.inference.objects import (
    ObjectRegistry,
    index_mask_to_one_hot,
    probabilities_to_binary_masks,
    probabilities_to_index_mask,
)
from s3cli.inference.transforms import (
    Padding,
    aggregate,
    image_to_tensor,
    index_mask_to_tensor,
    pad_to_multiple,
    resize_image,
    resize_index_mask,
    resize_probabilities,
    short_side_size,
    unpad,
)
from s3cli.lite.adaptation import adapt_labels, fit_label_classifier
from s3cli.lite.model import LiteFeatures, LiteModel
from s3cli.lite.propagation import (
    TileGrid,
    active_tiles,
    classify_labels,
    pad_cells,
    propagate_labels,
    query_tiles,
    untile,
    window_index,
)
from s3cli.lite.refinement import refine_labels, refinement_features

__all__ = ["LiteOptions", "LiteState", "LiteTracker", "MemoryFrame"]

STRIDE = 8
"""Stride of the grid labels are propagated on."""


@dataclass(frozen=True)
class LiteOptions:
    """Options of :class:`LiteTracker` (all have working defaults).

    - ``max_internal_size``: shorter side used internally (<= 0: the input size).
    - ``mem_every``: a predicted frame enters the recent memory every this many frames.
    - ``num_recent``: how many of those recent frames memory keeps.
    - ``num_previous``: how many of the last frames are matched too (short-term memory).
    - ``max_permanent``: annotated frames kept (the first always, then the newest).
    - ``matching``: ``"class"``: each label scores the mean of a cell's ``top_k`` best
      affinities among that label's memory cells, labels are softmax(score / temperature)
      (:func:`~s3cli.lite.propagation.classify_labels`: a small object in memory is not
      outvoted by background); ``"soft"``: the softmax(affinity / temperature)-weighted mean
      of the labels of the ``top_k`` best matches (``top_k`` 0: of all of them).
    - ``tile``: window tile size in grid cells; ``reach``/``permanent_reach``: tiles searched
      on each side of a query tile in predicted/annotated frames.
    - ``active_reach``: only tiles within this many tiles of the last frame's objects are
      matched (the rest is background); < 0: every tile some memory frame's window gives an
      object to.
    - ``features``: ``"expanded"``: keys from the 240- and 672-channel expansions of the
      next blocks at strides 8 and 16; ``"projected"``: from the 40- and 112-channel block
      outputs.
    - ``center``: subtract the first frame's mean feature (per stride) before normalising.
    - ``f16_weight``: weight of the stride-16 features in the key (stride-8 weight 1).
      Seven-sequence J&F in ``benchmarks/lite_davis.py``: 68.4 / 69.9 / 68.8 / 69.6 / 68.8 at
      1.0 / 1.2 / 1.3 / 1.4 / 1.6, 64.7 at 2.0, 63.4 at 0.7. Most of the spread is
      motocross-jump, which flips between ~55 and ~64 with small perturbations: with the bf16
      backbone 1.2 gives 67.8 (motocross 51.2), 1.4 gives 69.5 (fp32 69.6), so 1.4.
    - ``key_dim``: project keys onto this many principal directions of the first annotated
      frame's keys (0: keep all channels).
    - ``classifier_weight``: test-time adaptation: weight of a ridge classifier fitted on the
      annotated frames' keys (:mod:`s3cli.lite.adaptation`, ridge ``classifier_ridge``), added
      to the propagated log-probabilities (0: off). Seven-sequence J&F with
      ``follow_objects`` (``follow_reach`` 2): 70.6 / 70.5 / 70.5 at 0.3 / 0.4 / 0.5 (70.0 at
      0, 69.6 with neither): breakdance 48 -> 53-56 and bmx-trees 57 -> 60, camel and
      car-shadow 1-3 points down (a camel-like neighbour or a trail of uncovered background
      scores as camel).
    - ``follow_objects``: annotated frames are also searched in a window moved by how far the
      objects' centre has moved since (the previous frame's against that frame's), so that
      the annotation still helps once the objects have left their first place; the moved
      window reaches ``follow_reach`` tiles (at most ``permanent_reach``). J&F 70.6 / 70.4 /
      69.7 at reach 2 / 1 / 0; reach 2 costs ~20% of the frame rate, so 1. Searching only the
      moved window (not the fixed one too) gave 68.9.
    - ``key_colour``: weight of the cell's mean colour (RGB in [0, 1], centred on the first
      frame's mean) appended to the unit-norm feature key before it is normalised again (0:
      features only). Seven-sequence J&F (with ``refine``): 72.3 / 72.6 / 73.0 / 72.4 at 0 /
      0.3 / 0.5 / 1.0 (0.5: breakdance 58.3 -> 61.1, camel 71.7 -> 73.4, soapbox 72.3 ->
      73.9, bmx-trees 59.1 -> 57.2, car-shadow 85.6 -> 84.7; 1.0 takes bmx-trees to 53.1);
      chromaticity (r, g, b over their sum) instead of RGB at weight 2: 72.4.
    - ``f4_weight``: weight of the stride-4 block output (24 channels), average-pooled to
      stride 8, centred on the first frame's mean and unit-normalised, appended to the feature
      key before it is normalised again (and before the colour; 0: off). Fine texture that
      the stride-8/16 expansions blur: seven-sequence J&F 73.0 / 74.1 / 74.5 / 75.4 / 76.5 /
      77.0 / 76.2 / 76.3 at 0 / 0.3 / 0.5 / 0.6 / 0.7 / 0.8 / 0.9 / 1.0 (0.8: breakdance 61.1
      -> 68.5, camel 73.4 -> 79.2, bmx-trees 57.3 -> 63.2, motocross-jump 67.3 -> 71.8,
      car-shadow 84.7 -> 88.6, soapbox 73.9 -> 73.8; 0.9 and 1.0 take car-shadow to 76.7 and
      76.3).
    - ``refine``: edge-aware refinement of the shown labels on the stride-4 grid
      (:func:`~s3cli.lite.refinement.refine_labels`): ``refine_iterations`` passes of a
      weighted mean over the cells within ``refine_radius`` cells, weights
      exp((affinity - 1) / ``refine_temperature``) of features made of the stride-4 backbone
      features and the cells' colour (weight ``refine_colour``). Seven-sequence J&F 70.4 ->
      72.3 (breakdance 52.7 -> 58.3, soapbox 68.8 -> 72.3, camel 67.9 -> 71.7, car-shadow
      88.2 -> 85.6), ~15 ms per 480p frame. Variants measured (radius / temperature /
      colour / passes, J&F): 3 / 0.1 / 0 / 1 70.6; 3 / 0.05 / 0 / 3 70.5; 4 / 0.1 / 1 / 2
      71.6; 4 / 0.1 / 2 / 2 72.1; 4 / 0.1 / 3 / 2 72.3; 4 / 0.2 / 3 / 2 71.3 (car-shadow
      83.5, bmx-trees 53.1); 3 / 0.1 / 3 / 3 72.1; colour without the backbone features
      4 / 0.1 / 1 / 2 71.3; the refined labels written into memory too (4 / 0.1 / 2 / 2):
      68.9.
    """

    max_internal_size: int = 480
    mem_every: int = 5
    num_recent: int = 2
    num_previous: int = 1
    max_permanent: int = 4
    matching: str = "class"
    top_k: int = 5
    temperature: float = 0.05
    tile: int = 8
    reach: int = 1
    permanent_reach: int = 2
    active_reach: int = 1
    features: str = "expanded"
    center: bool = True
    f16_weight: float = 1.4
    key_dim: int = 64
    active_eps: float = 0.01
    classifier_weight: float = 0.3
    classifier_ridge: float = 1.0
    follow_objects: bool = True
    follow_reach: int = 1
    key_colour: float = 0.5
    f4_weight: float = 0.8
    refine: bool = True
    refine_radius: int = 4
    refine_temperature: float = 0.1
    refine_colour: float = 3.0
    refine_iterations: int = 2

    def __post_init__(self) -> None:
        for name in ("mem_every", "max_permanent", "tile"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        non_negative = ("num_recent", "num_previous", "top_k", "reach", "permanent_reach")
        for name in (*non_negative, "follow_reach"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.key_colour < 0 or self.f4_weight < 0:
            raise ValueError(
                f"key_colour and f4_weight must be >= 0, got {self.key_colour} and {self.f4_weight}"
            )
        if self.refine_radius < 0 or self.refine_iterations < 0:
            raise ValueError(
                "refine_radius and refine_iterations must be >= 0, got "
                f"{self.refine_radius} and {self.refine_iterations}"
            )
        if not self.refine_temperature > 0 or self.refine_colour < 0:
            raise ValueError(
                "refine_temperature must be > 0 and refine_colour >= 0, got "
                f"{self.refine_temperature} and {self.refine_colour}"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.classifier_weight < 0 or not self.classifier_ridge > 0:
            raise ValueError(
                "classifier_weight must be >= 0 and classifier_ridge > 0, got "
                f"{self.classifier_weight} and {self.classifier_ridge}"
            )
        if self.matching not in ("class", "soft"):
            raise ValueError(f"matching must be 'class' or 'soft', got {self.matching!r}")
        if self.features not in ("expanded", "projected"):
            raise ValueError(f"features must be 'expanded' or 'projected', got {self.features!r}")

    def replace(self, **changes: Any) -> LiteOptions:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown lite option(s): {', '.join(unknown)}")
        return replace(self, **changes)


@dataclass
class MemoryFrame:
    """One memorised frame: keys and soft labels of its grid cells, and their windows."""

    index: int  # frame index in the video
    permanent: bool  # an annotated frame
    key: torch.Tensor  # (h', w', C) unit-norm keys, zero-padded by whole tiles
    value: torch.Tensor  # (h', w', K) soft labels (channel 0 background), zero-padded
    valid: torch.Tensor  # (K,) bool: which channels this frame knows
    reach: int  # window reach (tiles) when this frame is matched

    def set_channels(self, value: torch.Tensor, valid: torch.Tensor) -> None:
        self.value = value
        self.valid = valid


@dataclass
class LiteState:
    """Everything one video accumulates (the model holds no per-video state)."""

    objects: ObjectRegistry = field(default_factory=ObjectRegistry)
    permanent: list[MemoryFrame] = field(default_factory=list)
    recent: list[MemoryFrame] = field(default_factory=list)
    previous: list[MemoryFrame] = field(default_factory=list)
    frame_index: int = -1
    last_mem_index: int = -1
    input_size: tuple[int, int] | None = None
    grid: TileGrid | None = None
    basis: torch.Tensor | None = None  # (C, key_dim) key projection
    means: tuple[torch.Tensor, torch.Tensor] | None = None  # per-video feature means
    mean4: torch.Tensor | None = None  # per-video mean of the pooled stride-4 features
    colour_mean: torch.Tensor | None = None  # (3,) the first frame's mean colour
    classifier: torch.Tensor | None = None  # (C + 1, K) fitted on the annotated frames

    def frames(self) -> list[MemoryFrame]:
        """Every distinct memory frame: annotated, recent, then the last frames."""
        out = list(self.permanent)
        for m in [*self.recent, *self.previous]:
            if all(m.index != o.index for o in out):
                out.append(m)
        return out


def _upsample_cells(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w, D) cells -> (H, W, D), bilinear."""
    y = F.interpolate(x.permute(2, 0, 1)[None], size=size, mode="bilinear", align_corners=False)
    return y[0].permute(1, 2, 0)


def _object_shift(
    then: torch.Tensor, now: torch.Tensor, known: torch.Tensor, tile: int
) -> tuple[int, int]:
    """How far (dy, dx), in whole tiles, the centre of the objects has moved from a frame with
    labels ``then`` (h, w, K) to one with labels ``now``, over the object channels ``known``
    (K,) in the first; (0, 0) where either frame has none of them."""
    channels = known[1:].nonzero()[:, 0] + 1
    centres = []
    for labels in (then, now):
        fg = labels[..., channels].sum(dim=-1)  # (h, w)
        mass = fg.sum()
        if channels.numel() == 0 or float(mass) < 1e-3:
            return (0, 0)
        ys = torch.arange(fg.shape[0], dtype=fg.dtype, device=fg.device)
        xs = torch.arange(fg.shape[1], dtype=fg.dtype, device=fg.device)
        centres.append(((fg.sum(dim=1) * ys).sum() / mass, (fg.sum(dim=0) * xs).sum() / mass))
    (y0, x0), (y1, x1) = centres
    return (round(float(y1 - y0) / tile), round(float(x1 - x0) / tile))


class LiteTracker:
    """Segments one video, one frame at a time, with the training-free ``lite`` model.

    ``LiteTracker(model, **options)``: options are :class:`LiteOptions` fields (``config=``
    may give a whole :class:`LiteOptions`). Device follows the model.
    """

    def __init__(self, model: LiteModel, config: LiteOptions | None = None, **options: Any):
        base = config if config is not None else LiteOptions()
        self.config = base.replace(**options) if options else base
        self.model = model
        self.device = model.device
        self.state = LiteState()

    # ------------------------------------------------------------------ properties
    def reset(self) -> None:
        """Forget the video: memory, objects and frame count."""
        self.state = LiteState()

    @property
    def object_ids(self) -> list[int]:
        """Tracked object ids in channel order (channel ``i + 1`` of ``step``'s output)."""
        return list(self.state.objects.object_ids)

    @property
    def frame_index(self) -> int:
        """Index of the last frame stepped (-1 before the first)."""
        return self.state.frame_index

    # ------------------------------------------------------------------ features
    def _keys(self, feats: LiteFeatures, image: torch.Tensor) -> torch.Tensor:
        """Unit-norm keys (h, w, C) on the stride-8 grid: the feature keys
        (:meth:`_feature_keys`) beside the cells' mean colour (of ``image`` (3, 8h, 8w) in [0,
        1]) centred on the first frame's, times ``key_colour``, normalised again."""
        key = self._feature_keys(feats)
        weight = self.config.key_colour
        if weight <= 0:
            return key
        colour = F.avg_pool2d(image[None].float(), STRIDE)[0].permute(1, 2, 0)  # (h, w, 3)
        if self.state.colour_mean is None:
            self.state.colour_mean = colour.mean(dim=(0, 1))
        colour = (colour - self.state.colour_mean) * weight
        return F.normalize(torch.cat([key, colour], dim=-1), dim=-1).contiguous()

    def _feature_keys(self, feats: LiteFeatures) -> torch.Tensor:
        """Unit-norm feature keys (h, w, C): the stride-8/16 keys (:meth:`_coarse_keys`)
        beside the stride-4 features average-pooled to stride 8 (centred like the others,
        unit-normalised, times ``f4_weight``), normalised again."""
        key = self._coarse_keys(feats)
        weight = self.config.f4_weight
        if weight <= 0:
            return key
        fine = F.avg_pool2d(feats.f4.float(), 2)[0].permute(1, 2, 0)  # (h, w, C4)
        if self.config.center:
            if self.state.mean4 is None:
                self.state.mean4 = fine.mean(dim=(0, 1))
            fine = fine - self.state.mean4
        fine = F.normalize(fine, dim=-1) * weight
        return F.normalize(torch.cat([key, fine], dim=-1), dim=-1)

    def _coarse_keys(self, feats: LiteFeatures) -> torch.Tensor:
        """Unit-norm keys (h, w, C) of the stride-8 features and the bilinearly
        upsampled stride-16 features, each centred (optionally) and normalised, concatenated,
        and optionally projected onto the first frame's principal directions (the stride-16
        part is projected before it is upsampled: the two commute)."""
        cfg = self.config
        state = self.state
        if cfg.features == "expanded":
            assert feats.e8 is not None and feats.e16 is not None
            a, b = feats.e8, feats.e16  # (1, C8, h, w), (1, C16, h/2, w/2)
        else:
            a, b = feats.f8, feats.f16
        a = a[0].float().permute(1, 2, 0)  # (h, w, C8)
        b = b[0].float().permute(1, 2, 0)  # (h/2, w/2, C16)
        if cfg.center:
            if state.means is None:
                state.means = (a.mean(dim=(0, 1)), b.mean(dim=(0, 1)))
            a = a - state.means[0]
            b = b - state.means[1]
        w = cfg.f16_weight
        a = F.normalize(a, dim=-1)
        b = F.normalize(b, dim=-1) * w
        size = (int(a.shape[0]), int(a.shape[1]))
        if cfg.key_dim <= 0:
            key = torch.cat([a, _upsample_cells(b, size)], dim=-1)
            return (key / math.sqrt(1 + w * w)).contiguous()
        if state.basis is None:
            full = torch.cat([a, _upsample_cells(b, size)], dim=-1).reshape(
                -1, a.shape[-1] + b.shape[-1]
            )
            _, vectors = torch.linalg.eigh(full.t() @ full)  # ascending eigenvalues
            state.basis = vectors[:, -cfg.key_dim :].flip(1).contiguous()
        ca = a.shape[-1]
        key = a @ state.basis[:ca] + _upsample_cells(b @ state.basis[ca:], size)
        return F.normalize(key, dim=-1).contiguous()

    # ------------------------------------------------------------------ memory
    @property
    def _pad_tiles(self) -> int:
        return max(self.config.reach, self.config.permanent_reach)

    def _interior(self, x: torch.Tensor) -> torch.Tensor:
        """The grid part (h, w, D) of a padded memory tensor."""
        grid = self.state.grid
        assert grid is not None
        e = self._pad_tiles * grid.tile
        return x[e : e + grid.height, e : e + grid.width]

    def _memorise(self, key: torch.Tensor, value: torch.Tensor, permanent: bool) -> None:
        """Add the current frame with soft labels ``value`` (h, w, K); evict beyond bounds."""
        state = self.state
        cfg = self.config
        grid = state.grid
        assert grid is not None
        frame = MemoryFrame(
            index=state.frame_index,
            permanent=permanent,
            key=pad_cells(key, grid, self._pad_tiles),
            value=pad_cells(value, grid, self._pad_tiles),
            valid=torch.ones(value.shape[-1], dtype=torch.bool, device=value.device),
            reach=cfg.permanent_reach if permanent else cfg.reach,
        )
        if permanent:
            state.permanent.append(frame)
            if len(state.permanent) > cfg.max_permanent:
                del state.permanent[1]  # keep the first annotated frame and the newest ones
            # Predictions made before this annotation are superseded by it.
            state.recent = []
            state.previous = []
            state.last_mem_index = state.frame_index
            self._fit_classifier()
            return
        if cfg.num_previous > 0:
            state.previous = [*state.previous, frame][-cfg.num_previous :]
        if state.frame_index - state.last_mem_index >= cfg.mem_every:
            state.last_mem_index = state.frame_index
            if cfg.num_recent > 0:
                state.recent = [*state.recent, frame][-cfg.num_recent :]

    def _fit_classifier(self) -> None:
        """Refit the test-time classifier on the annotated frames (their interior cells)."""
        state = self.state
        if self.config.classifier_weight <= 0 or not state.permanent:
            state.classifier = None
            return
        keys = [self._interior(m.key).flatten(0, 1) for m in state.permanent]
        values = [self._interior(m.value).flatten(0, 1) for m in state.permanent]
        valid = [m.valid for m in state.permanent]
        state.classifier = fit_label_classifier(keys, values, valid, self.config.classifier_ridge)

    def _add_channels(self, count: int) -> None:
        """New objects: every memory frame gets ``count`` unknown (invalid) channels."""
        for m in self.state.frames():
            value = torch.cat([m.value, m.value.new_zeros(*m.value.shape[:2], count)], dim=-1)
            valid = torch.cat([m.valid, m.valid.new_zeros(count)])
            # Background meant "none of the objects known then": unknown from now on (its
            # values stay, so that a cell's strongest label is still background).
            valid[0] = False
            m.set_channels(value, valid)

    # ------------------------------------------------------------------ propagation
    def _propagate(self, key: torch.Tensor) -> torch.Tensor:
        """Soft labels (K, h, w) of the current frame from memory."""
        state = self.state
        cfg = self.config
        grid = state.grid
        assert grid is not None
        memory = state.frames()
        # Only tiles that some memory frame can give an object to need matching: elsewhere
        # every candidate is background.
        near = [(m, m.reach) for m in memory]
        if cfg.active_reach >= 0 and state.previous:
            # Objects move little between frames: search only around the last frame's.
            near = [(state.previous[-1], cfg.active_reach)]
        active = torch.stack(
            [active_tiles(self._interior(m.value), grid, r, cfg.active_eps) for m, r in near]
        ).any(dim=0)  # (T,)
        k = memory[0].value.shape[-1]
        labels = key.new_zeros(grid.num_tiles, grid.tile * grid.tile, k)  # (T, Q, K)
        labels[..., 0] = 1
        tiles = active.nonzero()[:, 0]  # (A,)
        if tiles.numel() > 0:
            queries = query_tiles(key, grid)[tiles]  # (A, Q, C)
            matched = self._match(queries, tiles, memory)  # (A, Q, K)
            if state.classifier is not None and state.classifier.shape[1] == k:
                matched = adapt_labels(matched, queries, state.classifier, cfg.classifier_weight)
            labels[tiles] = matched
        return untile(labels, grid)  # (K, h, w)

    def _match(
        self, queries: torch.Tensor, tiles: torch.Tensor, memory: list[MemoryFrame]
    ) -> torch.Tensor:
        """Labels (A, Q, K) of query tiles (A, Q, C) at ``tiles`` from ``memory``."""
        cfg = self.config
        grid = self.state.grid
        assert grid is not None
        keys = torch.cat([m.key.flatten(0, 1) for m in memory])  # (M h' w', C)
        values = torch.cat([m.value.flatten(0, 1) for m in memory])  # (M h' w', K)
        frames = list(range(len(memory)))
        reaches = [m.reach for m in memory]
        shifts = [(0, 0)] * len(memory)
        if cfg.follow_objects and self.state.previous:
            # Annotated frames are searched around where the objects were then, too.
            last = self._interior(self.state.previous[-1].value)
            for f, m in enumerate(memory):
                if m.permanent:
                    shift = _object_shift(self._interior(m.value), last, m.valid, grid.tile)
                    if shift != (0, 0):
                        frames.append(f)
                        reaches.append(min(m.reach, cfg.follow_reach))
                        shifts.append(shift)
        index = window_index(grid, self._pad_tiles, reaches, tiles, frames, shifts)
        valid = torch.stack([m.valid for m in memory])  # (M, K)
        match = classify_labels if cfg.matching == "class" else propagate_labels
        return match(
            queries,
            keys,
            values,
            index,
            cfg.top_k,
            cfg.temperature,
            valid,
            frame_cells=memory[0].key.shape[0] * memory[0].key.shape[1],
        )

    # ------------------------------------------------------------------ masks
    def _prepare_mask(
        self,
        mask: np.ndarray | torch.Tensor | None,
        objects: Sequence[int] | None,
        size: tuple[int, int],
    ) -> tuple[torch.Tensor | None, list[int]]:
        if mask is None:
            if objects is not None:
                raise ValueError("objects were given without a mask")
            return None, []
        mask_t = index_mask_to_tensor(mask, device=self.device)
        if tuple(mask_t.shape) != size:
            raise ValueError(f"mask is {tuple(mask_t.shape)} but the image is {size}")
        if objects is None:
            ids = [int(v) for v in torch.unique(mask_t).tolist() if v != 0]
        else:
            ids = [int(v) for v in objects]
            if any(v <= 0 for v in ids) or len(set(ids)) != len(ids):
                raise ValueError(f"objects must be unique positive ids, got {list(objects)}")
        if not ids:
            return None, []
        return mask_t, ids

    @staticmethod
    def _merge(
        pred: torch.Tensor,
        mask: torch.Tensor,
        tracked: list[int],
        given: list[int],
        new_ids: list[int],
    ) -> torch.Tensor:
        """Per-object probabilities (N, H, W): the given objects take their masks, the other
        tracked objects are zeroed under them, new objects are appended."""
        given_masks = index_mask_to_one_hot(mask, given).to(pred.dtype)  # (n, H, W)
        merged = pred.clone()
        merged[:, given_masks.sum(dim=0) > 0] = 0
        for j, obj in enumerate(given):
            if obj in tracked:
                merged[tracked.index(obj)] = given_masks[j]
        new = [given_masks[given.index(obj)].unsqueeze(0) for obj in new_ids]
        return torch.cat([merged, *new], dim=0)

    # ------------------------------------------------------------------ public
    @torch.inference_mode()
    def step(
        self,
        image: np.ndarray | torch.Tensor,
        mask: np.ndarray | torch.Tensor | None = None,
        objects: Sequence[int] | None = None,
        end: bool = False,
    ) -> torch.Tensor:
        """Process the next frame.

        image: (H, W, 3) uint8 array or (3, H, W) float tensor in [0, 1].
        mask: optional (H, W) integer index mask; ``objects`` lists the ids it defines (default:
        its non-zero values, sorted). The named objects take their given masks (new ids get new
        channels in the order listed), other tracked objects keep being tracked and are zeroed
        under the given foreground. The frame becomes permanent memory.
        end: the last frame; nothing is memorised.

        Returns (1 + N, H, W) float32 probabilities: channel 0 background, then the objects in
        ``object_ids`` order.
        """
        cfg = self.config
        state = self.state
        img = image_to_tensor(image, device=self.device, dtype=torch.float32)  # (3, H, W)
        size = (int(img.shape[-2]), int(img.shape[-1]))
        if state.input_size is None:
            state.input_size = size
        elif state.input_size != size:
            raise ValueError(f"frame size changed from {state.input_size} to {size}")
        mask_t, given = self._prepare_mask(mask, objects, size)
        state.frame_index += 1
        tracked = list(state.objects.object_ids)
        if mask_t is None and not tracked:
            return torch.ones((1, *size), dtype=torch.float32, device=self.device)

        internal = short_side_size(size[0], size[1], cfg.max_internal_size)
        if internal is not None:
            img = resize_image(img, internal)
            if mask_t is not None:
                mask_t = resize_index_mask(mask_t, internal)
        img, pad = pad_to_multiple(img, self.model.pad_divisor)  # (3, Hp, Wp)
        hp, wp = int(img.shape[-2]), int(img.shape[-1])
        if state.grid is None:
            state.grid = TileGrid(hp // STRIDE, wp // STRIDE, cfg.tile)

        # Under autocast (``--precision bf16``) only the backbone runs in low precision: keys,
        # affinities, their ranking and the labels stay float32 (bf16 affinities cost 0.8
        # seven-sequence J&F in benchmarks/lite_davis.py).
        feats = self.model.features(img[None], expanded=cfg.features == "expanded")
        with torch.autocast(self.device.type, enabled=False):
            key = self._keys(feats, img)  # (h, w, C)
            need_propagation = bool(tracked) and (mask_t is None or not set(tracked) <= set(given))
            prob8 = self._propagate(key) if need_propagation else None  # (K, h, w)
            # What is shown is refined at stride 4 (memory keeps the stride-8 labels).
            shown = self._refine(prob8, feats, img) if prob8 is not None else None

        if mask_t is not None:
            new_ids = state.objects.add(given)
            mask_p, _ = pad_to_multiple(mask_t, self.model.pad_divisor)  # (Hp, Wp)
            if prob8 is not None:
                pred = self._upsample(shown, (hp, wp))[1:]  # (N_old, Hp, Wp)
                merged = self._merge(pred, mask_p, tracked, given, new_ids)
            else:
                merged = index_mask_to_one_hot(mask_p, state.objects.object_ids)
            prob = torch.softmax(aggregate(merged, dim=0), dim=0)  # (K, Hp, Wp)
            if new_ids:
                self._add_channels(len(new_ids))
            if not end:
                value = F.avg_pool2d(prob[None], STRIDE)[0]  # (K, h, w)
                self._memorise(key, value.permute(1, 2, 0), permanent=True)
        else:
            assert prob8 is not None and shown is not None
            prob = self._upsample(shown, (hp, wp))
            if not end:
                self._memorise(key, prob8.permute(1, 2, 0), permanent=False)
        return self._to_output(prob, pad, size, internal is not None)

    def _refine(self, prob8: torch.Tensor, feats: LiteFeatures, img: torch.Tensor) -> torch.Tensor:
        """Stride-8 labels (K, h, w) -> labels on the stride-4 grid (K, 2h, 2w), refined at
        the objects' edges (:mod:`s3cli.lite.refinement`) unless ``refine`` is off."""
        cfg = self.config
        if not cfg.refine:
            return prob8
        cells = refinement_features(feats.f4, img[None], cfg.refine_colour)  # (2h, 2w, C)
        prob4 = self._upsample(prob8, (int(cells.shape[0]), int(cells.shape[1])))
        refined = refine_labels(
            prob4, cells, cfg.refine_radius, cfg.refine_temperature, cfg.refine_iterations
        )
        # An object only a few stride-8 cells wide can lose to its surroundings in the mean:
        # where the refinement would take away half of an object's cells or more, the frame is
        # shown unrefined.
        k = int(prob4.shape[0])
        before = torch.bincount(prob4.argmax(dim=0).flatten(), minlength=k)[1:]
        after = torch.bincount(refined.argmax(dim=0).flatten(), minlength=k)[1:]
        return prob4 if bool((2 * after <= before).logical_and(before > 0).any()) else refined

    @staticmethod
    def _upsample(prob: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(K, h, w) grid labels -> (K, Hp, Wp) bilinear."""
        return F.interpolate(prob[None], size=size, mode="bilinear", align_corners=False)[0]

    @staticmethod
    def _to_output(
        prob: torch.Tensor, pad: Padding, size: tuple[int, int], resized: bool
    ) -> torch.Tensor:
        out = unpad(prob, pad)  # (K, h_internal, w_internal)
        if resized:
            out = resize_probabilities(out, size)
        return out.to(torch.float32, copy=True)

    @torch.inference_mode()
    def delete_objects(self, ids: int | Sequence[int]) -> None:
        """Stop tracking ``ids`` (unknown ids are ignored); later channels shift down."""
        id_list = [ids] if isinstance(ids, int) else list(ids)
        removed = self.state.objects.delete(id_list)
        if not removed:
            return
        for m in self.state.frames():
            keep = [0] + [i + 1 for i in range(m.value.shape[-1] - 1) if i not in removed]
            gone = [i + 1 for i in removed if m.valid[i + 1]]
            valid = m.valid[keep].clone()
            value = m.value[..., keep].contiguous()
            if not bool(valid[0]) and bool(valid[1:].all()):
                # Background is known again: it is what no remaining object covers.
                valid[0] = True
                inside = self._interior(value)
                inside[..., 0] = (1 - inside[..., 1:].sum(dim=-1)).clamp_min(0)
            elif bool(valid[0]) and gone:
                # A deleted object's cells are background from now on.
                value[..., 0] += m.value[..., gone].sum(dim=-1)
            m.set_channels(value, valid)
        self._fit_classifier()

    def to_index_mask(self, prob: torch.Tensor) -> torch.Tensor:
        """``step`` output (1 + N, H, W) -> (H, W) int64 object ids (0 = background)."""
        return probabilities_to_index_mask(prob, self.state.objects.object_ids)

    def to_binary_masks(self, prob: torch.Tensor) -> dict[int, torch.Tensor]:
        """``step`` output -> {object id: (H, W) bool mask}, from the per-pixel argmax."""
        masks = probabilities_to_binary_masks(prob)  # (N, H, W)
        return {obj: masks[i] for i, obj in enumerate(self.state.objects.object_ids)}
