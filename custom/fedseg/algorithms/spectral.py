"""Spectral style transfer (FDA / FedDG style) for pFL-ResFIM (paper 004; DESIGN.md section 5).

Pure code: numpy only, no nvflare (and no torch) import.

Paper 004 publishes only its abstract ("we employ a spectral transfer strategy that generates simulated data
reflecting the domain styles of different clients"). Everything below is therefore *our* choice, modelled on
Fourier Domain Adaptation (FDA, Yang & Soatto 2020) and the amplitude-spectrum exchange of FedDG (Liu et al. 2021).
Every choice is stated here so the documentation can quote it.

Spectrum
--------
Images are real arrays shaped ``(H, W)`` or ``(C, H, W)`` (channels first, one 2-D FFT per channel; a batch axis
is not accepted: call once per image). Computation is in float64.

    F = fft2(x)  (over the last two axes),   A = |F|,   P = angle(F)  (in (-pi, pi]; angle(0) = 0)

:func:`amplitude_spectrum` returns ``(A, P)`` in numpy's natural (unshifted) FFT order, DC at index ``[0, 0]``.

Low-frequency window and beta
-----------------------------
The window lives in the *fftshift-ed* spectrum, where DC sits at ``(cH, cW) = (H // 2, W // 2)`` (numpy's
``fftshift`` puts DC at ``n // 2`` for even and odd ``n``). With

    b = floor(min(H, W) * beta)        (the window half-size; computed as floor(min(H, W) * beta + 1e-9) so that
                                        decimal betas such as 0.29 * 100 give 29, not 28)

the window is rows ``cH - b .. cH + b`` and columns ``cW - b .. cW + b`` (inclusive), i.e. ``(2b + 1) x (2b + 1)``
coefficients: every frequency ``(u, v)`` with ``|u| <= b`` and ``|v| <= b``. beta is the window half-size as a
fraction of the shorter image side and must satisfy ``0 < beta <= 0.5``; anything else is a
:class:`~fedseg.errors.ConfigError`. Edge cases, both allowed and documented:

* ``b = 0`` (``min(H, W) * beta < 1``): the window is the DC coefficient alone (only the mean intensity moves).
* the window is clipped to the array: when ``2b + 1`` exceeds a side (``b = n / 2`` for even ``n``, only possible at
  ``beta = 0.5``) the window covers that whole axis (``n`` coefficients, frequencies ``-n/2 .. n/2 - 1``).

The window's set of frequencies is closed under negation (mod n), so a modification that is Hermitian-symmetric in
the window keeps the spectrum of a real image Hermitian, and the inverse FFT is real up to rounding.
:func:`window_shape` gives the window's shape for an image size and beta.

Style and style bank
--------------------
A *style* is the window of the shifted amplitude, ``(C, h, w)`` for ``(C, H, W)`` images and ``(h, w)`` for
``(H, W)`` images (:func:`low_freq_style`). A *site's style* is the arithmetic mean of its images' styles
(:func:`site_style`; the mean of amplitudes, not the amplitude of a mean image). This is all a site shares through
the server: no image and no phase, only ``(2b + 1)^2`` non-negative numbers per channel.

:class:`StyleBank` keeps one style per site, all for the same ``beta``, the same image size ``(H, W)`` and the same
style shape (same channel count). Mixing sizes is a :class:`~fedseg.errors.DataError` (resize the images to one
size first): the window's meaning depends on ``(H, W)``. ``to_dict()`` serialises the bank as a flat mapping of
numpy arrays (FLARE-friendly, no pickled objects)::

    {"beta": float64 0-d array, "image_size": int64 [H, W] (absent for an empty bank), "style/<site>": float64 style}

``from_dict()`` is the inverse and re-checks everything (the "size check"): known keys only, valid beta, every style
exactly ``window_shape(image_size, beta)`` spatially (so nothing larger than a low-frequency window, e.g. a full
image, can travel as a style), one channel layout for all sites, finite non-negative values.

Transfer
--------
:func:`transfer` (the amplitude swap) with ``lam`` in ``[0, 1]``::

    A_new = A_local                                         outside the window (high frequencies untouched)
    A_new = (1 - lam) * A_local + lam * A_style             inside the window (lam = 1: A_style exactly)
    x_new = real(ifft2(A_new * exp(i * P_local)))           the local phase is kept
    x_new -> float32, shape of the input

``lam = 1`` replaces the window (FDA), ``0 < lam < 1`` interpolates (FedDG's continuous interpolation), ``lam = 0``
returns the input unchanged (cast to float32, no FFT round trip). The style must have exactly the shape of
``low_freq_style(image, beta)`` (same channels, same window); a mismatch is a :class:`~fedseg.errors.DataError`.
The imaginary part of the inverse FFT is dropped; for a style computed from real images it is rounding noise only.

Value range: by default (``clip=False``) there is **no clipping**: the output is the exact inverse FFT, so the
statements above (phase kept, window amplitude = style, high frequencies unchanged) hold up to float32 rounding, and
the output may leave the input's intensity range (it usually does when the DC term changes). With ``clip=True`` the
output is clipped to the input image's own ``[min, max]`` (over all channels together), which breaks the exact
spectral statements wherever clipping is active. Normalise after the transfer as for real images.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from fedseg.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_BETA",
    "StyleBank",
    "amplitude_spectrum",
    "low_freq_style",
    "site_style",
    "transfer",
    "window_half_size",
    "window_shape",
]

DEFAULT_BETA = 0.01  # FDA's smallest recommended window (L = 0.01); a suggestion only, every function takes beta
_STYLE_PREFIX = "style/"


# ---------------------------------------------------------------- checks

def _check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.integer, np.floating)):
        raise ConfigError(f"spectral transfer: beta must be a number in (0, 0.5], got {beta!r}; set e.g. beta=0.01")
    beta = float(beta)
    if not math.isfinite(beta) or not 0.0 < beta <= 0.5:
        raise ConfigError(f"spectral transfer: beta must be in (0, 0.5] (the low-frequency window half-size as a "
                          f"fraction of the shorter image side), got {beta!r}; set e.g. beta=0.01")
    return beta


def _check_lam(lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float, np.integer, np.floating)):
        raise ConfigError(f"spectral transfer: lam must be a number in [0, 1], got {lam!r}")
    lam = float(lam)
    if not math.isfinite(lam) or not 0.0 <= lam <= 1.0:
        raise ConfigError(f"spectral transfer: lam must be in [0, 1] (1 = replace the window, 0 = keep the "
                          f"local amplitude), got {lam!r}")
    return lam


def _as_image(image, name: str = "image") -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise DataError(f"spectral transfer: {name} must be a numeric array, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise DataError(f"spectral transfer: {name} must be real, got complex dtype {arr.dtype}")
    if arr.ndim not in (2, 3):
        raise DataError(f"spectral transfer: {name} must be shaped (H, W) or (C, H, W), got shape {arr.shape}; "
                        "pass one image at a time, channels first")
    if arr.size == 0:
        raise DataError(f"spectral transfer: {name} is empty (shape {arr.shape})")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise DataError(f"spectral transfer: {name} holds {int(arr.size - np.isfinite(arr).sum())} NaN/Inf values")
    return arr


def _check_size(image_size) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ConfigError(f"spectral transfer: image_size must be a pair (H, W), got {image_size!r}") from None
    if h < 1 or w < 1:
        raise ConfigError(f"spectral transfer: image_size must be positive, got {(h, w)}")
    return h, w


# ---------------------------------------------------------------- window geometry

def window_half_size(image_size, beta) -> int:
    """``b = floor(min(H, W) * beta)`` (with a 1e-9 slack against decimal rounding)."""
    h, w = _check_size(image_size)
    beta = _check_beta(beta)
    return math.floor(min(h, w) * beta + 1e-9)


def _window(image_size, beta) -> tuple[slice, slice]:
    h, w = _check_size(image_size)
    b = window_half_size((h, w), beta)
    ch, cw = h // 2, w // 2
    return slice(max(0, ch - b), min(h, ch + b + 1)), slice(max(0, cw - b), min(w, cw + b + 1))


def window_shape(image_size, beta) -> tuple[int, int]:
    """Spatial shape ``(h, w)`` of the low-frequency window: ``(2b + 1, 2b + 1)``, clipped to ``(H, W)``."""
    rows, cols = _window(image_size, beta)
    return rows.stop - rows.start, cols.stop - cols.start


# ---------------------------------------------------------------- spectra and styles

def amplitude_spectrum(image) -> tuple[np.ndarray, np.ndarray]:
    """``(A, P) = (|fft2(x)|, angle(fft2(x)))`` per channel, unshifted (DC at ``[..., 0, 0]``), float64."""
    x = _as_image(image)
    f = np.fft.fft2(x, axes=(-2, -1))
    return np.abs(f), np.angle(f)


def low_freq_style(image, beta) -> np.ndarray:
    """The centred ``(2b+1) x (2b+1)`` window of ``fftshift(|fft2(image)|)``: ``(C, h, w)`` or ``(h, w)``, float64."""
    x = _as_image(image)
    rows, cols = _window(x.shape[-2:], beta)
    amp = np.fft.fftshift(np.abs(np.fft.fft2(x, axes=(-2, -1))), axes=(-2, -1))
    return amp[..., rows, cols].copy()


def site_style(images: Iterable, beta) -> np.ndarray:
    """A site's style: the mean of :func:`low_freq_style` over ``images`` (all of one shape, at least one)."""
    beta = _check_beta(beta)
    total, n, shape = None, 0, None
    for i, image in enumerate(images):
        x = _as_image(image, f"image {i}")
        if shape is None:
            shape = x.shape
        elif x.shape != shape:
            raise DataError(f"spectral style: image {i} has shape {x.shape}, image 0 has {shape}; a site's style "
                            "is a mean over images of one size, resize them first")
        s = low_freq_style(x, beta)
        total = s if total is None else total + s
        n += 1
    if n == 0:
        raise DataError("spectral style: no image was given; a site's style needs at least one image")
    return total / n


