"""Image references in API requests -> checked, encoded image bytes.

A reference is an OpenAI `image_url` value: a `data:` URL carrying base64, or an
http(s) URL that is fetched only as `ApiLimits` allows (host allowlist, size and time
bounds, every redirect hop re-checked). The bytes are only verified here (header, pixel
count, container integrity); the encode worker decodes them for real.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import warnings

import aiohttp
from PIL import Image
from yarl import URL

from router.backend import ApiError
from router.limits import ApiLimits

_MAX_REDIRECTS = 5
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024
_WHITESPACE = str.maketrans("", "", " \t\r\n")


def image_url_of(ref: object, param: str) -> str:
    """The URL string of an `image_url` part, its `image_url` value, or a bare string."""
    if isinstance(ref, dict):
        inner = ref.get("image_url", ref)
        ref = inner.get("url") if isinstance(inner, dict) else inner
    if not isinstance(ref, str) or not ref:
        raise ApiError(400, f"{param}: image_url must be a non-empty URL string "
                            f"or {{\"url\": ...}}", param=param)
    return ref


def decode_data_url(url: str, index: int, param: str) -> bytes:
    """The payload of a base64 `data:` URL; 400 naming the part when malformed."""
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep:
        raise ApiError(400, f"{param}: image {index} is a malformed data URL (no ',')",
                       param=param)
    if not header.lower().endswith(";base64"):
        raise ApiError(400, f"{param}: image {index} data URL must be base64-encoded "
                            f"(data:<type>;base64,...)", param=param)
    # Clients wrap lines or drop the padding; anything else off-alphabet is an error.
    payload = payload.translate(_WHITESPACE)
    payload += "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{param}: image {index} is not valid base64: {e}",
                       param=param) from None


def check_image(data: bytes, limits: ApiLimits, index: int, param: str) -> None:
    """Raise a 400 unless `data` is an image PIL can open within `max_image_pixels`.

    The size is read from the header before any pixel data, so a small file that
    claims a huge canvas (a decompression bomb) is refused without decoding it.
    """
    def fail(reason: object) -> ApiError:
        return ApiError(400, f"image {index} could not be decoded: {reason}", param=param)

    try:
        # PIL warns between its own limit and twice it; ours is the one that counts.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > limits.max_image_pixels:
                    raise fail(f"{width}x{height} is {width * height} pixels, more than "
                               f"the limit of {limits.max_image_pixels}")
                if width < 1 or height < 1:
                    raise fail(f"empty image ({width}x{height})")
                img.verify()
    except ApiError:
        raise
    except Image.DecompressionBombError as e:
        raise fail(e) from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        raise fail(e or type(e).__name__) from None


class ImageResolver:
    """Resolves image references of one server; owns the HTTP client used to fetch.

    Call `close()` when the server stops (the session is created on first fetch).
    """

    def __init__(self, limits: ApiLimits):
        self.limits = limits
        self._session: aiohttp.ClientSession | None = None

    async def resolve(self, ref: object, index: int, param: str) -> bytes:
        """Checked image bytes for the `index`-th image of a request, found at `param`."""
        url = image_url_of(ref, param)
        if url[:5].lower() == "data:":
            data = decode_data_url(url, index, param)
        else:
            data = await self._fetch(url, index, param)
        check_image(data, self.limits, index, param)
        return data

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _fetch(self, url: str, index: int, param: str) -> bytes:
        def fail(reason: str) -> ApiError:
            return ApiError(400, f"{param}: image {index}: {reason}", param=param)

        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme not in ("http", "https"):
            raise fail(f"unsupported image URL scheme {scheme!r} "
                       f"(use a base64 data: URL or http(s))")
        if self.limits.remote_images == "off":
            raise fail("remote image URLs are disabled on this server "
                       "(send the image as a base64 data: URL)")
        if self._session is None:
            # No cookies, no proxy settings from the environment: fetches are anonymous.
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                                  trust_env=False)
        try:
            async with asyncio.timeout(self.limits.fetch_timeout_s):
                return await self._fetch_hops(URL(url), fail)
        except TimeoutError:
            raise fail(f"fetching the image timed out after "
                       f"{self.limits.fetch_timeout_s:g} s") from None
        except (aiohttp.ClientError, ValueError) as e:
            raise fail(f"fetching the image failed: {e or type(e).__name__}") from None

    async def _fetch_hops(self, url: URL, fail) -> bytes:
        # Redirects are followed by hand so that every hop's scheme and host is checked.
        for _ in range(_MAX_REDIRECTS + 1):
            if url.scheme not in ("http", "https") or not url.host:
                raise fail(f"refusing to fetch {str(url)[:200]!r}")
            if not self.limits.domain_allowed(url.host):
                raise fail(f"host {url.host!r} is not in this server's allowed image domains")
            async with self._session.get(url, allow_redirects=False) as resp:
                if resp.status in _REDIRECT_STATUSES and "Location" in resp.headers:
                    url = url.join(URL(resp.headers["Location"]))
                    continue
                if resp.status != 200:
                    raise fail(f"fetching the image failed: HTTP {resp.status}")
                limit = self.limits.fetch_max_bytes
                if resp.content_length is not None and resp.content_length > limit:
                    raise fail(f"image is {resp.content_length} bytes, more than the limit "
                               f"of {limit} bytes")
                data = bytearray()
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    data += chunk
                    if len(data) > limit:
                        raise fail(f"image is more than the limit of {limit} bytes")
                return bytes(data)
        raise fail(f"more than {_MAX_REDIRECTS} redirects")
