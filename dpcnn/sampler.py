"""The epoch sampler and augmentation: global batches, a rank's share of them, random shifts and flips.

Nothing here depends on the rank or the world size except ``shard``, which cuts
a rank's contiguous part of a global batch: the order of the examples and every
random draw of the augmentation are made for the whole global batch, which is
what lets training on 1, 2 or 4 ranks produce the same weights.

* ``split_indices``   a seeded, rank-independent split of n examples (validation, test of an image folder)
* ``EpochSampler``    the same global batches on every rank; ``shard`` cuts a rank's slice
* ``shift_offsets``, ``random_shift``  random translations, decided per global batch
* ``flip_mask``, ``random_flip``       random horizontal flips, decided per global batch
* ``Augment``         both, as the data config asks, for one rank's shard of a batch
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from .errors import ConfigError

# ------------------------------------------------------------------------ sampler

def split_indices(n: int, val_fraction: float, seed: int = 0, tag: int = 0x56414C) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (kept, held out) index arrays, each sorted, disjoint, covering 0..n-1."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return np.arange(n), np.arange(0)
    if n < 2:
        raise ConfigError(f"data.val_fraction={val_fraction} needs at least 2 training examples, have {n}")
    n_val = min(n - 1, max(1, round(val_fraction * n)))  # both parts non-empty
    # A tag in the seed keeps this stream apart from the sampler's default_rng([seed, epoch]).
    perm = np.random.default_rng([seed, tag]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class EpochSampler:
    """Global batches of example indices, identical on every rank.

    Epoch e visits ``default_rng([seed, e]).permutation(n)`` in slices of
    ``batch_size``; global batch k is the k-th slice. Each rank then takes its
    contiguous ``shard`` of that batch, so the global batch, and therefore the
    averaged gradient, does not depend on the number of ranks.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False):
        if n < 0 or batch_size < 1:
            raise ConfigError(f"sampler needs n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self._cache: tuple[int, np.ndarray] | None = None  # permutation of the current epoch

    @property
    def num_batches(self) -> int:
        whole, rest = divmod(self.n, self.batch_size)
        return whole + (1 if rest and not self.drop_last else 0)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The global batch sizes an epoch has: ``batch_size``, and the short last batch's unless dropped."""
        whole, rest = divmod(self.n, self.batch_size)
        return (self.batch_size,) * bool(whole) + (rest,) * bool(rest and not self.drop_last)

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of all n examples in ``epoch``: int64 ``(n,)``."""
        if self._cache is None or self._cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
            order.flags.writeable = False  # shared by every batch() of the epoch: keep it intact
            self._cache = (epoch, order)
        return self._cache[1]

    def batch(self, epoch: int, k: int) -> np.ndarray:
        """Global indices of batch k of ``epoch``: ``(batch_size,)``, or shorter for the last one."""
        if not 0 <= k < self.num_batches:
            raise IndexError(f"batch {k} out of range 0..{self.num_batches - 1}")
        return self.permutation(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

    @staticmethod
    def shard(global_indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
        """Rank r's contiguous part of a global batch (np.array_split: sizes differ by at most one)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in 0..{world_size - 1}")
        start = EpochSampler.shard_start(len(global_indices), rank, world_size)
        return global_indices[start:EpochSampler.shard_start(len(global_indices), rank + 1, world_size)]

    @staticmethod
    def shard_start(batch_size: int, rank: int, world_size: int) -> int:
        """Where rank r's shard starts in a global batch of ``batch_size`` (rank = world_size: the end)."""
        base, extra = divmod(batch_size, world_size)
        return rank * base + min(rank, extra)

    def local_batches(self, epoch: int, rank: int, world_size: int, start: int = 0
                      ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(k, global_batch_size, local_indices)`` for k = start, ..., num_batches - 1."""
        for k in range(start, self.num_batches):
            indices = self.batch(epoch, k)
            yield k, len(indices), self.shard(indices, rank, world_size)


# ------------------------------------------------------------------- augmentation

def shift_offsets(seed: int, epoch: int, step: int, n: int, max_shift: int) -> np.ndarray:
    """Random ``(dy, dx)`` per example of global batch ``step``: int64 ``(n, 2)`` in [-max_shift, max_shift].

    Drawn for the whole global batch, so rank r uses the rows of its shard and
    the augmentation does not depend on the world size.
    """
    # The trailing tag keeps these draws apart from the sampler's stream: SeedSequence
    # pads with zeros, so [seed, epoch, 0] alone would equal the sampler's [seed, epoch].
    rng = np.random.default_rng([seed, epoch, step, 0x5348])
    return rng.integers(-max_shift, max_shift + 1, size=(n, 2))


def random_shift(x: np.ndarray, offsets: np.ndarray, fill: float | None = None) -> np.ndarray:
    """Translate each image of ``x`` ``(n, h, w, c)`` by its ``offsets[i] = (dy, dx)``.

    ``out[i, y, x] = x[i, y - dy, x - dx]``: positive dy moves content down,
    positive dx right. Pixels shifted in take ``fill``; by default each
    image's minimum, which for MNIST-like data is the normalised 0 pixel (pass
    ``Splits.background`` to be explicit). Returns a new array of x's dtype.
    """
    n, h, w, _ = x.shape
    dy, dx = offsets[:, 0:1], offsets[:, 1:2]                      # (n, 1)
    rows, cols = np.arange(h) - dy, np.arange(w) - dx               # source row/col: (n, h), (n, w)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    # One gather for all images: clipped indices read some valid pixel, then the mask overwrites them.
    out = x[np.arange(n)[:, None, None], np.clip(rows, 0, h - 1)[:, :, None], np.clip(cols, 0, w - 1)[:, None, :]]
    if fill is None:
        fill_values = x.min(axis=(1, 2, 3), keepdims=True)
    else:
        fill_values = np.asarray(fill, dtype=x.dtype)
    return np.where(inside[..., None], out, fill_values).astype(x.dtype, copy=False)


def flip_mask(seed: int, epoch: int, step: int, n: int) -> np.ndarray:
    """Which examples of global batch ``step`` are mirrored left-right: bool ``(n,)``, each with probability 1/2."""
    # Its own tag: a stream apart from the sampler's and the shifts'.
    return np.random.default_rng([seed, epoch, step, 0x464C4950]).random(n) < 0.5


def random_flip(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mirror the images of ``x`` ``(n, h, w, c)`` where ``mask`` is true: one vectorised select."""
    return np.where(mask[:, None, None, None], x[:, :, ::-1], x)


class Augment:
    """This rank's shard of global batch k, shifted and/or flipped as ``data.augment`` asks.

    Every draw is made for the whole global batch and then sharded, so the
    augmentation of an example does not depend on the world size.
    """

    def __init__(self, augment: Mapping, seed: int, background, rank: int, world_size: int):
        enabled = bool(augment.get("enabled", False))
        self.max_shift = int(augment.get("max_shift", 0)) if enabled else 0
        self.hflip = enabled and bool(augment.get("hflip", False))
        self.seed, self.background, self.rank, self.size = seed, background, rank, world_size

    @property
    def active(self) -> bool:
        return bool(self.max_shift or self.hflip)

    def __call__(self, x: np.ndarray, epoch: int, k: int, global_size: int) -> np.ndarray:
        if self.max_shift:
            shifts = shift_offsets(self.seed, epoch, k, global_size, self.max_shift)
            x = random_shift(x, EpochSampler.shard(shifts, self.rank, self.size), self.background)
        if self.hflip:
            x = random_flip(x, EpochSampler.shard(flip_mask(self.seed, epoch, k, global_size), self.rank, self.size))
        return x
