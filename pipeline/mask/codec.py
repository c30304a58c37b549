"""Image decoding, VOC-palette mask encoding, the ignore rule and overlay pictures (PIL and numpy;
no model, no Ray: the reading side, export, eval, report and the datasets, imports no torch)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline.errors import ImageError

# The mask value of pixels no class claims (the ignore index of VOC masks and training losses).
IGNORE_INDEX = 255


# decode_image checks its own limit before decoding; PIL's warning would only repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageDecodeError(ImageError, ValueError):
    """An image file or byte string could not be decoded."""


def voc_palette() -> np.ndarray:
    """The standard PASCAL VOC colormap (bit-interleaved), uint8 [256, 3]."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (r, g, b)
    return palette


_PALETTE = voc_palette()


def mask_colour(value: int) -> str:
    """The CSS colour (#rrggbb) that masks show the mask value `value` (0..255) in."""
    return "#" + bytes(_PALETTE[value]).hex()

# zlib level of confidence PNGs, against PIL's default 6: on VOC-sized confidence maps
# (upsampled attention maps) 6.2 ms per image instead of 15.4 for 3% more bytes, on one core.
# Mask PNGs keep level 6: on VOC masks level 3 saves only 0.3 ms for 43% more bytes.
CONFIDENCE_PNG_LEVEL = 3


# ISO-BMFF brands of HEIF images (what phones save as .heic), which Pillow cannot open by itself.
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")


def undecodable_reason(data: bytes, exc: Exception) -> str:
    """Why Pillow could not decode data, with the fix where one is known (HEIF photos)."""
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return ("it is a HEIF/HEIC image, which Pillow cannot decode without a plug-in: convert it to JPEG or PNG "
                "(e.g. with pillow-heif or heif-convert)")
    if not data:
        return "the file is empty (0 bytes); replace or remove the file"
    if isinstance(exc, UnidentifiedImageError):  # its text names only the in-memory buffer
        return f"not an image format Pillow reads (its first bytes are {data[:8]!r}); replace or remove the file"
    return f"{exc}; replace or remove the file"


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation of an opened image: 1 (stored upright) to 8; 1 where it has none
    or an invalid one."""
    try:
        orientation = int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except (TypeError, ValueError, OSError, SyntaxError):
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def upright_image_bytes(data: bytes) -> tuple[bytes, int]:
    """Image bytes -> (the image turned upright by its EXIF orientation, orientation).

    An image stored upright (orientation 1, no tag, or undecodable) comes back as the same
    bytes. Otherwise its pixels are transposed and re-encoded without EXIF (JPEG at quality
    95 for a JPEG, else PNG), so a loader that applies the tag (OpenCV, viewers) and one that
    ignores it (PIL, torchvision) see the same pixels.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            orientation = exif_orientation(img)
            if orientation == 1:
                return data, 1
            upright = ImageOps.exif_transpose(img)
            buffer = io.BytesIO()
            if img.format == "JPEG":
                upright.save(buffer, format="JPEG", quality=95)
            else:
                upright.save(buffer, format="PNG")
            return buffer.getvalue(), orientation
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return data, 1


