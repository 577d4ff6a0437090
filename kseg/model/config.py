"""Model configuration (the ``model`` block of ``params.yaml``).

Kept free of torch imports so that reading ``params.yaml`` stays fast.

Two presets matter:

* :meth:`ModelConfig.original_compatible` reproduces the original Kidney-SegNet (``dist_dice``)
  exactly: original checkpoints load into it and give the same outputs. Every ``fix_*`` option is
  off there.
* The kseg default (``ModelConfig()``) switches the fixes on, because each one either removes dead
  weights, lets deep features reach the decoder, or lets the network run on any tile size (the
  original crashes on anything but 512x512); and it uses nfeat=16 / mid_channels=128 on 256x256
  tiles because this project trains on 2 CPU cores, where the nfeat=32 / 512 network costs about
  8x more per step for the same number of pixels seen (see docs/model.md for the numbers).
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    model_validator,
)


class ModelConfig(BaseModel):
    """Architecture, width and the named fixes of the segmentation network.

    Attributes:
        arch: ``kidney_segnet`` (DiCE encoder/decoder + DiCE pyramid pooling + attention gates)
            or ``unet`` (a plain U-Net of the same widths with the same head, for comparison).
        nfeat: Width of the first level; levels have nfeat, 2, 4, 8 x nfeat channels.
        mid_channels: Width of each DiCE pyramid-pooling branch.
        tile_size: Tile edge the DiCE blocks are built for. Their height- and width-wise
            kernels have one 3x3 kernel per row / column, so the parameter shapes depend on it.
        aspp_rates: Dilation rates of the dilated DiCE pyramid-pooling branches.
        dice_impl: ``fast`` (transpose-free, used for training and inference) or ``reference``
            (a line-by-line port of the original, slow; kept for tests and benchmarks).
        fix_decoder_concat_upsampled: Each decoder level also concatenates the learned x2
            upsampling of the deeper feature (the original builds ``upconv1..3`` but never uses
            them, so deep features reach the decoder only through a 1-channel attention map).
        fix_aspp_adaptive_pool: The pyramid's image-pooling branch pools globally with an
            adaptive pool and is broadcast back to the actual input size (the original uses
            ``AvgPool2d(64)`` and upsamples to a fixed 64x64, so only 512x512 tiles work).
        fix_drop_unused_upconv: Do not build the unused ``upconv1..3`` (387k dead parameters at
            nfeat=32). Ignored when ``fix_decoder_concat_upsampled`` uses them.
        dice_dim_kernels: ``per_position`` (the original: DiCE's height-wise conv has one kernel
            per row and the width-wise one per column, so the network is not
            translation-equivariant and tiles are resized to ``tile_size``) or ``shared`` (one
            kernel for all rows / columns: an ordinary, translation-equivariant conv over the
            (C, W) / (H, C) planes that runs on any window size).
        infer_window: Edge of the overlapping windows tiled inference runs the network on
            (0 = ``tile_size``). Training crops stay ``tile_size``; a fully convolutional,
            translation-equivariant network can segment larger windows at once.
        infer_tta: Test-time augmentation at inference (validation, evaluate, predict, serving):
            ``flips`` averages the maps of the window and its three flips (4x the network's
            work), ``dihedral`` those and the flips of the transposed window (8x).
        infer_scales: Multi-scale test-time augmentation: factors of ``input_scale``. The image is
            run at each ``input_scale * factor`` (with ``infer_tta`` at each), the maps are
            resampled back to the image and averaged. ``(1.0,)`` (default) = one scale.
        input_scale: The network's resolution relative to the data's (1 = the data's own, 0.5 =
            half: a 512 tile at 0.25 µm/px reaches the network as 256 px at 0.5 µm/px). Training
            tiles are resampled once at load (images by area, instance labels nearest), and every
            inference path resamples the input, runs the network and resamples the maps back, so
            post-processing, metrics and outputs stay at the input's resolution. ``tile_size``
            and ``infer_window`` are in network pixels.
        head: ``dist`` (the original: one channel, ReLU, regressing the 0..255 per-image
            min-max scaled distance map) or ``fg_dist`` (two raw channels: a foreground logit and
            a logit of the distance to the nucleus border divided by that nucleus's largest
            distance, as DIST/HoVer-Net-style models do; see docs/training.md).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    arch: Literal["kidney_segnet", "unet"] = "kidney_segnet"
    """kidney_segnet or the unet baseline"""
    nfeat: StrictInt = Field(16, ge=1, le=512)
    mid_channels: StrictInt = Field(128, ge=1, le=4096)
    tile_size: StrictInt = Field(256, ge=16, le=4096)
    aspp_rates: tuple[StrictInt, ...] = (4, 6, 8)
    """dilation of the dilated DiCE pyramid branches"""
    dice_impl: Literal["fast", "reference"] = "fast"
    """fast (default) or the slow line-by-line reference"""
    fix_decoder_concat_upsampled: StrictBool = True
    """decoder also gets the upsampled deeper features"""
    fix_aspp_adaptive_pool: StrictBool = True
    """pyramid image pooling works at any input size"""
    fix_drop_unused_upconv: StrictBool = True
    """do not build upconv1..3 when they are unused"""
    dice_dim_kernels: Literal["per_position", "shared"] = "per_position"
    """per_position = the original (one height-wise kernel per row, one width-wise per column);
    shared = one each, translation-equivariant and any input size"""
    infer_window: StrictInt = Field(0, ge=0, le=8192)
    """inference window edge; 0 = tile_size. Larger windows (more context, fewer seams, fewer
    passes) need a size-agnostic network: unet or dice_dim_kernels shared"""
    infer_tta: Literal["none", "flips", "dihedral"] = "none"
    """test-time augmentation: none | flips (mean of 4 flipped views, 4x cost) | dihedral (8x)"""
    infer_scales: tuple[
        Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.25, le=4.0)], ...
    ] = (1.0,)
    """multi-scale test-time augmentation: factors of input_scale whose maps are averaged
    (1.0 alone = off); the cost grows with the sum of the squared factors"""
    input_scale: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.125, le=4.0)] = 1.0
    """resolution the network works at, relative to the data: 0.5 = half (each window covers 4x
    the tissue); inputs are resampled on the way in and the maps back (kseg.resample)"""
    head: Literal["dist", "fg_dist"] = "dist"
    """dist = the original's 1-channel 0..255 distance map (ReLU); fg_dist = foreground logit +
    per-nucleus normalised distance logit (2 channels)"""

    @property
    def out_channels(self) -> int:
        """Channels of the network output: 1 for ``dist``, 2 for ``fg_dist``."""
        return 2 if self.head == "fg_dist" else 1

    def inert_options(self) -> list[str]:
        """Options set to a value that has no effect in this combination (``kseg params`` notes).

        They are not errors: the presets and the original-compatible configuration set them
        explicitly, so that switching the other option on or off needs one edit.
        """
        if self.arch == "unet":
            return [
                "model.arch is unet: mid_channels, aspp_rates, dice_impl, dice_dim_kernels and "
                "the fix_* options shape Kidney-SegNet only and have no effect"
            ]
        if self.fix_decoder_concat_upsampled and self.fix_drop_unused_upconv:
            return [
                "model.fix_drop_unused_upconv has no effect while "
                "model.fix_decoder_concat_upsampled is true (the decoder uses upconv1..3)"
            ]
        return []

    @model_validator(mode="after")
    def check_rules(self) -> Self:
        """Cross-field rules: the tile must survive three 2x poolings.

        Raises:
            ValueError: If ``tile_size`` is not a multiple of 8, a rate is < 1, no rate is
                given, ``infer_scales`` is empty, repeats a factor or leaves the network's
                resolution range, or nfeat < 4 for kidney_segnet.
        """
        if self.tile_size % 8:
            raise ValueError(
                f"model.tile_size={self.tile_size}: must be a multiple of 8 (three 2x poolings)"
            )
        if not self.aspp_rates or min(self.aspp_rates) < 1:
            raise ValueError(f"model.aspp_rates={self.aspp_rates}: need one or more rates >= 1")
        if self.infer_window % 8:
            raise ValueError(
                f"model.infer_window={self.infer_window}: must be a multiple of 8 (or 0)"
            )
        if (
            self.infer_window
            and self.infer_window != self.tile_size
            and self.arch == "kidney_segnet"
            and self.dice_dim_kernels != "shared"
        ):
            raise ValueError(
                f"model.infer_window={self.infer_window}: Kidney-SegNet with per-position DiCE "
                f"kernels is built for {self.tile_size}x{self.tile_size} windows; use "
                "model.dice_dim_kernels: shared or infer_window: 0"
            )
        if not self.infer_scales or len(set(self.infer_scales)) != len(self.infer_scales):
            raise ValueError(
                f"model.infer_scales={list(self.infer_scales)}: need one or more distinct factors"
            )
        if not all(0.125 <= self.input_scale * f <= 4.0 for f in self.infer_scales):
            raise ValueError(
                f"model.infer_scales={list(self.infer_scales)}: input_scale "
                f"{self.input_scale:g} x factor must lie in [0.125, 4]"
            )
        if self.arch == "kidney_segnet" and self.nfeat < 4:
            # The DiCE gate squeezes C -> C // 4; nfeat < 4 would give a zero-width layer.
            raise ValueError(f"model.nfeat={self.nfeat}: kidney_segnet needs nfeat >= 4")
        return self

    @classmethod
    def original_compatible(
        cls, nfeat: int = 32, mid_channels: int = 256, dice_impl: str = "fast"
    ) -> ModelConfig:
        """The configuration that reproduces the original ``dist_dice`` network exactly.

        Args:
            nfeat: Width of the first level (the paper uses 32).
            mid_channels: Width of each pyramid branch (the paper uses 256).
            dice_impl: ``fast`` or ``reference``; both compute the same function.

        Returns:
            A config with 512x512 tiles, rates (4, 6, 8) and every ``fix_*`` off.
        """
        return cls(
            arch="kidney_segnet",
            nfeat=nfeat,
            mid_channels=mid_channels,
            tile_size=512,
            aspp_rates=(4, 6, 8),
            dice_impl=dice_impl,  # type: ignore[arg-type]
            fix_decoder_concat_upsampled=False,
            fix_aspp_adaptive_pool=False,
            fix_drop_unused_upconv=False,
            dice_dim_kernels="per_position",
            head="dist",
        )

    @property
    def window(self) -> int:
        """The inference window edge (``infer_window`` or ``tile_size``)."""
        return self.infer_window or self.tile_size

    def with_(self, **changes: object) -> ModelConfig:
        """Returns a copy with ``changes`` applied, validated like ``params.yaml``.

        Raises:
            kseg.config.ConfigError: naming the ``model.`` key and the rule.
        """
        try:
            return ModelConfig.model_validate({**self.__dict__, **changes})
        except ValidationError as err:
            from kseg.config import config_error

            raise config_error(err, ("model",)) from None