def _check_style(style, expected_shape: tuple[int, ...], what: str) -> np.ndarray:
    arr = np.asarray(style)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise DataError(f"spectral transfer: {what} must be a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if tuple(arr.shape) != tuple(expected_shape):
        raise DataError(f"spectral transfer: {what} has shape {tuple(arr.shape)}, expected {tuple(expected_shape)} "
                        "(channels + the low-frequency window of this image size and beta); the style was made "
                        "from images of another size, channel count or beta: resize the images to one size and "
                        "use one beta for every site")
    if not np.isfinite(arr).all():
        raise DataError(f"spectral transfer: {what} holds NaN/Inf values")
    if (arr < 0).any():
        raise DataError(f"spectral transfer: {what} holds negative values; an amplitude spectrum is >= 0")
    return arr


def transfer(image, style, beta, lam: float = 1.0, clip: bool = False) -> np.ndarray:
    """Give ``image`` the low-frequency amplitude ``style``, keeping its own phase; float32, input shape.

    Inside the window ``A <- (1 - lam) A_local + lam A_style``; outside, and the phase everywhere, unchanged.
    ``clip=False`` (default): no clipping; ``clip=True``: clip to the input's ``[min, max]``.
    """
    x = _as_image(image)
    beta = _check_beta(beta)
    lam = _check_lam(lam)
    rows, cols = _window(x.shape[-2:], beta)
    expected = x.shape[:-2] + (rows.stop - rows.start, cols.stop - cols.start)
    style = _check_style(style, expected, "style")
    if lam == 0.0:
        return x.astype(np.float32)
    f = np.fft.fft2(x, axes=(-2, -1))
    amp, phase = np.abs(f), np.angle(f)
    amp = np.fft.fftshift(amp, axes=(-2, -1))
    if lam == 1.0:
        amp[..., rows, cols] = style
    else:
        amp[..., rows, cols] = (1.0 - lam) * amp[..., rows, cols] + lam * style
    amp = np.fft.ifftshift(amp, axes=(-2, -1))
    out = np.real(np.fft.ifft2(amp * np.exp(1j * phase), axes=(-2, -1)))
    if clip:
        out = np.clip(out, x.min(), x.max())
    return out.astype(np.float32)


# ---------------------------------------------------------------- style bank

class StyleBank:
    """One low-frequency amplitude style per site, for one ``beta`` and one image size ``(H, W)``.

    ``StyleBank(beta, image_size=None)``; the image size is fixed by the first ``add_images`` (or given here, which
    ``add_style`` needs). What travels through the server is ``to_dict()``: the styles only, never images.
    """

    def __init__(self, beta, image_size=None):
        self.beta = _check_beta(beta)
        self.image_size = None if image_size is None else _check_size(image_size)
        self._styles: dict[str, np.ndarray] = {}

    # -- content
    @property
    def sites(self) -> list[str]:
        return sorted(self._styles)

    def __len__(self) -> int:
        return len(self._styles)

    def __contains__(self, site) -> bool:
        return str(site) in self._styles

    def __getitem__(self, site) -> np.ndarray:
        return self.style(site)

    def style(self, site) -> np.ndarray:
        """A copy of ``site``'s style."""
        try:
            return self._styles[str(site)].copy()
        except KeyError:
            raise DataError(f"style bank: no style for site {site!r}; the bank holds {self.sites}") from None

    def others(self, site) -> list[str]:
        """The sites (sorted) whose styles ``site`` uses for its style-transferred copies: all but itself."""
        return [s for s in self.sites if s != str(site)]

    @property
    def nbytes(self) -> int:
        """Bytes of style data the bank holds (what a broadcast of ``to_dict()`` carries, apart from 3 scalars)."""
        return sum(s.nbytes for s in self._styles.values())

    # -- adding
    def add_images(self, site, images: Iterable) -> np.ndarray:
        """Compute ``site``'s style (mean low-frequency amplitude over ``images``), store and return it."""
        images = list(images)
        style = site_style(images, self.beta)
        size = tuple(np.asarray(images[0]).shape[-2:])
        if self.image_size is None:
            self.image_size = _check_size(size)
        elif size != self.image_size:
            raise DataError(f"style bank: site {site!r}'s images are {size}, the bank's are {self.image_size}; "
                            "resize every site's images to one size before computing styles")
        self.add_style(site, style)
        return style.copy()

    def add_style(self, site, style) -> None:
        """Store ``site``'s style (replacing an earlier one); checked against the bank's size, beta and channels."""
        if not isinstance(site, str) or not site:
            raise ConfigError(f"style bank: a site name must be a non-empty string, got {site!r}")
        if self.image_size is None:
            raise ConfigError("style bank: the image size is unknown; pass image_size=(H, W) to StyleBank(...) "
                              "or add images first")
        spatial = window_shape(self.image_size, self.beta)
        arr = np.asarray(style)
        if arr.ndim not in (2, 3):
            raise DataError(f"style bank: site {site!r}'s style must be (h, w) or (C, h, w), got shape {arr.shape}")
        expected = arr.shape[:-2] + spatial
        others = [s for name, s in self._styles.items() if name != site]
        if others and others[0].shape[:-2] != arr.shape[:-2]:
            raise DataError(f"style bank: site {site!r}'s style has channel layout {arr.shape[:-2]}, the bank's "
                            f"styles have {others[0].shape[:-2]}; every site needs the same channels")
        self._styles[site] = _check_style(arr, expected, f"site {site!r}'s style").copy()

    # -- use
    def transfer(self, image, site, lam: float = 1.0, clip: bool = False) -> np.ndarray:
        """:func:`transfer` of ``image`` to ``site``'s style (the image must have the bank's size)."""
        x = _as_image(image)
        if self.image_size is not None and tuple(x.shape[-2:]) != self.image_size:
            raise DataError(f"style bank: the image is {tuple(x.shape[-2:])}, the bank's styles are for "
                            f"{self.image_size}; resize it first")
        return transfer(x, self.style(site), self.beta, lam=lam, clip=clip)

    # -- serialisation
    def to_dict(self) -> dict[str, np.ndarray]:
        out = {"beta": np.array(self.beta, dtype=np.float64)}
        if self.image_size is not None:
            out["image_size"] = np.array(self.image_size, dtype=np.int64)
        for site in self.sites:
            out[_STYLE_PREFIX + site] = self._styles[site].copy()
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> StyleBank:
        if not isinstance(data, Mapping) or "beta" not in data:
            raise DataError("style bank: expected a mapping with 'beta', 'image_size' and 'style/<site>' arrays "
                            "(StyleBank.to_dict())")
        unknown = sorted(k for k in data if k not in ("beta", "image_size") and not
                         (isinstance(k, str) and k.startswith(_STYLE_PREFIX) and len(k) > len(_STYLE_PREFIX)))
        if unknown:
            raise DataError(f"style bank: unknown keys {unknown[:5]}; a bank holds only 'beta', 'image_size' and "
                            "'style/<site>'")
        beta = np.asarray(data["beta"])
        if beta.size != 1:
            raise DataError(f"style bank: 'beta' must be a scalar, got shape {beta.shape}")
        styles = {k[len(_STYLE_PREFIX):]: v for k, v in data.items() if k.startswith(_STYLE_PREFIX)}
        size = None
        if "image_size" in data:
            size_arr = np.asarray(data["image_size"])
            if size_arr.shape != (2,) or not np.issubdtype(size_arr.dtype, np.integer):
                raise DataError(f"style bank: 'image_size' must be two integers [H, W], got {size_arr!r}")
            size = tuple(int(v) for v in size_arr)
        elif styles:
            raise DataError("style bank: 'image_size' is missing but the bank holds styles")
        bank = cls(float(beta.reshape(())), image_size=size)
        for site in sorted(styles):
            bank.add_style(site, styles[site])
        return bank