def rgb_pixels(img: Image.Image, upright: bool = False) -> np.ndarray:
    """An opened image's pixels as uint8 RGB [H, W, 3]; with upright, turned by its EXIF
    orientation first.

    A 16-bit greyscale image (a PNG or TIFF of mode I;16, or a PNG that Pillow opens as mode I)
    has its 0..65535 range mapped onto 0..255 (value / 257, rounded), as OpenCV and torchvision
    read it: Pillow's own conversion clips each value to 255, which turns such an image white.
    """
    sixteen_bit = img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG")
    if upright:
        img = ImageOps.exif_transpose(img)
    if sixteen_bit:
        grey = ((np.asarray(img).astype(np.uint32) + 128) // 257).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(img.convert("RGB"))


def decode_image(data: bytes, name: str = "image", max_pixels: int | None = None,
                 upright: bool = False) -> np.ndarray:
    """Encoded image bytes -> uint8 RGB [H, W, 3]; ImageDecodeError names `name` otherwise.

    The stored pixel grid, which annotations (VOC, COCO) and the official code use; with
    upright, turned by the image's EXIF orientation first, as a viewer shows it.
    max_pixels: images with more pixels fail before they are decoded (a decompression bomb
    guard: a small file can declare a huge image); it is also PIL's own limit while decoding.
    """
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageDecodeError(f"{name} is {width} x {height} = {width * height:,} pixels, over the limit of "
                                       f"{max_pixels:,}: shrink the image or raise max_image_pixels in the config")
            return rgb_pixels(img, upright)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot decode {name}: {undecodable_reason(data, exc)}") from exc


def read_image(path: str | Path, upright: bool = False) -> np.ndarray:
    """Image file -> uint8 RGB [H, W, 3] (upright: as `decode_image`)."""
    path = Path(path)
    if path.is_dir():
        raise ImageDecodeError(f"image {path} is a folder: pass one image file (a folder of images is sharded with "
                               "pseudolabel shard-folder, then segmented by pseudolabel run)")
    if not path.is_file():
        raise ImageDecodeError(f"image {path} not found: check the path")
    return decode_image(path.read_bytes(), str(path), upright=upright)


def apply_ignore(labels: np.ndarray, confidence: np.ndarray, ignore_below: float | None) -> np.ndarray:
    """labels with pixels whose confidence is below `ignore_below` set to 255 (None: unchanged)."""
    if ignore_below is None:
        return labels
    return np.where(confidence < ignore_below, np.uint8(IGNORE_INDEX), labels).astype(np.uint8)


def encode_mask(labels: np.ndarray) -> bytes:
    """uint8 labels [H, W] -> 8-bit palette PNG bytes (index values kept)."""
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(_PALETTE.flatten().tolist())
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """PNG bytes of an index mask (mode P or L) -> uint8 [H, W] index values."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode not in ("P", "L"):
            raise ValueError(f"mask PNG has mode {img.mode}; index masks are mode P or L")
        return np.array(img, dtype=np.uint8)


def encode_confidence(confidence: np.ndarray) -> bytes:
    """float [H, W] scores in [0, 1] -> 8-bit grey PNG (value = round(255 * score))."""
    levels = np.clip(np.rint(confidence * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(levels, mode="L").save(buffer, format="PNG", compress_level=CONFIDENCE_PNG_LEVEL)
    return buffer.getvalue()


def decode_confidence(data: bytes) -> np.ndarray:
    """Confidence PNG bytes -> float32 [H, W] in [0, 1] (steps of 1/255)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img, dtype=np.float32) / 255.0


def write_mask(labels: np.ndarray, path: str | Path) -> None:
    Path(path).write_bytes(encode_mask(labels))


def overlay(image: np.ndarray, labels: np.ndarray, ground_truth: np.ndarray | None = None,
            alpha: float = 0.5) -> Image.Image:
    """The picture to look at a mask with: the image blended with the mask colours (background
    and ignore left as the image) | the mask | the ground truth when given. uint8 [H, W, 3] and
    [H, W] label maps in; a PIL image [H, 2W] (or [H, 3W]) out."""
    colours = np.take(_PALETTE, labels, axis=0)
    picture = Image.fromarray(image)
    class_pixels = Image.fromarray(((labels != 0) & (labels != IGNORE_INDEX)).astype(np.uint8) * 255)
    # PIL's blend and composite: a 12-megapixel photo in a fraction of a second (numpy's float blend took 5 s)
    blended = Image.composite(Image.blend(picture, Image.fromarray(colours), alpha), picture, class_pixels)
    panels = [np.asarray(blended), colours] + ([np.take(_PALETTE, ground_truth, axis=0)] if ground_truth is not None else [])
    return Image.fromarray(np.concatenate(panels, axis=1))
