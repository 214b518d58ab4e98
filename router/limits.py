"""Bounds on what one API request may ask of the server, with safe defaults."""

from __future__ import annotations

from dataclasses import dataclass

REMOTE_IMAGE_MODES = ("off", "allowlist", "any")


@dataclass(frozen=True)
class ApiLimits:
    """Limits the HTTP layer enforces before a request reaches the backend.

    remote_images: "off" refuses http(s) image URLs; "allowlist" fetches only from
    `allowed_domains` (exact domain or a subdomain of one); "any" fetches from any host,
    which lets clients make the server reach internal addresses: use it only on trusted
    networks. max_tokens_cap clamps `max_tokens` (a request without one gets the cap).
    """

    max_body_bytes: int = 32 * 1024 * 1024      # room for several base64 images
    max_images_per_request: int = 8
    max_image_pixels: int = 4096 * 4096         # larger headers are decompression bombs
    remote_images: str = "off"
    allowed_domains: tuple[str, ...] = ()
    fetch_timeout_s: float = 10.0
    fetch_max_bytes: int = 20 * 1024 * 1024
    max_tokens_cap: int | None = None

    def __post_init__(self) -> None:
        if self.remote_images not in REMOTE_IMAGE_MODES:
            raise ValueError(f"remote_images must be one of {REMOTE_IMAGE_MODES}, "
                             f"got {self.remote_images!r}")
        if isinstance(self.allowed_domains, str):
            raise ValueError("allowed_domains must be a tuple of domains, not a string")
        # Domains compare case-insensitively and without a trailing dot.
        object.__setattr__(self, "allowed_domains",
                           tuple(d.lower().strip(".") for d in self.allowed_domains if d))
        if self.remote_images == "allowlist" and not self.allowed_domains:
            raise ValueError("remote_images='allowlist' needs allowed_domains")
        for name in ("max_body_bytes", "max_image_pixels", "fetch_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_images_per_request < 0:
            raise ValueError(f"max_images_per_request must be >= 0, "
                             f"got {self.max_images_per_request}")
        if self.fetch_timeout_s <= 0:
            raise ValueError(f"fetch_timeout_s must be > 0, got {self.fetch_timeout_s}")
        if self.max_tokens_cap is not None and self.max_tokens_cap < 1:
            raise ValueError(f"max_tokens_cap must be None or >= 1, got {self.max_tokens_cap}")

    def domain_allowed(self, host: str) -> bool:
        """Whether `remote_images` lets the server fetch from `host`."""
        if self.remote_images == "any":
            return True
        if self.remote_images == "off":
            return False
        host = host.lower().strip(".")
        return any(host == d or host.endswith("." + d) for d in self.allowed_domains)
