"""TFDS builder for the bouncing-balls dataset, written as array_record (no TensorFlow needed).

Each (size, frames, num_train, num_test, seed) combination is a BuilderConfig created on the
fly, so differently sized datasets live in different directories, e.g.
`<data_dir>/physics_balls/s64_f17_n512_t64_seed0/1.1.0/`. Read it back with
`builder.as_data_source()` (a grain-compatible random-access source); `as_dataset` would need
TensorFlow.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from sora_jax.data.physics import PhysicsConfig, format_combos, parse_combos, simulate

_SPLIT_IDS = {"train": 0, "test": 1}
# Example seeds are (seed * 2 + split_id) * _SEED_STRIDE + i: disjoint across splits and base
# seeds, and a larger num_train keeps the smaller dataset's examples as a prefix.
_SEED_STRIDE = 1_000_000


def example_seed(seed: int, split: str, index: int) -> int:
    """The `simulate` seed of example `index` of `split` in a dataset built with base `seed`."""
    if not 0 <= index < _SEED_STRIDE:
        raise ValueError(f"example index must be in [0, {_SEED_STRIDE}), got {index}")
    return (seed * 2 + _SPLIT_IDS[split]) * _SEED_STRIDE + index


@dataclasses.dataclass(eq=False)
class PhysicsBallsConfig(tfds.core.BuilderConfig):
    """Dataset shape and size; the name encodes every field so each lives in its own directory."""

    size: int = 64
    frames: int = 17
    num_train: int = 512
    num_test: int = 64
    seed: int = 0
    exclude: str = ""  # (colour, count) pairs never drawn, e.g. "red3,cyan1" (`parse_combos`)
    zero_gravity: float = 0.0  # share of clips simulated without gravity (`PhysicsConfig.zero_gravity`)

    @property
    def physics(self) -> PhysicsConfig:
        """The simulator config for this dataset."""
        return PhysicsConfig(size=self.size, frames=self.frames, exclude=parse_combos(self.exclude),
                             zero_gravity=self.zero_gravity)


def config_name(*, size: int, frames: int, num_train: int, num_test: int, seed: int, exclude: str = "",
                zero_gravity: float = 0.0) -> str:
    """Directory-safe config name, e.g. 's64_f17_n512_t64_seed0', '..._seed0_xcyan1-red3' or '..._zg50'.

    `exclude` as `make_config` canonicalises it; `zero_gravity` as a percentage ('.' written 'p'). No
    suffix for an option left at its default, so datasets built before it keep their directories.
    """
    name = f"s{size}_f{frames}_n{num_train}_t{num_test}_seed{seed}"
    name += "_x" + exclude.replace(",", "-") if exclude else ""
    return name + (f"_zg{100 * zero_gravity:g}".replace(".", "p") if zero_gravity else "")


def make_config(
    *, size: int = 64, frames: int = 17, num_train: int = 512, num_test: int = 64, seed: int = 0,
    exclude: str = "", zero_gravity: float = 0.0,
) -> PhysicsBallsConfig:
    """Returns the BuilderConfig for these settings (the predefined one when it matches)."""
    exclude = format_combos(sorted(set(parse_combos(exclude))))  # one directory per set of pairs
    zero_gravity = float(zero_gravity)
    PhysicsConfig(zero_gravity=zero_gravity)  # checked before it names a directory
    name = config_name(size=size, frames=frames, num_train=num_train, num_test=num_test, seed=seed,
                       exclude=exclude, zero_gravity=zero_gravity)
    # tfds refuses a custom config that shares a name with a predefined one.
    for cfg in PhysicsBalls.BUILDER_CONFIGS:
        if cfg.name == name:
            return cfg
    return PhysicsBallsConfig(
        name=name, size=size, frames=frames, num_train=num_train, num_test=num_test, seed=seed, exclude=exclude,
        zero_gravity=zero_gravity,
        description=f"{size}x{size} px, {frames} frames, {num_train}/{num_test} train/test clips"
        + (f", never {exclude}" if exclude else "") + (f", {zero_gravity:.0%} without gravity" if zero_gravity else ""),
    )


class PhysicsBalls(tfds.core.GeneratorBasedBuilder):
    """Procedural clips of 1-3 coloured balls under gravity (or, for a share of clips, none) with elastic collisions."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        # Clips under gravity are unchanged; only datasets with zero_gravity > 0 differ.
        "1.1.0": "Captions of gravity-free clips end 'in zero gravity'.",
    }
    BUILDER_CONFIGS = [
        PhysicsBallsConfig(name="s64_f17_n512_t64_seed0", description="default 64x64x17"),
    ]
    # tfds' own `code_path` lookup imports `importlib_resources`, which is not installed
    # without TensorFlow; point it at this file directly.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg: PhysicsBallsConfig = self.builder_config
        phys = cfg.physics
        t, s, m = phys.frames, phys.size, phys.max_balls
        features = tfds.features.FeaturesDict({
            # ZLIB: the plain backgrounds compress ~20x; decoding needs only numpy/zlib.
            "video": tfds.features.Tensor(
                shape=(t, s, s, 3), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
            ),
            "caption": tfds.features.Text(),
            "num_balls": tfds.features.Scalar(dtype=np.int32),
            "positions": tfds.features.Tensor(shape=(t, m, 2), dtype=np.float32),
            "velocities": tfds.features.Tensor(shape=(t, m, 2), dtype=np.float32),
            "radii": tfds.features.Tensor(shape=(m,), dtype=np.float32),
            "colors": tfds.features.Tensor(shape=(m,), dtype=np.int32),
            "seed": tfds.features.Scalar(dtype=np.int64),
        })
        return tfds.core.DatasetInfo(
            builder=self,
            description="Bouncing coloured balls with state-derived captions (sora-jax).",
            features=features,
        )

    def _split_generators(self, dl_manager):  # noqa: ARG002 - nothing to download
        cfg: PhysicsBallsConfig = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "test": self._generate_examples("test", cfg.num_test),
        }

    def _generate_examples(self, split: str, num: int):
        cfg: PhysicsBallsConfig = self.builder_config
        phys = cfg.physics
        for i in range(num):
            s = example_seed(cfg.seed, split, i)
            ex = simulate(s, phys)
            ex["seed"] = s
            yield i, ex


def make_builder(data_dir: str, **config_kwargs) -> PhysicsBalls:
    """A PhysicsBalls builder (array_record) for `make_config(**config_kwargs)` under data_dir."""
    return PhysicsBalls(
        data_dir=data_dir, config=make_config(**config_kwargs), file_format="array_record"
    )


def build_physics_dataset(
    data_dir: str,
    *,
    size: int = 64,
    frames: int = 17,
    num_train: int = 512,
    num_test: int = 64,
    seed: int = 0,
    exclude: str = "",
    zero_gravity: float = 0.0,
) -> dict:
    """Builds (or reuses) the dataset; returns {'train', 'test'} grain-compatible data sources."""
    builder = make_builder(
        data_dir, size=size, frames=frames, num_train=num_train, num_test=num_test, seed=seed, exclude=exclude,
        zero_gravity=zero_gravity,
    )
    builder.download_and_prepare()
    sources = builder.as_data_source()
    return {"train": sources["train"], "test": sources["test"]}
