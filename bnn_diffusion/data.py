"""Few-shot fine-tuning data: the instance (and class) images and a deterministic, resumable stream of batches.

The images of a directory are resized so the shorter side is ``resolution`` (bilinear), cropped to a square
(centre, or a random crop) and scaled to [-1, 1], as in diffusers' DreamBooth examples.

Batches come from an endless stream: pass ``p`` over the dataset visits its items in a random permutation drawn from
``(seed, p)``, and the concatenated passes are cut into batches of a fixed size (a batch may span two passes, so
every batch is full even with fewer images than the batch size).  Batch ``b`` and each item's random crop depend on
``(seed, b)`` alone, never on a global random state: a run resumed at step ``k`` sees exactly the batches an
uninterrupted run sees after step ``k``, and processes of a distributed run take interleaved batches of one stream.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["IMAGE_EXTENSIONS", "list_images", "count_images", "load_image", "DreamBoothDataset", "BatchStream",
           "collate"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_MASK63 = (1 << 63) - 1


def list_images(directory, what: str = "image directory") -> list:
    """The image files directly inside ``directory`` (by extension, sorted by name).  ValueError naming ``what``
    when the directory does not exist, is not a directory, or holds no image."""
    path = Path(directory)
    if not path.exists():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is not a directory")
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(f"{what} {str(path)!r} holds no image (looked for {', '.join(IMAGE_EXTENSIONS)})")
    for image in images:  # now, not when a batch first draws it, hours into a run
        try:
            with Image.open(image) as opened:  # load, not verify: verify reads no pixel data of a JPEG
                opened.load()
        except Exception as error:  # PIL raises several types for unreadable or truncated files
            raise ValueError(f"{what}: {str(image)!r} is not a readable image ({type(error).__name__}: {error}); "
                             "remove it or convert it") from None
    return images


def mix_seed(*values: int) -> int:
    """A 63-bit hash of integers (splitmix64 steps): independent seeds for (seed, pass), (seed, item) and the
    trainer's (seed, class image)."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
        state = state * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 29
    return state & _MASK63


def _to_rgb(image: "Image.Image") -> "Image.Image":
    """RGB, with the wide grey modes (I;16*, I, F) mapped to 0..255 as their type's full range: 65535 for 16 bits
    (an "I" image, 32-bit ints, is read as 16-bit data, what PNG/TIFF decoders give it), 1.0 for floats."""
    if image.mode.startswith("I") or image.mode == "F":
        full_range = 1.0 if image.mode == "F" else 65535.0
        grey = np.asarray(image, dtype=np.float64) / full_range * 255.0
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def load_image(path, resolution: int, center_crop: bool = True, crop_seed: int = 0) -> torch.Tensor:
    """One image as a float32 (3, resolution, resolution) tensor in [-1, 1].

    EXIF orientation is applied, the image converted to RGB (16-bit and float grey images scaled to 8 bits over
    their type's range first: Pillow's own conversion would clip them to white), resized so its shorter side is
    ``resolution``
    (bilinear) and cropped to a square: in the centre, or (``center_crop=False``) at an offset drawn from
    ``crop_seed``.
    """
    with Image.open(path) as opened:
        image = _to_rgb(ImageOps.exif_transpose(opened))
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != (width, height):
        image = image.resize(size, Image.BILINEAR)
    width, height = image.size
    if center_crop:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        rng = np.random.default_rng(crop_seed)
        left, top = int(rng.integers(0, width - resolution + 1)), int(rng.integers(0, height - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images, paired with class images when prior preservation is on.

    Item ``i`` is ``{"instance": instance image i mod n, "class": class image i mod m}`` (the class entry only with
    class images); the length is the larger of the two counts, as in diffusers' DreamBooth example.  Items are
    addressed by ``(index, crop_seed)`` pairs, as ``BatchStream`` yields them, so a random crop is a function of
    the stream position and not of a global random state.
    """

    def __init__(self, instance_images: list, resolution: int, class_images: Optional[list] = None,
                 center_crop: bool = True) -> None:
        if not instance_images:
            raise ValueError("instance_images must hold at least one image path")
        if class_images is not None and not class_images:
            raise ValueError("class_images must hold at least one image path (or be None)")
        self.instance_images = list(instance_images)
        self.class_images = list(class_images) if class_images is not None else None
        self.resolution = int(resolution)
        self.center_crop = bool(center_crop)

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images or ()))

    def __getitem__(self, key) -> dict:
        index, crop_seed = key if isinstance(key, tuple) else (key, 0)
        load = lambda path, salt: load_image(path, self.resolution, self.center_crop, mix_seed(crop_seed, salt))
        item = {"instance": load(self.instance_images[index % len(self.instance_images)], 0)}
        if self.class_images is not None:
            item["class"] = load(self.class_images[index % len(self.class_images)], 1)
        return item


def collate(items: list) -> dict:
    """Stack a batch: ``pixel_values`` (B, 3, H, W) of the instance images, followed by the B class images when
    the items have them (then ``num_instance`` = B marks where they start)."""
    pixels = [item["instance"] for item in items]
    if "class" in items[0]:
        pixels += [item["class"] for item in items]
    return {"pixel_values": torch.stack(pixels), "num_instance": len(items)}


@dataclass
class BatchStream(torch.utils.data.Sampler):
    """An endless, position-addressed stream of batches over a dataset of ``length`` items (a batch sampler).

    Batch ``b`` holds stream items ``b * batch_size`` to ``(b + 1) * batch_size - 1``; stream item ``j`` is item
    ``perm_p[j mod length]`` of pass ``p = j // length``, with ``perm_p`` a random permutation drawn from
    ``(seed, p)``.  Iterating yields batches ``start, start + stride, start + 2 * stride, ...`` as lists of
    ``(index, crop_seed)`` pairs: process ``r`` of ``n`` uses ``start = first_batch * n + r`` and ``stride = n``.
    """

    length: int
    batch_size: int
    seed: int
    start: int = 0
    stride: int = 1

    def __post_init__(self) -> None:
        for name in ("length", "batch_size", "stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")
        self._pass, self._perm = None, None

    def permutation(self, pass_index: int) -> list:
        if pass_index != self._pass:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, pass_index))
            self._pass, self._perm = pass_index, torch.randperm(self.length, generator=generator).tolist()
        return self._perm

    def batch(self, batch_index: int) -> list:
        first = batch_index * self.batch_size
        items = []
        for position in range(first, first + self.batch_size):
            pass_index, offset = divmod(position, self.length)
            items.append((self.permutation(pass_index)[offset], mix_seed(self.seed, position, 0xC0)))
        return items

    def __iter__(self) -> Iterator[list]:
        batch_index = self.start
        while True:
            yield self.batch(batch_index)
            batch_index += self.stride

    def passes(self, batches: int) -> float:
        """How many passes over the data ``batches`` batches make (the 'epoch' of a step)."""
        return batches * self.batch_size / self.length


def count_images(directory) -> int:
    """Number of image files in ``directory`` (0 when it does not exist)."""
    return len([p for p in Path(directory).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]) \
        if os.path.isdir(directory) else 0
