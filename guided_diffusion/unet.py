"""The Semantic Diffusion Model UNet (Wang et al. 2022) on top of OpenAI's guided-diffusion UNet.

The noisy image goes through a plain guided-diffusion encoder. The middle block and the decoder use
`SDMResBlock`s whose two normalisations are SPADE layers: a parameter-free GroupNorm whose scale and shift are
predicted, per pixel, from the one-hot semantic mask. Module and parameter names follow guided-diffusion/SDM
exactly, so `model*.pt` / `ema_*.pt` files written by SDM or ISDM load with `load_state_dict` as they are.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

SPADE_HIDDEN_CHANNELS = 128
NORM_GROUPS = 32


@dataclass(frozen=True)
class UNetSpec:
    """Everything that fixes the UNet's shape; built from a config by `guided_diffusion.config`."""

    image_size: int
    num_classes: int
    model_channels: int
    num_res_blocks: int
    channel_mult: tuple[float, ...]
    attention_ds: tuple[int, ...]  # downsampling factors (image_size // resolution) that get attention
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    learn_sigma: bool = True
    dropout: float = 0.0
    use_checkpoint: bool = False
    use_new_attention_order: bool = False
    in_channels: int = 3  # image channels: 3 (RGB, ISDM/SDM) or 1 (grayscale); the output has as many (x2 learn_sigma)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def downsampling(self) -> int:
        """Total downsampling factor: image_size must be a multiple of it."""
        return 2 ** (len(self.channel_mult) - 1)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 for half-precision inputs (as guided-diffusion does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_at_least_float32(x)).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    return GroupNorm32(NORM_GROUPS, channels)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos | sin] of geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class SPADEGroupNorm(nn.Module):
    """Parameter-free GroupNorm modulated by scale and shift maps predicted from the semantic mask."""

    def __init__(self, channels: int, label_channels: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.GroupNorm(NORM_GROUPS, channels, affine=False, eps=eps)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_channels, SPADE_HIDDEN_CHANNELS, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(SPADE_HIDDEN_CHANNELS, channels, 3, padding=1)
        self.mlp_beta = nn.Conv2d(SPADE_HIDDEN_CHANNELS, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, condition: Condition) -> torch.Tensor:
        """x normalised, then scaled and shifted by the maps of `condition`: a one-hot mask (maps computed here) or
        a `FixedMasks` (maps computed once for all the forwards that share it)."""
        normalized = self.norm(_at_least_float32(x)).type(x.dtype)
        if isinstance(condition, FixedMasks):
            gamma, beta = condition.modulation(self, x)
        else:
            gamma, beta = self.modulation(condition, x)
        return normalized * (1 + gamma) + beta

    def modulation(self, one_hot: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and shift maps (gamma, beta) of `one_hot` at x's size and dtype. They depend on the mask
        alone, not on x's values or the timestep."""
        if one_hot.shape[2:] == (1, 1) and min(x.shape[2:]) > CONSTANT_MAP_SIDE:
            return self._constant_modulation(one_hot.type(x.dtype), x.shape[2], x.shape[3])
        segmap = F.interpolate(one_hot.type(x.dtype), size=x.shape[2:], mode="nearest")
        hidden = self.mlp_shared(segmap)
        return self.mlp_gamma(hidden), self.mlp_beta(hidden)

    def _constant_modulation(self, one_hot: torch.Tensor, height: int, width: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and shift maps of a 1×1 condition (the mask generator's presence vector), which is the same
        at every pixel. Two zero-padded 3x3 convolutions of a constant map give a map that is constant except in
        the 2 pixels next to each border, so they are computed on a 5×5 map (2 border rows and columns each
        side, one inner) and its rows and columns are spread to height × width: the same values as the full-size
        convolutions, at the cost of 25 pixels instead of height × width."""
        side = CONSTANT_MAP_SIDE
        hidden = self.mlp_shared(one_hot.expand(-1, -1, side, side))
        gamma, beta = self.mlp_gamma(hidden), self.mlp_beta(hidden)
        rows, cols = _spread_index(height, one_hot.device), _spread_index(width, one_hot.device)

        def spread(small: torch.Tensor) -> torch.Tensor:
            return small.index_select(2, rows).index_select(3, cols)

        return spread(gamma), spread(beta)


CONSTANT_MAP_SIDE = 5
"""The side of the map SPADE computes a 1×1 condition's modulation on: 2 border pixels each side + 1 inner."""


def _spread_index(size: int, device: torch.device) -> torch.Tensor:
    """For each of `size` positions, the position of the 5-wide map holding its value: 0, 1, then the inner 2
    for all but the last two, then 3, 4."""
    index = torch.full((size,), 2, dtype=torch.long, device=device)
    index[:2] = torch.tensor([0, 1], device=device)
    index[-2:] = torch.tensor([3, 4], device=device)
    return index


class FixedMasks:
    """A batch of one-hot masks that conditions many forwards (every step of a sampling run), with each SPADE
    layer's scale and shift maps kept once computed.

    A SPADE layer turns the mask into its maps with three convolutions (the mask to 128 hidden channels, then to
    gamma and to beta) that see neither the noisy image nor the timestep. In the SDM these convolutions are most of
    the decoder's work (77 % of all the FLOPs of the tiny 32 px test model, 55 % at 64 px, 35 % in ISDM's 256 px
    model), and a sampling run feeds the same masks to every one of its steps: passed to `SDMUNet.forward` in
    place of the one-hot tensor, this object computes each layer's maps at the first forward and hands the same
    tensors to the later ones. The outputs are those of the plain forward to the bit (the same convolutions of
    the same input, done once).

    The maps of one image row take 2 x channels x height x width values per SPADE layer (3.5 MiB in fp32 for the
    tiny model, 41 MiB at 64 px, 1.9 GiB for ISDM's 256 px model). They are kept while `budget` allows (default:
    a budget of its own, a quarter of the device's free memory when the object is made; the FixedMasks of one
    denoiser share one); a layer past the budget computes its maps at every forward, as without this object. The
    maps belong to the model's current weights: make a new FixedMasks after the weights change (training previews
    make one per preview)."""

    def __init__(self, one_hot: torch.Tensor, budget: MemoryBudget | None = None):
        self.one_hot = one_hot
        self.budget = MemoryBudget.quarter_of_free(one_hot.device) if budget is None else budget
        self.kept_bytes = 0
        self._maps: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def modulation(self, layer: SPADEGroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`layer`'s maps of these masks at x's size and dtype: kept ones, or computed (and kept if they fit)."""
        key = (layer, tuple(x.shape[2:]), x.dtype, torch.is_autocast_enabled(x.device.type))
        if key in self._maps:
            return self._maps[key]
        gamma, beta = layer.modulation(self.one_hot, x)
        size = gamma.numel() * gamma.element_size() + beta.numel() * beta.element_size()
        if self.budget.take(size):
            self._maps[key] = (gamma, beta)
            self.kept_bytes += size
        return gamma, beta


class MemoryBudget:
    """Bytes that the FixedMasks sharing this object may keep, all together."""

    def __init__(self, limit_bytes: int):
        self.left_bytes = limit_bytes

    @classmethod
    def quarter_of_free(cls, device: torch.device) -> MemoryBudget:
        return cls(free_memory_bytes(device) // 4)

    def take(self, size: int) -> bool:
        """Whether `size` more bytes fit; if so, they are taken."""
        if size > self.left_bytes:
            return False
        self.left_bytes -= size
        return True


Condition = torch.Tensor | FixedMasks
"""What conditions the decoder: a one-hot mask N x classes x H x W (or N x classes x 1 x 1), or `FixedMasks`."""


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of `device`: the CUDA allocator's free bytes, or the free physical memory of the machine."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf (not Linux): a modest fixed budget
        return 4 * 2 ** 30


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv (parameter name `conv`)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: a strided 3x3 conv or average pooling (parameter name `op`)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class _Checkpointed(nn.Module):
    """Base for blocks that may recompute their activations in the backward pass to save memory."""

    use_checkpoint: bool = False

    def forward(self, *args):
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return activation_checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)


class _ResidualBlock(_Checkpointed):
    """What guided-diffusion's ResBlock and SDM's SDMResBlock share: resampling and the timestep projection."""

    def _init_shared(self, channels: int, out_channels: int, emb_channels: int, use_scale_shift_norm: bool,
                     use_checkpoint: bool, up: bool, down: bool) -> None:
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))


class ResBlock(_ResidualBlock):
    """guided-diffusion's residual block (encoder side): GroupNorm, timestep scale-shift, optional up/down."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, use_checkpoint: bool = False, up: bool = False,
                 down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self._init_shared(channels, out_channels, emb_channels, use_scale_shift_norm, use_checkpoint, up, down)
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class SDMResBlock(_ResidualBlock):
    """SDM's decoder residual block: both normalisations are SPADE layers driven by the one-hot mask."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, label_channels: int,
                 out_channels: int | None = None, use_scale_shift_norm: bool = False,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.in_norm = SPADEGroupNorm(channels, label_channels)
        self.in_layers = nn.Sequential(nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self._init_shared(channels, out_channels, emb_channels, use_scale_shift_norm, use_checkpoint, up, down)
        self.out_norm = SPADEGroupNorm(out_channels, label_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(p=dropout), zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _forward(self, x: torch.Tensor, one_hot: Condition, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_norm(x, one_hot)
        if self.updown:
            h = self.in_layers[0](h)
            h = self.in_layers[1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(h)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_norm(h, one_hot) * (1 + scale) + shift
        else:
            h = self.out_norm(h + emb_out, one_hot)
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(_Checkpointed):
    """Multi-head self-attention over all pixels, computed with PyTorch's fused SDPA kernel.

    `legacy_order` keeps guided-diffusion's default qkv channel layout ([q, k, v] per head) so that
    checkpoints trained with `use_new_attention_order=False` keep their meaning.
    """

    def __init__(self, channels: int, num_heads: int, use_checkpoint: bool = False, legacy_order: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.legacy_order = legacy_order
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))
        # (q, k, v) -> attention, each batch x heads x length x channels; replaceable per block for benchmarks
        self.attention = F.scaled_dot_product_attention

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        length, head_channels = qkv.shape[-1], c // self.num_heads
        if self.legacy_order:
            q, k, v = qkv.reshape(b, self.num_heads, 3 * head_channels, length).split(head_channels, dim=2)
        else:
            q, k, v = (part.reshape(b, self.num_heads, head_channels, length) for part in qkv.chunk(3, dim=1))
        attended = self.attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        h = attended.transpose(-1, -2).reshape(b, c, length)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of blocks; each gets the inputs it needs (mask and/or timestep embedding)."""

    def forward(self, x: torch.Tensor, one_hot: Condition, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, SDMResBlock):
                x = layer(x, one_hot, emb)
            elif isinstance(layer, ResBlock):
                x = layer(x, emb)
            else:
                x = layer(x)
        return x


class SDMUNet(nn.Module):
    """The SDM UNet: `forward(x_t, timesteps, one_hot)` returns eps (and the variance interpolation values)."""

    def __init__(self, spec: UNetSpec):
        super().__init__()
        self.spec = spec
        mc = spec.model_channels
        emb_channels = mc * 4
        heads_up = spec.num_heads_upsample if spec.num_heads_upsample != -1 else spec.num_heads
        legacy = not spec.use_new_attention_order

        def heads(ch: int, default: int) -> int:
            return ch // spec.num_head_channels if spec.num_head_channels != -1 else default

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))
        ch = input_ch = int(spec.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(spec.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(spec.channel_mult):
            for _ in range(spec.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_channels, spec.dropout, int(mult * mc),
                                                    spec.use_scale_shift_norm, spec.use_checkpoint)]
                ch = int(mult * mc)
                if ds in spec.attention_ds:
                    layers.append(AttentionBlock(ch, heads(ch, spec.num_heads), spec.use_checkpoint, legacy))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(spec.channel_mult) - 1:
                down = (ResBlock(ch, emb_channels, spec.dropout, ch, spec.use_scale_shift_norm, spec.use_checkpoint,
                                 down=True)
                        if spec.resblock_updown else Downsample(ch, True))
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        label_ch = spec.num_classes
        self.middle_block = TimestepEmbedSequential(
            SDMResBlock(ch, emb_channels, spec.dropout, label_ch, use_scale_shift_norm=spec.use_scale_shift_norm,
                        use_checkpoint=spec.use_checkpoint),
            AttentionBlock(ch, heads(ch, spec.num_heads), spec.use_checkpoint, legacy),
            SDMResBlock(ch, emb_channels, spec.dropout, label_ch, use_scale_shift_norm=spec.use_scale_shift_norm,
                        use_checkpoint=spec.use_checkpoint),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(spec.channel_mult))[::-1]:
            for i in range(spec.num_res_blocks + 1):
                skip_ch = skip_channels.pop()
                layers = [SDMResBlock(ch + skip_ch, emb_channels, spec.dropout, label_ch, int(mc * mult),
                                      spec.use_scale_shift_norm, spec.use_checkpoint)]
                ch = int(mc * mult)
                if ds in spec.attention_ds:
                    layers.append(AttentionBlock(ch, heads(ch, heads_up), spec.use_checkpoint, legacy))
                if level and i == spec.num_res_blocks:
                    layers.append(SDMResBlock(ch, emb_channels, spec.dropout, label_ch, ch,
                                              spec.use_scale_shift_norm, spec.use_checkpoint, up=True)
                                  if spec.resblock_updown else Upsample(ch, True))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(input_ch, spec.out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, one_hot: Condition) -> torch.Tensor:
        """x: N×in_channels×H×W noisy images; timesteps: N (model's 0..999 range); one_hot: N×num_classes×H×W, or
        the same masks as `FixedMasks` when many forwards share them (sampling)."""
        emb = self.time_embed(timestep_embedding(timesteps, self.spec.model_channels).to(x.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, one_hot, emb)
            skips.append(h)
        h = self.middle_block(h, one_hot, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), one_hot, emb)
        return self.out(h)
