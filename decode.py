"""Opt-in fast JPEG decoding: torchvision.io's decoder with tensor resizing, on the CPU or batched on
the GPU (nvjpeg) for `--decode gpu`. Pixels differ slightly from the PIL path of dataset.EvalPreset
(another IDCT and antialiasing kernel), so results are an approximation: README Performance.
(torchvision 0.29 deprecates torchvision.io's decoders in favour of TorchCodec; they still work.)
"""

import contextlib
import functools
import queue
import sys
import threading

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
                # bytes, which pack_jpegs joins into one tensor a batch: a tensor an image would cross from
                # the worker as a shared-memory file each, which cost more than the GPU's decode (H100)
                return data
            return decode_rgb(path, torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return decode_rgb(path, read_file(path))


def pack_jpegs(items: list) -> dict:
    """GpuDecodeLoader's collate_fn, run in the loader workers: the batch's JPEG bytes joined in one
    uint8 tensor, which crosses to the main process as one shared-memory block: as a list of byte
    strings, every image's bytes went through a pipe and were unpickled and copied by the main
    process, which also runs the decoder and the model.
    items: ImageDataset's (image, target, index, error); image is bytes, a decoded tensor or None."""
    jpegs = [item[0] for item in items if isinstance(item[0], bytes)]
    joined = bytearray().join(jpegs)
    return {
        "jpeg_bytes": torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8),
        "jpeg_sizes": [len(data) for data in jpegs],
        # in batch order; None where the image is among the JPEG bytes, in the same order
        "items": [(None if isinstance(image, bytes) else image, t, i) for image, t, i, error in items if not error],
        "errors": [(index, error) for _, _, index, error in items if error],
    }


class GpuDecodeLoader:
    """Iterates like build_loader's loader (so engine.evaluate runs on it unchanged), but each batch of
    JPEG bytes is decoded in one batched decode_jpeg call on `device` and resized and cropped there.
    A thread decodes the next batches while the model runs on this one (decode_jpeg releases the GIL),
    on a CUDA stream of its own. When the device refuses a batch (e.g. for a CMYK JPEG in it), its
    images are decoded one by one, on the device where it takes them, else on the CPU; an image
    nothing can decode is reported like build_loader reports it."""

    def __init__(self, samples, preset: EvalPreset, batch_size: int, workers: int, device, sampler=None):
        self.dataset = TensorImageDataset(samples, torch.nn.Identity(), raw_jpeg=True)
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=pack_jpegs,  # decode_jpeg copies the bytes to the GPU itself: nothing to pin
            prefetch_factor=4 if workers > 0 else None,
        )
        self.preset, self.device = preset, device

    def __len__(self) -> int:
        return len(self.loader)

    def decode_one(self, index: int, data: torch.Tensor):
        """(image, '') on the device, else on the CPU (libjpeg, then PIL), else (None, why not)."""
        try:
            return decode_jpeg([data], mode=ImageReadMode.RGB, device=self.device)[0], ""
        except RuntimeError as e:
            raise_if_out_of_memory(e)
        try:
            return decode_rgb(self.dataset.samples[index].path), ""
        except (RuntimeError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return None, f"{type(e).__name__}: {e}"

    def decode_batch(self, batch: dict):
        """One packed batch as build_loader gives it: (images on the device, targets, indices, errors)."""
        sizes, errors = batch["jpeg_sizes"], list(batch["errors"])
        data = list(batch["jpeg_bytes"].split(sizes)) if sizes else []  # views: nothing is copied
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device) if data else []
        except RuntimeError as e:  # an image the device refuses (CMYK, say) fails the batch: the rest one by one
            raise_if_out_of_memory(e)
            jpeg_indices = [index for image, _, index in batch["items"] if image is None]
            decoded = []
            for index, one in zip(jpeg_indices, data):
                image, error = self.decode_one(index, one)
                decoded.append(image)
                errors += [(index, error)] if error else []
        decoded = iter(decoded)
        items = [(next(decoded) if image is None else image, t, i) for image, t, i in batch["items"]]
        items = [item for item in items if item[0] is not None]
        images = [image.to(self.device, non_blocking=True) for image, _, _ in items]
        return (
            resize_crop_batch(images, self.preset) if images else torch.empty(0, dtype=torch.uint8),
            torch.tensor([target for _, target, _ in items], dtype=torch.long),
            torch.tensor([index for _, _, index in items], dtype=torch.long),
            errors,
        )

    def __iter__(self):
        batches = iter(self.loader)  # here, not in the thread: workers are forked from the main thread
        return decoded_ahead(lambda: map(self.decode_batch, batches), self.device)


def raise_if_out_of_memory(error: RuntimeError) -> None:
    """Raise `error` as the out-of-memory error it may be (for the caller's retry with a smaller batch),
    not as an image the device refuses: torch's own, or CUDA's that torchvision's GPU decoder re-raises
    as a plain RuntimeError."""
    if isinstance(error, OUT_OF_MEMORY):
        raise error
    if "out of memory" in str(error):
        raise OUT_OF_MEMORY[0](str(error)) from error


@functools.cache
def side_stream(index: int):
    """One stream per GPU for decoding ahead: memory the allocator caches for a stream serves only that
    stream, so a stream per pass would hold a cache per pass."""
    return torch.cuda.Stream(index)


def decoded_ahead(produce, device, depth: int = 2):
    """Iterates produce() (batches whose first item is a tensor on `device`) in a thread, up to `depth`
    batches ahead of the caller, on a CUDA stream of its own: each batch is handed over after its
    stream's work, and kept from the allocator until the caller's stream is done with it. The
    thread's errors are raised here; leaving the loop early stops the thread."""
    results, stop = queue.Queue(depth), threading.Event()
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None

    def hand_over(item) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            if cuda:
                torch.cuda.set_device(index)  # the current device is per thread
            side = side_stream(index) if cuda else None
            with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                for batch in produce():
                    event = torch.cuda.Event() if cuda else None
                    if event is not None:
                        event.record(side)
                    if not hand_over((batch, event, None)):
                        return
                    if event is not None:
                        # nvjpeg writes on a stream of its own into memory allocated on this one: the next
                        # batch's decode may reuse blocks this batch's queued resize still reads
                        event.synchronize()
        except BaseException as e:  # noqa: BLE001 - every error reaches the caller, re-raised there
            hand_over((None, None, e))
            return
        hand_over((None, None, None))

    thread = threading.Thread(target=work, name="decode-ahead", daemon=True)
    thread.start()
    try:
        while True:
            batch, event, error = results.get()
            if error is not None:
                try:
                    raise error
                finally:  # this frame is in the error's traceback: no cycle keeping its tensors alive
                    error = None  # (an out-of-memory retry needs their GPU memory back)
            if batch is None:
                return
            if event is not None:
                stream = torch.cuda.current_stream(index)
                stream.wait_event(event)
                if batch[0].is_cuda:  # not the empty CPU tensor of a batch whose every image failed
                    batch[0].record_stream(stream)
            yield batch
    finally:
        stop.set()
        thread.join()


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
