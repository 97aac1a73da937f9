"""What one ``patchcast eval`` run evaluates: models, data, sweep, arithmetic, bytes and outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from patchcast.eval.grid import GRIDS, SweepGrid
from shared.precision import PrecisionSetting


@dataclass(frozen=True)
class EvalConfig:
    data: str = "cifar10/test.tar"
    edge: str = "zoo:cifar10-edge"
    server: str = "zoo:cifar10-server"
    pretrained: bool = False
    limit: int | None = None
    out: str = "reports/eval"
    cache_dir: str | None = None  # default: OUT/cache
    use_cache: bool = True
    sweep: Literal["full", "quick"] = "full"
    rollout: bool = True
    server_encoder: bool = True
    precision: PrecisionSetting = "fp32"
    batch_size: int = 64
    max_tokens: int = 4096  # padded tokens per server forward on selected patches
    threads: int | None = None
    codec: str = "jpeg-mosaic"  # the service's default codec (shared.config.CodecConfig)
    codec_params: tuple[tuple[str, int], ...] = ()  # e.g. (("q", 90),); codec defaults otherwise
    # the server sees each selection's kept patches after the codec's round trip (encode, then decode,
    # as a worker receives them) instead of the exact pixels; the server on full images stays lossless
    through_codec: bool = False
    # which patches each score-ranked selection keeps (shared.selection): 0, the highest-scoring (the
    # paper's); c ≥ 2, its count spread over c×c cells of the grid. Random selections match the counts.
    spread: int = 0
    bytes_sample: int = 256
    random_draws: int = 1  # independent random-patch draws the random baseline is averaged over
    max_loss: float = 1.0  # accuracy points below server-only
    bootstrap: int = 200  # image resamples for the acceptance checks' confidence intervals (0: none)
    experts: tuple[str, ...] = ()  # specialist model references for the expert-routing comparison
    expert_min_share: float = 0.0  # routing.min_share for the points.csv rows of expert routing
    seed: int = 0
    plots: bool = True
    publish: str | None = None  # a markdown file whose generated section (and img/ figures) to rewrite
    # several generated sections in one file: each run rewrites the one with its name (figures img/NAME-*.png)
    publish_name: str = ""
    command: str = ""  # the command line, recorded in the report

    def __post_init__(self) -> None:
        from shared.errors import ConfigError

        if self.limit is not None and self.limit <= 0:
            raise ConfigError("limit must be positive")
        if self.batch_size < 1 or self.max_tokens < 2 or self.bytes_sample < 1:
            raise ConfigError("batch_size and bytes_sample must be ≥ 1, max_tokens ≥ 2")
        if self.sweep not in GRIDS:
            raise ConfigError(f"sweep must be one of {sorted(GRIDS)}")
        if self.max_loss < 0:
            raise ConfigError("max_loss must be ≥ 0 points")
        if self.spread < 0:
            raise ConfigError("spread must be ≥ 0 (a cell side in patches; 0: by score)")
        if self.random_draws < 1:
            raise ConfigError("random_draws must be ≥ 1")
        if self.bootstrap < 0:
            raise ConfigError("bootstrap must be ≥ 0 resamples")
        if not 0.0 <= self.expert_min_share <= 1.0:
            raise ConfigError("expert_min_share must be in [0, 1]")

    @property
    def grid(self) -> SweepGrid:
        return GRIDS[self.sweep]
