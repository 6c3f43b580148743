"""How an image file becomes pixels: PIL (load_rgb: the exact evaluation path, any format, and its
reduced-size JPEG decode) and the JPEG codec of the tensor paths.

TorchCodec (torchcodec.decoders, from 0.16) decodes JPEGs on the CPU (libjpeg-turbo) and on CUDA (nvJPEG,
batched); torchvision 0.29 deprecates its own decoders (torchvision.io) in its favour. Where torchcodec
can't be imported (it needs torch >= 2.11), torchvision.io's decoders do the same work: the choice is
made once, at the first decode, and said in one note.

    images = decode_jpeg([read_bytes(p) for p in paths], device="cuda")   # a list of (3, H, W) uint8
    image = decode_jpeg(read_bytes(path))                                  # on the CPU

On 300 ImageNet JPEGs (9 of them grayscale), torchcodec's CPU decode equals torchvision.io's and
PIL's pixel for pixel: all three use libjpeg-turbo with the same IDCT (tests/test_decoding.py checks
each kind of JPEG). One difference: torchcodec applies a JPEG's EXIF orientation and the others don't,
so the tensor paths send EXIF-rotated JPEGs to PIL (exif_rotated).
"""

import contextlib
import functools
import io
import os
import sys
import warnings
from pathlib import Path

import torch
from PIL import Image

# what PIL raises for a file it can't read (truncated, corrupt, not an image, too large)
IMAGE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


def image_error(e: BaseException) -> str:
    """Why an image could not be read, in words (PIL's own message names a file object, not the file)."""
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image file PIL can read (unknown format)"
    if isinstance(e, IsADirectoryError):
        return "a folder, not an image file"
    return f"{type(e).__name__}: {e}"


def load_rgb(path, draft=None) -> Image.Image:
    """Any image PIL can read, as RGB: grayscale and CMYK JPEGs, a PNG named .JPEG. Truncated,
    corrupt or decompression-bomb-sized files raise, with the file named. `path` may also be a file
    object (an image from a tar shard). draft(size) -> a smaller (w, h) or None, given the file's (w, h):
    a JPEG is then decoded at the smallest of 1/8, 1/4, 1/2 of its size that is at least that large
    (libjpeg's DCT scaling: PIL's Image.draft), at a fraction of the full decode's cost."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with open(path, "rb") if isinstance(path, str | os.PathLike) else contextlib.nullcontext(path) as f:
            image = Image.open(f)
            wanted = draft(image.size) if draft is not None else None
            if wanted is not None and image.format == "JPEG":
                image.draft("RGB", wanted)
            image.load()
            if image.mode.startswith("I;16"):  # 16-bit gray: 0..65535 -> 0..255 (convert would clip at 255)
                image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
            return image if image.mode == "RGB" else image.convert("RGB")  # (converting RGB only copies)


def pre_resized(data: bytes, max_size: int, quality: int) -> bytes | None:
    """FFCV's trick for a loader that decodes fewer pixels: an image whose longer side exceeds max_size,
    shrunk to it (aspect kept, PIL's antialiased Lanczos) and re-encoded as a JPEG at `quality`; None for
    one that fits as it is (its bytes are kept) or that PIL can't read (left for the loaders to report)."""
    try:
        image = load_rgb(io.BytesIO(data))
    except IMAGE_ERRORS:
        return None
    if max(image.size) <= max_size:
        return None
    scale = max_size / max(image.size)
    size = tuple(max(1, round(side * scale)) for side in image.size)
    out = io.BytesIO()
    image.resize(size, Image.Resampling.LANCZOS).save(out, "JPEG", quality=quality)
    return out.getvalue()


@functools.cache
def codec() -> tuple[str, object, object]:
    """(name, decode(data or list, device), encode(image, quality)) of the codec this process uses."""
    try:
        from torchcodec.decoders import decode_jpeg as torchcodec_decode
        from torchcodec.encoders import JpegEncoder

        def decode(data, device):
            return torchcodec_decode(data, mode="RGB", device=device)

        def encode(image, quality):
            return JpegEncoder(image).to_tensor(quality=quality)

        return "torchcodec", decode, encode
    except Exception as e:  # noqa: BLE001 - ImportError, or torchcodec's native library failing to load
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        print(f"note: torchcodec is not usable here ({why}); decoding with torchvision.io", file=sys.stderr)
    from torchvision import io

    def decode(data, device):
        with warnings.catch_warnings():  # torchvision 0.29's deprecation, the reason for this fallback
            warnings.simplefilter("ignore", DeprecationWarning)
            return io.decode_jpeg(data, mode=io.ImageReadMode.RGB, device=device)

    def encode(image, quality):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return io.encode_jpeg(image, quality=quality)

    return "torchvision.io", decode, encode


def codec_name() -> str:
    """'torchcodec' or 'torchvision.io' (for benchmark rows and notes)."""
    return codec()[0]


def decode_jpeg(data, device="cpu"):
    """(3, H, W) uint8 RGB of a JPEG's bytes (a 1-D uint8 tensor, or bytes), or a list of them for a list
    (on CUDA, one batched nvJPEG call). Grayscale and CMYK JPEGs come out as RGB. A JPEG the decoder
    refuses raises RuntimeError; CUDA's out of memory may also arrive as a RuntimeError."""
    return codec()[1](data, device)


def encode_jpeg(image: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """A (3, H, W) or (1, H, W) uint8 image as a 1-D uint8 tensor of JPEG bytes."""
    return codec()[2](image, quality)


def exif_rotated(data) -> bool:
    """Whether a JPEG's EXIF header asks for a rotation or mirror (orientation other than 1). torchcodec
    applies it; PIL, torchvision.io and so torchvision's weights transforms don't: the tensor paths send
    such images to PIL, so that every path sees the same pixels. (Reads the header, not the image.)"""
    try:
        raw = data.numpy() if isinstance(data, torch.Tensor) else data
        with Image.open(io.BytesIO(memoryview(raw))) as image:
            return image.getexif().get(0x0112, 1) != 1
    except IMAGE_ERRORS:
        return False  # not an image PIL knows: the decoder will say so


def read_bytes(path) -> torch.Tensor:
    """A file's bytes as a 1-D uint8 tensor (writable: no copy-on-write warning from torch)."""
    return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
