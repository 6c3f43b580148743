"""Opt-in fast JPEG decoding: torchvision.io's decoder with tensor resizing, on the CPU or batched on
the GPU (nvjpeg) for `--decode gpu`. Pixels differ slightly from the PIL path of dataset.EvalPreset
(another IDCT and antialiasing kernel), so results are an approximation: README Performance.
(torchvision 0.29 deprecates torchvision.io's decoders in favour of TorchCodec; they still work.)
"""

import sys

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg, read_file
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from dataset import ImageDataset, build_loader, load_rgb
from engine import OUT_OF_MEMORY
from presets import EvalPreset


def is_jpeg(data: torch.Tensor | bytes) -> bool:
    """A JPEG's first two bytes, in a file's bytes or a uint8 tensor of them."""
    return bytes(data[:2]) == b"\xff\xd8"


def decode_rgb(path: str, data: torch.Tensor | None = None) -> torch.Tensor:
    """(3, H, W) uint8 by torchvision.io's libjpeg; PIL for other formats and JPEGs it refuses.
    `data`: the file's bytes, when the caller has read them already."""
    data = read_file(path) if data is None else data
    if is_jpeg(data):
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError:
            pass
    return F.pil_to_tensor(load_rgb(path))


def resize_crop(image: torch.Tensor, preset: EvalPreset) -> torch.Tensor:
    """EvalPreset on a (3, H, W) uint8 tensor on any device: pixels within 1 level of PIL's with libjpeg
    decoding (tests/test_eval.py); on a GPU, nvjpeg's IDCT differs a little more."""
    image = F.resize(
        image, [preset.resize], interpolation=InterpolationMode(preset.interpolation), antialias=preset.antialias
    )
    return F.center_crop(image, [preset.crop])


def resize_crop_batch(images: list[torch.Tensor], preset: EvalPreset) -> torch.Tensor:
    """resize_crop of each image, stacked: images of one size are resized in one call (most of
    ImageNet's val images share a handful of sizes), which saves a kernel launch per image on a GPU."""
    out = [None] * len(images)
    by_size = {}
    for i, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(i)
    for indices in by_size.values():
        for i, image in zip(indices, resize_crop(torch.stack([images[i] for i in indices]), preset)):
            out[i] = image
    return torch.stack(out)


class TensorImageDataset(ImageDataset):
    """Images decoded by torchvision.io (transform e.g. resize_crop), or, with raw_jpeg, JPEGs left as
    file bytes for GpuDecodeLoader to decode in batches (other formats are decoded here)."""

    def __init__(self, samples, transform, raw_jpeg: bool = False):
        super().__init__(samples, transform)
        self.raw_jpeg = raw_jpeg

    def load(self, index: int):
        path = self.samples[index].path
        if self.raw_jpeg:
            with open(path, "rb") as f:
                data = f.read()
            if is_jpeg(data):
                # bytes, not a tensor: a tensor crosses from a loader worker as its own shared-memory file,
                # which costs the main process more per image than the GPU's decode (H100: 1.8k img/s cap)
                return data
            return decode_rgb(path, torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return decode_rgb(path, read_file(path))


class GpuDecodeLoader:
    """Iterates like build_loader's loader (so engine.evaluate runs on it unchanged), but each batch of
    JPEG bytes is decoded in one batched decode_jpeg call on `device` and resized and cropped there.
    When the device refuses a batch (e.g. for a CMYK JPEG in it), its images are decoded one by one, on
    the device where it takes them, else on the CPU; an image nothing can decode is reported like
    build_loader reports it."""

    def __init__(self, samples, preset: EvalPreset, batch_size: int, workers: int, device, sampler=None):
        self.dataset = TensorImageDataset(samples, torch.nn.Identity(), raw_jpeg=True)
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=list,  # decode_jpeg copies the bytes to the GPU itself: nothing to pin
            prefetch_factor=4 if workers > 0 else None,
        )
        self.preset, self.device = preset, device

    def __len__(self) -> int:
        return len(self.loader)

    def decode_one(self, index: int, data: torch.Tensor):
        """(image, '') on the device, else on the CPU (libjpeg, then PIL), else (None, why not)."""
        try:
            return decode_jpeg([data], mode=ImageReadMode.RGB, device=self.device)[0], ""
        except OUT_OF_MEMORY:
            raise
        except RuntimeError:
            pass
        try:
            return decode_rgb(self.dataset.samples[index].path), ""
        except (RuntimeError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return None, f"{type(e).__name__}: {e}"

    def __iter__(self):
        for items in self.loader:
            errors = [(index, error) for image, _, index, error in items if image is None]
            good = [item for item in items if item[0] is not None]
            images = {item[2]: item[0] for item in good if isinstance(item[0], torch.Tensor)}
            jpegs = [item for item in good if isinstance(item[0], bytes)]
            try:
                data = [torch.frombuffer(bytearray(item[0]), dtype=torch.uint8) for item in jpegs]
                decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device) if data else []
                images.update((item[2], image) for item, image in zip(jpegs, decoded))
            except OUT_OF_MEMORY:  # a RuntimeError too, but for the caller's retry with a smaller batch
                raise
            except RuntimeError:  # an image the device refuses (CMYK, say) fails the batch: the rest one by one
                for item, one in zip(jpegs, data):
                    images[item[2]], error = self.decode_one(item[2], one)
                    errors += [(item[2], error)] if error else []
            good = [item for item in good if images.get(item[2]) is not None]
            batch = [images[item[2]].to(self.device, non_blocking=True) for item in good]
            yield (
                resize_crop_batch(batch, self.preset) if batch else torch.empty(0, dtype=torch.uint8),
                torch.tensor([item[1] for item in good], dtype=torch.long),
                torch.tensor([item[2] for item in good], dtype=torch.long),
                errors,
            )


def gpu_decode_error(device) -> str:
    """'' when batched decode_jpeg works on `device`, else why not. Tried on a JPEG made here: a user's
    file that nvjpeg refuses (CMYK, say) is decoded on the CPU alone and must not turn the GPU off."""
    if device.type != "cuda":
        return f"decoding on the GPU needs a CUDA device, not {device.type}"
    try:
        decode_jpeg([encode_jpeg(torch.zeros(3, 16, 16, dtype=torch.uint8))], mode=ImageReadMode.RGB, device=device)
        return ""
    except (RuntimeError, TypeError) as e:
        return f"decode_jpeg on {device} failed: {str(e).splitlines()[0][:120]}"


def eval_loader(samples, preset: EvalPreset, batch_size: int, workers: int, device, gpu_decode: bool, sampler=None):
    """The evaluation loader: exact PIL preprocessing (build_loader), or batched decoding on the GPU."""
    if gpu_decode:
        return GpuDecodeLoader(samples, preset, batch_size, workers, device, sampler)
    return build_loader(
        ImageDataset(samples, preset), batch_size, workers, sampler=sampler, pin_memory=device.type == "cuda"
    )


def use_gpu_decode(decode: str, device, note_to=sys.stderr) -> bool:
    """Whether --decode `decode` ("cpu" or "gpu") decodes on the GPU here; where it can't, a note says
    why and the exact CPU path is used."""
    why_not = gpu_decode_error(device) if decode == "gpu" else ""
    if why_not and note_to is not None:
        print(f"note: --decode gpu is not possible here ({why_not}); decoding on the CPU", file=note_to)
    return decode == "gpu" and not why_not
